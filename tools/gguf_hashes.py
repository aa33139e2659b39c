"""sha256 of the GGUF exports of tiny masters with every --type, preset and embed/output type, to show a refactor of
converters/gguf keeps the bytes: run it on the commit before and after, then compare the two JSON files.

    python tools/gguf_hashes.py OUT.json [--base DIR]   # ~15 min on 2 busy cores

Models and tokenizers are built once under DIR/models (default /tmp/gguf_hashes; fixed paths, since general.name
comes from them); the masters (uniform 2/3/4/5/8-bit from tests/converters/gguf_fixtures.py, pipeline masters on a
GGUF type's lattice and with a quantized head) are rebuilt each run and their file hashes recorded too, as are the
lattice quantizer's output for every type, the refusals' messages and the CLI's GGUF policy (cli.gguf_policy: gguf_fit,
lattice_types). Issue 18 item 2: 532 files and 841 entries, identical before and after one row per type.
Exports go through the registry (load_all()['gguf'].export(master, out, **options)); plain options (issue 18
item 3): the same 841 entries as main.
"""
import hashlib
import json
import shutil
import sys
import traceback
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "converters")]

from gguf_fixtures import build_master, build_model, build_tokenizer, corpus  # noqa: E402

from converters.gguf import export_original  # noqa: E402
from converters.registry import load_all  # noqa: E402
from neuqi_export.errors import UserError  # noqa: E402
from neuqi_export.master import MasterCheckpoint  # noqa: E402

BASE = Path("/tmp/gguf_hashes")
TYPES = ["F16", "F32", "Q2_K", "Q3_K", "Q4_K", "Q4_1", "Q5_1",
         "Q2_K_MIX", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "q4_k_m"]
FLOATS = ["auto", "F32", "F16", "Q8_0", "Q6_K", "Q4_1", "Q5_1"]


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def model_dir(arch, hidden, inter, seed=0):
    d = BASE / "models" / f"{arch}-{hidden}-{inter}-{seed}"
    if not (d / "config.json").exists():
        n = build_tokenizer(d, "qwen2" if arch == "qwen2" else "smollm")
        build_model(arch, n, seed=seed, hidden=hidden, intermediate=inter).save_pretrained(str(d))
    return d


def tiny_master(arch, hidden, inter, bits, g):
    from transformers import AutoModelForCausalLM

    d = model_dir(arch, hidden, inter)
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    return build_master(model, d, bits, g)


