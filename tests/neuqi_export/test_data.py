"""Text files -> token windows (real SmolLM2 tokenizer; the text is the fetched Wikipedia)."""
from __future__ import annotations

import pytest
import torch

from neuqi_export import data
from neuqi_export.data import calibration_windows, eval_windows, read_text, tokenize
from neuqi_export.errors import UserError


@pytest.fixture(scope="module")
def eval_text(real_assets):
    return read_text(real_assets.eval_text)


@pytest.fixture(scope="module")
def sample(eval_text):
    return eval_text[:60_000]


@pytest.fixture(scope="module")
def sample_ids(real_tokenizer, sample):
    return real_tokenizer(sample, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------ read_text

def test_read_text_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    with pytest.raises(UserError, match="is not a file"):
        read_text(tmp_path)
    for name, content in [("empty.txt", b""), ("blank.txt", b" \n\t\n  ")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError, match="is empty; give a file with text in it"):
            read_text(tmp_path / name)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8"):
        read_text(tmp_path / "latin1.txt")
    for name, content in [("nul.txt", b"\0" * 5000), ("controls.txt", b"\0\x01\x1b\x7f \n" * 100)]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError, match=f"'{tmp_path / name}' holds no text"):
            read_text(tmp_path / name)
    (tmp_path / "ok.txt").write_text("héllo\n", encoding="utf-8")
    assert read_text(str(tmp_path / "ok.txt")) == "héllo\n"
    assert read_text(tmp_path / "ok.txt").source == str(tmp_path / "ok.txt")


# ------------------------------------------------------------------------------------ tokenize

def test_chunked_tokenization_equals_one_call(real_tokenizer, sample, sample_ids):
    ids = tokenize(real_tokenizer, sample, chunk_chars=3000)  # ~20 chunks
    assert len(data._chunks(sample, 3000)) > 10
    assert ids == sample_ids
    # with max_tokens it may stop early, but only ever returns a prefix of the full stream
    part = tokenize(real_tokenizer, sample, max_tokens=100, chunk_chars=1000)
    assert len(part) >= 100 and part == sample_ids[: len(part)]


class PrefixTokenizer:
    """Like a SentencePiece tokenizer that prepends '▁' to every call: chunking would change the ids."""

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        return {"input_ids": [[0] + [ord(c) for c in t] for t in texts]}


def test_tokenize_falls_back_to_one_call_when_chunk_boundaries_differ():
    text = "\n".join(f"line {i} of some text" for i in range(2000))
    ids = tokenize(PrefixTokenizer(), text, chunk_chars=500)
    assert ids == [0] + [ord(c) for c in text]


# ------------------------------------------------------------------------------------ calibration

def test_calibration_windows_are_seeded_slices(real_tokenizer, sample, sample_ids):
    w = calibration_windows(real_tokenizer, sample, nsamples=6, seqlen=64, seed=3)
    assert w.shape == (6, 64) and w.dtype == torch.long
    assert torch.equal(w, calibration_windows(real_tokenizer, sample, 6, 64, seed=3))
    assert not torch.equal(w, calibration_windows(real_tokenizer, sample, 6, 64, seed=4))
    stream = torch.tensor(sample_ids)
    for row in w:  # every window is a contiguous slice of the one tokenized stream
        starts = (stream[: len(stream) - 63] == row[0]).nonzero().flatten().tolist()
        assert any(torch.equal(stream[s:s + 64], row) for s in starts)


def test_calibration_windows_need_seqlen_plus_one_tokens(real_tokenizer):
    text = "one two three four five six seven eight"
    n = len(real_tokenizer(text, add_special_tokens=False)["input_ids"])
    assert calibration_windows(real_tokenizer, text, 3, n - 1).shape == (3, n - 1)
    with pytest.raises(UserError) as e:
        calibration_windows(real_tokenizer, text, 3, n)
    assert str(e.value) == (f"calibration text has {n} tokens, needs at least seqlen+1={n + 1}; "
                            "give more text or lower --seqlen")
    with pytest.raises(UserError, match=r"calibration text has 0 tokens, needs at least seqlen\+1=65"):
        calibration_windows(real_tokenizer, "", 3, 64)


def test_too_short_text_read_from_a_file_names_it(real_tokenizer, tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("Only a few words.", encoding="utf-8")
    with pytest.raises(UserError, match=f"calibration text '{f}' has 5 tokens, needs at least seqlen\\+1=33"):
        calibration_windows(real_tokenizer, read_text(f), 2, 32)
    with pytest.raises(UserError, match=f"evaluation text '{f}' has 5 tokens, fewer than one window"):
        eval_windows(real_tokenizer, read_text(f), 32)


@pytest.mark.parametrize("kw,flag", [(dict(nsamples=0), "--nsamples"), (dict(seqlen=0), "--seqlen"),
                                     (dict(seqlen=-5), "--seqlen")])
def test_calibration_windows_reject_bad_sizes(real_tokenizer, sample, kw, flag):
    args = dict(nsamples=2, seqlen=16) | kw
    with pytest.raises(UserError, match=f"must be a positive integer.*{flag}"):
        calibration_windows(real_tokenizer, sample, **args)


# ------------------------------------------------------------------------------------ evaluation

def test_eval_windows_are_consecutive_non_overlapping_and_deterministic(real_tokenizer, sample, sample_ids):
    w = eval_windows(real_tokenizer, sample, 128)
    n = len(sample_ids) // 128
    assert w.shape == (n, 128) and w.dtype == torch.long
    assert w.flatten().tolist() == sample_ids[: n * 128]  # window i+1 starts where window i ends
    assert torch.equal(w, eval_windows(real_tokenizer, sample, 128))
    capped = eval_windows(real_tokenizer, sample, 128, max_windows=3)
    assert torch.equal(capped, w[:3])
    assert torch.equal(eval_windows(real_tokenizer, sample, 128, max_windows=10 ** 6), w)


def test_eval_windows_of_the_real_text_use_no_special_tokens(real_tokenizer, eval_text):
    w = eval_windows(real_tokenizer, eval_text, 2048, max_windows=2)
    assert w.shape == (2, 2048)
    special = set(real_tokenizer.all_special_ids)
    assert not special & set(w.flatten().tolist())
    assert real_tokenizer.decode(w.flatten()) == eval_text[: len(real_tokenizer.decode(w.flatten()))]


def test_eval_windows_errors(real_tokenizer):
    text = "A short text."
    n = len(real_tokenizer(text, add_special_tokens=False)["input_ids"])
    assert eval_windows(real_tokenizer, text, n).shape == (1, n)
    with pytest.raises(UserError) as e:
        eval_windows(real_tokenizer, text, n + 1)
    assert str(e.value) == (f"evaluation text has {n} tokens, fewer than one window of seqlen={n + 1}; "
                            "give more text or lower --seqlen")
    with pytest.raises(UserError, match="evaluation text has 0 tokens"):
        eval_windows(real_tokenizer, "", 16)
    with pytest.raises(UserError, match="max_windows must be a positive integer.*--max-windows"):
        eval_windows(real_tokenizer, text, 2, max_windows=0)
