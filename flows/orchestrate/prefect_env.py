"""Prefect without surprises: quiet, offline, no hang, a clean shutdown.

With no ``PREFECT_API_URL``, Prefect 3 starts a temporary API server in a subprocess for each process that
needs one (every Ray worker too). We start that server once per run instead, point this process and its
workers at it (``PREFECT_API_URL``), send its output to ``$PREFECT_HOME/v2v-server.log``, drain the event
and log workers before stopping it, and keep Prefect's console logging off unless asked (``--verbose``).
This is the same sequence as Prefect's own test harness. With ``PREFECT_API_URL`` set (a real server, e.g.
``prefect server start``) nothing is started and runs show up in its UI. The temporary server ends with this
process however it ends, SIGKILL included (:mod:`flows.orchestrate.lifeline`).

Call :func:`configure` before the first ``import prefect`` (settings are read at import).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flows.orchestrate import lifeline

_DEFAULTS = {
    # Offline machines: no telemetry call home (it logs an error per run when DNS is missing).
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # A loaded 2-core machine takes 20-40 s to boot the API server; Prefect's default timeout is 20 s.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


# The temporary server records task runs from their events one insert per event by default (batch size 1);
# with stages of a fraction of a second that cost it ~70 ms of CPU per task on this 2-core machine, taken
# from the stages. Batches of up to 200 events, flushed every second (and at shutdown), halve the server's CPU
# per run (bench/orchestration.py).
_RECORDER_BATCHING = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
}


def configure(verbose: bool = False) -> None:
    """Environment defaults for Prefect (the user's own settings win)."""
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)
    if not verbose:
        # Our CLI renders progress and errors itself; Prefect's console handler would print tracebacks of
        # failed tasks (bad inputs) that the summary already explains. Logs still reach the API / UI.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    else:
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "INFO"


def _server_class() -> Any:
    from prefect.server.api.server import SubprocessASGIServer

    class QuietServer(SubprocessASGIServer):
        """Prefect's temporary server with its output in a log file instead of our terminal."""

        _instances: dict[int | None, Any] = {}
        log_path: Path | None = None

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            import prefect
            from prefect.settings import PREFECT_HOME, get_current_settings

            home = Path(PREFECT_HOME.value()).expanduser()
            home.mkdir(parents=True, exist_ok=True)
            self.log_path = home / "v2v-server.log"
            env = {**_RECORDER_BATCHING, **os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                   "PREFECT__SERVER_FINAL": "1",
                   **get_current_settings().to_environment_variables(exclude_unset=True)}
            env.pop("PREFECT_API_URL", None)
            env["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"  # its warnings go to the log file
            lifeline.ensure()  # the server ends with this process, even on SIGKILL
            # Its own session: a terminal's Ctrl-C or hangup reaches v2v, which stops the server after draining
            # its event workers into it (the lifeline does it if v2v cannot).
            with open(self.log_path, "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
                     "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                     "--log-level", "error", "--lifespan", "on"],
                    env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            lifeline.rescan()
            return proc

    return QuietServer


_SERVER: Any = None


def server_env() -> dict[str, str]:
    """Settings for a Prefect server that v2v starts (the task-run recorder's batching)."""
    return dict(_RECORDER_BATCHING)


def server_url() -> str | None:
    return _SERVER.api_url if _SERVER is not None and _SERVER.running else None


@contextlib.contextmanager
def prefect_session(verbose: bool = False) -> Iterator[str]:
    """Make sure a Prefect API is reachable for this run and its workers; yields its URL."""
    global _SERVER
    configure(verbose)
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    url = PREFECT_API_URL.value()
    if url:  # a real server: nothing to start or stop
        yield url
        return
    from flows.orchestrate.prefect_server import running_server

    shared = running_server()
    if shared:  # `v2v server` is running on this machine: use it, start nothing
        with _pointed_at(shared):
            yield shared
        return
    owned = False
    if _SERVER is None or not _SERVER.running:
        _SERVER = _server_class()()
        _SERVER.start(timeout=PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        owned = True
    # Code inside Prefect that asks for "the" temporary server must find ours, not start a second one.
    prior = SubprocessASGIServer._instances.get(None)
    SubprocessASGIServer._instances[None] = _SERVER
    try:
        with _pointed_at(_SERVER.api_url):
            yield _SERVER.api_url
    finally:
        if prior is not None:
            SubprocessASGIServer._instances[None] = prior
        else:
            SubprocessASGIServer._instances.pop(None, None)
        if owned and not _keep_server():
            stop_server()


@contextlib.contextmanager
def _pointed_at(url: str) -> Iterator[None]:
    """This process (and the Ray workers it starts, through the environment) talks to the API at ``url``;
    Prefect's event and log queues are drained before leaving."""
    import prefect.context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    old = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}), \
                prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()):
            yield
            drain()
    finally:
        if old is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = old


def ensure_server() -> str:
    """Start the shared temporary server now (kept until exit); tests and benchmarks call this once."""
    os.environ["V2V_KEEP_PREFECT_SERVER"] = "1"
    with prefect_session() as url:
        return url


def _keep_server() -> bool:
    # Tests and benchmarks run many flows in one process: keep the server until exit.
    return os.environ.get("V2V_KEEP_PREFECT_SERVER", "") not in ("", "0", "false")


def drain() -> None:
    """Flush Prefect's event and log workers (before stopping the server they talk to)."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def _drain() -> None:
        with contextlib.suppress(RuntimeError):
            res = APILogWorker.instance().drain()
            if inspect.isawaitable(res):
                await res
        res = EventsWorker.drain_all()
        if inspect.isawaitable(res):
            await res

    with contextlib.suppress(Exception):
        run_coro_as_sync(_drain())


def stop_server() -> None:
    global _SERVER
    if _SERVER is not None:
        # Drained inside the session already: draining here (outside the settings that point at the server)
        # would make Prefect create fresh workers, and a fresh temporary server for them.
        _SERVER.stop()
        _SERVER = None


def forget_result_links(result: Any) -> None:
    """Drop the flow run's links from a task's result to its state, once the result is read.

    Prefect records every task result, and each item of one, in ``FlowRunContext.run_results`` (id -> a copy of
    the task's state), so that a result passed to a later task marks that task as downstream. v2v passes keys
    between tasks, never results, and the entries of results that cannot be weakly referenced (dicts, lists,
    slots dataclasses) are never evicted: a long run would hold one for every item of every result it read."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None:
        return
    items = [result]
    if isinstance(result, dict):
        items += [*result.keys(), *result.values()]
    elif isinstance(result, list | tuple | set):
        items += list(result)
    for item in items:
        ctx.run_results.pop(id(item), None)
