"""tools/llama_bins.py: where the comparison tools find llama-quantize / llama-imatrix (dir, env, PATH, wheel)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tools.llama_bins import find_bin  # noqa: E402


def _exe(d: Path, name: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_text("#!/bin/sh\n")
    p.chmod(0o755)
    return p


def test_dir_is_the_only_place_looked_at_when_given(tmp_path, monkeypatch):
    exe = _exe(tmp_path / "bin", "llama-quantize")
    monkeypatch.setenv("LLAMA_QUANTIZE", "/elsewhere/llama-quantize")
    assert find_bin("llama-quantize", str(tmp_path / "bin")) == str(exe)
    assert find_bin("llama-imatrix", str(tmp_path / "bin")) is None  # not there: not searched elsewhere


def test_env_then_path(tmp_path, monkeypatch):
    on_path = _exe(tmp_path / "path", "llama-imatrix")
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    monkeypatch.delenv("LLAMA_IMATRIX", raising=False)
    assert find_bin("llama-imatrix", None) == str(on_path)
    monkeypatch.setenv("LLAMA_IMATRIX", "/from/env/llama-imatrix")
    assert find_bin("llama-imatrix", None) == "/from/env/llama-imatrix"
