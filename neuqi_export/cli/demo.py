"""`neuqi-export demo`: SmolLM2-135M -> 3-bit NeUQI + GPTQ master -> every format -> scored in its own runtime.

One command on a fresh install: fetch the assets, quantize (small calibration set), export with each
registered exporter at its default settings (exactly what `neuqi-export export --to FMT` writes), load
every artifact in its runtime (exactly what `neuqi-export eval` uses), score all of them on the same
token windows, and write a table, a PNG plot and a markdown report into the output directory.
"""
from __future__ import annotations

import gc
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..master import EMBED

GGUF_NAME = "model.gguf"
REFERENCE_ROWS = ("original (fp32)", "master (exact)")  # always scored on every window (as is every "master (...)")
BASE_PLAN = ("neuqi", None)  # (init, lm_head_bits) of the reference master


def _master_name(init: str, head_bits: int | None) -> str:
    """The directory of the master quantized with (init, head_bits) inside the demo's output."""
    return "master" if (init, head_bits) == BASE_PLAN else f"master-{init}" + (f"-head{head_bits}" if head_bits else "")


def _plan_label(init: str, head_bits: int | None) -> str:
    return f"--init {init}" + (f" --lm-head-bits {head_bits}" if head_bits else "")


def _is_reference(fmt: str) -> bool:
    return fmt in REFERENCE_ROWS or fmt.startswith("master (")


@dataclass
class DemoOptions:
    """What the demo runs; the defaults keep it under 15 minutes on 2 CPU cores."""

    out: Path = Path("neuqi-demo")
    bits: int = 3
    group_size: int = 128
    nsamples: int = 16  # calibration windows (paper: 128)
    seqlen: int = 512  # calibration and evaluation window length (paper: 2048)
    eval_windows: int = 16
    decode_tokens: int = 32  # greedy tokens generated to time decoding
    score_budget_s: float = 150.0  # per exported artifact: a slow runtime scores only the leading windows
    formats: list | None = None  # None: every registered exporter
    force: bool = False
    progress: bool = True


@dataclass
class Row:
    """One scored artifact."""

    format: str
    runtime: str
    path: str
    bytes: int = 0
    bits_per_weight: float = float("nan")
    ppl: float = float("nan")
    score_tps: float = float("nan")  # tokens/s while scoring the windows (prefill, batch 1)
    decode_tps: float = float("nan")  # tokens/s of greedy decoding with the runtime's KV cache
    windows: int = 0  # evaluation windows scored (the leading ones, when the time budget ran out)
    nll: list = field(default_factory=list, repr=False)  # summed NLL of each scored window
    note: str = ""
    error: str = ""


@dataclass
class DemoResult:
    rows: list[Row]
    settings: dict
    seconds: float
    files: dict = field(default_factory=dict)


