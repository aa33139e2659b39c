"""llama.cpp importance-matrix files <-> the master's per-linear h (hdiag).

What llama.cpp calls the importance matrix is, per weight tensor, the mean over calibration tokens of the
squared input activation of each input column: imatrix[j] = Σ_t x_tj² / N. That is the diagonal of the
H = XᵀX / N that NeUQI / GPTQ use (neuqi_export.hessian), before damping, so the two are the same vector.

Formats (both read by `llama-quantize --imatrix FILE`; the reader tells them apart by the GGUF magic):

- GGUF (what current `llama-imatrix` writes, default `imatrix.gguf`): a GGUF file with
  `general.type = "imatrix"`, `imatrix.datasets` (string array), `imatrix.chunk_count`,
  `imatrix.chunk_size` (u32), and per weight tensor two F32 tensors:
  `<name>.in_sum2` (ne = [n_in, n_mat]: Σ x² per column, per expert matrix) and `<name>.counts`
  (ne = [1, n_mat]: tokens summed). The importance is in_sum2 / counts.
- legacy binary `.dat` (`--output-format dat`): int32 n_entries; per entry int32 name length, the name,
  int32 ncall, int32 nval, nval float32 holding mean * ncall (the reader divides by ncall); then int32
  chunk count and int32 length + the dataset name.

Names are the GGUF weight names (`blk.N.attn_q.weight`, ...). attn_q / attn_k / attn_v read the same
input and ffn_gate / ffn_up too, so they carry the same vector (llama-imatrix records each separately,
with the same values). The rotary row permutation of q/k (writer.rope_permutation) permutes output rows,
not input columns, so h needs no permutation.

Master -> file: hdiag = diag(H) + percdamp * mean(diag(H)), so diag(H) = hdiag - p/(1+p) * mean(hdiag);
counts = the calibration tokens (nsamples * seqlen) and in_sum2 = diag(H) * counts, chunk_count =
nsamples, chunk_size = seqlen. File -> master: `read_imatrix` returns the undamped mean x² per HF module
(damp it as the pipeline does before using it as h).
"""
from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np

from neuqi_export.errors import UserError

from .presets import linear_names, row_lengths  # the HF <-> GGUF name and row-length tables

GGUF_MAGIC = b"GGUF"


def master_importance(master) -> tuple[dict[str, np.ndarray], int, int]:
    """({GGUF name: undamped mean x² (float64)}, chunk_count, chunk_size) from a master's hdiag."""
    q = master.quantization_config
    if q.get("calibrated") is False:
        raise UserError("this master was quantized without calibration (h = 1), so it has no importance matrix; "
                        "re-run quantize with calibration text")
    p = float(q.get("percdamp", 0.0) or 0.0)
    names = linear_names(master.config)
    out = {}
    for hf, lin in master.linears.items():
        if hf not in names:
            raise UserError(f"linear {hf!r} has no llama.cpp tensor name; an imatrix holds the blocks' linears only")
        h = np.ones(lin.shape[1]) if lin.hdiag is None else lin.hdiag.double().cpu().numpy()
        raw = h - (p / (1 + p)) * h.mean()  # undo the damping: mean(hdiag) = (1+p) * mean(diag H)
        out[names[hf]] = np.maximum(raw, 0.0)
    return out, int(q.get("nsamples", 1) or 1), int(q.get("seqlen", 1) or 1)


def write_imatrix(master, path, fmt: str = "gguf", dataset: str | None = None) -> Path:
    """Write the master's h as a llama.cpp imatrix file (fmt 'gguf' — current — or legacy 'dat')."""
    path = Path(path)
    imp, chunks, chunk_size = master_importance(master)
    dataset = dataset or "neuqi-export master calibration"
    tokens = chunks * chunk_size
    entries = {name: (v * tokens, float(tokens)) for name, v in sorted(imp.items(), key=lambda kv: _key(kv[0]))}
    if fmt == "gguf":
        write_imatrix_gguf(path, entries, [dataset], chunks, chunk_size)
    elif fmt == "dat":
        write_imatrix_dat(path, {k: s / c for k, (s, c) in entries.items()}, chunks, dataset)
    else:
        raise UserError(f"imatrix format {fmt!r} is unknown; use gguf or dat")
    return path


def _key(name: str):
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def write_imatrix_gguf(path, entries: dict[str, tuple[np.ndarray, float]], datasets: list[str], chunk_count: int,
                       chunk_size: int) -> None:
    """entries: {tensor name: (Σ x² per column (n_in,), token count)} -> GGUF imatrix file."""
    import gguf

    w = gguf.GGUFWriter(str(path), "imatrix")
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes no architecture
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", list(datasets))
    w.add_uint32("imatrix.chunk_count", int(chunk_count))
    w.add_uint32("imatrix.chunk_size", int(chunk_size))
    for name, (sums, count) in entries.items():
        w.add_tensor(f"{name}.in_sum2", np.asarray(sums, np.float32).reshape(1, -1))  # ne = [n_in, 1]
        w.add_tensor(f"{name}.counts", np.array([[count]], np.float32))  # ne = [1, 1]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_imatrix_dat(path, values: dict[str, np.ndarray], chunk_count: int, dataset: str, ncall: int | None = None) -> None:
    """values: {tensor name: mean x² per column} -> legacy binary imatrix."""
    ncall = int(ncall or max(chunk_count, 1))
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(values)))
        for name, v in values.items():
            b = name.encode()
            v = np.asarray(v, np.float32)
            f.write(struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, v.size))
            f.write((v * np.float32(ncall)).astype("<f4").tobytes())
        d = dataset.encode()
        f.write(struct.pack("<i", int(chunk_count)) + struct.pack("<i", len(d)) + d)


