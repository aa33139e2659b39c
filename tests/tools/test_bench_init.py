"""tools/bench_init.py end to end on a few rows (CPU): the report's rows, loss ratios and extrapolation marks."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_init", ROOT / "tools" / "bench_init.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(text):
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| layer")]


def test_layer_and_model_rows(bench, tmp_path):
    out = tmp_path / "b.md"
    assert bench.main(["--device", "cpu", "--rows", "2", "--shapes", "4096x4096", "llama2-7b-model", "--blocks", "2",
                       "--ref-blocks", "1", "--bits", "2", "--methods", "neuqi_int", "minmax", "--impls", "reference",
                       "auto", "--repeats", "1", "--threads", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "python tools/bench_init.py" in text and "ran on the first 1 block(s) only" in text
    rows = _rows(text)
    layer = {(r[0], r[2], r[3]): r for r in rows}
    assert set(layer) == {(s, m, i) for s in ("4096x4096", "llama2-7b-model")
                          for m, i in (("neuqi_int", "reference"), ("neuqi_int", "auto"), ("minmax", "-"))}
    for r in rows:
        assert r[10].startswith("~")  # 2 rows timed: every full-layer / whole-model time is extrapolated
    auto = layer[("4096x4096", "neuqi_int", "auto")]
    assert auto[5] == str(2 * 32)
    total, worst = (float(v) for v in auto[11].split(";"))
    assert total <= 1 + 1e-6 and worst <= 1 + 1e-5  # the kernel is never worse than the torch path
    model_ref, model_auto = layer[("llama2-7b-model", "neuqi_int", "reference")], layer[("llama2-7b-model", "neuqi_int", "auto")]
    assert int(model_auto[5]) == 2 * int(model_ref[5]) == 2 * 2 * (4 * 32 + 2 * 32 + 86)  # 2 blocks vs 1
    assert float(model_auto[11].split(";")[0]) <= 1 + 1e-6


def test_bad_impl_is_a_usage_error(bench, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--impls", "triton:3x4"])
    assert e.value.code == 2
    assert "powers of two" in capsys.readouterr().err
