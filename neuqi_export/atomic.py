"""Write a file or directory all-or-nothing: build it under a temporary name beside the target, then rename."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


@contextmanager
def atomic_file(path):
    """Yields a temp file name beside `path`; on success it replaces `path`, on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_directory(path, overwrite: bool = False):
    """Yields a fresh temp dir; on success it replaces `path`, on any error it is removed."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"output '{path}' already exists; choose another -o or pass --force")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
