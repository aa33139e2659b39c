"""The `neuqi-export` entry point: parse, run the command under the output's lock, turn a UserError or a full disk
into one line and exit code 2."""
from __future__ import annotations

import errno
import sys

from ..atomic import output_lock
from ..distributed import env_world
from ..errors import UserError
from .commands import COMMANDS
from .parser import build_parser


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk or quota: one line, nothing under the final name


def _disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or its cause) is a write that failed for lack of space: ENOSPC/EDQUOT/EFBIG, numpy's short
    `tofile` write, or a safetensors I/O error naming os error 28."""
    while exc is not None:
        msg = str(exc)
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return True
        if any(s in msg for s in ("No space left on device", "os error 28", "File too large", "os error 27")) or \
                (isinstance(exc, OSError) and exc.errno is None and "requested and" in msg and "written" in msg):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        out = getattr(args, "output", None)
        if getattr(args, "nproc", 1) != 1:  # the processes take the lock (rank 0)
            from .launch import launch

            return launch(argv, args.nproc, out)
        rank, size, _ = env_world()
        if size > 1 and args.command != "quantize":
            raise UserError(f"`{args.command}` does not run across processes yet (WORLD_SIZE={size}); run it in one "
                            "process (quantize with torchrun, then export)")
        if out is None or rank > 0:  # under torchrun only rank 0 writes, so only it locks the output
            return COMMANDS[args.command](args)
        with output_lock(out):  # two runs on one output: the second stops in one line
            return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"neuqi-export: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - only a full disk is turned into one line; the rest is re-raised
        if not _disk_full(exc):
            raise
        kept = {"quantize": "finished blocks under <out>.partial are kept",
                "distill": "its last checkpoint under <out>.partial is kept"}.get(args.command, "nothing was written")
        print(f"neuqi-export: error: no space left writing {getattr(args, 'output', None) or 'the output'} "
              f"({str(exc).strip().splitlines()[0][:100]}); free space (or choose another -o) and rerun: {kept}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neuqi-export: interrupted; re-run the same command to resume from the last finished block",
              file=sys.stderr)
        return 130
