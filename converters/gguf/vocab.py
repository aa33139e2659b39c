"""The tokenizer.ggml.* keys of a GGUF file from a master checkpoint's tokenizer files.

- `tokenizer.model` present -> SentencePiece, `tokenizer.ggml.model = llama` (tokens, scores, types).
- `tokenizer.json` with a SentencePiece-style BPE model (byte fallback, spaces written as "▁": SentencePiece models
  converted to tokenizer.json) -> `tokenizer.ggml.model = llama` as well: llama.cpp's SPM tokenizer merges the adjacent pair whose
  joined piece has the highest score, HF's BPE the pair of lowest merge rank, so each piece's score is minus the rank
  of the first merge that makes it (spm_scores); whether a "▁" is put before the text (add_space_prefix) is read
  from the normalizer / Metaspace pre-tokenizer.
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
from pathlib import Path

import gguf

from neuqi_export.errors import UserError

# llama.cpp's tokenizer ids, one row each: GGUF values of tokenizer.ggml.model / .pre, not model families (the
# families live in neuqi_export/archs). SPM is llama.cpp's name for its SentencePiece tokenizer; the pre-tokenizer ids
# name regexes, matched below by the regex itself, never by model_type (Qwen3, DeepSeek and others ship the same)
GGML_SPM, GGML_BPE = "llama", "gpt2"
PRE_DEFAULT, PRE_GPT2, PRE_SMOLLM, PRE_ONE_DIGIT, PRE_DIGITS_1_3 = "default", "gpt-2", "smollm", "qwen2", "llama-bpe"
_ONE_DIGIT_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_DIGITS_1_3_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SPACE = "\u2581"  # SentencePiece's visible space


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
        return PRE_GPT2
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True) \
            and not parts[1].get("add_prefix_space", False):
        return PRE_SMOLLM
    if types == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        pattern = parts[0].get("pattern", {})
        regex = pattern.get("Regex") if isinstance(pattern, dict) else None
        if regex == _ONE_DIGIT_RE:
            return PRE_ONE_DIGIT
        if regex == _DIGITS_1_3_RE:
            return PRE_DIGITS_1_3
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
        tj = _read_json(tok_dir / "tokenizer.json")
        info = _add_spm_bpe(w, tj, n_vocab) if is_spm_bpe(tj) else _add_bpe(w, tj, n_vocab, pre)
    else:
        raise UserError(f"'{tok_dir}' has neither tokenizer.json nor tokenizer.model; copy the model's tokenizer files into the master checkpoint")
    special = gguf.SpecialVocab(tok_dir, load_merges=info["model"] == GGML_BPE, n_vocab=n_vocab)
    if info["model"] == GGML_BPE and not special.merges:
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


def _add_bpe(w: gguf.GGUFWriter, tj: dict, n_vocab: int, pre: str | None) -> dict:
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"tokenizer.json model is {model.get('type')!r}; GGUF export handles byte-level BPE (or SentencePiece with tokenizer.model)")
    if pre is None:
        pre = detect_pre(tj)
        if pre is None:
            raise UserError("unrecognised BPE pre-tokenizer in tokenizer.json; pass --tokenizer-pre with the llama.cpp name (e.g. gpt-2, smollm, qwen2, llama-bpe)")
    tokens, types = _token_table(model.get("vocab", {}), tj.get("added_tokens", []), n_vocab)
    w.add_tokenizer_model(GGML_BPE)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    return {"model": GGML_BPE, "pre": pre}


def is_spm_bpe(tj: dict) -> bool:
    """Whether tokenizer.json is a SentencePiece model written as BPE: byte fallback and a decoder that turns "▁"
    back into spaces."""
    model = tj.get("model", {})
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return False
    dec = tj.get("decoder") or {}
    parts = dec.get("decoders", []) if dec.get("type") == "Sequence" else [dec]
    return any(d.get("type") == "Metaspace" or (d.get("type") == "Replace" and d.get("pattern", {}).get("String") == _SPACE)
               for d in parts)


def space_prefix(tj: dict) -> bool:
    """Whether the tokenizer puts a "▁" before the text: a Prepend("▁") normalizer or a Metaspace pre-tokenizer
    that prepends, not a bare Replace(" ", "▁") normalizer."""
    norm = tj.get("normalizer") or {}
    norms = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    if any(n.get("type") == "Prepend" and n.get("prepend") == _SPACE for n in norms):
        return True
    pre = [p for p in _flatten(tj.get("pre_tokenizer")) if p.get("type") == "Metaspace"]
    return any(p.get("prepend_scheme", "always" if p.get("add_prefix_space", True) else "never") != "never" for p in pre)


def spm_scores(vocab: dict[str, int], merges: list, n_vocab: int) -> list[float]:
    """Per token id the score llama.cpp's SPM tokenizer merges by: -(rank + 1) of the first merge that makes the
    piece (earlier merges win, as in HF's BPE); single characters 0 (never a merge result); a longer piece no
    merge makes gets the lowest score (HF's BPE never forms it; llama.cpp then forms it last)."""
    lowest = -float(len(merges) + 1)
    scores = [lowest] * n_vocab
    for text, i in vocab.items():
        if len(text) == 1:
            scores[i] = 0.0
    seen: set[int] = set()
    for rank, m in enumerate(merges):
        a, b = m if isinstance(m, (list, tuple)) else m.split(" ", 1)
        i = vocab.get(a + b)
        if i is not None and i not in seen:
            seen.add(i)
            scores[i] = -float(rank + 1)
    return scores


def _add_spm_bpe(w: gguf.GGUFWriter, tj: dict, n_vocab: int) -> dict:
    """A SentencePiece-style tokenizer.json as llama.cpp's `llama` (SPM) vocabulary: tokens, scores, types."""
    model = tj["model"]
    vocab = model.get("vocab", {})
    added = tj.get("added_tokens", [])
    tokens, types = _token_table(vocab, added, n_vocab)
    scores = spm_scores(vocab, model.get("merges", []), n_vocab)
    unk = model.get("unk_token")
    for i, t in enumerate(tokens):
        if types[i] == int(gguf.TokenType.NORMAL) and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types[i] = int(gguf.TokenType.BYTE)
        elif t == unk:
            types[i] = int(gguf.TokenType.UNKNOWN)
    for a in added:  # control tokens are matched whole, never merged (as llama.cpp's SPM conversions score them)
        if a.get("special"):
            scores[a["id"]] = -1000.0
    w.add_tokenizer_model(GGML_SPM)
    w.add_tokenizer_pre(PRE_DEFAULT)
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(space_prefix(tj))
    return {"model": GGML_SPM, "pre": PRE_DEFAULT}


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
    w.add_tokenizer_model(GGML_SPM)
    w.add_tokenizer_pre(PRE_DEFAULT)
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    return {"model": GGML_SPM, "pre": PRE_DEFAULT}


# llama.cpp (llama-vocab.cpp) looks these tokens up, and aborts loading when one is missing, if general.name
# (lowercased) contains one of the keys
_NAME_TOKENS = {r"phi-?3": ("</s>", "<unk>", "<s>", "<|endoftext|>")}


def loadable_name(name: str, tok_dir, explicit: bool) -> str:
    """general.name as llama.cpp can load it: a default name that would make llama.cpp look up special tokens this
    tokenizer lacks is changed (Phi-3 -> Phi_3); an explicit one is refused with a UserError."""
    import re

    tj = Path(tok_dir) / "tokenizer.json" if tok_dir is not None else None
    if tj is None or not tj.is_file():
        return name
    for pattern, needed in _NAME_TOKENS.items():
        if not re.search(pattern, name.lower()):
            continue
        data = _read_json(tj)
        have = set(data.get("model", {}).get("vocab", {})) | {a["content"] for a in data.get("added_tokens", [])}
        missing = [t for t in needed if t not in have]
        if missing and explicit:
            raise UserError(f"general.name {name!r} makes llama.cpp look up the tokens {missing}, which this tokenizer "
                            "lacks, and fail to load; pass another --gguf-name")
        if missing:
            name = re.sub(r"(?i)phi-?3", "Phi_3", name)
    return name
