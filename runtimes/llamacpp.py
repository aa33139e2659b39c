"""llama.cpp runtime (through llama-cpp-python): load a GGUF, give per-token logits, greedy generation.

Each window is evaluated from a fresh state (the KV cache is cleared), so logits of window i do not
depend on window i-1. llama.cpp quantizes the activations to 8 bits for its quantized matmuls on
CPU, so its logits differ slightly from a float evaluation of the same weights.

Extra CPU buffer types (llama.cpp's weight repacking / AMX kernels) are OFF by default: with the
llama-cpp-python 0.3.36 build on an AMX machine (Xeon with AMX_INT8) every decode of a model with
Q4_0/Q4_1/Q8_0 weights segfaults inside llama_decode when they are on, at any model size; Q5_1 and
F32 are unaffected. Pass extra_buffers=True to turn them back on where they work.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from neuqi_export.atomic import atomic_file
from neuqi_export.errors import UserError
from runtimes.registry import Runtime, register


_PARAMS_LOCK = threading.Lock()


@contextmanager
def _model_params(extra_buffers: bool):
    """llama-cpp-python has no argument for llama_model_params.use_extra_bufts: set it on the defaults it reads."""
    import llama_cpp.llama as ll

    if extra_buffers:
        yield
        return
    with _PARAMS_LOCK:
        orig = ll.llama_cpp.llama_model_default_params

        def defaults():
            params = orig()
            if hasattr(params, "use_extra_bufts"):
                params.use_extra_bufts = False
            return params

        ll.llama_cpp.llama_model_default_params = defaults
        try:
            yield
        finally:
            ll.llama_cpp.llama_model_default_params = orig


class LlamaCppScorer:
    def __init__(self, path, n_ctx: int | None = None, n_threads: int = 2, n_batch: int = 512, n_gpu_layers: int = 0,
                 extra_buffers: bool = False):
        """n_ctx None: start at 2048 and re-create the context when a longer window arrives; an int is a hard limit."""
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise UserError("llama-cpp-python is not installed; `pip install 'neuqi-export[llamacpp]'` (or llama-cpp-python)") from None
        path = Path(path)
        if not path.is_file():
            raise UserError(f"GGUF file '{path}' does not exist; export one with `neuqi-export export MASTER --to gguf`")
        from neuqi_export.file_checks import gguf_header

        gguf_header(path, "re-export it with `neuqi-export export MASTER --to gguf`")  # before llama.cpp parses it
        self.path = path
        self._grow = n_ctx is None
        self._opts = dict(n_threads=n_threads, n_batch=n_batch, n_gpu_layers=n_gpu_layers, extra_buffers=extra_buffers)
        self._open(2048 if n_ctx is None else int(n_ctx))

    def _open(self, n_ctx: int) -> None:
        from llama_cpp import Llama

        path, o = self.path, self._opts
        self.n_ctx = n_ctx
        try:
            with _model_params(o["extra_buffers"]):
                self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(o["n_batch"], n_ctx), logits_all=True,
                                 n_threads=o["n_threads"], n_threads_batch=o["n_threads"], n_gpu_layers=o["n_gpu_layers"],
                                 verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise UserError(f"llama.cpp could not load '{path}' ({exc}); re-export the GGUF or update llama-cpp-python") from None
        self.n_vocab = self.llm.n_vocab()

    def _ensure_ctx(self, n: int) -> None:
        if n > self.n_ctx and self._grow:
            self.llm.close()
            self._open(-(-n // 256) * 256)

    def _eval(self, ids: list[int]) -> None:
        self._ensure_ctx(len(ids))
        if len(ids) > self.n_ctx:
            raise UserError(f"window of {len(ids)} tokens exceeds the llama.cpp context {self.n_ctx}; load with a larger n_ctx or use shorter windows")
        if ids and (min(ids) < 0 or max(ids) >= self.n_vocab):
            raise UserError(f"token id outside 0..{self.n_vocab - 1}; the ids do not come from this model's tokenizer")
        self.llm.reset()
        self.llm.eval(ids)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """int (b, L) token ids -> float32 (b, L, vocab); each row from a fresh state."""
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None]
        b, L = ids.shape
        out = np.empty((b, L, self.n_vocab), dtype=np.float32)
        for i in range(b):
            self._eval([int(t) for t in ids[i]])
            out[i] = np.asarray(self.llm.scores[:L], dtype=np.float32)
        return out

    def generate(self, ids: list[int], max_new_tokens: int, stop_at_eos: bool = False) -> list[int]:
        """Greedy continuation of `ids`: the new tokens only."""
        ids = [int(t) for t in np.asarray(ids).reshape(-1)]
        self._ensure_ctx(len(ids) + max_new_tokens)
        if len(ids) + max_new_tokens > self.n_ctx:
            raise UserError(f"prompt + {max_new_tokens} new tokens exceed the llama.cpp context {self.n_ctx}; load with a larger n_ctx")
        self._eval(ids)
        eos = self.llm.token_eos()
        new: list[int] = []
        for _ in range(max_new_tokens):
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            new.append(tok)
            if stop_at_eos and tok == eos:
                break
            self.llm.eval([tok])
        return new

    def close(self) -> None:
        self.llm.close()


def load(path, **options) -> LlamaCppScorer:
    return LlamaCppScorer(path, **options)


def detects(path: Path) -> bool:
    path = Path(path)
    if path.suffix.lower() != ".gguf":
        return False
    if path.is_file():
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    return True


register(Runtime(name="llamacpp", detects=detects, load=load))


def llama_quantize(inp, out, ftype: str, nthread: int = 0) -> None:
    """llama.cpp's own quantizer on a GGUF (libllama's llama_model_quantize, what `llama-quantize INP OUT FTYPE` runs,
    without an imatrix: that argument is a C++ map Python cannot build); ftype e.g. 'Q2_K', 'Q4_K_M'."""
    import ctypes

    import llama_cpp

    name = f"LLAMA_FTYPE_MOSTLY_{ftype}"
    if not hasattr(llama_cpp, name):
        raise UserError(f"llama.cpp has no file type {ftype!r}; use a llama-quantize type name such as Q4_K_M")
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = nthread
    params.ftype = getattr(llama_cpp, name)
    with atomic_file(out) as tmp:  # a failed or interrupted run leaves no file under the final name
        rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise UserError(f"llama.cpp's quantizer failed on {inp} (rc {rc}); check that it is a valid GGUF")
