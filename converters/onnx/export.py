"""export_onnx: master checkpoint -> directory with model.onnx, genai_config.json (where genai has the family's
type), tokenizer files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
from onnx import helper

from converters.registry import ExportReport, TensorReport, prepare_output
from neuqi_export.atomic import atomic_directory
from neuqi_export.errors import UserError

from .builder import ExternalData
from .genai import genai_config, skip_reason
from .graph import IR_VERSION, MIN_ORT_VERSION, MS_OPSET, ONNX_OPSET, DecoderGraph

ACCURACY_LEVEL_DEFAULT = 4
MODEL_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
EXTERNAL_THRESHOLD = int(1.8 * 2**30)  # protobuf's hard limit is 2 GiB for the whole file


def _tokenizer_files():
    from neuqi_export.master import TOKENIZER_FILES

    return TOKENIZER_FILES


def build_model(master, dtype: str = "fp32", zero_point: str = "fast", accuracy_level: int = ACCURACY_LEVEL_DEFAULT,
                float_storage: str = "half", sink: ExternalData | None = None):
    """(onnx.ModelProto, DecoderGraph) for a master checkpoint, with metadata set. With `sink`, every large
    initializer's bytes are written to that external data file as the graph is built (the model refers to them)."""
    g = DecoderGraph(master, dtype=dtype, zero_point=zero_point, accuracy_level=accuracy_level,
                     float_storage=float_storage, sink=sink)
    model = g.build()
    q = master.config.get("quantization_config", {})
    forms = sorted({w.zero_point_form for _, w in g.reports})
    helper.set_model_props(model, {
        "neuqi_export.format": "onnx-matmulnbits-1",
        "neuqi_export.model_type": g.d.model_type,
        "neuqi_export.bits": str(q.get("bits", "")),
        "neuqi_export.group_size": str(q.get("group_size", "")),
        "neuqi_export.dtype": dtype,
        "neuqi_export.float_storage": float_storage,
        "neuqi_export.zero_point": zero_point,
        "neuqi_export.zero_point_forms": ",".join(forms),
        "neuqi_export.accuracy_level": str(accuracy_level),
        "opset.ai.onnx": str(ONNX_OPSET),
        "opset.com.microsoft": str(MS_OPSET),
        "ir_version": str(IR_VERSION),
        "onnxruntime.min_version": MIN_ORT_VERSION,
    })
    return model, g


def _report(g: DecoderGraph, dtype: str, path: Path, nbytes: int) -> ExportReport:
    rep = ExportReport(path=path, bytes=nbytes)
    for name, w in g.reports:
        note = f"block_size={w.block_size}, zero points {w.zero_point_form}"
        if w.master_bits != w.bits:
            note += f", {w.master_bits}-bit codes in a {w.bits}-bit container"
        if w.K % w.block_size:
            note += f", ragged last block ({w.K % w.block_size} of {w.block_size})"
        if dtype == "fp16":
            note += ", scales/zeros stored fp16"
        if g.accuracy_level == 4 and w.zero_point_form != "float":
            note += ", accuracy_level 4: int8 activations at run time"
        rep.tensors.append(TensorReport(name=name, type=f"MatMulNBits-{w.bits}", exact=True, note=note))
    for name in g.master.tensors:
        key = name if name in g.b.stored else f"{name}_t"
        stored, rounded = g.b.stored.get(key, dtype.upper()), key in g.b.rounded
        rep.tensors.append(TensorReport(name=name, type=stored, exact=dtype == "fp32" and not rounded,
                                        note="rounded to fp16 (--float-storage exact keeps it exact)" if rounded else ""))
    return rep


def export_onnx(master, out, dtype: str = "fp32", zero_point: str = "fast", accuracy_level: int = ACCURACY_LEVEL_DEFAULT,
                overwrite: bool = False, external_data: bool | None = None, float_storage: str = "half") -> ExportReport:
    out = prepare_output(out, overwrite)
    if out.exists() and not out.is_dir():
        raise UserError(f"output '{out}' is a file; the ONNX export writes a directory, choose another -o")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        sink = ExternalData(tmp / DATA_NAME, DATA_NAME)  # initializers streamed out as they are made
        try:
            model, g = build_model(master, dtype=dtype, zero_point=zero_point, accuracy_level=accuracy_level,
                                   float_storage=float_storage, sink=sink)
        finally:
            sink.close()
        external = g.b.init_bytes > EXTERNAL_THRESHOLD if external_data is None else bool(external_data)
        if not external:  # a small model: one file, its bytes put back (what onnx.save_model writes without them)
            sink.embed(model.graph.initializer)
        if not external or not sink.count:
            (tmp / DATA_NAME).unlink()
        onnx.save_model(model, str(tmp / MODEL_NAME))
        cfg = genai_config(master.config, g.d, filename=MODEL_NAME)
        if cfg is not None:
            (tmp / "genai_config.json").write_text(json.dumps(cfg, indent=4) + "\n")
        if master.tokenizer_dir is not None:
            for fname in _tokenizer_files():
                src = Path(master.tokenizer_dir) / fname
                if src.is_file():
                    shutil.copy2(src, tmp / fname)
        nbytes = sum(f.stat().st_size for f in tmp.iterdir() if f.name.startswith(MODEL_NAME))
    rep = _report(g, dtype, out, nbytes)
    rep.advice = skip_reason(g.d) or ""
    return rep


__all__ = ["export_onnx", "build_model", "ACCURACY_LEVEL_DEFAULT", "MODEL_NAME", "DATA_NAME"]
