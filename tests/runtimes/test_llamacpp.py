"""The llama.cpp runtime: fresh state per window, greedy generation, detection, errors."""

import numpy as np
import pytest

from neuqi_export.errors import UserError
from fixture_modules import converter_fixtures


def _fixtures():
    return converter_fixtures("gguf_fixtures")


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    from converters.gguf import export_gguf

    fx = _fixtures()
    tmp = tmp_path_factory.mktemp("llamacpp")
    master, tok_dir = fx.make_tiny(tmp, "llama", bits=4, group_size=32)
    out = tmp / "tiny.gguf"
    export_gguf(master, out, qtype="Q4_1")
    return out, fx.windows(tok_dir, n=3, length=16)


def test_registered_and_detects(gguf_file, tmp_path):
    from runtimes.registry import load_all, runtime_for

    path, _ = gguf_file
    assert "llamacpp" in load_all()
    assert runtime_for(path).name == "llamacpp"
    other = tmp_path / "x.gguf"
    other.write_bytes(b"NOPE")
    assert not load_all()["llamacpp"].detects(other)
    assert not load_all()["llamacpp"].detects(tmp_path / "model.onnx")


def test_windows_are_independent_and_generation_is_greedy(gguf_file):
    from runtimes.registry import load_all

    path, ids = gguf_file
    sc = load_all()["llamacpp"].load(path, n_ctx=64)
    both = sc.logits(ids)
    assert both.shape == (3, 16, sc.n_vocab) and both.dtype == np.float32 and np.isfinite(both).all()
    alone = sc.logits(ids[2:3])  # same window, evaluated after others / alone: same numbers
    assert np.array_equal(alone[0], both[2])
    again = sc.logits(ids[::-1])
    assert np.array_equal(again[0], both[2])
    # greedy: each new token is the argmax of the logits over prompt + tokens so far
    prompt = [int(t) for t in ids[0, :8]]
    new = sc.generate(prompt, 5)
    assert len(new) == 5
    seq = prompt + new
    full = sc.logits(np.array([seq]))[0]
    for k in range(5):
        assert new[k] == int(np.argmax(full[len(prompt) + k - 1]))
    with pytest.raises(UserError, match="context"):
        sc.logits(np.zeros((1, 65), dtype=np.int64))
    with pytest.raises(UserError, match="token id"):
        sc.logits(np.array([[0, sc.n_vocab]]))
    sc.close()


def test_missing_file_is_a_user_error(tmp_path):
    from runtimes.llamacpp import load

    with pytest.raises(UserError, match="does not exist"):
        load(tmp_path / "none.gguf")


def test_context_grows_when_not_fixed(gguf_file):
    from runtimes.llamacpp import load

    path, ids = gguf_file
    sc = load(path)  # no n_ctx: starts at 2048 and grows for a longer window
    long = np.resize(ids.reshape(-1), (1, 2100))
    out = sc.logits(long)
    assert out.shape == (1, 2100, sc.n_vocab) and sc.n_ctx == 2304 and np.isfinite(out).all()
    sc.close()
