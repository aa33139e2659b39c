"""GGUF key/values from a master checkpoint: hyper-parameters and the tokenizer.

Architectures: HF `llama` and `mistral` become GGUF `llama` (q/k rows permuted to GGML's rotary
layout), `qwen2` stays `qwen2` (NEOX rotary, no permutation).

Tokenizer:
- `tokenizer.model` present -> SentencePiece, `tokenizer.ggml.model = llama` (tokens, scores, types).
- otherwise `tokenizer.json` with a byte-level BPE model -> `tokenizer.ggml.model = gpt2` (tokens,
  types, merges). `tokenizer.ggml.pre` names the pre-tokenizer regex llama.cpp must apply.
  llama.cpp's convert_hf_to_gguf decides it by hashing the token ids of a fixed probe text and
  looking the hash up in a table of known models (SmolLM -> "smollm", Qwen2 -> "qwen2", ...). That
  only recognises the exact published vocabularies, so we decide from what the hash stands for: the
  pre_tokenizer of tokenizer.json, matched to the llama.cpp pre-type that runs the same splits:
    Digits(individual) + ByteLevel(use_regex)        -> "smollm"  (SmolLM/SmolLM2, StarCoder-style)
    ByteLevel(use_regex) alone                        -> "gpt-2"
    Split(Qwen2 regex, \\p{N} one digit) + ByteLevel   -> "qwen2"
    Split(Llama-3 regex, \\p{N}{1,3}) + ByteLevel       -> "llama-bpe"
  Anything else is refused with a UserError (pass --tokenizer-pre to force a name).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import gguf

from neuqi_export.errors import UserError

# HF model_type -> (GGUF architecture, permute q/k rows)
ARCHES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}

_QWEN2_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
KNOWN_PRE = ("smollm", "gpt-2", "qwen2", "llama-bpe", "default")


def gguf_arch(config: dict) -> tuple[str, bool]:
    mt = config.get("model_type")
    if mt not in ARCHES:
        raise UserError(f"GGUF export supports model_type {', '.join(sorted(ARCHES))}, not {mt!r}; export another format")
    return ARCHES[mt]


def _rope(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from a transformers 4.x or 5.x config."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or None
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    if scaling is None and params.get("rope_type", params.get("type", "default")) != "default":
        scaling = params
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(theta), scaling


def head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def llama3_rope_factors(config: dict) -> np.ndarray:
    """The per-frequency divisors llama.cpp reads from `rope_freqs.weight` for llama3-style scaling."""
    theta, sc = _rope(config)
    dim = head_dim(config)
    factor = float(sc.get("factor", 8.0))
    low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
    old_ctx = float(sc.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    f = np.where(wavelen < old_ctx / high, 1.0,
                 np.where(wavelen > old_ctx / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return f.astype(np.float32)


def add_hparams(w: gguf.GGUFWriter, config: dict, n_vocab: int) -> np.ndarray | None:
    """Write the model hyper-parameters; return the rope_freqs tensor when llama3 scaling needs one."""
    arch, _ = gguf_arch(config)
    try:
        n_head = int(config["num_attention_heads"])
        w.add_context_length(int(config.get("max_position_embeddings", 2048)))
        w.add_embedding_length(int(config["hidden_size"]))
        w.add_block_count(int(config["num_hidden_layers"]))
        w.add_feed_forward_length(int(config["intermediate_size"]))
        w.add_head_count(n_head)
        w.add_head_count_kv(int(config.get("num_key_value_heads") or n_head))
        w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    except KeyError as exc:
        raise UserError(f"config.json lacks {exc.args[0]!r}; restore the model's config.json in the master checkpoint") from None
    hd = head_dim(config)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    theta, scaling = _rope(config)
    w.add_rope_freq_base(theta)
    w.add_vocab_size(n_vocab)
    # sliding_window (Mistral v0.1) is not written: llama.cpp's own converter drops it for the llama arch too
    if scaling is None:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(scaling["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(scaling.get("original_max_position_embeddings", config.get("max_position_embeddings", 2048))))
    elif kind == "llama3":
        return llama3_rope_factors(config)
    else:
        raise UserError(f"rope scaling {kind!r} has no GGUF equivalent in neuqi-export; use linear, yarn or llama3 scaling")
    return None


# ------------------------------------------------------------------------------------------------
# tokenizer


def _flatten(node: dict | None) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [p for sub in node.get("pretokenizers", []) for p in _flatten(sub)]
    return [node]


def detect_pre(tokenizer_json: dict) -> str | None:
    """The llama.cpp pre-tokenizer name for a byte-level BPE tokenizer.json, or None if unknown."""
    parts = _flatten(tokenizer_json.get("pre_tokenizer"))
    types = [p.get("type") for p in parts]
    if types == ["ByteLevel"] and parts[0].get("use_regex", True) and not parts[0].get("add_prefix_space", False):
        return "gpt-2"
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True) \
            and not parts[1].get("add_prefix_space", False):
        return "smollm"
    if types == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        pattern = parts[0].get("pattern", {})
        regex = pattern.get("Regex") if isinstance(pattern, dict) else None
        if regex == _QWEN2_RE:
            return "qwen2"
        if regex == _LLAMA3_RE:
            return "llama-bpe"
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path} ({exc}); restore the tokenizer files in the master checkpoint") from None


def _add_bos_eos(tok_dir: Path, bos: int | None, eos: int | None) -> tuple[bool | None, bool | None]:
    """Whether the HF tokenizer prepends BOS / appends EOS, observed on a probe text."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        ids = tok("Hello world", add_special_tokens=True)["input_ids"]
    except Exception:  # noqa: BLE001 - fall back to what the config files say
        return None, None
    return (bos is not None and len(ids) > 0 and ids[0] == bos), (eos is not None and len(ids) > 0 and ids[-1] == eos)


