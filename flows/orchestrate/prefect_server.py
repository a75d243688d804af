"""``v2v server``: a local Prefect server that every ``v2v run`` on this machine attaches to while it runs.

A run without ``PREFECT_API_URL`` otherwise starts Prefect's temporary server, which costs 6-13 s of start-up on
this 2-core machine (more than a third of a one-video edit) and keeps no history. ``v2v server`` runs
``prefect server start`` in the foreground (Ctrl-C stops it: nothing outlives the command that started it),
keeps its database under the v2v cache dir, so runs, task runs and summaries accumulate in the UI, and registers
itself in ``<v2v cache>/prefect-server.json``; a run finds it there (live process, healthy API) and skips the
temporary server altogether.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path


def _cache_dir() -> Path:
    from stages.models import cache_dir

    return cache_dir()


def registry() -> Path:
    return _cache_dir() / "prefect-server.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def healthy(api_url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as resp:  # noqa: S310
            return bool(resp.status == 200)
    except (OSError, ValueError):
        return False


def running_server() -> str | None:
    """The API URL of a live ``v2v server`` on this machine, else None (a stale record is removed)."""
    path = registry()
    try:
        doc = json.loads(path.read_text())
        url, pid = str(doc["api_url"]), int(doc["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if _alive(pid) and healthy(url):
        return url
    if not _alive(pid):
        with contextlib.suppress(OSError):
            path.unlink()
    return None


def serve(host: str = "127.0.0.1", port: int = 4200, env: Mapping[str, str] | None = None,
          ready_timeout: float = 180.0, on_ready: object = None) -> int:
    """Run the Prefect server in the foreground until it exits or this process is interrupted."""
    if running_server():
        raise RuntimeError(f"a v2v Prefect server is already running ({running_server()}); "
                           f"stop it first (Ctrl-C in its terminal)")
    home = _cache_dir() / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    prefect = Path(sys.executable).with_name("prefect")
    cmd = [str(prefect) if prefect.exists() else "prefect", "server", "start", "--host", host, "--port", str(port)]
    full_env = {**os.environ, **dict(env or {}), "PREFECT_HOME": str(home)}
    full_env.pop("PREFECT_API_URL", None)
    # Dies with us even on SIGKILL (Linux): the server never outlives `v2v server`.
    child = subprocess.Popen(cmd, env=full_env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    api_url = f"http://{host}:{port}/api"
    path = registry()
    try:
        deadline = time.monotonic() + ready_timeout
        while not healthy(api_url, timeout=0.5):
            if child.poll() is not None:
                return int(child.returncode or 1)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Prefect server did not answer at {api_url} within {ready_timeout:.0f} s")
            time.sleep(0.3)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"api_url": api_url, "pid": child.pid, "owner": os.getpid(),
                                   "home": str(home)}))
        os.replace(tmp, path)
        if callable(on_ready):
            on_ready(api_url)
        return int(child.wait())
    except KeyboardInterrupt:
        return 0
    finally:
        with contextlib.suppress(OSError):
            if json.loads(path.read_text()).get("pid") == child.pid:
                path.unlink()
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
