"""A small ONNX graph builder over onnx.helper: unique names, shared constants, initializers with their byte count;
with an ExternalData sink, every large initializer's bytes go to the external data file as it is made."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

SIZE_THRESHOLD = 1024  # onnx.save_model's default: tensors whose raw data (sys.getsizeof) is at least this go external


class ExternalData:
    """The external data file of one model, appended tensor by tensor (issue 21: an export holds one initializer's
    bytes at a time). The layout is onnx.save_model's with all_tensors_to_one_file and this size threshold: each
    large initializer's raw bytes in the order the graph lists them, no padding, the tensor left with its location,
    offset and length."""

    def __init__(self, path, location: str):
        self.path, self.location = Path(path), location
        self._f = open(self.path, "wb")
        self.count = 0

    def write(self, name: str, data_type: int, dims, raw: np.ndarray) -> TensorProto | None:
        """A large initializer straight from its array: its bytes appended to the file and a TensorProto that only
        refers to them (None when it is small: it stays in the graph). The bytes never enter a TensorProto, whose
        memory protobuf's upb arena keeps to the end even after ClearField: parking them grew the export's RSS by
        every tensor's bytes."""
        n = raw.nbytes
        if sys.getsizeof(b"") + n < SIZE_THRESHOLD:  # onnx.save_model's rule: sys.getsizeof of the raw_data bytes
            return None
        t = TensorProto(name=name, data_type=data_type, dims=list(dims))
        offset = self._f.tell()
        self._f.write(memoryview(np.ascontiguousarray(raw)).cast("B"))
        t.data_location = TensorProto.EXTERNAL  # what onnx's set_external_data writes (it wants a raw_data field)
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(n))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self.count += 1
        return t

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def embed(self, tensors) -> None:
        """Put the parked bytes back into `tensors` (the model saved as one file, as onnx writes a small one)."""
        self.close()
        with open(self.path, "rb") as f:
            for t in tensors:
                if t.data_location == TensorProto.EXTERNAL:
                    info = {e.key: e.value for e in t.external_data}
                    f.seek(int(info["offset"]))
                    t.raw_data = f.read(int(info["length"]))
                    del t.external_data[:]
                    t.ClearField("data_location")

NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}
TP_DTYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}



def lossless_half(arr: np.ndarray):
    """(TensorProto type, raw uint16 array) of float32 `arr` in bfloat16 or float16, whichever holds every value
    exactly (bf16 first: a bf16 checkpoint's weights always fit it), or None when neither does."""
    a = np.ascontiguousarray(arr, dtype=np.float32)
    bits = a.view(np.uint32)
    if not (bits & 0xFFFF).any():
        return TensorProto.BFLOAT16, (bits >> 16).astype(np.uint16)
    with np.errstate(over="ignore"):
        h = a.astype(np.float16)
    if np.array_equal(h.astype(np.float32), a):
        return TensorProto.FLOAT16, h.view(np.uint16)
    return None


class Builder:
    """Nodes and initializers of one graph in activation dtype `dtype` ('fp32' or 'fp16'). `float_storage`:
    how float weights of an fp32 graph are stored ('half': bf16/fp16 where that loses nothing, else fp16
    rounded (fp32 where fp16's range cannot hold them), cast to fp32 in the graph; 'exact': only the lossless
    half; 'fp32': as they are)."""

    def __init__(self, dtype: str, float_storage: str = "half", sink: ExternalData | None = None):
        self.dtype = dtype
        self.sink = sink  # where large initializers' bytes go as they are made (None: kept in the protos)
        self.float_storage = float_storage
        self.stored: dict = {}  # float weight name -> the dtype it is stored in (BF16 / FP16), when not the graph's
        self.rounded: set = set()  # float weights rounded to fp16 (float_storage 'half'), not exact
        self.np = NP_DTYPES[dtype]
        self.tp = TP_DTYPES[dtype]
        self.nodes: list = []
        self.inits: list = []
        self._names: set = set()
        self._consts: dict = {}
        self.init_bytes = 0

    def reserve(self, *names: str) -> None:
        """Mark graph input/output names as taken."""
        self._names.update(names)

    def name(self, base: str) -> str:
        """`base`, or `base_N` if taken; marks it taken."""
        n, i = base, 0
        while n in self._names:
            i += 1
            n = f"{base}_{i}"
        self._names.add(n)
        return n

    def init(self, name: str, arr: np.ndarray) -> str:
        """An initializer holding `arr` as it is; returns its (unique) name."""
        name = self.name(name)
        arr = np.ascontiguousarray(arr)
        self._add_array(name, helper.np_dtype_to_tensor_dtype(arr.dtype), arr.shape, arr)
        self.init_bytes += arr.nbytes
        return name

    def _add_array(self, name: str, data_type: int, dims, raw: np.ndarray) -> None:
        """An initializer from an array's bytes: written to the sink directly when large, else in the graph."""
        t = None if self.sink is None else self.sink.write(name, data_type, dims, raw)
        if t is None:
            t = (numpy_helper.from_array(raw, name) if raw.dtype == helper.tensor_dtype_to_np_dtype(data_type)
                 else helper.make_tensor(name, data_type, dims, raw.tobytes(), raw=True))
        self.inits.append(t)

    def float_weight(self, name: str, arr: np.ndarray) -> str:
        """A float weight as a tensor in the graph's dtype: in an fp32 graph stored as `float_storage` says and
        cast to fp32; in an fp16 graph stored fp16."""
        half = None
        if self.dtype == "fp32" and self.float_storage != "fp32":
            half = lossless_half(arr)
            if half is None and self.float_storage == "half":
                h = np.asarray(arr, dtype=np.float32).astype(np.float16)
                if np.isfinite(h).all():
                    half = TensorProto.FLOAT16, h.view(np.uint16)
                    self.rounded.add(name)
        if half is None:
            return self.init(name, np.asarray(arr).astype(self.np))
        tp, raw = half
        self.stored[name] = "BF16" if tp == TensorProto.BFLOAT16 else "FP16"
        stored = self.name(name)
        self._add_array(stored, tp, raw.shape, raw)
        self.init_bytes += raw.nbytes
        return self.op("Cast", [stored], f"{name}/to_f32", to=TensorProto.FLOAT)

    def const(self, value, dtype) -> str:
        """A small constant initializer, shared by every use of the same value and dtype."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"const_{len(self._consts)}", arr)
        return self._consts[key]

    def i64(self, *values) -> str:
        """A shared int64 1-D constant (shapes, axes)."""
        return self.const(list(values), np.int64)

    def op(self, op_type: str, inputs: list, name: str | None = None, domain: str | None = None, n_out: int = 1, **attrs):
        """Append a node; its output name (or the list of them with n_out > 1)."""
        node_name = self.name(f"/{name or op_type}")
        outs = [self.name(f"{node_name}/out{k}") for k in range(n_out)]
        kw = {"domain": domain} if domain else {}
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name, **kw, **attrs))
        return outs[0] if n_out == 1 else outs

    def op_to(self, op_type: str, inputs: list, output: str, **attrs) -> str:
        """Append a node writing the (reserved) graph output `output`."""
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=self.name(f"/{output}"), **attrs))
        return output

    def to_float(self, x: str, name: str) -> str:
        """x in float32 (a Cast when the graph runs in fp16)."""
        return x if self.dtype == "fp32" else self.op("Cast", [x], f"{name}/to_f32", to=TensorProto.FLOAT)

    def to_model(self, x: str, name: str) -> str:
        """A float32 x back in the graph's dtype."""
        return x if self.dtype == "fp32" else self.op("Cast", [x], f"{name}/to_model", to=self.tp)
