"""All-or-nothing writes (neuqi_export/atomic.py)."""
from pathlib import Path

import pytest

from neuqi_export.atomic import atomic_file


def test_atomic_file_replaces_on_success_and_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "sub" / "model.gguf"
    with atomic_file(out) as tmp:
        assert tmp.parent == out.parent and tmp != out and not out.exists()
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new"
    with pytest.raises(RuntimeError):
        with atomic_file(out) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert out.read_bytes() == b"new" and sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]


def test_second_run_on_one_output_stops_in_one_line(tmp_path, capsys):
    """A run holding the output's lock (another process) makes a second run stop at once, exit 2, nothing written;
    once the holder is killed (SIGKILL) the lock is free again."""
    import subprocess
    import sys
    import time

    from neuqi_export.cli import main

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys,time; sys.path.insert(0, sys.argv[1]);"
                               "from neuqi_export.atomic import output_lock\n"
                               "with output_lock(sys.argv[2]):\n print('held', flush=True); time.sleep(60)",
                               str(Path(__file__).resolve().parents[2]), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = main(["export", str(tmp_path / "no-master"), "--to", "gguf", "-o", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and "another neuqi-export run is writing" in err, err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    from neuqi_export.atomic import output_lock

    t0 = time.time()
    with output_lock(out):  # released by the kernel with the killed process
        pass
    assert time.time() - t0 < 5 and not (tmp_path / "out.lock").exists()


def test_lock_holder_sweeps_the_temporaries_of_dead_runs_on_its_output_only(tmp_path):
    """A SIGKILLed run leaves `.out.<pid>.tmp` / `.out.<pid>.<8 chars>`; the next run on `out`, once it holds the
    lock, removes those of dead processes, and nothing of a live process or of another output."""
    import os
    import subprocess
    import sys

    from neuqi_export.atomic import output_lock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = os.getppid()
    names = {f".out.{dead.pid}.tmp": True, f".out.{dead.pid}.ab_c9xyz": True, f".out.{live}.tmp": False,
             f".out.gguf.{dead.pid}.tmp": False, f".other.{dead.pid}.tmp": False, ".out.notapid.tmp": False}
    for n in names:
        (tmp_path / n).mkdir() if n.endswith("xyz") else (tmp_path / n).write_bytes(b"x")
    (tmp_path / f".out.{dead.pid}.ab_c9xyz" / "shard").write_bytes(b"y")
    with output_lock(tmp_path / "out"):
        left = {p.name for p in tmp_path.iterdir()}
    assert left == {n for n, swept in names.items() if not swept} | {"out.lock"}