def _weights_size(path: Path) -> int:
    """Bytes of the weight files (what a user downloads), not tokenizers or configs."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    exts = {".safetensors", ".onnx", ".data", ".gguf", ".bin", ".npz"}
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and (p.suffix in exts or p.name.endswith(".onnx.data")))


def _n_params(master) -> int:
    derived = EMBED if master.head_shares_embedding else None  # a tied quantized head's float copy: not a parameter
    return (sum(lin.codes.numel() for lin in master.linears.values())
            + sum(t.numel() for k, t in master.tensors.items() if k != derived))


def _fmt(v: float, spec: str) -> str:
    return "-" if v != v else format(v, spec)


def format_table(rows: list[Row]) -> str:
    """The markdown table printed and written into the report."""
    lines = ["| format | runtime | bits/weight | size (MiB) | windows | perplexity | tokens/s (scoring) | tokens/s (decode) | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        note = f"FAILED: {r.error}" if r.error else r.note
        lines.append(f"| {r.format} | {r.runtime} | {_fmt(r.bits_per_weight, '.2f')} | {_fmt(r.bytes / 2**20, '.1f')} "
                     f"| {r.windows} | {_fmt(r.ppl, '.2f')} | {_fmt(r.score_tps, '.0f')} | {_fmt(r.decode_tps, '.1f')} | {note} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path, title: str) -> Path:
    """PNG: perplexity vs bits/weight (one point per artifact) and tokens/s per artifact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.error and r.ppl == r.ppl]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1.2, 1]})
    markers = "osD^vP*Xh<>p"
    for i, r in enumerate(ok):
        part = f", {r.windows} windows" if r.windows and r.windows < max(x.windows for x in ok) else ""
        a.scatter(r.bits_per_weight, r.ppl, s=55, marker=markers[i % len(markers)], alpha=0.8,
                  label=f"{r.format} ({r.runtime}): {r.ppl:.2f}{part}")
    a.set_xlabel("bits per weight (weight files ÷ parameters)")
    a.set_ylabel("perplexity (lower is better)")
    a.set_xscale("log", base=2)
    a.grid(alpha=0.3)
    a.legend(fontsize=7)
    labels = [f"{r.format}\n{r.runtime}" for r in ok]
    y = range(len(ok))
    b.barh([i - 0.2 for i in y], [r.score_tps for r in ok], height=0.4, label="scoring (prefill)")
    b.barh([i + 0.2 for i in y], [0 if r.decode_tps != r.decode_tps else r.decode_tps for r in ok], height=0.4,
           label="decode")
    b.set_yticks(list(y), labels, fontsize=8)
    b.set_xscale("log")
    b.set_xlabel("tokens/s (log)")
    b.legend(fontsize=8)
    b.grid(alpha=0.3, axis="x")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def score(runtime, path: Path, windows: torch.Tensor, decode_tokens: int, progress: bool,
          budget_s: float | None = None, **load_options) -> dict:
    """Load `path` in `runtime`, score the windows in order (stopping after `budget_s`), time a greedy decode."""
    from tqdm.auto import tqdm

    from ..evaluate import window_nll

    scorer = runtime.load(path, **load_options)
    try:
        scorer.logits(windows[:1, :8])  # warm-up (lazy init, kernel selection)
        nll, t0 = [], time.perf_counter()
        for i in tqdm(range(windows.shape[0]), desc="perplexity", unit="window", disable=not progress, leave=False):
            ids = windows[i:i + 1]
            nll.append(float(window_nll(scorer.logits(ids), ids).sum()))
            if budget_s is not None and time.perf_counter() - t0 > budget_s:
                break
        score_s = time.perf_counter() - t0
        decode_tps = float("nan")
        if decode_tokens > 0:
            t0 = time.perf_counter()
            new = scorer.generate(windows[0, :64].tolist(), decode_tokens)
            decode_tps = len(new) / (time.perf_counter() - t0)
        return {"nll": nll, "windows": len(nll), "ppl": ppl_of(nll, windows.shape[1]),
                "score_tps": len(nll) * windows.shape[1] / score_s, "decode_tps": decode_tps}
    finally:
        del scorer
        gc.collect()


def ppl_of(nll: list, seqlen: int, k: int | None = None) -> float:
    """Perplexity over the first k (default all) windows from their summed NLLs."""
    nll = nll[:k] if k is not None else nll
    return math.exp(min(sum(nll) / (len(nll) * (seqlen - 1)), 700)) if nll else float("nan")


def write_report(result: DemoResult, out: Path, command: str) -> Path:
    """REPORT.md in `out`: settings, the table, the plot."""
    s = result.settings
    text = "\n".join([
        "# neuqi-export demo",
        "",
        f"Command: `{command}`",
        "",
        f"Model: {s['model']}. Quantized to {s['bits']}-bit g{s['group_size']} with NeUQI + GPTQ "
        f"(act-order, static groups) on a **small calibration set: {s['nsamples']} windows × {s['seqlen']} tokens** "
        f"(the paper uses 128 × 2048). Perplexity on the **same {s['eval_windows']} windows × {s['seqlen']} tokens** "
        f"({s['eval_tokens']:,} scored tokens) of held-out text in every runtime, fed identical token ids.",
        "",
        "bits/weight = 8 × (bytes of the weight files) ÷ (model parameters, embeddings included); tokens/s (scoring) = "
        f"window tokens ÷ scoring time, batch 1; tokens/s (decode) = {s['decode_tokens']} greedy tokens after a 64-token "
        "prompt through the runtime's KV cache. Every export uses its exporter's default settings, from the master "
        "`convert --to FMT` quantizes for it (compressed-tensors: integer zero-points; MLX: an 8-bit head), each such "
        "master scored as a row of its own. Each export is "
        f"scored for at most {s.get('score_budget_s', 0):.0f} s: a slower runtime is scored on the leading windows only "
        "(its note gives the master's perplexity on the same windows).",
        "",
        format_table(result.rows),
        "",
        "![perplexity vs bits per weight, and speed](demo.png)",
        "",
        f"Machine: {s['machine']}. Wall time {result.seconds / 60:.1f} min"
        + (f" (quantize {s['quantize_seconds']:.0f} s, export {s['export_seconds']:.0f} s, "
           f"scoring {s['score_seconds']:.0f} s)." if "score_seconds" in s else "."),
        "",
    ])
    path = out / "REPORT.md"
    path.write_text(text)
    return path


