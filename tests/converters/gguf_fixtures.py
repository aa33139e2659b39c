"""Builders shared by the GGUF tests: a tiny byte-level BPE tokenizer, tiny random llama / qwen2
models, and a master checkpoint made from them without the quantization pipeline.

(Not named test_*, so pytest does not collect it; the GGUF tests import it, tests/runtimes/test_llamacpp.py by path.)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

WORDS = ("the model reads a window of tokens and predicts the next one while the quantizer keeps "
         "four bits per weight in groups of thirty two columns with a float scale and zero point "
         "Paris is the capital of France and Rome is the capital of Italy in 1999 there were 42 cats "
         "llama cpp loads a gguf file evaluates the logits and generates text greedily hello world").split()

QWEN2_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        k = int(rng.integers(5, 15))
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), k)]
        lines.append(" ".join(words) + (f", {int(rng.integers(0, 10000))}!" if rng.random() < 0.3 else "."))
    return lines


def build_tokenizer(out_dir: Path, style: str) -> int:
    """A trained byte-level BPE tokenizer saved as a HF tokenizer; style 'smollm' or 'qwen2'. Returns its size."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if style == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_RE), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    if style == "smollm":
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                     unk_token="<|endoftext|>")
    else:
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return len(hf)


def build_model(arch: str, vocab: int, seed: int = 0, hidden: int = 64, intermediate: int = 128, rope: dict | None = None,
                **config_kw):
    """A tiny random model of any registered family (tests/model_factory.py), with these tests' dimensions."""
    from model_factory import build_model as factory_model

    if rope is not None:
        config_kw["rope_parameters"] = rope
    return factory_model(arch, vocab, seed=seed, hidden=hidden, intermediate=intermediate, **config_kw)


def quantize_minmax(w: torch.Tensor, bits: int, group_size: int):
    """Self-contained asymmetric min-max quantizer with a FLOAT zero-point (codes, scale, zero)."""
    out, n = w.shape
    g = n if group_size == -1 else group_size
    ng = -(-n // g)
    scale = torch.empty(out, ng)
    zero = torch.empty(out, ng)
    codes = torch.empty(out, n, dtype=torch.uint8)
    L = 2**bits
    for j in range(ng):
        blk = w[:, j * g:(j + 1) * g].double()
        lo, hi = blk.min(1).values, blk.max(1).values
        s = ((hi - lo) / (L - 1)).clamp_min(1e-8) * 1.02  # a little slack: zero is not an integer
        z = -lo / s + 0.01
        q = torch.clamp(torch.round(blk / s[:, None] + z[:, None]), 0, L - 1)
        codes[:, j * g:(j + 1) * g] = q.to(torch.uint8)
        scale[:, j], zero[:, j] = s.float(), z.float()
    return codes, scale, zero


def build_master(model, tok_dir: Path, bits: int, group_size: int):
    """Every block linear of the family quantized with quantize_minmax (random hdiag), the rest float."""
    from model_factory import master_from_model

    from neuqi_export.master import QuantizedLinear

    gen = torch.Generator().manual_seed(1)

    def quantize(W):
        codes, scale, zero = quantize_minmax(W, bits, group_size)
        return QuantizedLinear(codes=codes, scale=scale, zero=zero, bits=bits, group_size=group_size,
                               hdiag=torch.rand(W.shape[1], generator=gen) + 0.1)

    return master_from_model(model, quantize, tok_dir, {"bits": bits, "group_size": group_size, "init": "minmax"})


def make_tiny(tmp: Path, arch: str, bits: int, group_size: int, pad_vocab: int = 0, **dims):
    """(master, tokenizer dir) for a tiny random model of `arch` ('llama' tied / 'qwen2' untied with biases)."""
    tok_dir = tmp / f"tok-{arch}"
    n = build_tokenizer(tok_dir, "qwen2" if arch == "qwen2" else "smollm")
    model = build_model(arch, n + pad_vocab, **dims)
    return build_master(model, tok_dir, bits, group_size), tok_dir


def windows(tok_dir: Path, n: int = 3, length: int = 24, seed: int = 5) -> np.ndarray:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    ids = tok(" ".join(corpus(60, seed=seed)), add_special_tokens=False)["input_ids"]
    return np.array([ids[i * length:(i + 1) * length] for i in range(n)], dtype=np.int64)
