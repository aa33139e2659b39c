"""Every registered model family through every export format, each run in its own runtime.

For each family (neuqi_export.archs) a tiny random model from tests/model_factory.py (with its family's special
cases switched on) is quantized by the real pipeline (NeUQI + GPTQ, g32, a small calibration text), exported to
each format, loaded in that format's runtime (runtimes.registry), and its logits compared with the master's
dequantized model in transformers (the reference) on windows longer than the families' sliding windows.

    python tools/family_matrix.py [--families F ...] [--formats gguf onnx ...] [--bits 2 3 4] [--work DIR]

writes docs/ARCHITECTURES.md (the table section) with the command; cells are cached under --work
(tools/cells.py), so an interrupted run resumes. tests/test_family_matrix.py runs the same `measure` function.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests", ROOT / "tests" / "converters"):  # the factory and tokenizer builder live with the tests
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

# the options under which each format holds the master exactly (the matrix checks the export, not a refit):
# ONNX with fp32 activations in MatMulNBits (the default, accuracy level 4, quantizes them to int8); GGUF with the
# float embedding and head kept F32; compressed-tensors stores integer zero-points, so its master uses neuqi_int
EXACT_OPTIONS = {"onnx": {"accuracy_level": 1, "float_storage": "exact"}, "gguf": {"embed_type": "F32", "output_type": "F32"},
                 "mlx": {"float_storage": "exact"}, "compressed-tensors": {"float_storage": "exact"}}
MASTER_INIT = {"compressed-tensors": "neuqi_int"}
WINDOW = 32  # tokens per compared window: longer than the factory's sliding window (8)
N_WINDOWS = 2


def tiny_master(model_type: str, bits: int, work: Path, init: str = "neuqi", seed: int = 0) -> Path:
    """A master of a tiny `model_type` model at `bits` (g32, `init` + GPTQ on a small synthetic corpus); cached."""
    import torch
    from gguf_fixtures import build_tokenizer, corpus
    from model_factory import build_model
    from transformers import AutoTokenizer

    from neuqi_export.pipeline import QuantizeOptions, quantize_model

    out = work / f"{model_type}-{bits}bit-{init}"
    if (out / "config.json").is_file():
        return out
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        build_tokenizer(tok_dir, "smollm")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    src = work / f"{model_type}-float"
    if not (src / "config.json").is_file():
        model = build_model(model_type, len(tok), seed=seed)
        model.save_pretrained(str(src))
        tok.save_pretrained(str(src))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        quantize_model(src, out, QuantizeOptions(bits=bits, group_size=32, init=init, gptq=True, nsamples=4,
                                                 seqlen=64), calib_text="\n\n".join(corpus(400, seed=3)),
                       progress=False, force=True)
    finally:
        torch.set_num_threads(n)
    return out


def windows(vocab: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, (N_WINDOWS, WINDOW)).astype(np.int64)


def reference_logits(master_dir: Path, ids: np.ndarray) -> np.ndarray:
    import torch

    from neuqi_export.master import MasterCheckpoint
    from neuqi_export.modeling import master_to_hf

    with torch.no_grad():
        return master_to_hf(MasterCheckpoint.load(master_dir))(torch.from_numpy(ids)).logits.numpy()


def export(master_dir: Path, fmt: str, out: Path, options: dict | None = None) -> dict:
    """Export with the exporter's keyword `options` (its defaults otherwise); {'path', 'bytes', 'exact', 'refit'}."""
    from converters.registry import load_all

    report = load_all()[fmt].export(master_dir, out, overwrite=True, **(options or {}))
    refit = sum(not t.exact for t in report.tensors)
    return {"path": str(report.path), "bytes": int(report.bytes), "exact": len(report.tensors) - refit, "refit": refit}


def runtime_logits(path: Path, ids: np.ndarray) -> tuple[str, np.ndarray]:
    from runtimes.registry import runtime_for

    rt = runtime_for(Path(path))
    if rt is None:
        raise RuntimeError(f"no runtime detects {path}")
    scorer = rt.load(Path(path))
    return rt.name, np.asarray(scorer.logits(ids), np.float64)