def add_tokenizer(w: gguf.GGUFWriter, tok_dir: Path | None, n_vocab: int, pre: str | None = None) -> dict:
    """Write tokenizer.ggml.* keys; return {'model': ..., 'pre': ...}."""
    if tok_dir is None or not Path(tok_dir).is_dir():
        raise UserError("the master checkpoint has no tokenizer files; copy the model's tokenizer into it before exporting GGUF")
    tok_dir = Path(tok_dir)
    if (tok_dir / "tokenizer.model").is_file():
        info = _add_spm(w, tok_dir, n_vocab)
    elif (tok_dir / "tokenizer.json").is_file():
        info = _add_bpe(w, tok_dir, n_vocab, pre)
    else:
        raise UserError(f"'{tok_dir}' has neither tokenizer.json nor tokenizer.model; copy the model's tokenizer files into the master checkpoint")
    special = gguf.SpecialVocab(tok_dir, load_merges=info["model"] == "gpt2", n_vocab=n_vocab)
    if info["model"] == "gpt2" and not special.merges:
        raise UserError(f"{tok_dir / 'tokenizer.json'} has no BPE merges; restore the model's tokenizer.json")
    add_bos, add_eos = _add_bos_eos(tok_dir, special.special_token_ids.get("bos"), special.special_token_ids.get("eos"))
    if add_bos is not None:
        special.add_special_token["bos"] = add_bos
        special.add_special_token["eos"] = add_eos
    special.add_to_gguf(w, quiet=True)
    info.update(special_ids=dict(special.special_token_ids), add_bos=special.add_special_token.get("bos"))
    return info


def _token_table(vocab: dict[str, int], added: list[dict], n_vocab: int) -> tuple[list[str], list[int]]:
    tokens: list[str | None] = [None] * n_vocab
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    top = max(list(vocab.values()) + [a["id"] for a in added] + [-1])
    if top >= n_vocab:
        raise UserError(f"the tokenizer has token id {top} but the model's vocab_size is {n_vocab}; the tokenizer does not belong to this model")
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = int(gguf.TokenType.NORMAL)
    for a in added:
        tokens[a["id"]] = a["content"]
        types[a["id"]] = int(gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = f"[PAD{i}]"
    return tokens, types


def _add_bpe(w: gguf.GGUFWriter, tok_dir: Path, n_vocab: int, pre: str | None) -> dict:
    tj = _read_json(tok_dir / "tokenizer.json")
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"tokenizer.json model is {model.get('type')!r}; GGUF export handles byte-level BPE (or SentencePiece with tokenizer.model)")
    if pre is None:
        pre = detect_pre(tj)
        if pre is None:
            raise UserError("unrecognised BPE pre-tokenizer in tokenizer.json; pass --tokenizer-pre with the llama.cpp name (e.g. gpt-2, smollm, qwen2, llama-bpe)")
    tokens, types = _token_table(model.get("vocab", {}), tj.get("added_tokens", []), n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    return {"model": "gpt2", "pre": pre}


def _add_spm(w: gguf.GGUFWriter, tok_dir: Path, n_vocab: int) -> dict:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(tok_dir / "tokenizer.model"))
    n_sp = sp.vocab_size()
    if n_sp > n_vocab:
        raise UserError(f"tokenizer.model has {n_sp} pieces but vocab_size is {n_vocab}; the tokenizer does not belong to this model")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-1000.0] * n_vocab
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    for i in range(n_sp):
        tokens[i] = sp.IdToPiece(i)
        scores[i] = float(sp.GetScore(i))
        t = gguf.TokenType.NORMAL
        if sp.IsUnknown(i):
            t = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            t = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            t = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            t = gguf.TokenType.BYTE
        types[i] = int(t)
    added = []
    if (tok_dir / "tokenizer.json").is_file():
        added = _read_json(tok_dir / "tokenizer.json").get("added_tokens", [])
    elif (tok_dir / "added_tokens.json").is_file():
        added = [{"content": k, "id": v, "special": True} for k, v in _read_json(tok_dir / "added_tokens.json").items()]
    for a in added:
        i = a["id"]
        if i >= n_vocab:
            raise UserError(f"added token id {i} >= vocab_size {n_vocab}; the tokenizer does not belong to this model")
        if i >= n_sp or types[i] == int(gguf.TokenType.UNUSED):
            tokens[i] = a["content"]
            scores[i] = -1000.0
            types[i] = int(gguf.TokenType.CONTROL if a.get("special", True) else gguf.TokenType.USER_DEFINED)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    return {"model": "llama", "pre": "default"}
