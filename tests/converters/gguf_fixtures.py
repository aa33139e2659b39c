"""Builders shared by the GGUF tests: a tiny byte-level BPE tokenizer, tiny random llama / qwen2
models, and a master checkpoint made from them without the quantization pipeline.

(Not named test_*, so pytest does not collect it; the GGUF tests import it, tests/runtimes/test_llamacpp.py by path.)
"""
from __future__ import annotations

import json
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


def build_model(arch: str, vocab: int, seed: int = 0, hidden: int = 64, intermediate: int = 128, rope: dict | None = None):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, rms_norm_eps=1e-5,
                  initializer_range=0.15)
    if rope is not None:
        common["rope_parameters"] = rope
    if arch == "llama":
        cfg = LlamaConfig(tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, **common)
    elif arch == "mistral":
        cfg = MistralConfig(tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, sliding_window=None, **common)
    else:
        cfg = Qwen2Config(tie_word_embeddings=False, eos_token_id=2, pad_token_id=0, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms and biases, so that their export is checked too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
    return model.eval()


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
    from neuqi_export.master import MasterCheckpoint, QuantizedLinear

    cfg = json.loads(model.config.to_json_string())
    cfg["quantization_config"] = {"quant_method": "neuqi", "bits": bits, "group_size": group_size, "init": "minmax"}
    linears, tensors = {}, {}
    gen = torch.Generator().manual_seed(1)
    for name, p in model.state_dict().items():
        mod = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and (".self_attn." in name or ".mlp." in name):
            codes, scale, zero = quantize_minmax(p.detach().float(), bits, group_size)
            linears[mod] = QuantizedLinear(codes=codes, scale=scale, zero=zero, bits=bits, group_size=group_size,
                                           hdiag=torch.rand(p.shape[1], generator=gen) + 0.1)
        elif name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        else:
            tensors[name] = p.detach().clone()
    return MasterCheckpoint(config=cfg, linears=linears, tensors=tensors, tokenizer_dir=Path(tok_dir))


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
