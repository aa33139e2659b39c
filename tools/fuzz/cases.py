"""The fuzz case list: per file kind the broken copies (tools/fuzz/mutations.py) of one base file and the CLI argv
that reads it, in a fixed, seeded order (docs/RELIABILITY.md and tests/tools/test_fuzz_inputs.py agree on it)."""
from __future__ import annotations

import random
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from .bases import DIST_ARGV, Q, ROOT
from .mutations import (dat_nan, dat_patch, first_module, flip, gguf_patch, json_edit, move_first_tensor, other_shard,
                        patch_bytes, remove, st_drop, st_dtype, st_edit, st_extra, st_hostile_len, st_hostile_shape,
                        st_offsets_past_end, st_shape, st_values, truncate, truncate_at, write)


@dataclass
class Case:
    """One broken input: which kind, what was done, how to break it and the CLI argv that reads it."""

    kind: str
    name: str
    base: str  # which base artifact the case copies ('hf', 'master', ...)
    target: str  # the broken file, relative to the copied base
    mutate: object  # f(path_of_target, base_dir, bases) -> None
    argv: object  # f(case_dir, base_dir, bases) -> (argv, out_path or None)
    # exit 0 is right too when the output equals a clean run's ('quantize' | 'distill'): the toolkit's own resume
    # caches (a damaged part is recomputed), and a HF checkpoint's extra tensors (ignored, as transformers does)
    accept: str | None = None


# ---------------------------------------------------------------- the commands that read each kind


def quantize_argv(extra=()):
    def f(d: Path, base: Path, b: dict):
        out = d / "out"
        return ["quantize", str(base), "-o", str(out), "--calib", str(b["calib"]), *Q, *extra], out
    return f


def quantize_calib(d: Path, base: Path, b: dict):
    out = d / "out"
    return ["quantize", str(b["hf"]), "-o", str(out), "--calib", str(base / "calib.txt"), *Q], out


def quantize_imatrix(name):
    def f(d: Path, base: Path, b: dict):
        out = d / "out"
        return ["quantize", str(b["hf"]), "-o", str(out), "--imatrix", str(base / name),
                *[a for a in Q if a not in ("--nsamples", "2")]], out
    return f


def export_argv(d: Path, base: Path, b: dict):
    out = d / "out.gguf"
    return ["export", str(base), "--to", "gguf", "-o", str(out), "--quiet"], out


def eval_argv(name):
    def f(d: Path, base: Path, b: dict):
        return ["eval", str(base / name) if name else str(base), "--text", str(b["eval"]), "--seqlen", "32",
                "--max-windows", "1", "--tokenizer", str(b["hf"]), "--quiet"], None
    return f


def resume_quantize(d: Path, base: Path, b: dict):
    return ["quantize", str(b["hf"]), "-o", str(base / "out"), "--calib", str(b["calib"]), *Q], base / "out"


def resume_distill(d: Path, base: Path, b: dict):
    return ["distill", str(b["master"]), "--teacher", str(b["hf"]), "--text", str(b["calib"]), "-o",
            str(base / "out"), *DIST_ARGV], base / "out"


ST = "model.safetensors"


