"""Killing ``v2v run`` (SIGKILL, SIGTERM, a terminal's SIGHUP) leaves no process it started: not the temporary
Prefect server, not a local Ray's processes, not the lifeline that reaps them.

Each case runs the real CLI in its own session on a small catalog, waits until the Prefect server answers (and,
for the Ray case, until Ray's raylet and a worker run), kills v2v and then looks, for a bounded time, for any
live process carrying a token only that run's environment has (every child inherits it: the server, Ray's
processes, the lifeline). The run's descendants are also tracked by pid while it runs, as a second witness.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from test_flow_catalog import OFFLINE

REPO = Path(__file__).resolve().parent.parent
BEAR = Path(__file__).parent / "data" / "bear"
# Enough work that the run is still going when the server (or Ray) is up: 3 jobs of 8 frames.
PARAMS = {"ingest": {"n_frames": 8, "width": 128, "height": 128}}
READY_S = 300  # a loaded 2-core machine takes up to ~40 s to boot the server, Ray ~15 s more
GONE_S = 30  # the lifeline's SIGTERM grace is 3 s, then SIGKILL

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="walks /proc (Linux)")


def _procs() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, state, cmdline) of every process we can see."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{name}/stat").read_text(errors="replace")
            cmd = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()
        out[int(name)] = (int(fields[1]), fields[0], cmd.strip())
    return out


def _carrying(token: str) -> dict[int, str]:
    """Live (not zombie) processes whose environment holds ``token``: pid -> command line."""
    needle = f"V2V_LEAK_TOKEN={token}".encode()
    found = {}
    for pid, (_ppid, state, cmd) in _procs().items():
        if state == "Z":  # ended; this container's init may never reap it
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found[pid] = cmd
    return found


def _descendants(root: int) -> dict[int, str]:
    table = _procs()
    out, todo = {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, state, cmd) in table.items():
            if ppid == parent and pid not in out and state != "Z":
                out[pid] = cmd
                todo.append(pid)
    return out


def _server_up(cmds: dict[int, str]) -> bool:
    for cmd in cmds.values():
        if "prefect.server.api.server:create_app" in cmd:
            port = cmd.split("--port", 1)[1].split()[0]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False
    return False


def _ray_up(cmds: dict[int, str]) -> bool:
    raylet = any("raylet/raylet" in c for c in cmds.values())
    worker = any(c.startswith("ray::") and "Agent" not in c for c in cmds.values())
    return raylet and worker


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    (tmp_path / "local.yaml").write_text(yaml.safe_dump({"name": "t", "backends": OFFLINE, "params": PARAMS}))
    (tmp_path / "ray.yaml").write_text(yaml.safe_dump({
        "name": "t-ray", "backends": OFFLINE, "params": PARAMS,
        "runner": {"kind": "ray", "num_cpus": 1, "cpus_per_task": 1}}))
    jobs = [{"id": f"bear-{i}", "source": str(BEAR / "frames"), "masks": str(BEAR / "mask-00000.png"),
             "first_frame": str(BEAR / "edited-first-frame-elephant.png"), "prompt": "an elephant", "seed": i}
            for i in range(3)]
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump({"jobs": jobs}))
    return tmp_path


@pytest.mark.parametrize(("runner", "sig"), [("local", signal.SIGKILL), ("local", signal.SIGTERM),
                                             ("local", signal.SIGHUP), ("ray", signal.SIGKILL)],
                         ids=["prefect-SIGKILL", "prefect-SIGTERM", "prefect-SIGHUP", "ray-SIGKILL"])
def test_killing_v2v_run_leaves_no_process_behind(workspace: Path, runner: str, sig: signal.Signals) -> None:
    if runner == "ray":
        pytest.importorskip("ray")
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "V2V_KEEP_PREFECT_SERVER")}
    env.update(PYTHONPATH=str(REPO), V2V_STORE="", V2V_PROFILE="", V2V_LEAK_TOKEN=token, HF_HUB_OFFLINE="1",
               V2V_CACHE_DIR=str(workspace / "cache"),
               # The flow tests' Prefect home: its database is migrated already.
               PREFECT_HOME=os.environ.get("PREFECT_HOME") or str(Path(tempfile.gettempdir()) / "v2v-test-prefect"))
    args = [sys.executable, "-m", "flows.cli.main", "run", str(workspace / "catalog.yaml"),
            "--profile", str(workspace / f"{runner}.yaml"), "--store", str(workspace / "store"),
            "--out", str(workspace / "out")]
    log = open(workspace / "v2v.log", "wb")  # noqa: SIM115 - closed below
    # Its own session, as a command started from a terminal: SIGHUP goes to its whole process group.
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[int, str] = {}
    try:
        deadline = time.monotonic() + READY_S
        while True:
            assert proc.poll() is None, f"v2v ended before the kill ({proc.returncode}): " \
                                        f"{(workspace / 'v2v.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"no server{' / Ray' if runner == 'ray' else ''} after {READY_S} s"
            kids = _descendants(proc.pid)
            seen.update(kids)
            if _server_up(kids) and (runner != "ray" or _ray_up(kids)):
                break
            time.sleep(0.2)
        seen.update(_descendants(proc.pid))
        if sig == signal.SIGHUP:
            os.killpg(proc.pid, sig)  # a closed terminal: the foreground process group
        else:
            os.kill(proc.pid, sig)
        code = proc.wait(timeout=60)
        assert code != 0
        deadline = time.monotonic() + GONE_S
        left = _carrying(token)
        while left and time.monotonic() < deadline:
            time.sleep(0.25)
            left = _carrying(token)
        # The second witness: the pids v2v's tree had before the kill (their token may be unreadable to us).
        table = _procs()
        tracked = {p: c for p, c in seen.items() if p in table and table[p][1] != "Z" and table[p][2] == c}
        assert not left and not tracked, f"survivors after {GONE_S} s: {left or tracked}"
        assert any("create_app" in c for c in seen.values())
        if runner == "ray":
            # Ray's agents are the ones that outlive a killed driver on their own.
            assert any("raylet" in c for c in seen.values()) and any(c.startswith("ray::") for c in seen.values())
    finally:
        log.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _carrying(token):  # never leak from the test itself
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_the_lifeline_reaps_a_child_when_its_process_exits_and_removes_its_record(tmp_path: Path) -> None:
    """Cheap, at the lifeline's level: a process starts its lifeline and a long child, and exits without
    stopping it; the child is gone within the grace period, the lifeline too, and its record is removed."""
    token = uuid.uuid4().hex
    script = ("import subprocess, sys, time\n"
              "from flows.orchestrate import lifeline\n"
              "lifeline.ensure()\n"
              "child = subprocess.Popen(['sleep', '300'])\n"
              "lifeline.rescan()\n"
              "print(child.pid, lifeline.lifeline_pid(), flush=True)\n"
              "time.sleep(1.0)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "V2V_LEAK_TOKEN": token, "V2V_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    child, watchdog = (int(x) for x in out.stdout.split())
    try:
        deadline = time.monotonic() + GONE_S
        while _carrying(token) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _carrying(token), _carrying(token)
        assert not list((tmp_path / "lifelines").glob("*.json"))
    finally:
        for pid in (child, watchdog, *_carrying(token)):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_a_record_left_by_a_dead_run_and_its_dead_lifeline_is_reaped_on_the_next_start(tmp_path: Path) -> None:
    """The second line of defence: if the lifeline itself was killed, the next one reaps what its record names
    (matching start times only: a recycled pid is not touched); a record of a live run is left alone."""
    import json

    from flows.orchestrate import lifeline

    orphan = subprocess.Popen(["sleep", "300"])
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        folder = tmp_path / "lifelines"
        folder.mkdir()
        gone = 2**22 + 7  # beyond pid_max: never alive
        (folder / "stale.json").write_text(json.dumps({
            "root": [gone, 1], "lifeline": [gone, 2],
            "procs": [[orphan.pid, lifeline.start_time(orphan.pid)],
                      [bystander.pid, lifeline.start_time(bystander.pid) + 1]]}))  # same pid, another process
        (folder / "live.json").write_text(json.dumps({
            "root": [os.getpid(), lifeline.start_time(os.getpid())], "lifeline": [gone, 2],
            "procs": [[bystander.pid, lifeline.start_time(bystander.pid)]]}))
        lifeline.reap_stale(folder)
        assert orphan.wait(timeout=10) == -signal.SIGTERM
        assert bystander.poll() is None
        assert sorted(p.name for p in folder.iterdir()) == ["live.json"]
    finally:
        for p in (orphan, bystander):
            p.kill()
            p.wait()
