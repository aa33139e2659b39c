"""Write a file or directory all-or-nothing: build it under a temporary name beside the target, then rename."""
from __future__ import annotations

import os
import re
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(path) -> list[str]:
    """Remove the temporaries a killed run (SIGKILL: no cleanup) left beside `path`: atomic_file's
    `.<name>.<pid>.tmp` and atomic_directory's `.<name>.<pid>.<8 chars>` whose process is gone; their names."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.(tmp|[a-z0-9_]{{8}})$")
    gone = []
    if not path.parent.is_dir():
        return gone
    for p in path.parent.iterdir():
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(p.name)
    return gone


@contextmanager
def output_lock(path):
    """Hold an exclusive lock on `<path>.lock` while the body runs; a second run on the same output ends in
    one line. flock is released by the kernel when the process dies (even by SIGKILL), so no stale lock stays;
    once held, the temporaries a killed run on this output left beside it are removed (sweep_stale)."""
    import fcntl

    path = Path(path)
    lock = path.parent / f"{path.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"another neuqi-export run is writing '{path}' (it holds '{lock}'); wait for it to "
                            "finish or choose another -o") from None
        try:  # the holder before us may have removed the file between our open and our lock: lock the new one
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        sweep_stale(path)
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)