def run_demo(opts: DemoOptions, model_dir=None, calib_text: str | None = None, eval_text: str | None = None,
             command: str = "neuqi-export demo") -> DemoResult:
    """The whole demo; model_dir / texts default to the fetched SmolLM2-135M and Wikipedia texts."""
    from transformers import AutoTokenizer

    from converters.registry import load_all as load_exporters
    from runtimes.registry import load_all as load_runtimes, runtime_for

    from ..data import eval_windows, read_text
    from ..master import MasterCheckpoint
    from ..pipeline import QuantizeOptions, quantize_model

    t0, load0 = time.time(), os.getloadavg()[0]
    out = Path(opts.out)
    if out.exists() and any(out.iterdir()) and not opts.force:
        raise UserError(f"output directory '{out}' is not empty; choose another -o or pass --force")
    exporters = load_exporters()
    formats = list(opts.formats) if opts.formats else sorted(exporters)
    unknown = [f for f in formats if f not in exporters]
    if unknown:
        raise UserError(f"unknown format(s) {', '.join(unknown)}; use some of {', '.join(sorted(exporters))}")
    if model_dir is None or calib_text is None or eval_text is None:
        from ..assets import fetch_assets

        assets = fetch_assets(progress=opts.progress)
        model_dir = model_dir or assets.model_dir
        calib_text = calib_text if calib_text is not None else read_text(assets.calib_text)
        eval_text = eval_text if eval_text is not None else read_text(assets.eval_text)
    model_dir = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"demo: {model_dir.name}, {opts.bits}-bit g{opts.group_size} NeUQI + GPTQ; small sets for speed: calibration "
          f"{opts.nsamples} windows × {opts.seqlen} tokens, evaluation {opts.eval_windows} windows × {opts.seqlen} "
          f"tokens; formats: {', '.join(formats)}", flush=True)
    # each format gets the master `convert --to FMT` would quantize for it (Exporter.init / head_bits: compressed-tensors
    # integer zero-points, MLX an 8-bit head); the first, NeUQI with a float head, is the reference "master (exact)"
    wants = {fmt: (exporters[fmt].init, exporters[fmt].head_bits) for fmt in formats}
    plans = [BASE_PLAN] + sorted({w for w in wants.values() if w != BASE_PLAN}, key=str)
    masters, q_seconds = {}, 0.0
    for init, head_bits in plans:
        mdir = out / _master_name(init, head_bits)
        qopts = QuantizeOptions(bits=opts.bits, group_size=opts.group_size, init=init, gptq=True,
                                nsamples=opts.nsamples, seqlen=opts.seqlen, lm_head_bits=head_bits)
        summary = quantize_model(model_dir, mdir, qopts, calib_text=calib_text, force=True, progress=opts.progress)
        print(summary, flush=True)
        q_seconds += summary.seconds
        masters[(init, head_bits)] = MasterCheckpoint.load(mdir)
    master_dir = out / _master_name(*BASE_PLAN)
    n_params = _n_params(masters[BASE_PLAN])
    tok = AutoTokenizer.from_pretrained(str(master_dir))
    windows = eval_windows(tok, eval_text, opts.seqlen, max_windows=opts.eval_windows)
    runtimes = load_runtimes()

    rows = [Row("original (fp32)", "transformers", str(model_dir), note="the unquantized model"),
            Row("master (exact)", "transformers", str(master_dir), note="NeUQI master, dequantized")]
    rows += [Row(f"master ({_plan_label(*plan)})", "transformers", str(out / _master_name(*plan)),
                 note=f"the master `convert --to {', '.join(f for f, w in wants.items() if w == plan)}` quantizes")
             for plan in plans[1:]]
    reference = {fmt: next(i for i, r in enumerate(rows) if r.path == str(out / _master_name(*wants[fmt])))
                 for fmt in formats}
    t_export = time.time()
    for fmt in formats:
        path = out / (GGUF_NAME if fmt == "gguf" else fmt)
        row = Row(fmt, "?", str(path))
        try:
            report = exporters[fmt].export(masters[wants[fmt]], path, overwrite=True)  # the format's defaults
            refit = [t for t in report.tensors if not t.exact]
            row.note = f"{len(report.tensors) - len(refit)} tensors exact, {len(refit)} refit"
            if wants[fmt] != BASE_PLAN:
                row.note = f"from master ({_plan_label(*wants[fmt])}); " + row.note
            if report.advice:  # the exporter's own fix, e.g. "for an exact export quantize with --init neuqi_int"
                row.note += f" ({report.advice.rsplit(';', 1)[-1].strip()})"
            rt = runtime_for(path)
            row.runtime = rt.name if rt else "none"
        except Exception as exc:  # one format failing must not hide the others
            row.error = f"export: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        rows.append(row)
    t_export, t_score = time.time() - t_export, time.time()
    for row in rows:
        if row.error:
            continue
        rt = runtimes.get(row.runtime)
        try:
            if rt is None:
                raise UserError(f"no runtime loads {row.path}")
            print(f"scoring {row.format} in {row.runtime} ...", flush=True)
            budget = None if _is_reference(row.format) else opts.score_budget_s
            row.__dict__.update(score(rt, Path(row.path), windows, opts.decode_tokens, opts.progress, budget))
            ref = rows[reference.get(row.format, 1)]
            if row.windows < windows.shape[0] and ref.nll:
                row.note += (f"; time budget: scored the first {row.windows}/{windows.shape[0]} windows, its master on "
                             f"those {ppl_of(ref.nll, windows.shape[1], row.windows):.2f}")
            row.bytes = _weights_size(Path(row.path))
            row.bits_per_weight = 8 * row.bytes / n_params
        except Exception as exc:
            row.error = f"score: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    t_score = time.time() - t_score

    threads = f"{os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads" + (
        f", CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")
    settings = {**asdict(opts), "out": str(out), "model": model_dir.name, "eval_windows": int(windows.shape[0]),
                "eval_tokens": int(windows.shape[0] * (windows.shape[1] - 1)), "n_params": n_params,
                "quantize_seconds": q_seconds, "masters": [_plan_label(*p) for p in plans],
                "export_seconds": t_export, "score_seconds": t_score,
                "machine": f"{platform.machine()}, {threads}, load average {load0:.1f} at start"}
    result = DemoResult(rows=rows, settings=settings, seconds=time.time() - t0)
    title = (f"{model_dir.name} {opts.bits}-bit g{opts.group_size} NeUQI+GPTQ "
             f"(calib {opts.nsamples}×{opts.seqlen}, eval {windows.shape[0]}×{opts.seqlen})")
    result.files["plot"] = str(plot(rows, out / "demo.png", title))
    result.seconds = time.time() - t0
    result.files["report"] = str(write_report(result, out, command))
    (out / "results.json").write_text(json.dumps({"settings": settings, "seconds": result.seconds,
                                                  "rows": [asdict(r) for r in rows]}, indent=2, default=str))
    print(format_table(rows))
    print(f"calibration {opts.nsamples}×{opts.seqlen} tokens, evaluation {windows.shape[0]}×{opts.seqlen} tokens; "
          f"wall time {result.seconds / 60:.1f} min (quantize {q_seconds:.0f} s, export {t_export:.0f} s, "
          f"scoring {t_score:.0f} s); wrote {out / 'REPORT.md'} and {out / 'demo.png'}")
    return result