def master_hash(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(d.rglob("*")):
        if f.is_file() and f.name != "quantize_timing.json":
            h.update(f.relative_to(d).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def pipeline_master(name, arch, hidden, inter, work, **kw):
    from neuqi_export.pipeline import QuantizeOptions, quantize_model

    d = model_dir(arch, hidden, inter)
    calib = "\n".join(corpus(400, seed=9))
    out = work / name
    opts = QuantizeOptions(group_size=32, nsamples=4, seqlen=64, **kw)
    quantize_model(d, out, opts, calib_text=calib, progress=False, force=True)
    return MasterCheckpoint.load(out), master_hash(out)


def record(res, key, fn):
    try:
        rep = fn()
        path = Path(rep.path)
        tens = [[t.name, t.type, bool(t.exact), float(t.added_error), t.note] for t in rep.tensors]
        res[key] = {"sha256": sha(path), "bytes": path.stat().st_size,
                    "report": hashlib.sha256(json.dumps(tens).encode()).hexdigest()}
        path.unlink()
    except UserError as exc:
        res[key] = {"UserError": str(exc)}
    except Exception as exc:  # noqa: BLE001
        res[key] = {"error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()[-600:]}


def main(argv=None):
    global BASE
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="the JSON file of hashes to write")
    ap.add_argument("--base", default=str(BASE), help="models (kept) and work directory")
    args = ap.parse_args(argv)
    BASE = Path(args.base)
    out_json = Path(args.out)
    work = BASE / ("work-" + out_json.stem)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    res = {}
    exporter = load_all()["gguf"]  # every export through the registry: its record-kind check, plain keyword options
    masters = {
        "llama64-b4g32": tiny_master("llama", 64, 128, 4, 32),
        "llama256-b3g32": tiny_master("llama", 256, 512, 3, 32),
        "qwen256-b2g64": tiny_master("qwen2", 256, 512, 2, 64),
        "qwen256-b5g128": tiny_master("qwen2", 256, 512, 5, 128),
        "llama256-b8gpc": tiny_master("llama", 256, 512, 8, -1),
        "qwen64-b4g32": tiny_master("qwen2", 64, 128, 4, 32),
    }
    from converters.gguf.presets import linear_types

    cfg = json.loads((model_dir("llama", 256, 512) / "config.json").read_text())
    cfg64 = json.loads((model_dir("llama", 64, 128) / "config.json").read_text())
    for name, kw in {
        "lat-llama256-Q4_K_M": dict(arch="llama", hidden=256, inter=512, gptq=True,
                                    gguf_types=linear_types(cfg, preset="Q4_K_M")),
        "lat-llama256-Q3_K_M": dict(arch="llama", hidden=256, inter=512, gptq=False,
                                    gguf_types=linear_types(cfg, preset="Q3_K_M")),
        "lat-llama256-Q2_K": dict(arch="llama", hidden=256, inter=512, gptq=True,
                                  gguf_types=linear_types(cfg, qtype="Q2_K")),
        "lat-llama64-Q2_K_MIX": dict(arch="llama", hidden=64, inter=128, gptq=True,
                                     gguf_types=linear_types(cfg64, preset="Q2_K")),
        "lat-llama64-Q6_K": dict(arch="llama", hidden=64, inter=128, gptq=True,
                                 gguf_types=linear_types(cfg64, preset="Q6_K")),
        "head-llama256-b3h4": dict(arch="llama", hidden=256, inter=512, bits=3, gptq=True, lm_head_bits=4),
        "head-qwen256-b4h8": dict(arch="qwen2", hidden=256, inter=512, bits=4, gptq=True, lm_head_bits=8),
        "head-llama64-b2h2": dict(arch="llama", hidden=64, inter=128, bits=2, gptq=True, lm_head_bits=2),
    }.items():
        masters[name], res[f"master:{name}"] = pipeline_master(name, work=work, **kw)
        print(name, res[f"master:{name}"][:16], flush=True)
    for mname, m in masters.items():
        for t in TYPES:
            pre = None
            if t == "Q2_K_MIX":
                t, pre = "Q4_1", "Q2_K"
            record(res, f"{mname}|{t}|{pre}", lambda: exporter.export(m, work / "x.gguf", qtype=t, preset=pre))
            if pre or t.upper() != t or t in ("Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K"):
                record(res, f"{mname}|{t}|{pre}|narrow",
                       lambda: exporter.export(m, work / "x.gguf", qtype=t, preset=pre, narrow=True))
        for ft in FLOATS:
            record(res, f"{mname}|Q4_1|embed={ft}", lambda: exporter.export(m, work / "x.gguf", qtype="Q4_1", embed_type=ft))
            record(res, f"{mname}|Q4_K|output={ft}", lambda: exporter.export(m, work / "x.gguf", qtype="Q4_K", output_type=ft))
            record(res, f"{mname}|Q4_K_M|embed={ft}",
                   lambda: exporter.export(m, work / "x.gguf", qtype="Q4_K_M", embed_type=ft, narrow=True))
        print(mname, "exported", flush=True)
    for t in ("F16", "F32"):
        record(res, f"original|llama256|{t}", lambda: export_original(model_dir("llama", 256, 512), work / "x.gguf", t))
    record(res, "bad|Q9_9", lambda: exporter.export(masters["llama64-b4g32"], work / "x.gguf", qtype="Q9_9"))
    record(res, "bad|embed=Q2_K", lambda: exporter.export(masters["llama64-b4g32"], work / "x.gguf", embed_type="Q2_K"))
    out_json.write_text(json.dumps(res, indent=1, sort_keys=True))
    # the lattice quantizer alone, every type
    from converters.gguf.lattice import quantize_for_type

    g = torch.Generator().manual_seed(3)
    W = torch.randn(32, 512, generator=g) * (torch.rand(32, 512, generator=g) + 0.2)
    X = torch.randn(1024, 512, generator=g)
    H = X.T @ X / 1024 + 0.01 * torch.eye(512)
    for t in ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_0", "IQ4_NL", "Q4_1", "Q5_1", "Q8_0", "F16", "F32",
              "IQ2_XS"]:
        for gp in (True, False):
            try:
                r = quantize_for_type(W, H, torch.diagonal(H).clone(), t, gptq=gp)
                res[f"lattice|{t}|{gp}"] = hashlib.sha256(np.ascontiguousarray(r.data).tobytes()
                                                          + r.deq.numpy().tobytes()).hexdigest()
            except UserError as exc:
                res[f"lattice|{t}|{gp}"] = f"UserError: {exc}"
    # the CLI's GGUF policy
    from neuqi_export.cli import gguf_policy  # keys keep the names they had before the cli/ package

    for t in TYPES + ["Q8_0", "Q5_K", "IQ4_NL", "Q5_0", "Q4_0", "Q9_9"]:
        for fit in (None, "lattice", "master"):
            for pre in (None, "Q4_K_M"):
                a = Namespace(to="gguf", gguf_type=t, gguf_fit=fit, preset=pre)
                try:
                    res[f"cli._gguf_fit|{t}|{fit}|{pre}"] = str(gguf_policy.gguf_fit(a))
                except UserError as exc:
                    res[f"cli._gguf_fit|{t}|{fit}|{pre}"] = f"UserError: {exc}"
        for pre in (None, "Q3_K_M"):
            try:
                res[f"cli._lattice_types|{t}|{pre}"] = gguf_policy.lattice_types(str(model_dir("llama", 64, 128)), t, pre)
            except UserError as exc:
                res[f"cli._lattice_types|{t}|{pre}"] = f"UserError: {exc}"
    from converters.gguf import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    res["argparse"] = [[a.dest, list(a.choices) if a.choices else None, a.default] for a in p._actions]
    out_json.write_text(json.dumps(res, indent=1, sort_keys=True))
    errs = [k for k, v in res.items() if isinstance(v, dict) and "error" in v]
    print(len(res), "entries;", sum(isinstance(v, dict) and "sha256" in v for v in res.values()), "files;",
          sum(isinstance(v, dict) and "UserError" in v for v in res.values()), "refusals;", len(errs), "errors", errs[:5])


if __name__ == "__main__":
    main()
