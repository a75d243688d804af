"""The lifeline: what v2v starts (the temporary Prefect server, a local Ray) ends when v2v ends, by any signal.

A process killed by SIGKILL runs no cleanup, and its children are re-parented to init: a Prefect server or Ray's
agents then run for ever. So before starting any such child, v2v starts this small watchdog (this file, run as a
script: stdlib only, ~10 MB) in its own session, holding the read end of a pipe whose write end only v2v has
(non-inheritable, so no grandchild keeps it open). Every few seconds, and when v2v asks (``rescan``), the
watchdog records v2v's descendants by (pid, start time). When the pipe reaches EOF, or v2v is gone, it sends
SIGTERM to every recorded process still alive (and to process groups they lead), SIGKILL after a grace period,
and exits. A clean run has stopped its children already: nothing is left to do.

The record also goes to ``<v2v cache>/lifelines/``: if the watchdog itself was killed, the next v2v to start one
reaps what a dead v2v left behind (start times guard against recycled pids).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

SCAN_SECONDS = 2.0  # between descendant scans while v2v lives (a /proc scan costs a few ms)
GRACE_SECONDS = 3.0  # SIGTERM, then SIGKILL (Ray's agents ignore SIGTERM)

_LOCK = threading.Lock()
_PROC: subprocess.Popen[bytes] | None = None


# ---- /proc -------------------------------------------------------------------------------------------------

def _stat(pid: int) -> tuple[int, int, int, str] | None:
    """(ppid, pgid, start time, state) of a live process, None when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # the name may hold spaces and parentheses
    return int(fields[1]), int(fields[2]), int(fields[19]), fields[0]


def _table() -> dict[int, tuple[int, int, int, str]]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            out[int(name)] = st
    return out


def _alive(pid: int, start: int, table: dict[int, tuple[int, int, int, str]] | None = None) -> bool:
    st = table.get(pid) if table is not None else _stat(pid)
    return st is not None and st[2] == start and st[3] != "Z"  # a zombie has ended (init may never reap it)


def start_time(pid: int) -> int:
    st = _stat(pid)
    return st[2] if st else -1


# ---- v2v's side --------------------------------------------------------------------------------------------

def _registry_dir() -> Path:
    from stages.models import cache_dir

    return cache_dir() / "lifelines"


def ensure() -> None:
    """Start this process's lifeline unless it runs already; call before starting a child that must not
    outlive v2v. A no-op without /proc (the children then rely on a clean exit)."""
    global _PROC
    if not os.path.isdir("/proc/self"):
        return
    with _LOCK:
        if _PROC is not None and _PROC.poll() is None:
            return
        me = os.getpid()
        _PROC = subprocess.Popen(
            [sys.executable, "-S", os.path.abspath(__file__), str(me), str(start_time(me)), str(_registry_dir())],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


def rescan() -> None:
    """Ask the lifeline to record v2v's descendants now (right after starting a server or Ray)."""
    with _LOCK:
        proc = _PROC
    if proc is None or proc.stdin is None:
        return
    with contextlib.suppress(OSError, ValueError):
        proc.stdin.write(b"scan\n")
        proc.stdin.flush()


def lifeline_pid() -> int | None:
    return _PROC.pid if _PROC is not None and _PROC.poll() is None else None


# ---- the watchdog ------------------------------------------------------------------------------------------

def _descendants(root: int, root_start: int, known: dict[int, int], me: int) -> bool:
    """Add the live descendants of the root and of known processes to ``known``; True when it grew."""
    table = _table()
    seeds = {p for p, s in known.items() if _alive(p, s, table)}
    if _alive(root, root_start, table):
        seeds.add(root)
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in table.items():
        children.setdefault(ppid, []).append(pid)
    grew, todo = False, list(seeds)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child == me or child in known or child == root:
                continue
            known[child] = table[child][2]
            todo.append(child)
            grew = True
    return grew


def _write(path: Path | None, doc: dict[str, Any]) -> None:
    if path is None:
        return
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, path)


def reap(procs: dict[int, int], grace: float = GRACE_SECONDS) -> list[int]:
    """SIGTERM the live ones among ``procs`` (pid -> start time) and the process groups they lead; SIGKILL what
    is left after ``grace`` seconds. Returns the pids signalled."""
    table = _table()
    targets = {p: s for p, s in procs.items() if _alive(p, s, table)}
    # A group led by one of ours holds only processes started below it (e.g. a Ray worker's own children).
    for pid, (_ppid, pgid, start, state) in table.items():
        if pgid in targets and pid not in targets and state != "Z" and pid != os.getpid():
            targets[pid] = start
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in [p for p, s in targets.items() if _alive(p, s)]:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 1.0)
        while time.monotonic() < deadline and any(_alive(p, s) for p, s in targets.items()):
            time.sleep(0.05)
    return sorted(targets)


def reap_stale(folder: Path) -> None:
    """Reap what v2v processes that died along with their lifeline left behind."""
    with contextlib.suppress(OSError):
        for path in folder.glob("*.json"):
            try:
                doc = json.loads(path.read_text())
                root, line = tuple(doc["root"]), tuple(doc["lifeline"])
                procs = {int(p): int(s) for p, s in doc["procs"]}
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)
                continue
            if _alive(*root) or _alive(*line):
                continue  # still looked after
            reap(procs)
            path.unlink(missing_ok=True)


def watch(root: int, root_start: int, folder: Path | None) -> None:
    """The watchdog's loop: record descendants until the root's pipe closes (or the root is gone), then reap."""
    for sig in (signal.SIGINT, signal.SIGHUP):  # a terminal's signals are for v2v; we act when it is gone
        signal.signal(sig, signal.SIG_IGN)
    me = os.getpid()
    if folder is not None:
        reap_stale(folder)
    path = folder / f"{root}-{root_start}.json" if folder is not None else None
    known: dict[int, int] = {}
    fd = sys.stdin.fileno()
    while True:
        if _descendants(root, root_start, known, me):
            _write(path, {"root": [root, root_start], "lifeline": [me, start_time(me)],
                          "procs": sorted(known.items())})
        ready, _, _ = select.select([fd], [], [], SCAN_SECONDS)
        if ready and not os.read(fd, 4096):
            break  # EOF: the root has exited (its fds closed), however it ended
        if not _alive(root, root_start):
            break  # ended while a forked child still holds the pipe
    _descendants(root, root_start, known, me)  # started after the last scan, below ones we know
    reap(known)
    if path is not None:
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] else None)
