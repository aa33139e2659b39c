"""StageTimer charges every second to exactly one (the innermost) stage."""
import json
import time

from neuqi_export.data import read_text
from neuqi_export.pipeline import TIMING_FILE, QuantizeOptions, quantize_model
from neuqi_export.timing import StageTimer


def test_nested_stages_are_exclusive_and_add_up_to_the_wall_time():
    t = StageTimer()
    with t.stage("forward"):
        time.sleep(0.05)
        with t.stage("hessian"):
            time.sleep(0.05)
        time.sleep(0.02)
    with t.stage("forward"):  # re-entered: accumulates
        time.sleep(0.01)
    s = t.ordered()
    assert 0.075 <= s["forward"] < 0.2 and 0.045 <= s["hessian"] < 0.15
    assert abs(sum(s.values()) - t.total()) < 1e-3  # "other" is the untimed rest (read an instant apart)
    assert t.report().startswith("time: ") and "total" in t.report()


def test_known_stages_come_first_in_report_order():
    t = StageTimer()
    for name in ("zzz", "gptq", "load"):
        with t.stage(name):
            pass
    assert list(t.ordered()) == ["load", "gptq", "zzz", "other"]


def test_the_master_records_the_time_per_stage(tiny_llama_dir, tmp_path, real_assets):
    opts = QuantizeOptions(bits=4, group_size=32, init="neuqi", gptq=True, nsamples=2, seqlen=32)
    summary = quantize_model(tiny_llama_dir, tmp_path / "m", opts, calib_text=read_text(real_assets.calib_text), progress=False)
    t = json.loads((tmp_path / "m" / TIMING_FILE).read_text())
    assert {"load", "calibration forward", "hessian", "fit", "gptq", "write"} <= set(t["seconds"])
    assert abs(sum(t["seconds"].values()) - t["total"]) < 0.05 * t["total"] + 0.01
    assert summary.timing.startswith("time: ") and summary.timing.endswith(f"total {summary.seconds:.1f} s")
