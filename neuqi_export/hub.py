"""MODEL arguments: a local directory, `smollm2` (the fetched default), or a Hugging Face repo id (`org/name`).

A repo id is resolved with huggingface_hub into the usual HF cache (HF_HOME / HF_HUB_CACHE), downloading only
what the toolkit reads (config, tokenizer and generation files, safetensors weights and their index; no
`.bin`, no remote code), with huggingface_hub's progress bars; with HF_HUB_OFFLINE=1 it resolves from that
cache alone. Every way it can fail is one UserError line naming the fix.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import UserError

# what quantize/convert/eval/distill read from a model repo
ALLOW = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
         "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "vocab.json",
         "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(arg: str) -> bool:
    """Does `arg` look like `org/name` (and is it not a path that exists)?"""
    return bool(_REPO_ID.match(arg)) and not Path(arg).exists() and not arg.startswith(("./", "../"))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model(arg: str, revision: str | None = None) -> str:
    """A path for MODEL: `smollm2` / `gemma3-270m` (when no such path exists) the fetched models, a repo id its snapshot
    in the HF cache (downloaded unless HF_HUB_OFFLINE=1), anything else unchanged."""
    if arg == "smollm2" and not Path(arg).exists():
        from .assets import fetch_assets

        return str(fetch_assets().model_dir)
    if arg == "gemma3-270m" and not Path(arg).exists():
        from .gemma_asset import fetch_gemma

        return str(fetch_gemma())
    if not is_repo_id(arg):
        if revision is not None:
            raise UserError(f"--revision is for a Hugging Face repo id (org/name), but '{arg}' is a local path; "
                            "drop --revision")
        return arg
    return str(download(arg, revision))


def download(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot directory of `repo_id` at `revision` (default: main) in the HF cache; UserError otherwise."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    at = f"'{repo_id}'" + (f" at revision {revision}" if revision else "")
    local = f" (there is no local directory '{repo_id}' either)"
    offline = _offline()
    try:  # cache, endpoint and offline mode read now, not when huggingface_hub was imported
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW, local_files_only=offline,
                                      cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                                      endpoint=os.environ.get("HF_ENDPOINT") or None))
    except GatedRepoError:
        raise UserError(f"{at} is gated: accept its licence on its Hugging Face page and log in (`hf auth login`, "
                        "or set HF_TOKEN), or pass a local model directory") from None
    except RevisionNotFoundError:
        raise UserError(f"{at}: no such revision on the Hugging Face hub; pass an existing branch, tag or "
                        "commit to --revision") from None
    except RepositoryNotFoundError:
        raise UserError(f"no Hugging Face repo {at}{local} (or it is private: log in with `hf auth login` or set "
                        "HF_TOKEN); check the id, or pass a local model directory") from None
    except LocalEntryNotFoundError:
        if offline:
            raise UserError(f"{at} is not in the Hugging Face cache{local} and HF_HUB_OFFLINE=1 forbids downloading it; "
                            "unset HF_HUB_OFFLINE on a machine with network, or pass a local model "
                            "directory") from None
        raise UserError(f"{at} could not be fetched from the Hugging Face hub (no connection){local}; set "
                        "HF_HUB_OFFLINE=1 to use a copy already in the HF cache, or pass a local model "
                        "directory") from None
    except OSError as exc:  # connection errors that huggingface_hub passes through, a full or read-only cache
        raise UserError(f"{at} could not be fetched ({type(exc).__name__}: {exc}); set HF_HUB_OFFLINE=1 to use "
                        "the HF cache, or pass a local model directory") from None
    if not (path / "config.json").is_file():
        raise UserError(f"{at} has no config.json; it is not a transformers model repo (pass a local model "
                        "directory)")
    if not any(path.glob("*.safetensors")):
        raise UserError(f"{at} has no safetensors weights (only .bin or none); neuqi-export reads safetensors: "
                        "convert the weights, or pick a repo that ships them")
    return path
