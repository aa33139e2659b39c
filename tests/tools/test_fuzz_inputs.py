"""CI-sized run of the harness in tools/fuzz/ (issue 23): a few broken files of every kind, each one line + exit 2 +
nothing under the final name (or, for an accepted extra HF tensor, an output equal to a clean run's); the hostile
sizes in a forked child under a memory limit and a timeout; full disks."""
from __future__ import annotations

import pytest

from tools.fuzz.bases import clean_shas
from tools.fuzz.cases import cases
from tools.fuzz.runner import run_case
from tools.fuzz.scenarios import disk_full

# (kind, case name): fast cases that stop at the reader (the full set is in docs/RELIABILITY.md)
SUBSET = [
    ("config", "not an object"), ("config", "missing model_type"), ("config", "vocab_size claims 1e12"),
    ("safetensors", "truncate@0.5"), ("safetensors", "header length claims 4 TB"),
    ("safetensors", "tensor shape claims 4 TB"), ("safetensors", "wrong dtype (F32 -> F16)"),
    ("index", "names a missing shard"), ("index", "tensor moved to the wrong shard"),
    ("tokenizer", "tokenizer.json truncate@0.5"),
    ("calib", "not UTF-8 (random bytes)"), ("calib", "NUL bytes only"), ("calib", "too short"),
    ("master", "truncate@0.5"), ("master", "header length claims 4 TB"), ("master", "config a module's bits 5"),
    ("master", "NaN in a weight"), ("master", "extra tensor"), ("master", "config a module removed"),
    ("partial", "block truncate@0.5"), ("partial", "block header claims 4 TB"),
    ("gguf", "truncate@0.5"), ("gguf", "tensor count claims 2^40"), ("gguf", "key length claims 2^40"),
    ("onnx", "truncate@0.5"),
    ("imatrix", "gguf tensor count claims 2^40"), ("imatrix", "dat name length claims 2^31-1"),
    ("imatrix", "dat NaN values"),
    ("distill-state", "truncate@0.5"), ("distill-state", "header claims 4 TB"),
]
BY_NAME = {(c.kind, c.name): c for c in cases()}


@pytest.fixture(scope="module")
def bases(fuzz_bases):
    return fuzz_bases


def test_subset_names_exist():
    missing = [k for k in SUBSET if k not in BY_NAME]
    assert not missing
    assert {k for k, _ in SUBSET} == {c.kind for c in cases()}  # every kind is covered


@pytest.mark.parametrize("kind,name", SUBSET, ids=[f"{k}:{n}" for k, n in SUBSET])
def test_case_ends_in_one_line(kind, name, bases, tmp_path):
    case = BY_NAME[kind, name]
    hostile = "claims" in name  # never in this process: a forked child under RLIMIT_AS and a timeout
    r = run_case(case, bases, tmp_path / "case", {}, inprocess=not hostile)
    assert r["ok"], r["how"]
    if hostile:
        assert r["seconds"] < 60


def test_extra_hf_tensor_is_ignored(bases, tmp_path):
    """An extra tensor in a HF checkpoint is accepted: exit 0 and the master equals a clean run's."""
    r = run_case(BY_NAME["safetensors", "extra tensor"], bases, tmp_path / "case", clean_shas(bases, ("quantize",)),
                 inprocess=True)
    assert r["ok"], r["how"]


@pytest.mark.parametrize("fmt", ["gguf", "onnx", "compressed-tensors", "mlx"])
def test_export_disk_full(fmt, bases, tmp_path):
    out = tmp_path / f"out_{fmt}"
    r = disk_full(["export", bases["master"], "--to", fmt, "-o", out, "--quiet"], out)
    assert r["ok"], r


def test_quantize_disk_full(bases, tmp_path):
    out = tmp_path / "q"
    r = disk_full(["quantize", bases["hf"], "-o", out, "--no-calib", "--group-size", "32", "--quiet"], out)
    assert r["ok"], r
