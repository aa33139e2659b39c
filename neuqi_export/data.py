"""Text -> token windows, for calibration (random windows) and evaluation (consecutive windows).

Text is tokenized ONCE as one stream with `add_special_tokens=False`: no BOS/EOS is inserted at
the start of the text, between documents or at window boundaries. Every window is a plain slice of
that one stream, so any runtime fed the same ids sees exactly the same tokens (the usual
"wikitext" protocol: no per-window BOS).

Long text is tokenized in chunks of whole lines (cut just before a newline that follows a
non-space character) through the tokenizer's batch call, which is several times faster than one
huge call. The chunked ids are used only if every chunk boundary is checked to tokenize exactly as
in the joined text; otherwise the whole text is tokenized in one call. Either way the ids equal
`tokenizer(text, add_special_tokens=False)["input_ids"]`.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .errors import UserError

CHUNK_CHARS = 1 << 16  # ~64k characters per chunk
_PROBE_CHARS = 300  # characters each side of a chunk boundary checked against the joined text
_CUT = re.compile(r"(?<=\S)\n")
_VISIBLE = re.compile(r"[^\s\x00-\x1f\x7f-\x9f]")  # a character that is not blank, NUL or a control code


class Text(str):
    """A str read from a file, which remembers that file (`source`), so a later check (too few tokens) can name it."""

    source: str | None = None


def _with_source(text: str, source) -> Text:
    t = Text(text)
    t.source = str(source)
    return t


def read_text(path) -> Text:
    """The UTF-8 text of `path` (a str that remembers `path`); UserError when it is missing, not a file, not UTF-8,
    or holds no visible character (empty, blank, or only NUL and control bytes)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"text file '{p}' does not exist; pass an existing UTF-8 text file (or 'auto' for the fetched Wikipedia text)")
    if not p.is_file():
        raise UserError(f"'{p}' is not a file; pass a UTF-8 text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"text file '{p}' is not UTF-8 (byte {e.start}); convert it to UTF-8") from None
    if not text.strip():
        raise UserError(f"text file '{p}' is empty; give a file with text in it")
    if _VISIBLE.search(text) is None:
        raise UserError(f"text file '{p}' holds no text (only NUL, control or blank characters); give a file with "
                        "text in it")
    return _with_source(text, p)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    out = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [list(ids) for ids in out]


def _chunks(text: str, chunk_chars: int) -> list[str]:
    cuts, pos = [0], chunk_chars
    while pos < len(text):
        m = _CUT.search(text, pos)
        if m is None:
            break
        cuts.append(m.start())
        pos = m.start() + chunk_chars
    cuts.append(len(text))
    return [text[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]


def _boundaries_safe(tokenizer, chunks: list[str]) -> bool:
    """Do the text pieces either side of each chunk boundary tokenize the same apart as joined?"""
    lefts = [c[-_PROBE_CHARS:] for c in chunks[:-1]]
    rights = [c[:_PROBE_CHARS] for c in chunks[1:]]
    joined = _encode(tokenizer, [a + b for a, b in zip(lefts, rights)])
    la, rb = _encode(tokenizer, lefts), _encode(tokenizer, rights)
    return all(j == a + b for j, a, b in zip(joined, la, rb))


def tokenize(tokenizer, text: str, max_tokens: int | None = None, chunk_chars: int = CHUNK_CHARS) -> list[int]:
    """Token ids of `text` as one stream (add_special_tokens=False).

    With `max_tokens`, tokenization may stop early: the result then holds at least `max_tokens` ids
    (or all of them) and is a prefix of the full tokenization.
    """
    chunks = _chunks(text, chunk_chars)
    if len(chunks) < 2 or not _boundaries_safe(tokenizer, chunks):
        return _encode(tokenizer, [text])[0]
    ids: list[int] = []
    step = 16  # chunks per batch call
    for i in range(0, len(chunks), step):
        for part in _encode(tokenizer, chunks[i:i + step]):
            ids.extend(part)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return ids


def _check_positive(name: str, value, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}; pass {flag} N with N >= 1")
    return value


def check_context(config: dict, seqlen: int) -> None:
    """UserError when `seqlen` exceeds the model's context (max_position_embeddings), before any work."""
    max_pos = config.get("max_position_embeddings")
    if max_pos and seqlen > int(max_pos):
        raise UserError(f"--seqlen {seqlen} exceeds the model's context ({max_pos}); pass --seqlen <= {max_pos}")


def calibration_windows(tokenizer, text: str, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """LongTensor (nsamples, seqlen): windows at random offsets of the tokenized text.

    Offsets are drawn uniformly (with replacement) from [0, N - seqlen) with a torch.Generator
    seeded by `seed`, so the same text, tokenizer and seed always give the same windows.
    """
    _check_positive("nsamples", nsamples, "--nsamples")
    _check_positive("seqlen", seqlen, "--seqlen")
    ids = tokenize(tokenizer, text)
    n = len(ids)
    if n < seqlen + 1:
        where = f" '{text.source}'" if getattr(text, "source", None) else ""
        raise UserError(f"calibration text{where} has {n} tokens, needs at least seqlen+1={seqlen + 1}; give more text "
                        "or lower --seqlen")
    stream = torch.tensor(ids, dtype=torch.long)
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, n - seqlen, (nsamples,), generator=g)
    return torch.stack([stream[s:s + seqlen] for s in starts.tolist()])


def eval_windows(tokenizer, text: str, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """LongTensor (n, seqlen): the first n non-overlapping consecutive windows of the tokenized text.

    n = floor(tokens / seqlen), capped at `max_windows` (the first windows, as llama-perplexity's
    --chunks does); the tail shorter than a window is not used.
    """
    _check_positive("seqlen", seqlen, "--seqlen")
    if max_windows is not None:
        _check_positive("max_windows", max_windows, "--max-windows")
    ids = tokenize(tokenizer, text, max_tokens=None if max_windows is None else max_windows * seqlen)
    n = len(ids) // seqlen
    if n < 1:
        where = f" '{text.source}'" if getattr(text, "source", None) else ""
        raise UserError(f"evaluation text{where} has {len(ids)} tokens, fewer than one window of seqlen={seqlen}; "
                        "give more text or lower --seqlen")
    if max_windows is not None:
        n = min(n, max_windows)
    return torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen)
