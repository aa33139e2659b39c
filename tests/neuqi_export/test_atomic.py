"""All-or-nothing writes (neuqi_export/atomic.py)."""
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
