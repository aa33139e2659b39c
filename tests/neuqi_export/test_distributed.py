"""Quantizing across processes (torch.distributed, gloo): 2 processes give the master one process gives, to the
sha256 of every tensor; the CLI's --nproc; a rank that dies or hangs stops the run, and the rerun resumes."""
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neuqi_export import distributed
from neuqi_export.cli.launch import _free_port, without_nproc, worker_env
from neuqi_export.master_store import tensor_digests
from neuqi_export.pipeline import QuantizeOptions, quantize_model
from neuqi_export.data import read_text
from neuqi_export.hessian import HessianAccumulator

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_worker.py")
BASE = dict(bits=3, group_size=32, init="neuqi", nsamples=5, seqlen=48)  # 5 windows: rank 0 gets 3, rank 1 gets 2


def _env(extra: dict) -> dict:
    env = dict(extra, PYTHONPATH=os.pathsep.join([str(ROOT), extra.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    return env


def _ranks(jobs: list, tmp: Path, n: int = 2, timeout_env: str = "60", wait: float = 240) -> list:
    """Run dist_worker.py as n gloo ranks over `jobs`; [(rc, stdout, stderr, seconds)] per rank."""
    spec = tmp / f"jobs-{time.monotonic_ns()}.json"
    spec.write_text(json.dumps(jobs))
    port = _free_port()
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env(dict(worker_env(r, n, port), NEUQI_TEST_TIMEOUT=timeout_env)))
             for r in range(n)]
    out = []
    for p in procs:  # rank 0 first; once it failed, the others get a few seconds (a hung one is then killed)
        try:
            so, se = p.communicate(timeout=wait if not out or out[0][0] == 0 else 5)
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = p.communicate()
        out.append((p.returncode, so, se, time.monotonic() - t0))
    return out


_REFS: dict = {}


def _reference(model_dir, out, opts, calib, with_h: bool = False):
    """sha256 of every tensor of the master one process writes (made once per model and options); with_h: also the
    sha256 of every damped H it collected, in order."""
    key = (str(model_dir), json.dumps(opts, sort_keys=True), calib)
    if key not in _REFS:
        text = read_text(calib) if opts.get("calibrate", True) else None
        hashes, damped = [], HessianAccumulator.damped

        def recorded(self, percdamp=0.01):
            H = damped(self, percdamp)
            hashes.append(hashlib.sha256(H.numpy().tobytes()).hexdigest())
            return H

        HessianAccumulator.damped = recorded
        try:
            quantize_model(model_dir, out, QuantizeOptions(**opts), calib_text=text, progress=False)
        finally:
            HessianAccumulator.damped = damped
        _REFS[key] = tensor_digests(out), hashes
    return _REFS[key] if with_h else _REFS[key][0]


@pytest.fixture(scope="module")
def calib_file(real_assets, tmp_path_factory):
    """The calibration text's first 30 kB: tokenizing all 5 MB would be most of each tiny run."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(read_text(real_assets.calib_text)[:30000])
    return str(path)


def test_two_processes_write_the_master_one_process_writes(tiny_llama_dir, tiny_qwen2_dir, tmp_path, calib_file):
    # the qwen2 + GPTQ case quantizes its (untied) head too: its H is collected from both ranks' windows
    cases = [(d, dict(gptq=g, lm_head_bits=4 if g and d == tiny_qwen2_dir else None))
             for d in (tiny_llama_dir, tiny_qwen2_dir) for g in (False, True)]
    cases.append((tiny_llama_dir, dict(gptq=False, lm_head_bits=None, calibrate=False)))  # data-free: no H at all
    jobs = [{"model": str(d), "out": str(tmp_path / f"dist{i}"), "calib": calib_file, "opts": dict(BASE, **o)}
            for i, (d, o) in enumerate(cases)]
    res = _ranks(jobs, tmp_path)
    assert [r[0] for r in res] == [0, 0], [r[2][-2000:] for r in res]
    reports = [[json.loads(line) for line in r[1].splitlines() if line.startswith("{")] for r in res]
    for i, (d, g) in enumerate(cases):
        ref, ref_h = _reference(d, tmp_path / f"one{i}", dict(BASE, **g), calib_file, with_h=True)
        got = tensor_digests(tmp_path / f"dist{i}")
        assert got == ref, (d.name, g, sorted(k for k in ref if got.get(k) != ref[k])[:5])
        assert not (tmp_path / f"dist{i}.partial").exists()
        # every H an owner collected is the single process's, bit for bit (the master alone would not show an H
        # that differs in its last bits: a tiny model's codes come out the same), and each subset had an owner
        h0, h1 = reports[0][i]["H"], reports[1][i]["H"]
        assert len(h0) == len(h1) == len(ref_h) == (8 + bool(g["lm_head_bits"])) * g.get("calibrate", True)
        for k, want in enumerate(ref_h):
            assert {h0[k], h1[k]} - {None} == {want}, (d.name, g, k)
        assert None in h0 + h1 or not g.get("calibrate", True)  # some rank owned none of a subset: work was split
        # every rank reports the same losses (it set the same quantized weights; the head is rank 0's alone)
        assert (reports[0][i]["hessian_loss"] == reports[1][i]["hessian_loss"]) != bool(g["lm_head_bits"])


def test_cli_nproc_2_and_torchrun_match_one_process(tiny_llama_dir, tmp_path, calib_file):
    ref = _reference(tiny_llama_dir, tmp_path / "one", dict(BASE, gptq=True), calib_file)
    args = ["quantize", str(tiny_llama_dir), "--bits", "3", "--group-size", "32", "--gptq", "--nsamples", "5",
            "--seqlen", "48", "--calib", calib_file, "--device", "cpu", "--quiet"]
    for how, out, cmd in (
            ("--nproc", tmp_path / "a", ["-m", "neuqi_export", *args, "-o", str(tmp_path / "a"), "--nproc", "2"]),
            ("torchrun", tmp_path / "b", ["-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "neuqi_export",
                                          *args, "-o", str(tmp_path / "b")])):
        p = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=_env(dict(os.environ)),
                           timeout=240)
        assert p.returncode == 0, (how, p.stderr[-2000:])
        assert p.stdout.count("wrote") == 1 and "(2 processes)" in p.stdout, (how, p.stdout)
        assert tensor_digests(out) == ref, how


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_rank_that_dies_or_hangs_stops_the_run_and_the_rerun_resumes(tiny_llama_dir, tmp_path, calib_file, how):
    opts = dict(BASE, gptq=True)
    job = {"model": str(tiny_llama_dir), "out": str(tmp_path / "m"), "calib": calib_file, "opts": opts,
           "die_at": [1, 1, how]}  # rank 1 at the start of block 1 (block 0 is finished and saved)
    res = _ranks([job], tmp_path, timeout_env="5", wait=90)
    rc0, _, err0, secs = res[0]
    assert rc0 == 2, err0[-2000:]
    lines = [ln for ln in err0.splitlines() if ln.startswith("neuqi-export: error:")]
    cause = "rank 1 died" if how == "kill" else "rank 1 hung (it never reached this step"
    assert len(lines) == 1 and lines[0].startswith(f"neuqi-export: error: rank 0 of 2: {cause}"), err0[-2000:]
    assert secs < 60  # the hang: the 5 s timeout, not the worker's 3600 s sleep
    partial = tmp_path / "m.partial"
    assert any(partial.glob("*-00001-of-*.safetensors.json")), sorted(p.name for p in partial.iterdir())
    assert not (tmp_path / "m").exists()
    if how == "kill":  # resumed by 2 processes (rank 0 reads block 0 and sends it to rank 1)
        del job["die_at"]
        res = _ranks([job], tmp_path)
        assert [r[0] for r in res] == [0, 0], [r[2][-2000:] for r in res]
        assert [json.loads(r[1].splitlines()[-1])["resumed"] for r in res] == [1, 1]
    else:  # by one
        s = quantize_model(tiny_llama_dir, tmp_path / "m", QuantizeOptions(**opts), calib_text=read_text(calib_file),
                           progress=False)
        assert s.resumed_blocks == 1
    assert tensor_digests(tmp_path / "m") == _reference(tiny_llama_dir, tmp_path / "ref", opts, calib_file)
    assert not partial.exists()


def test_the_launcher_stops_the_others_when_a_rank_dies_in_one_line(monkeypatch, capsys):
    from neuqi_export.cli.launch import launch

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")]))
    t0 = time.monotonic()
    assert launch(["quantize", "--nproc", "3"], 3, "/x/m", module="dist_die") == 1
    assert time.monotonic() - t0 < 20  # not the others' 60 s
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["neuqi-export: error: rank 1 of 3 was killed by SIGKILL; stopped the other 2; finished blocks "
                   "stay in /x/m.partial: rerun the same command to resume"]


def test_owner_plan_balances_each_subset_by_out_times_in():
    plan = distributed.OwnerPlan(distributed.World(0, 2))
    qkv = plan.assign({"q": 64 * 64, "k": 32 * 64, "v": 32 * 64})
    assert qkv == {"q": 0, "k": 1, "v": 1}
    assert plan.assign({"o": 64 * 64}) == {"o": 0}  # both at 4096: the tie goes to the lower rank
    assert plan.assign({"gate": 128 * 64, "up": 128 * 64}) == {"gate": 1, "up": 0}  # rank 1 was behind
    assert plan.assign({"down": 64 * 128}) == {"down": 1}  # rank 0 carries more of the block so far
    alone = distributed.OwnerPlan(distributed.SINGLE)
    assert set(alone.assign({"q": 1, "k": 2}).values()) == {0}


def test_windows_and_argv_helpers():
    assert distributed.my_windows(distributed.World(1, 3), 8) == [1, 4, 7]
    assert without_nproc(["quantize", "m", "--nproc", "2", "-o", "x"]) == ["quantize", "m", "-o", "x"]
    assert without_nproc(["quantize", "--nproc=4", "m"]) == ["quantize", "m"]


def test_too_few_windows_for_the_processes_is_one_line():
    from neuqi_export.errors import UserError

    with pytest.raises(UserError, match="--nsamples 1 is below the 2 processes"):
        distributed.check_supported(distributed.World(0, 2), type("F", (), {"experts": None})(),
                                    QuantizeOptions(nsamples=1))


def test_under_torchrun_other_commands_and_a_nested_nproc_are_one_line(monkeypatch, capsys, tmp_path):
    from neuqi_export.cli.main import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["export", str(tmp_path / "m"), "--to", "gguf", "-o", str(tmp_path / "g")]) == 2
    assert capsys.readouterr().err.strip() == (
        "neuqi-export: error: `export` does not run across processes yet (WORLD_SIZE=2); run it in one process "
        "(quantize with torchrun, then export)")
    assert main(["quantize", str(tmp_path / "m"), "-o", str(tmp_path / "q"), "--nproc", "2"]) == 2
    assert "--nproc inside a torchrun" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "2")
    assert main(["quantize", str(tmp_path / "m"), "-o", str(tmp_path / "q")]) == 2
    assert "RANK=2 is not in [0, WORLD_SIZE=2)" in capsys.readouterr().err
    assert not (tmp_path / "g").exists() and not (tmp_path / "q").exists()
