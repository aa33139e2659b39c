"""tools/cells.py, the cached cell every comparison tool uses: hit, miss, atomic write, a corrupt file, check."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tools.cells import Cells  # noqa: E402


def test_miss_computes_writes_and_prints_then_hit_reads(tmp_path, capsys):
    cells = Cells(tmp_path, ".e4x256")
    calls = []

    def compute():
        calls.append(1)
        return {"ppl": 12.5, "nll": [1, 2]}

    assert cells.get("b3_g128", compute) == {"ppl": 12.5, "nll": [1, 2]}
    f = tmp_path / "b3_g128.e4x256.json"
    assert cells.path("b3_g128") == f
    assert f.read_text() == json.dumps({"ppl": 12.5, "nll": [1, 2]})  # the tools' format: one line, no newline
    assert capsys.readouterr().out == "b3_g128 {'ppl': 12.5, 'nll': [1, 2]}\n"
    assert [p.name for p in tmp_path.iterdir()] == [f.name]  # no temp file left beside it

    assert cells.get("b3_g128", compute) == {"ppl": 12.5, "nll": [1, 2]}
    assert calls == [1] and capsys.readouterr().out == ""  # a hit neither computes nor prints


def test_existing_cache_files_hit(tmp_path):
    """A file written by the tools before this helper (json.dumps, or indent=1 by onnx_compare) is a hit."""
    (tmp_path / "fp32.json").write_text(json.dumps({"ppl": 20.0}))
    (tmp_path / "onnx-fp32.eval512x40.json").write_text(json.dumps({"ppl": 20.1, "path": "x"}, indent=1))
    boom = lambda: pytest.fail("a cached cell was recomputed")  # noqa: E731
    assert Cells(tmp_path).get("fp32", boom) == {"ppl": 20.0}
    assert Cells(tmp_path, indent=1).get("onnx-fp32.eval512x40", boom) == {"ppl": 20.1, "path": "x"}


def test_indent_and_show(tmp_path, capsys):
    cells = Cells(tmp_path, indent=1, show=lambda r: {k: v for k, v in r.items() if k != "path"})
    cells.get("k", lambda: {"ppl": 1.0, "path": "/long/path"})
    assert (tmp_path / "k.json").read_text() == json.dumps({"ppl": 1.0, "path": "/long/path"}, indent=1)
    assert capsys.readouterr().out == "k {'ppl': 1.0}\n"


@pytest.mark.parametrize("text", ['{"ppl": 12.', "", "\xff\xfe", "[1, 2]"])
def test_corrupt_cell_is_reported_and_recomputed(tmp_path, capsys, text):
    """A file that is not a JSON object (e.g. cut short by an interrupted in-place write of an older tool) is
    reported on stderr and recomputed: its content is lost anyway."""
    f = tmp_path / "k.json"
    f.write_bytes(text.encode("latin-1"))
    assert Cells(tmp_path).get("k", lambda: {"ppl": 3.0}) == {"ppl": 3.0}
    assert json.loads(f.read_text()) == {"ppl": 3.0}
    err = capsys.readouterr().err
    assert str(f) in err and "recomputing" in err


def test_missing_without_compute_is_none(tmp_path):
    """compute=None (tools/report.py --write-only): a missing cell stays missing, nothing is written."""
    assert Cells(tmp_path).get("k", None) is None
    assert not any(tmp_path.iterdir())


def test_check_sees_hits_and_may_refuse(tmp_path):
    def same_ids(f, r):
        if r.get("ids_sha") != "abc":
            raise SystemExit(f"{f} was measured on other token ids")

    cells = Cells(tmp_path, check=same_ids)
    cells.get("k", lambda: {"ids_sha": "other"})  # a computed cell is not checked
    with pytest.raises(SystemExit, match="other token ids"):
        cells.get("k", lambda: pytest.fail("recomputed"))


def test_failed_compute_writes_nothing(tmp_path):
    def fail():
        raise RuntimeError("runtime crashed")

    with pytest.raises(RuntimeError):
        Cells(tmp_path).get("k", fail)
    assert not any(tmp_path.iterdir())


def test_interrupted_write_leaves_no_cell(tmp_path, monkeypatch):
    """The file appears all at once: an error while writing leaves neither the cell nor a temp file."""
    real = Path.write_text

    def half(self, data, *a, **kw):
        real(self, data[:5], *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half)
    with pytest.raises(KeyboardInterrupt):
        Cells(tmp_path).get("k", lambda: {"ppl": 3.0})
    monkeypatch.undo()
    assert not any(tmp_path.iterdir())
