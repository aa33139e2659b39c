"""CI-sized kill trials (issue 23 item 2, tools/fuzz/kill.py): quantize, export and distill SIGKILLed at their most
fragile point and at a seeded random point; the rerun resumes and writes files byte-identical to an uninterrupted
run's, leaving no temporary, lock or `<out>.partial` behind. The full set (every format, more trials) is in
docs/RELIABILITY.md."""
from __future__ import annotations

import pytest

from tools.fuzz.kill import commands, probe, reference, run_trials, trial

# what the kill must have left for the rerun to resume from (so the trial exercises the resume, not a restart)
LEFT = {"quantize": "partial: 1 block", "export gguf": "1 temp", "export onnx": "1 temp", "distill": "train state"}


@pytest.mark.parametrize("name", list(LEFT))
def test_killed_at_its_fragile_point_reruns_to_identical_files(name, fuzz_bases, tmp_path):
    cmd = commands(fuzz_bases, quick=True)[name]
    want, seconds, start = reference(cmd, tmp_path / "ref")
    assert 0 < start < seconds
    t = trial(cmd, tmp_path / "trial", want, (start, seconds), None, when=probe(name))
    assert LEFT[name] in t["after_kill"][0], t
    assert t["rerun_rc"] == 0 and t["identical"], t
    assert t["ok"], t  # nothing left: the rerun swept the killed run's temporary


def test_seeded_random_kills(fuzz_bases, tmp_path):
    rows = run_trials(fuzz_bases, tmp_path, 2, seed=1, names={"export onnx"}, quick=True, log=lambda s: None)
    assert [len(r["trials"]) for r in rows] == [3]
    assert all(t["ok"] for t in rows[0]["trials"]), rows
    again = run_trials(fuzz_bases, tmp_path, 2, seed=1, names={"export onnx"}, quick=True, log=lambda s: None)
    assert [t["fractions"] for t in again[0]["trials"]] == [t["fractions"] for t in rows[0]["trials"]]  # seeded