def master_shard() -> str:
    """The first shard (block 0) of the bases' sharded master (neuqi_export.master_store's layout)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from model_factory import tiny_config

    from neuqi_export.master_store import shard_name

    return shard_name(1, tiny_config("llama", 100).num_hidden_layers + 1)


def _st_cases(kind: str, base: str, target: str, argv, seed: int, float_suffix: str, drop: str,
              extra_accept: str | None = None) -> list[Case]:
    """The safetensors cases of one file; `extra_accept`: an extra tensor is accepted (see Case.accept)."""
    c = [Case(kind, f"truncate@{f:g}", base, target, truncate(f), argv) for f in (0.0, 0.5, 0.9, 0.999)]
    c += [Case(kind, f"truncate@{n}B", base, target, truncate_at(n), argv) for n in (4, 9, 100)]
    c += [Case(kind, f"flip header bytes (seed {s})", base, target, flip(s, 8, 400), argv) for s in (seed, seed + 1)]
    c += [Case(kind, "header length claims 4 TB", base, target, st_hostile_len, argv),
          Case(kind, "tensor shape claims 4 TB", base, target, st_hostile_shape(float_suffix), argv),
          Case(kind, "data offsets past the end", base, target, st_offsets_past_end(float_suffix), argv),
          Case(kind, "wrong dtype (F32 -> I64)", base, target, st_dtype(float_suffix, "I64"), argv),
          Case(kind, "wrong dtype (F32 -> F16)", base, target, st_dtype(float_suffix, "F16"), argv),
          Case(kind, "wrong shape (transposed)", base, target, st_shape(float_suffix, lambda s: s[::-1]), argv),
          Case(kind, "NaN in a weight", base, target, st_values(float_suffix, float("nan")), argv),
          Case(kind, "Inf in a weight", base, target, st_values(float_suffix, float("inf")), argv),
          Case(kind, "missing tensor", base, target, st_drop(drop), argv),
          Case(kind, "extra tensor", base, target, st_extra, argv, accept=extra_accept),
          Case(kind, "empty file", base, target, write(b""), argv)]
    return c


def cases() -> list[Case]:
    """Every fuzz case, in a fixed order (seeded)."""
    qa = quantize_argv()
    c: list[Case] = []
    # HF config.json
    c += [Case("config", n, "hf", "config.json", m, qa) for n, m in [
        ("truncate@0.5", truncate(0.5)), ("empty file", write(b"")), ("not an object", write(b"[1, 2]")),
        ("binary garbage", write(bytes(random.Random(3).randrange(256) for _ in range(300)))),
        ("missing model_type", json_edit(lambda d: d.pop("model_type"))),
        ("missing hidden_size", json_edit(lambda d: d.pop("hidden_size"))),
        ("hidden_size a string", json_edit(lambda d: d.__setitem__("hidden_size", "sixty-four"))),
        ("hidden_size claims 1e9 (TB model)", json_edit(lambda d: d.__setitem__("hidden_size", 10**9))),
        ("num_hidden_layers claims 1e9", json_edit(lambda d: d.__setitem__("num_hidden_layers", 10**9))),
        ("vocab_size claims 1e12", json_edit(lambda d: d.__setitem__("vocab_size", 10**12))),
        ("negative num_attention_heads", json_edit(lambda d: d.__setitem__("num_attention_heads", -4))),
        ("hidden_size 32 (other model's config)", json_edit(lambda d: d.__setitem__("hidden_size", 32))),
    ]]
    # the HF safetensors weights
    # an extra tensor in a HF checkpoint is accepted and ignored, as transformers does (real checkpoints carry tensors
    # the model class does not use: rotary inv_freq buffers, a tied lm_head, multi-token-prediction layers)
    c += _st_cases("safetensors", "hf", ST, qa, 10, "mlp.up_proj.weight", "mlp.up_proj.weight", extra_accept="quantize")
    c += [Case("safetensors", "a shard of another model (hidden 32)", "hf", ST, other_shard, qa)]
    # the index of a sharded checkpoint
    ix = "model.safetensors.index.json"
    c += [Case("index", n, "hf_sharded", ix, m, qa) for n, m in [
        ("truncate@0.5", truncate(0.5)), ("empty file", write(b"")),
        ("missing weight_map", json_edit(lambda d: d.pop("weight_map"))),
        ("weight_map a list", json_edit(lambda d: d.__setitem__("weight_map", []))),
        ("names a missing shard", json_edit(lambda d: d["weight_map"].__setitem__(
            sorted(d["weight_map"])[0], "model-00009-of-00009.safetensors"))),
        ("tensor moved to the wrong shard", json_edit(lambda d: move_first_tensor(d))),
        ("drops a tensor", json_edit(lambda d: d["weight_map"].pop(sorted(d["weight_map"])[-1]))),
        ("shard path escapes the directory", json_edit(lambda d: d["weight_map"].__setitem__(
            sorted(d["weight_map"])[0], "../../../etc/passwd"))),
    ]]
    c += [Case("index", "a shard truncated@0.5", "hf_sharded", "model-00001-of-00002.safetensors", truncate(0.5), qa)]
    # tokenizer files
    c += [Case("tokenizer", n, "hf", t, m, qa) for n, t, m in [
        ("tokenizer.json truncate@0.5", "tokenizer.json", truncate(0.5)),
        ("tokenizer.json empty", "tokenizer.json", write(b"")),
        ("tokenizer.json flipped bytes", "tokenizer.json", flip(20, 0, 2000, 8)),
        ("tokenizer.json removed", "tokenizer.json", remove),
        ("tokenizer_config.json truncate@0.5", "tokenizer_config.json", truncate(0.5)),
        ("tokenizer_config.json not an object", "tokenizer_config.json", write(b"7")),
        ("tokenizer.json vocab of another tokenizer", "tokenizer.json",
         json_edit(lambda d: d["model"].__setitem__("vocab", {"a": 0, "b": 1}))),
    ]]
    # calibration text
    rnd = random.Random(5)
    c += [Case("calib", n, "calibdir", "calib.txt", write(content), quantize_calib) for n, content in [
        ("empty", b""), ("whitespace only", b" \n\t\n"), ("not UTF-8 (random bytes)",
                                                           bytes(rnd.randrange(256) for _ in range(4000))),
        ("UTF-16", "Some calibration text. " .encode("utf-16") * 100), ("too short", b"Only a few words."),
        ("NUL bytes only", b"\0" * 5000),
    ]]
    # the master checkpoint
    ex = export_argv
    c += _st_cases("master", "master", master_shard(), ex, 30, ".scales", ".qweight")
    c += [Case("master", n, "master", "config.json", m, ex) for n, m in [
        ("config truncate@0.5", truncate(0.5)), ("config empty", write(b"")),
        ("config missing quantization_config", json_edit(lambda d: d.pop("quantization_config"))),
        ("config modules missing", json_edit(lambda d: d["quantization_config"].pop("modules"))),
        ("config a module's bits 5", json_edit(lambda d: first_module(d).__setitem__("bits", 5))),
        ("config a module's shape claims 4 TB", json_edit(lambda d: first_module(d).__setitem__("shape", [1 << 21, 1 << 21]))),
        ("config a module's shape wrong", json_edit(lambda d: first_module(d).__setitem__("shape", [64, 32]))),
        ("config a module's group_size 0", json_edit(lambda d: first_module(d).__setitem__("group_size", 0))),
        ("config a module removed", json_edit(lambda d: d["quantization_config"]["modules"].pop(
            sorted(d["quantization_config"]["modules"])[0]))),
        ("config an extra module", json_edit(lambda d: d["quantization_config"]["modules"].__setitem__(
            "model.layers.9.mlp.up_proj", dict(first_module(d))))),
    ]]
    # the master's <out>.partial blocks (quantize resumes them)
    blk = f"out.partial/{master_shard()}"
    c += [Case("partial", n, "partial", blk, m, resume_quantize, accept="quantize") for n, m in [
        ("block truncate@0.5", truncate(0.5)), ("block truncate@9B", truncate_at(9)), ("block empty", write(b"")),
        ("block header claims 4 TB", st_hostile_len), ("block flipped header bytes", flip(40, 8, 300)),
        ("block missing tensor", st_drop(".qweight")), ("block wrong dtype", st_dtype(".scales", "I64")),
        ("block NaN scale", st_values(".scales", float("nan"))),
        ("block wrong shape", st_shape(".qweight", lambda s: [s[0], s[1] // 2])),
        ("state.json truncated", None),
    ]]
    c[-1].target, c[-1].mutate = "out.partial/state.json", truncate(0.5)
    c += [Case("partial", "block record list truncated", "partial", f"{blk}.json", truncate(0.5), resume_quantize,
               accept="quantize")]
    # GGUF (eval loads it in llama.cpp)
    ga = eval_argv("m.gguf")
    c += [Case("gguf", n, "gguf", "m.gguf", m, ga) for n, m in [
        ("truncate@0", truncate(0.0)), ("truncate@6B", truncate_at(6)), ("truncate@0.01", truncate(0.01)),
        ("truncate@0.5", truncate(0.5)), ("truncate@0.999", truncate(0.999)),
        ("bad magic", flip(50, 0, 4, 1)), ("version 99", lambda p, *_: patch_bytes(p, 4, struct.pack("<I", 99))),
        ("tensor count claims 2^40", gguf_patch("tensors", 1 << 40)),
        ("kv count claims 2^40", gguf_patch("kvs", 1 << 40)),
        ("key length claims 2^40", gguf_patch("keylen", 1 << 40)),
        ("flipped bytes in the header", flip(51, 24, 4000, 16)),
        ("flipped bytes in the tensor data", flip(52, -4000, -1, 64)),
    ]]
    # ONNX (eval loads it in onnxruntime)
    oa = eval_argv("")
    c += [Case("onnx", n, "onnx", "model.onnx", m, oa) for n, m in [
        ("truncate@0", truncate(0.0)), ("truncate@0.5", truncate(0.5)), ("truncate@0.99", truncate(0.99)),
        ("flipped bytes", flip(60, 0, 2000, 16)), ("random bytes", write(bytes(random.Random(61).randrange(256)
                                                                             for _ in range(5000)))),
    ]]
    # imatrix (quantize --imatrix)
    ig, idat = "m.imatrix.gguf", "m.imatrix.dat"
    c += [Case("imatrix", n, "imatrix", t, m, quantize_imatrix(t)) for n, t, m in [
        ("gguf truncate@0.5", ig, truncate(0.5)), ("gguf truncate@10B", ig, truncate_at(10)),
        ("gguf tensor count claims 2^40", ig, gguf_patch("tensors", 1 << 40)),
        ("gguf key length claims 2^40", ig, gguf_patch("keylen", 1 << 40)),
        ("gguf flipped bytes", ig, flip(70, 24, 2000, 8)),
        ("dat truncate@0.5", idat, truncate(0.5)), ("dat truncate@3B", idat, truncate_at(3)),
        ("dat entry count claims 2^31-1", idat, dat_patch(0, 2**31 - 1)),
        ("dat name length claims 2^31-1", idat, dat_patch(4, 2**31 - 1)),
        ("dat negative entry count", idat, dat_patch(0, -5)),
        ("dat NaN values", idat, dat_nan),
        ("dat random bytes", idat, write(bytes(random.Random(71).randrange(256) for _ in range(3000)))),
    ]]
    # the distillation resume state
    ts = "out.partial/train.safetensors"
    c += [Case("distill-state", n, "dstate", ts, m, resume_distill, accept="distill") for n, m in [
        ("truncate@0.5", truncate(0.5)), ("truncate@9B", truncate_at(9)), ("empty", write(b"")),
        ("header claims 4 TB", st_hostile_len), ("flipped header bytes", flip(80, 8, 300)),
        ("skeleton metadata missing", st_edit(lambda h: h.pop("__metadata__"))),
        ("skeleton not JSON", st_edit(lambda h: h["__metadata__"].__setitem__(
            next(iter(h["__metadata__"])), "{not json"))),
        ("a tensor missing", st_drop("")), ("wrong dtype", st_dtype("", "I64")),
    ]]
    return c
