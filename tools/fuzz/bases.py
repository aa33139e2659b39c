"""The real files every fuzz case breaks a copy of, made once from a tiny llama model (hidden 64, the SmolLM2
tokenizer): the HF directory (one file and sharded), another model's shard, a master, its GGUF / ONNX exports and
imatrix files, a quantize `<out>.partial` after one block and a distillation state after one step; and the digests
of the outputs a clean (uninterrupted) quantize and distill run write, which a recomputed cache must equal."""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
Q = ["--nsamples", "2", "--seqlen", "32", "--bits", "4", "--group-size", "32", "--quiet"]
DIST_OPTS = dict(nsamples=2, seqlen=32, steps=3)
DIST_ARGV = ["--nsamples", "2", "--seqlen", "32", "--steps", "3", "--device", "cpu", "--quiet"]


def tiny_dir(out: Path, hidden: int, seed: int, tok_dir: Path, shard: str | None = None) -> Path:
    """A tiny random llama (hidden `hidden`, seeded) with the tokenizer of `tok_dir`, saved at `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT / "tests"))
    from model_factory import tiny_config

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    cfg = tiny_config("llama", len(tok), hidden=hidden, intermediate=2 * hidden, max_positions=2048, init_range=0.02,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(out), **kw)
    tok.save_pretrained(str(out))
    return out


def make_bases(work: Path) -> dict:
    """The real files every case breaks a copy of (made once into `work`, reused when present)."""
    from neuqi_export.assets import fetch_assets
    from neuqi_export.cli import main

    work.mkdir(parents=True, exist_ok=True)
    a = fetch_assets()
    b = {"calib": Path(a.calib_text), "eval": Path(a.eval_text)}
    if (work / "done").exists():
        b.update({k: work / k for k in ("hf", "hf_sharded", "other", "master", "gguf", "onnx", "imatrix", "partial",
                                         "dstate")})
        return b
    for d in work.iterdir():
        shutil.rmtree(d) if d.is_dir() else d.unlink()
    b["hf"] = tiny_dir(work / "hf", 64, 0, a.model_dir)
    b["hf_sharded"] = tiny_dir(work / "hf_sharded", 64, 0, a.model_dir, shard="5MB")
    b["other"] = tiny_dir(work / "other", 32, 1, a.model_dir)
    b["master"] = work / "master"
    assert main(["quantize", str(b["hf"]), "-o", str(b["master"]), "--calib", str(b["calib"]), *Q]) == 0
    (work / "gguf").mkdir()
    assert main(["export", str(b["master"]), "--to", "gguf", "-o", str(work / "gguf" / "m.gguf"), "--quiet"]) == 0
    assert main(["export", str(b["master"]), "--to", "onnx", "-o", str(work / "onnx"), "--quiet"]) == 0
    from converters.gguf.imatrix import write_imatrix
    from neuqi_export.master import MasterCheckpoint

    (work / "imatrix").mkdir()
    m = MasterCheckpoint.load(b["master"])
    write_imatrix(m, work / "imatrix" / "m.imatrix.gguf", "gguf")
    write_imatrix(m, work / "imatrix" / "m.imatrix.dat", "dat")
    _make_partial(b, work / "partial")
    _make_dstate(b, work / "dstate")
    (work / "done").write_text("")
    b.update({k: work / k for k in ("gguf", "onnx", "imatrix", "partial", "dstate")})
    return b


class _Stop(Exception):
    pass


def _make_partial(b: dict, where: Path) -> None:
    """`where/out.partial` holding the first finished block of the quantize run the cases resume."""
    import neuqi_export.pipeline as pl
    from neuqi_export.data import read_text

    orig = pl._save_block

    def once(*a, **k):
        orig(*a, **k)
        raise _Stop

    pl._save_block = once
    try:
        pl.quantize_model(b["hf"], where / "out", pl.QuantizeOptions(bits=4, group_size=32, nsamples=2, seqlen=32),
                          calib_text=read_text(b["calib"]), progress=False)
    except _Stop:
        pass
    finally:
        pl._save_block = orig


def _make_dstate(b: dict, where: Path) -> None:
    """`where/out.partial` with a distillation resume state after 1 of 3 steps."""
    from neuqi_export.data import read_text
    from neuqi_export.distill import DistillOptions, distill

    def stop(step, loss):
        if step >= 0:
            raise _Stop

    try:
        distill(b["master"], b["hf"], read_text(b["calib"]), where / "out",
                DistillOptions(**DIST_OPTS, checkpoint_every=1), device="cpu", progress=False, callback=stop)
    except _Stop:
        pass


def digest(master: Path) -> str:
    """One sha256 over every tensor of the master at `master`, whatever its layout."""
    from neuqi_export.master_store import tensor_digests

    return hashlib.sha256(json.dumps(tensor_digests(master), sort_keys=True).encode()).hexdigest()


def clean_shas(bases: dict, which=("quantize", "distill")) -> dict:
    """{'quantize' | 'distill': digest of the master an uninterrupted run writes} (those in `which`): what a run
    that recomputes a damaged cache (or ignores an extra tensor) must give."""
    from neuqi_export.cli import main

    out = {}
    if "quantize" in which:
        m = bases["partial"].parent / "clean_master"
        if not m.exists():
            assert main(["quantize", str(bases["hf"]), "-o", str(m), "--calib", str(bases["calib"]), *Q]) == 0
        out["quantize"] = digest(m)
    if "distill" in which:
        d = bases["partial"].parent / "clean_distill"
        if not d.exists():
            assert main(["distill", str(bases["master"]), "--teacher", str(bases["hf"]), "--text",
                         str(bases["calib"]), "-o", str(d), *DIST_ARGV]) == 0
        out["distill"] = digest(d)
    return out
