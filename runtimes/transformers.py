"""transformers runtime: a master checkpoint (dequantized through `master_to_hf`), a compressed-tensors export
(loaded with `CompressedTensorsConfig(dequantize=True)`, which transformers 5 needs for asymmetric
pack-quantized weights), a GGUF file (`gguf_file=`, dequantized by transformers; needs `gguf`), or a plain
HF directory. Gives per-token logits (each window from scratch) and greedy generation (transformers' own
`generate`, KV cache). Runs on CUDA when torch has it, else the CPU, in float32 unless `dtype` is given.

Detects a master checkpoint (quant_method "neuqi") and a compressed-tensors directory; GGUF files and plain HF
directories are loaded when this runtime is asked for by name (llama.cpp is the natural runtime for a GGUF).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from neuqi_export.errors import UserError
from runtimes.registry import Runtime, register


def _quant_method(path: Path) -> str | None:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        return (json.loads(cfg.read_text()).get("quantization_config") or {}).get("quant_method")
    except (OSError, ValueError, AttributeError):
        return None


def _quiet():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class TransformersScorer:
    def __init__(self, path, device: str | None = None, dtype=None, n_threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        path = Path(path)
        if not path.exists():
            raise UserError(f"'{path}' does not exist; pass a master checkpoint, a compressed-tensors export, a .gguf file or a HF directory")
        if n_threads:
            torch.set_num_threads(int(n_threads))
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or torch.float32
        _quiet()
        method = _quant_method(path) if path.is_dir() else None
        try:
            if path.is_file() and path.suffix.lower() == ".gguf":
                try:
                    import gguf  # noqa: F401
                except ImportError:
                    raise UserError("transformers needs the 'gguf' package to read GGUF; `pip install gguf`") from None
                self.kind = "gguf"
                model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
            elif method == "neuqi":
                from neuqi_export.master import MasterCheckpoint
                from neuqi_export.modeling import master_to_hf

                self.kind = "master"
                model = master_to_hf(MasterCheckpoint.load(path), dtype=dtype)
            elif method == "compressed-tensors":
                from transformers import CompressedTensorsConfig

                self.kind = "compressed-tensors"
                try:
                    import compressed_tensors  # noqa: F401
                except ImportError:
                    raise UserError("loading a compressed-tensors export needs the 'compressed-tensors' package; `pip install compressed-tensors`") from None
                import warnings

                with warnings.catch_warnings():  # "quantization_config from the model will be used": intended
                    warnings.simplefilter("ignore", UserWarning)
                    model = AutoModelForCausalLM.from_pretrained(
                        str(path), quantization_config=CompressedTensorsConfig(dequantize=True), dtype=dtype)
            elif path.is_dir() and (path / "config.json").is_file():
                self.kind = "hf"
                model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
            else:
                raise UserError(f"'{path}' is neither a model directory (config.json) nor a .gguf file; pass one of those")
        except UserError:
            raise
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"transformers could not load '{path}' ({msg[:300]}); re-export it or update transformers") from None
        self.model = model.to(self.device).eval()
        self.n_vocab = int(self.model.config.vocab_size)

    def _check_ids(self, ids: np.ndarray) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_vocab):
            raise UserError(f"token id outside 0..{self.n_vocab - 1}; the ids do not come from this model's tokenizer")

    def logits(self, ids) -> np.ndarray:
        """int (b, L) token ids -> float32 (b, L, vocab)."""
        torch = self.torch
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        self._check_ids(ids)
        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(ids).to(self.device), use_cache=False).logits
        return out.float().cpu().numpy()

    def generate(self, ids, max_new_tokens: int, stop_at_eos: bool = False, eos_token_id: int | None = None) -> list[int]:
        """Greedy continuation of `ids`: the new tokens only."""
        torch = self.torch
        seq = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        self._check_ids(seq)
        with torch.inference_mode():
            res = self.model.generate(torch.from_numpy(seq).to(self.device), max_new_tokens=int(max_new_tokens),
                                      min_new_tokens=0 if stop_at_eos else int(max_new_tokens), do_sample=False,
                                      attention_mask=torch.ones_like(torch.from_numpy(seq)).to(self.device),
                                      eos_token_id=eos_token_id if stop_at_eos else None,
                                      pad_token_id=eos_token_id if eos_token_id is not None else 0)
        return res[0, seq.shape[1]:].tolist()


def load(path, **options) -> TransformersScorer:
    return TransformersScorer(path, **options)


def detects(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and _quant_method(path) in ("neuqi", "compressed-tensors")


register(Runtime(name="transformers", detects=detects, load=load))
