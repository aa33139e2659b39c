"""Naming the rank that stopped a distributed run (distributed.py): each rank leaves in the rendezvous store its host
and pid, and before every collective a note of where it is; a rank whose collective failed reads them back to say
which rank died (its process is gone: checked for ranks on this host) or hung (it never reached the collective)."""
from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

_KEY = "neuqi-export"
_state: dict = {"store": None, "seq": 0}


def _store():
    if _state["store"] is None:
        try:
            from torch.distributed import distributed_c10d

            _state["store"] = distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 - no store: diagnoses are just less precise
            _state["store"] = False
    return _state["store"] or None


def register(rank: int) -> None:
    """Leave this rank's host and pid in the store (once, after joining the group)."""
    store = _store()
    if store is not None:
        store.set(f"{_KEY}/proc/{rank}", f"{socket.gethostname()} {os.getpid()}")


def at(rank: int, what: str) -> None:
    """Note that this rank enters collective number n (`what` says which)."""
    _state["seq"] += 1
    store = _store()
    if store is not None:
        store.set(f"{_KEY}/at/{rank}", f"{_state['seq']} {what}")


def _gone(host: str, pid: int) -> bool | None:
    """Whether process `pid` on `host` has ended (a zombie counts as ended); None when it runs elsewhere."""
    if host != socket.gethostname():
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        return None


def diagnose(rank: int, size: int, what: str) -> str:
    """Which other rank stopped the collective `what` this rank was in: 'rank R died' / 'rank R hung ...', or a
    generic cause when the store cannot tell."""
    store = _store()
    if store is None:
        return "another rank died or hung past --dist-timeout"
    try:
        store.set_timeout(timedelta(seconds=3))
        mine = store.get(f"{_KEY}/at/{rank}").decode().split(" ", 1)[0]
        for attempt in range(4):  # a killed rank's sockets close a moment before its process is gone
            dead, hung = [], []
            for r in range(size):
                if r == rank:
                    continue
                host, pid = store.get(f"{_KEY}/proc/{r}").decode().split()
                seq, where = store.get(f"{_KEY}/at/{r}").decode().split(" ", 1)
                if _gone(host, int(pid)):
                    dead.append(r)
                elif seq != mine:
                    hung.append((r, where))
            if dead or not hung:
                break
            time.sleep(0.25)
    except Exception:  # noqa: BLE001 - the store went with the rank (or launcher) that hosted it
        return "lost the rendezvous store (the rank or launcher hosting it died)"
    if dead:
        return " and ".join(f"rank {r}" for r in dead) + " died"
    if hung:
        return "; ".join(f"rank {r} hung (it never reached this step; its last: {w})" for r, w in hung)
    return "another rank died or hung past --dist-timeout"
