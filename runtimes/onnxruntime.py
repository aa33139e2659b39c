"""onnxruntime runtime: load an exported decoder (model.onnx in a directory, or a *.onnx file), give
per-token logits and greedy generation through the KV cache.

The graph's interface is the one the ONNX exporter writes (and onnxruntime-genai reads): input_ids,
attention_mask, position_ids, past_key_values.{i}.key/value -> logits, present.{i}.key/value. Each
window of `logits()` is evaluated from an empty cache. CUDA is used when onnxruntime has it (the
onnxruntime-gpu package), else the CPU.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from neuqi_export.errors import UserError
from runtimes.registry import Runtime, register

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


def _model_file(path: Path) -> Path:
    path = Path(path)
    if path.is_dir():
        f = path / "model.onnx"
        if f.is_file():
            return f
        found = sorted(path.glob("*.onnx"))
        if len(found) == 1:
            return found[0]
        raise UserError(f"'{path}' holds no single model.onnx; export one with `neuqi-export export MASTER --to onnx -o DIR`")
    if path.is_file() and path.suffix.lower() == ".onnx":
        return path
    raise UserError(f"'{path}' is not an ONNX model; export one with `neuqi-export export MASTER --to onnx -o DIR`")


class OnnxRuntimeScorer:
    def __init__(self, path, n_threads: int | None = None, providers: list | None = None, optimization: str = "all"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("onnxruntime is not installed; `pip install 'neuqi-export[onnxruntime]'` (or onnxruntime)") from None
        self.path = _model_file(path)
        so = ort.SessionOptions()
        if n_threads:
            so.intra_op_num_threads = int(n_threads)
        so.graph_optimization_level = {
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        if providers is None:
            avail = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"onnxruntime could not load '{self.path}' ({msg}); re-export it or update onnxruntime (>= 1.28)") from None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        for need in ("input_ids", "attention_mask", "position_ids"):
            if need not in self.inputs:
                raise UserError(f"'{self.path}' has no input '{need}'; it is not a decoder exported by neuqi-export")
        self.past_names = sorted((n for n in self.inputs if _PAST.match(n)),
                                 key=lambda n: (int(_PAST.match(n).group(1)), _PAST.match(n).group(2)))
        self.n_layers = len(self.past_names) // 2
        k0 = self.inputs[self.past_names[0]] if self.past_names else None
        self.kv_heads, self.head_dim = (int(k0.shape[1]), int(k0.shape[3])) if k0 is not None else (0, 0)
        # (kv heads, head dim) of each cache input: layers may differ
        self.past_dims = {n: (int(self.inputs[n].shape[1]), int(self.inputs[n].shape[3])) for n in self.past_names}
        self.dtype = np.float16 if (k0 is not None and "float16" in k0.type) else np.float32
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.n_vocab = int(self.session.get_outputs()[0].shape[-1])

    # ------------------------------------------------------------------------------------------------
    def _empty_past(self, batch: int) -> dict:
        return {n: np.zeros((batch, h, 0, d), dtype=self.dtype) for n, (h, d) in self.past_dims.items()}

    def _check_ids(self, ids: np.ndarray) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_vocab):
            raise UserError(f"token id outside 0..{self.n_vocab - 1}; the ids do not come from this model's tokenizer")

    def step(self, ids: np.ndarray, past: dict, past_len: int) -> tuple[np.ndarray, dict]:
        """One forward over `ids` (b, L) after a cache of `past_len` tokens: (logits (b, L, V) float32, new cache)."""
        b, L = ids.shape
        feed = {
            "input_ids": ids.astype(np.int64),
            "attention_mask": np.ones((b, past_len + L), dtype=np.int64),
            "position_ids": np.broadcast_to(np.arange(past_len, past_len + L, dtype=np.int64), (b, L)).copy(),
            **past,
        }
        res = self.session.run(None, feed)
        out = dict(zip(self.outputs, res))
        new_past = {n: out[n.replace("past_key_values.", "present.")] for n in self.past_names}
        return np.asarray(out["logits"], dtype=np.float32), new_past

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """int (b, L) token ids -> float32 (b, L, vocab), from an empty cache."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        self._check_ids(ids)
        return self.step(ids, self._empty_past(ids.shape[0]), 0)[0]

    def generate(self, ids, max_new_tokens: int, stop_at_eos: bool = False, eos_token_id: int | None = None) -> list[int]:
        """Greedy continuation of `ids` through the KV cache: the new tokens only."""
        seq = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        self._check_ids(seq)
        logits, past = self.step(seq, self._empty_past(1), 0)
        n = seq.shape[1]
        new: list[int] = []
        for i in range(int(max_new_tokens)):
            tok = int(np.argmax(logits[0, -1]))
            new.append(tok)
            if i == max_new_tokens - 1 or (stop_at_eos and eos_token_id is not None and tok == eos_token_id):
                break
            logits, past = self.step(np.array([[tok]], dtype=np.int64), past, n)
            n += 1
        return new

    def close(self) -> None:
        self.session = None


def load(path, **options) -> OnnxRuntimeScorer:
    return OnnxRuntimeScorer(path, **options)


def detects(path: Path) -> bool:
    path = Path(path)
    if path.is_dir():
        return (path / "model.onnx").is_file()
    return path.suffix.lower() == ".onnx"


register(Runtime(name="onnxruntime", detects=detects, load=load))