def measure(model_type: str, fmt: str, bits: int, work: Path) -> dict:
    """One cell: the export of a tiny `model_type` master at `bits` in `fmt`, run in its runtime, against the master."""
    work.mkdir(parents=True, exist_ok=True)
    import json

    master_dir = tiny_master(model_type, bits, work, MASTER_INIT.get(fmt, "neuqi"))

    vocab = int(json.loads((master_dir / "config.json").read_text())["vocab_size"])
    ids = windows(vocab)
    ref = reference_logits(master_dir, ids).astype(np.float64)
    info = export(master_dir, fmt, work / f"{master_dir.name}.{fmt}", EXACT_OPTIONS.get(fmt))
    runtime, got = runtime_logits(Path(info["path"]), ids)
    got = got[..., : ref.shape[-1]]
    diff = np.abs(got - ref)
    return {"family": model_type, "format": fmt, "bits": bits, "runtime": runtime, "bytes": info["bytes"],
            "exact": info["exact"], "refit": info["refit"], "max_rel": float(diff.max() / np.abs(ref).max()),
            "mean_rel": float(diff.mean() / np.abs(ref).mean()),
            "argmax_agree": float((got.argmax(-1) == ref.argmax(-1)).mean())}


def main(argv=None) -> None:
    from model_factory import families

    from converters.registry import load_all
    from tools.cells import Cells

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", nargs="*", default=None)
    ap.add_argument("--formats", nargs="*", default=None)
    ap.add_argument("--bits", nargs="*", type=int, default=[2, 3, 4])
    ap.add_argument("--work", default="/tmp/family_matrix")
    ap.add_argument("--out", default=str(ROOT / "docs" / "ARCHITECTURES.md"))
    args = ap.parse_args(argv)
    fams = args.families or families()
    fmts = args.formats or sorted(load_all())
    work = Path(args.work)
    cells = Cells(work / "cells")
    rows = []
    for fam in fams:
        for fmt in fmts:
            for bits in args.bits:
                key = f"{fam}-{fmt}-{bits}"
                try:
                    rows.append(cells.get(key, lambda f=fam, x=fmt, b=bits: measure(f, x, b, work / f)))
                except Exception as exc:  # a cell that fails is a row saying so, not a crash of the table
                    what = "refused" if type(exc).__name__ == "UserError" else f"error {type(exc).__name__}"
                    rows.append({"family": fam, "format": fmt, "bits": bits, "error": f"{what}: {exc}"})
                    print(key, rows[-1]["error"], flush=True)
    write_table(rows, Path(args.out), " ".join(["python tools/family_matrix.py", *(argv or sys.argv[1:])]))


def write_table(rows: list[dict], out: Path, command: str) -> None:
    """The family x format table as a section of docs/ARCHITECTURES.md (other sections kept)."""
    lines = ["<!-- family-matrix:begin -->", "## Tiny models: every family in every format", "",
             f"`{command}`", "",
             "Relative logit error of each export, run in its runtime, against the master's dequantized model in "
             "transformers (max |Δ| / max |ref| and mean |Δ| / mean |ref| over 2 windows of 32 tokens; argmax: "
             "share of positions with the same top token).", "",
             "| family | format | bits | runtime | max rel | mean rel | argmax | tensors exact / refit |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['format']} | {r['bits']} | — | {r['error'][:160]} | | | |")
        else:
            lines.append(f"| {r['family']} | {r['format']} | {r['bits']} | {r['runtime']} | {r['max_rel']:.2e} | "
                         f"{r['mean_rel']:.2e} | {r['argmax_agree']:.3f} | {r['exact']} / {r['refit']} |")
    lines.append("<!-- family-matrix:end -->")
    section = "\n".join(lines) + "\n"
    text = out.read_text() if out.is_file() else "# Architectures\n\n"
    if "<!-- family-matrix:begin -->" in text:
        head, rest = text.split("<!-- family-matrix:begin -->", 1)
        text = head + section + rest.split("<!-- family-matrix:end -->\n", 1)[-1]
    else:
        text += "\n" + section
    out.write_text(text)
    print(section)


if __name__ == "__main__":
    main()
