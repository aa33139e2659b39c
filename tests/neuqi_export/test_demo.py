"""The demo end to end on a tiny model (every registered format, every runtime), and its table/plot/report."""
import json
import math

import pytest

from neuqi_export.cli import main
from neuqi_export.cli.demo import DemoOptions, DemoResult, Row, format_table, plot, run_demo, write_report
from neuqi_export.errors import UserError


@pytest.fixture(scope="module")
def texts(real_assets):
    from neuqi_export.data import read_text

    return read_text(real_assets.calib_text)[:20000], read_text(real_assets.eval_text)[:20000]


def test_demo_on_a_tiny_model_scores_every_format(tiny_llama_dir, texts, tmp_path, capsys):
    from converters.registry import load_all

    opts = DemoOptions(out=tmp_path / "demo", group_size=32, nsamples=2, seqlen=64, eval_windows=2, decode_tokens=4,
                       progress=False)
    res = run_demo(opts, model_dir=tiny_llama_dir, calib_text=texts[0], eval_text=texts[1])
    formats = sorted(load_all())
    assert {"gguf", "onnx", "mlx", "compressed-tensors"} <= set(formats)
    # the formats whose `convert` quantizes otherwise get their own master (MLX: an 8-bit head; compressed-tensors:
    # integer zero-points), each scored as a row
    own = {"mlx": "master (--init neuqi --lm-head-bits 8)", "compressed-tensors": "master (--init neuqi_int)"}
    assert [r.format for r in res.rows] == ["original (fp32)", "master (exact)", *sorted(own.values()), *formats]
    by = {r.format: r for r in res.rows}
    assert not [r.error for r in res.rows if r.error]
    assert by["gguf"].runtime == "llamacpp" and by["onnx"].runtime == "onnxruntime" and by["mlx"].runtime == "mlx"
    for r in res.rows:
        assert math.isfinite(r.ppl) and r.score_tps > 0 and r.decode_tps > 0 and r.bytes > 0
    assert 30 < by["original (fp32)"].bits_per_weight < 34 and all(r.windows == 2 for r in res.rows)
    for f in formats:  # every export is its master up to its storage / activation precision
        master_ppl = by[own.get(f, "master (exact)")].ppl
        assert abs(by[f].ppl / master_ppl - 1) < 0.05, f
    ct, ct_master = by["compressed-tensors"], by[own["compressed-tensors"]]
    # exact: every linear holds its master's values (the one refit is the embedding, stored in half precision)
    assert abs(ct.ppl / ct_master.ppl - 1) < 1e-4 and "14 tensors exact, 1 refit" in ct.note
    assert by[own["mlx"]].bytes < by["master (exact)"].bytes  # the 8-bit head is smaller than the float one
    out = capsys.readouterr().out
    assert "calibration 2×64 tokens, evaluation 2×64 tokens" in out and "| gguf | llamacpp |" in out
    report = (tmp_path / "demo" / "REPORT.md").read_text()
    assert "2 windows × 64 tokens" in report and "demo.png" in report
    assert (tmp_path / "demo" / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((tmp_path / "demo" / "results.json").read_text())["rows"]) == len(res.rows)
    with pytest.raises(UserError, match="not empty"):
        run_demo(opts, model_dir=tiny_llama_dir, calib_text=texts[0], eval_text=texts[1])


def test_table_plot_and_report_show_failures(tmp_path):
    rows = [Row("master (exact)", "transformers", "m", bytes=2**20, bits_per_weight=3.5, ppl=25.0, score_tps=900,
                decode_tps=20.0),
            Row("gguf", "llamacpp", "m.gguf", bytes=3 * 2**20, bits_per_weight=4.6, ppl=25.3, score_tps=1500,
                decode_tps=float("nan"), windows=8),
            Row("onnx", "?", "onnx", error="export: boom")]
    table = format_table(rows)
    assert table.count("\n") == 4 and "| gguf | llamacpp | 4.60 | 3.0 | 8 | 25.30 | 1500 | - |" in table
    assert "FAILED: export: boom" in table
    assert plot(rows, tmp_path / "p.png", "t").stat().st_size > 1000
    settings = dict(model="M", bits=3, group_size=128, nsamples=1, seqlen=8, eval_windows=1, eval_tokens=7,
                    decode_tokens=4, machine="x", score_budget_s=9)
    text = write_report(DemoResult(rows, settings, 60.0), tmp_path, "neuqi-export demo").read_text()
    assert "1 windows × 8 tokens" in text and "FAILED" in text and "Wall time 1.0 min" in text
    assert "at most 9 s" in text


def test_cli_demo_rejects_unknown_formats(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "d"), "--formats", "nope", "--quiet"]) == 2
    assert "unknown format(s) nope" in capsys.readouterr().err


def test_a_slow_runtime_is_scored_on_the_leading_windows_within_its_budget():
    import numpy as np
    import torch

    from neuqi_export.cli.demo import ppl_of, score

    class Slow:
        name = "slow"

        @staticmethod
        def load(path):
            class S:
                def logits(self, ids):
                    import time
                    time.sleep(0.05)
                    return np.zeros((*ids.shape, 10), dtype=np.float32)

                def generate(self, ids, n):
                    return [0] * n
            return S()

    windows = torch.randint(0, 10, (20, 16))
    r = score(Slow, "x", windows, decode_tokens=3, progress=False, budget_s=0.12)
    assert 1 <= r["windows"] < 20 and len(r["nll"]) == r["windows"]
    assert r["ppl"] == pytest.approx(10.0) and ppl_of(r["nll"], 16, 1) == pytest.approx(10.0)
