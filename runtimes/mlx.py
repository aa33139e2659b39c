"""MLX runtime (mlx-lm): load an MLX directory (what `converters.mlx` writes, or any mlx-lm model dir),
give per-token logits (each window from an empty cache) and greedy generation through mlx-lm's KV cache.

Detects a directory whose config.json has a `quantization` block with `group_size`/`bits` and no
`quant_method` (mlx-lm's own layout). Runs on MLX's default device (Metal on Apple silicon, the CPU
with mlx[cpu] on Linux). On the CPU the model's float parameters (half-precision weights, scales and biases)
are cast to float32 after loading, which keeps every stored value: MLX's CPU kernels are 8x (bf16) to 38x
(fp16) slower than fp32 (quantized matmul 512x576x1536, 3-bit g64, mlx 0.31), so the scores are those of the
stored values computed in fp32; on Metal mlx-lm computes in the stored half dtype.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from neuqi_export.errors import UserError
from runtimes.registry import Runtime, register


class MlxScorer:
    def __init__(self, path):
        try:
            import mlx.core as mx  # noqa: F401
            from mlx_lm.utils import load_model
        except ImportError:
            raise UserError("mlx-lm is not installed; `pip install mlx-lm` (on Linux also `pip install 'mlx[cpu]'`)") from None
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise UserError(f"'{self.path}' is not an MLX model directory (no config.json); export one with `neuqi-export export MASTER --to mlx -o DIR`")
        try:
            self.model, self.config = load_model(self.path)
        except (ValueError, FileNotFoundError, KeyError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"mlx-lm could not load '{self.path}' ({msg}); re-export it or update mlx-lm") from None
        import mlx.core as mx

        if mx.default_device() == mx.cpu:  # same values, fp32 compute (module doc)
            self.model.set_dtype(mx.float32)
        self.n_vocab = int(self.config.get("vocab_size") or 0)

    def _check_ids(self, ids: np.ndarray) -> None:
        if ids.size and (ids.min() < 0 or (self.n_vocab and ids.max() >= self.n_vocab)):
            raise UserError(f"token id outside 0..{self.n_vocab - 1}; the ids do not come from this model's tokenizer")

    def logits(self, ids) -> np.ndarray:
        """int (b, L) token ids -> float32 (b, L, vocab), from an empty cache."""
        import mlx.core as mx

        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        self._check_ids(ids)
        out = self.model(mx.array(ids.astype(np.int32)))
        out = out.astype(mx.float32)
        mx.eval(out)
        return np.array(out, dtype=np.float32)

    def generate(self, ids, max_new_tokens: int, stop_at_eos: bool = False, eos_token_id: int | None = None) -> list[int]:
        """Greedy continuation of `ids` through mlx-lm's KV cache: the new tokens only."""
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        seq = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        self._check_ids(seq)
        cache = make_prompt_cache(self.model)
        logits = self.model(mx.array(seq.astype(np.int32)), cache=cache)
        new: list[int] = []
        for i in range(int(max_new_tokens)):
            tok = int(mx.argmax(logits[0, -1]).item())
            new.append(tok)
            if i == max_new_tokens - 1 or (stop_at_eos and eos_token_id is not None and tok == eos_token_id):
                break
            logits = self.model(mx.array([[tok]], dtype=mx.int32), cache=cache)
        return new


def load(path, **options) -> MlxScorer:
    return MlxScorer(path)


def detects(path: Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        c = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    q = c.get("quantization")
    return (isinstance(q, dict) and "group_size" in q and "bits" in q and "quant_method" not in q
            and "quant_method" not in (c.get("quantization_config") or {}))


register(Runtime(name="mlx", detects=detects, load=load))
