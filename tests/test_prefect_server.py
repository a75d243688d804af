"""`v2v server`: runs attach to a running local Prefect server instead of starting a temporary one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_flow_catalog import offline_profile, write_catalog

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture()
def v2v_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[subprocess.Popen[bytes], dict]]:
    cache = tmp_path / "cache"
    monkeypatch.setenv("V2V_CACHE_DIR", str(cache))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    env = {**os.environ, "PYTHONPATH": str(REPO), "V2V_CACHE_DIR": str(cache)}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli.main", "server", "--port", str(_free_port())],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = cache / "prefect-server.json"
    deadline = time.monotonic() + 240
    while not record.exists():
        assert proc.poll() is None, "v2v server exited"
        assert time.monotonic() < deadline, "v2v server did not come up"
        time.sleep(0.5)
    doc = json.loads(record.read_text())
    try:
        yield proc, doc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_a_run_uses_the_running_server_and_the_server_dies_with_its_command(
        tmp_path: Path, v2v_server: tuple[subprocess.Popen[bytes], dict]) -> None:
    from prefect import get_client

    from flows.api import run_catalog
    from flows.orchestrate import prefect_env

    proc, doc = v2v_server
    started_before = prefect_env.server_url()
    cat = write_catalog(tmp_path)
    report, _ = run_catalog(cat, profile=offline_profile(tmp_path / "out"), store=str(tmp_path / "store"))
    assert all(j.status == "done" for j in report.jobs)
    assert prefect_env.server_url() == started_before  # no temporary server was started for this run
    os.environ["PREFECT_API_URL"] = doc["api_url"]
    try:
        with get_client(sync_client=True) as client:
            assert any(r.name for r in client.read_flow_runs(limit=5)), "the run is not in the server's history"
    finally:
        os.environ.pop("PREFECT_API_URL", None)
    # SIGKILL of `v2v server` takes the Prefect server with it, and runs go back to a temporary server.
    proc.kill()
    proc.wait(timeout=10)
    deadline = time.monotonic() + 30
    while _alive(int(doc["pid"])) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(int(doc["pid"]))
    from flows.orchestrate.prefect_server import running_server

    assert running_server() is None
