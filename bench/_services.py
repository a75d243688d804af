"""What bench/scale.py starts and stops itself: a local Prefect server and a two-node Ray cluster.

Both are started as users run them (``v2v server``; ``ray start --head`` and ``ray start --address``, one CPU
each, token authentication on), the way tests/test_cluster.py does. Every process is ours and ends with the
bench: each service is one foreground command in its own session (a Ctrl-C reaches the bench, which stops them
in order), told to stop when the bench dies (PR_SET_PDEATHSIG, Linux), and stopped by its PID; what it leaves
behind (its descendants, or a process naming our temporary folder) is killed by PID. Nothing else on the
machine is touched: the Prefect server keeps its registry and database under our temporary folder
(``V2V_CACHE_DIR``), so no other ``v2v run`` on this machine attaches to it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
STARTUP_S = 240  # one service's start, generous for a loaded 2-core machine
# Settings that would send a bench run elsewhere than the profile says.
FOREIGN = ("RAY_ADDRESS", "V2V_STORE", "V2V_PROFILE", "V2V_RUNNER", "V2V_RAY_ADDRESS", "V2V_WORKERS",
           "PREFECT_API_URL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN}
    return {**env, **extra}


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:  # gone meanwhile
        return []


def _started(pid: int) -> str | None:
    """The process' start time (clock ticks since boot): with the PID, who it is (PIDs are reused)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def status_kb(pid: int, name: str = "VmHWM") -> int | None:
    """A field of /proc/<pid>/status in KiB (VmHWM: the process' peak RSS; VmRSS: now)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        todo += kids
    return found


def die_with_parent(sig: int) -> Callable[[], None]:
    def prctl() -> None:  # in the child before exec: ``sig`` when the bench dies, SIGKILL included
        # A bench started in the background by a shell inherits SIGINT ignored; its services must not, or the
        # SIGINT that stops `v2v server` would not reach it.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    return prctl


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    stop_signal: int
    marker: str | None = None  # processes whose command line holds this are this service's too

    @classmethod
    def start(cls, name: str, args: list[str], env: dict[str, str], log: Path, stop_signal: int,
              marker: str | None = None) -> Service:
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, env=env, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=die_with_parent(stop_signal))
        return cls(name, proc, log, stop_signal, marker)

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def stop(self, timeout: float = 60) -> None:
        """Its own signal (it stops what it started), then SIGKILL to whatever of it is left, by PID."""
        mine = {p: _started(p) for p in descendants(self.proc.pid)}
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.marker:
            mine.update({int(d.name): _started(int(d.name)) for d in Path("/proc").glob("[0-9]*")
                         if any(self.marker in a for a in cmdline(int(d.name)))})
        for pid, started in mine.items():
            if started is not None and _started(pid) == started:  # still that process, not a reused PID
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def prefect_server(root: Path) -> Iterator[str]:
    """``v2v server`` on a free port, its database and registry under ``root``; yields its API URL."""
    from flows.orchestrate.prefect_server import healthy

    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    root.mkdir(parents=True, exist_ok=True)
    env = clean_env(V2V_CACHE_DIR=str(root / "cache"))
    server = Service.start("prefect", [str(BIN / "v2v"), "server", "--port", str(port)], env,
                           root / "prefect-server.log", signal.SIGINT)  # SIGINT: it stops `prefect server start`
    try:
        deadline = time.monotonic() + STARTUP_S
        while not healthy(url, timeout=0.5):
            if server.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Prefect server did not come up at {url}:\n{server.tail()}")
            time.sleep(0.3)
        yield url
    finally:
        server.stop()


@dataclass
class RayCluster:
    address: str
    driver_env: dict[str, str]  # the token (RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH): what a driver needs to join
    nodes: list[Service] = field(default_factory=list)

    def raylets(self) -> list[int]:
        return [p for node in self.nodes for p in descendants(node.proc.pid)
                if Path((cmdline(p) or [""])[0]).name == "raylet"]

    def workers(self) -> list[tuple[int, str | None]]:
        """(PID, start time) of the nodes' Ray worker processes: the raylets' children that Ray titles
        ``ray::<task>`` / ``ray::IDLE`` (not its agents, which are ``ray::...Agent``, nor other helpers)."""
        found = []
        for raylet in self.raylets():
            for pid in descendants(raylet):
                title = (cmdline(pid) or [""])[0].split(" ")[0]
                if title.startswith("ray::") and not title.endswith("Agent"):
                    found.append((pid, _started(pid)))
        return found


def _node_args(root: Path, name: str, worker_ports: int) -> list[str]:
    """One node's flags: one CPU, ports chosen free and apart from the other node's (both on this machine)."""
    return ["--num-cpus=1", "--disable-usage-stats", "--block", f"--temp-dir={root / name}",
            "--object-store-memory=100000000", f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}", f"--min-worker-port={worker_ports}",
            f"--max-worker-port={worker_ports + 49}", f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}"]


def _wait_blocking(node: Service) -> None:
    deadline = time.monotonic() + STARTUP_S
    while "This command will now block" not in node.log.read_text(errors="replace"):
        if node.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ray start ({node.name}) did not come up:\n{node.tail()}")
        time.sleep(0.3)


@contextlib.contextmanager
def ray_cluster(root: Path, prefect_url: str | None = None) -> Iterator[RayCluster]:
    """A head and a worker node (``ray start --block`` each, one CPU each, token auth) under ``root``, which must
    be short: Ray's Unix sockets live under it (108-byte limit)."""
    root.mkdir(parents=True, exist_ok=True)
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes to ~/.ray/auth_token
    token.chmod(0o600)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    # The stages run in the workers, which inherit the raylet's environment: normal priority (Ray's default
    # nice 15 would put them behind the bench's own children), the same Prefect API as the driver.
    env = clean_env(**auth, RAY_worker_niceness="0", **({"PREFECT_API_URL": prefect_url} if prefect_url else {}))
    base = 20000 + (os.getpid() % 300) * 100  # worker port ranges apart from other sessions' clusters
    cluster = RayCluster("", {**auth, **({"PREFECT_API_URL": prefect_url} if prefect_url else {})})
    try:
        head = Service.start("head", [str(BIN / "ray"), "start", "--head", "--include-dashboard=false",
                                      f"--port={free_port()}", f"--ray-client-server-port={free_port()}",
                                      *_node_args(root, "head", base)], env, root / "head.log", signal.SIGTERM,
                             marker=str(root))
        cluster.nodes.append(head)
        _wait_blocking(head)
        cluster.address = (root / "head" / "ray_current_cluster").read_text().strip()
        worker = Service.start("worker", [str(BIN / "ray"), "start", f"--address={cluster.address}",
                                          *_node_args(root, "worker", base + 50)], env, root / "worker.log",
                               signal.SIGTERM)
        cluster.nodes.append(worker)
        _wait_blocking(worker)
        yield cluster
    finally:
        for node in reversed(cluster.nodes):  # the worker node, then the head (which sweeps up after both)
            try:
                node.stop()
            except Exception as exc:  # still stop the other node
                print(f"stopping Ray {node.name} node: {exc!r}", file=sys.stderr)