def read_imatrix_file(path) -> tuple[dict[str, np.ndarray], dict]:
    """({tensor name: importance (mean x²) float64 (n_in,) or (n_mat, n_in)}, metadata) from either format."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"imatrix file '{path}' does not exist; pass a llama.cpp imatrix (.gguf or .dat, e.g. from llama-imatrix)")
    with open(path, "rb") as f:
        magic = f.read(4)
    return _read_gguf(path) if magic == GGUF_MAGIC else _read_dat(path)


def _read_gguf(path: Path):
    import gguf

    from neuqi_export.file_checks import gguf_header

    gguf_header(path, "recreate the imatrix with llama-imatrix")
    try:
        r = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"'{path}' is not a readable GGUF imatrix ({exc})") from None
    meta = {}
    for key in ("imatrix.chunk_count", "imatrix.chunk_size", "general.type"):
        if key in r.fields:
            meta[key.split(".")[-1]] = r.fields[key].contents()
    if "imatrix.datasets" in r.fields:
        meta["datasets"] = r.fields["imatrix.datasets"].contents()
    tensors = {t.name: np.asarray(t.data, np.float64) for t in r.tensors}
    out = {}
    for tname, sums in tensors.items():
        if not tname.endswith(".in_sum2"):
            continue
        base = tname[: -len(".in_sum2")]
        counts = tensors.get(base + ".counts")
        if counts is None:
            raise UserError(f"'{path}': {tname} has no matching {base}.counts; the imatrix file is damaged")
        sums = sums.reshape(-1, sums.shape[-1])
        c = counts.reshape(-1)[:, None]
        imp = np.where(c > 0, sums / np.where(c > 0, c, 1), 0.0)
        out[base] = imp[0] if imp.shape[0] == 1 else imp
    if not out:
        raise UserError(f"'{path}' holds no <name>.in_sum2 tensors; it is not a llama.cpp imatrix file")
    return out, meta


def _read_dat(path: Path):
    data = path.read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise UserError(f"'{path}' ends early; it is not a complete llama.cpp imatrix (.dat) file")
        vals = struct.unpack_from(fmt, data, pos)
        pos += size
        return vals

    (n,) = take("<i")
    if n < 1 or n > 1_000_000:
        raise UserError(f"'{path}' is neither a GGUF nor a legacy llama.cpp imatrix file")
    out = {}
    for _ in range(n):
        (ln,) = take("<i")
        if not 0 <= ln <= len(data) - pos:
            raise UserError(f"'{path}' claims a {ln}-byte name past its end; it is not a complete llama.cpp imatrix file")
        name = data[pos:pos + ln].decode("utf-8", "replace")
        pos += ln
        ncall, nval = take("<ii")
        if not 0 <= 4 * nval <= len(data) - pos:
            raise UserError(f"'{path}' claims {nval} values for {name!r} past its end; it is not a complete imatrix file")
        v = np.frombuffer(data, "<f4", nval, pos).astype(np.float64)
        pos += 4 * nval
        out[name] = v / ncall if ncall > 0 else v
    meta = {}
    if pos + 4 <= len(data):
        (meta["chunk_count"],) = take("<i")
        if pos + 4 <= len(data):
            (ln,) = take("<i")
            meta["datasets"] = [data[pos:pos + ln].decode("utf-8", "replace")]
    return out, meta


def read_imatrix(path, model_config: dict) -> dict:
    """{HF linear module name: torch float32 h (n_in,)} from a llama.cpp imatrix file (GGUF or legacy .dat).

    h is the undamped mean squared input activation; linears the file lacks are left out (the caller falls
    back to calibration or h = 1 for them). A vector whose length does not match the model is refused.
    """
    import torch

    imp, _ = read_imatrix_file(path)
    n_in = row_lengths(model_config)
    out = {}
    for hf, g in linear_names(model_config).items():
        if g not in imp:
            continue
        v = np.asarray(imp[g])
        if not np.isfinite(v).all() or (v < 0).any():
            raise UserError(f"imatrix entry {g} in '{path}' holds NaN, Inf or negative values; recreate the imatrix")
        if v.ndim != 1:
            raise UserError(f"imatrix entry {g} has {v.shape[0]} expert matrices; only dense models are supported")
        want = n_in[g.split(".")[2]]
        if v.size != want:
            raise UserError(f"imatrix entry {g} has {v.size} values but the model's {hf} has {want} inputs; "
                            "the imatrix belongs to another model")
        out[hf] = torch.from_numpy(v.astype(np.float32))
    if not out:
        raise UserError(f"'{path}' has no entry for this model's linears (expected names like blk.0.attn_q.weight)")
    return out


__all__ = ["write_imatrix", "read_imatrix", "read_imatrix_file", "write_imatrix_gguf", "write_imatrix_dat",
           "linear_names", "master_importance"]
