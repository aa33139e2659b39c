"""Every bad input: one clear line on stderr, exit code 2, no output left behind."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from neuqi_export.cli import main


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture
def calib_file(tmp_path, real_assets):
    return real_assets.calib_text


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case,match", [
    ("missing_dir", "does not exist"),
    ("no_weights", "has no weights"),
    ("bad_arch", "unsupported architecture 'gpt2'"),
    ("bits", "--bits 5 is not supported"),
    ("group", "--group-size 48 is not a positive power of two"),
    ("nan", "contains NaN/Inf"),
    ("calib_missing", "does not exist"),
    ("calib_empty", "empty"),
    ("calib_short", "needs at least"),
    ("exists", "already exists"),
    ("imatrix_calib", "--imatrix replaces calibration text"),
    ("head_bits", "--lm-head-bits 6 is not supported"),
    ("seqlen", "exceeds the model's context"),
])
def test_bad_input(case, match, tmp_path, capsys, tiny_llama_dir, calib_file):
    model = tiny_llama_dir
    out = tmp_path / "out"
    extra = ["--calib", calib_file, "--nsamples", "2", "--seqlen", "32", "--quiet"]
    if case == "missing_dir":
        model = tmp_path / "nope"
    elif case == "no_weights":
        model = _copy(tiny_llama_dir, tmp_path / "m")
        for f in model.glob("*.safetensors"):
            f.unlink()
    elif case == "bad_arch":
        model = _copy(tiny_llama_dir, tmp_path / "m")
        cfg = json.loads((model / "config.json").read_text())
        cfg["model_type"] = "gpt2"
        (model / "config.json").write_text(json.dumps(cfg))
    elif case == "bits":
        extra += ["--bits", "5"]
    elif case == "group":
        extra += ["--group-size", "48"]
    elif case == "seqlen":  # the tiny model's context is its max_position_embeddings
        ctx = json.loads((model / "config.json").read_text())["max_position_embeddings"]
        extra[extra.index("--seqlen") + 1] = str(ctx + 1)
    elif case == "head_bits":
        extra += ["--lm-head-bits", "6"]
    elif case == "nan":
        model = _copy(tiny_llama_dir, tmp_path / "m")
        f = next(model.glob("*.safetensors"))
        sd = load_file(str(f))
        key = next(k for k in sd if k.endswith("mlp.up_proj.weight"))
        sd[key][0, 0] = float("nan")
        save_file(sd, str(f), metadata={"format": "pt"})
    elif case == "calib_missing":
        extra[1] = tmp_path / "nothere.txt"
    elif case == "calib_empty":
        (tmp_path / "empty.txt").write_text("  \n")
        extra[1] = tmp_path / "empty.txt"
    elif case == "calib_short":
        (tmp_path / "short.txt").write_text("Only a few words here.")
        extra[1] = tmp_path / "short.txt"
    elif case == "exists":
        out.mkdir()
    elif case == "imatrix_calib":  # an explicit --calib beside --imatrix would be silently ignored
        extra += ["--imatrix", tmp_path / "h.imatrix.gguf"]
    code, err = _run(capsys, "quantize", model, "-o", out, *extra)
    assert code == 2
    assert err.count("\n") == 0 and err.startswith("neuqi-export: error:") and match in err, err
    if case != "exists":
        assert not out.exists()
    assert not list(tmp_path.glob("out.partial*"))
