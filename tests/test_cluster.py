"""A two-node Ray cluster as users run one: ``ray start --head`` and ``ray start --address`` (two raylets on this
machine, one CPU each), token authentication on, the store and ``out:`` on S3 (moto's server) shared by both,
and ``v2v run`` as the driver with the profile's runner address pointing at the head.

Every process is ours: each node is one ``ray start --block`` in its own session, stopped by its PID (SIGTERM
makes it stop the Ray processes it started); anything left that names this cluster's temporary folder is
killed by PID. Other Ray clusters on the machine are never touched. Slow: both nodes take 7-32 s to start here,
the module 100-180 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from test_flow_catalog import OFFLINE, SMALL, offline_profile, write_catalog
from test_s3 import finished, free_port, s3, store_verify  # noqa: F401  (s3: the module's S3 server fixture)

from flows.api import run_catalog
from storage.store import ArtifactRef, ArtifactStore

pytest.importorskip("ray")
if not Path("/proc/self/cmdline").exists():
    pytest.skip("finds the nodes' processes through /proc (Linux)", allow_module_level=True)

BIN = Path(sys.executable).parent
JOBS = ["bear", "ball", "bear-seed7"]
STARTUP_S = 240  # one node's `ray start`, generous for a loaded 2-core machine


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:  # gone meanwhile
        return []


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        todo += kids
    return found


@dataclass
class RayNode:
    proc: subprocess.Popen[bytes]
    log: Path

    def raylet(self) -> int:
        """This node's raylet's PID (a child of its ``ray start --block``)."""
        for child in _descendants(self.proc.pid):
            if Path((_cmdline(child) or [""])[0]).name == "raylet":
                return child
        raise AssertionError(f"no raylet under ray start (pid {self.proc.pid}):\n{self.log.read_text()[-2000:]}")

    def node_id(self) -> str:
        args = _cmdline(self.raylet())
        return next(a.split("=", 1)[1] for a in args if a.startswith("--node_id="))


@dataclass
class Cluster:
    address: str
    env: dict[str, str]  # what a driver needs: the token (RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH), S3, Prefect
    head: RayNode
    worker: RayNode
    root: Path
    nodes: dict[str, str] = field(default_factory=dict)  # node id -> "head" / "worker"


def _wait_started(node: RayNode, what: str) -> None:
    deadline = time.monotonic() + STARTUP_S
    while "This command will now block" not in node.log.read_text(errors="replace"):
        if node.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"ray start ({what}) did not come up:\n{node.log.read_text()[-3000:]}")
        time.sleep(0.3)


def _node_ports(root: Path, name: str, worker_ports: int) -> list[str]:
    """Ports of one node: chosen free, distinct from the other node's (both share this machine's address)."""
    return ["--num-cpus=1", "--disable-usage-stats", "--block", f"--temp-dir={root / name}",
            "--object-store-memory=100000000", f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}", f"--min-worker-port={worker_ports}",
            f"--max-worker-port={worker_ports + 49}", f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}"]


def _start(args: list[str], env: dict[str, str], root: Path, name: str) -> RayNode:
    log = root / f"{name}.log"
    with open(log, "wb") as out:  # its own session: a Ctrl-C of pytest does not reach it, the fixture stops it
        proc = subprocess.Popen([str(BIN / "ray"), "start", *args], env=env, cwd=root, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return RayNode(proc, log)


def _stop(node: RayNode) -> None:
    if node.proc.poll() is None:
        node.proc.send_signal(signal.SIGTERM)
        try:
            node.proc.wait(60)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait(10)


def _leftovers(root: Path) -> list[int]:
    """PIDs of processes naming this cluster's temporary folder (Ray passes it to every process it starts)."""
    return [int(d.name) for d in Path("/proc").glob("[0-9]*") if any(str(root) in a for a in _cmdline(int(d.name)))]


@pytest.fixture(scope="module")
def cluster(s3: dict[str, Any]) -> Iterator[Cluster]:  # noqa: F811
    from flows.orchestrate import prefect_env

    prefect_url = prefect_env.ensure_server()  # one Prefect API for every driver run of this module
    # A short root: Ray's Unix sockets live under it (108-byte limit).
    root = Path(tempfile.mkdtemp(prefix="v2vray-"))
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes to ~/.ray/auth_token
    token.chmod(0o600)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    # Every node gets the token and the S3 credentials: the workers (and so the stages) inherit the raylet's
    # environment, not the driver's.
    env = {**os.environ, **s3["env"], **auth, "RAY_worker_niceness": "0"}
    for name in ("RAY_ADDRESS", "V2V_STORE", "V2V_PROFILE", "V2V_RUNNER", "V2V_RAY_ADDRESS", "V2V_WORKERS"):
        env.pop(name, None)  # the profile file says where the store and the cluster are
    base = 20000 + (os.getpid() % 300) * 100  # worker port ranges apart from other test sessions' clusters
    t0 = time.perf_counter()
    head = _start(["--head", "--include-dashboard=false", f"--port={free_port()}",
                   f"--ray-client-server-port={free_port()}", *_node_ports(root, "head", base)], env, root, "head")
    worker = None
    try:
        _wait_started(head, "head")
        address = (root / "head" / "ray_current_cluster").read_text().strip()
        worker = _start([f"--address={address}", *_node_ports(root, "worker", base + 50)], env, root, "worker")
        _wait_started(worker, "worker")
        print(f"\ncluster up in {time.perf_counter() - t0:.1f} s at {address}")
        c = Cluster(address, {**env, "PREFECT_API_URL": prefect_url}, head, worker, root)
        c.nodes = {head.node_id(): "head", worker.node_id(): "worker"}
        yield c
    finally:
        for node in (worker, head):
            if node is not None:
                _stop(node)
        for pid in _leftovers(root):  # e.g. workers of a node whose raylet was killed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def driver(cluster: Cluster, code: str, env: dict[str, str] | None = None, timeout: float = 120
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=env or cluster.env, cwd=cluster.root)


def v2v_run(cluster: Cluster, catalog: Path, profile: Path, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    """``v2v run`` as the driver, its output in a file beside the catalog (a pipe nobody reads while polling
    could fill up)."""
    log = catalog.parent / f"run-{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(BIN / "v2v"), "run", str(catalog), "-p", str(profile), *extra], stdout=out,
                                stderr=subprocess.STDOUT, env={**cluster.env, "COLUMNS": "200"}, cwd=cluster.root)
    return proc, log


def finish(run: subprocess.Popen[bytes], log: Path, timeout: float = 600) -> str:
    """Wait for a ``v2v run``; one that hangs is killed (by its PID) and fails the test with its output."""
    try:
        run.wait(timeout)
    except subprocess.TimeoutExpired:
        run.kill()
        run.wait(30)
        raise AssertionError(f"v2v run still running after {timeout} s:\n{log.read_text()[-3000:]}") from None
    return log.read_text()


def running_task(raylet: int) -> str | None:
    """The v2v task one of the node's Ray workers is running, if any: Ray titles a worker process
    ``ray::<function>`` while it runs a task and ``ray::IDLE`` between tasks (its agents are ``ray::...Agent``)."""
    for pid in _descendants(raylet):
        title = (_cmdline(pid) or [""])[0].split(" ")[0]
        if title in ("ray::run_stage", "ray::job_outputs"):
            return title
    return None


def cluster_profile(folder: Path, cluster: Cluster, s3: dict[str, Any], name: str) -> Path:  # noqa: F811
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "store": f"s3://{s3['bucket']}/store", "out": f"s3://{s3['bucket']}/out",
        "runner": {"kind": "ray", "address": cluster.address, "cpus_per_task": 1},
        "backends": OFFLINE, "params": SMALL}))
    return path


def nodes_of(store: ArtifactStore, job: str) -> dict[str, str]:
    """stage -> the node id recorded in the commit record of the artifact the job uses."""
    return {stage: store.attrs(ArtifactRef(stage, key)).get("node", "?")
            for stage, key in store.job(job)["artifacts"].items()}


def test_the_cluster_needs_its_token(cluster: Cluster) -> None:
    """Token auth is on: a driver with the token joins and sees both nodes; one without it is refused."""
    probe = (f"import json, ray\nray.init(address={cluster.address!r}, log_to_driver=False)\n"
             "print(json.dumps(sorted(n['NodeID'] for n in ray.nodes() if n['Alive'])))\n")
    ok = driver(cluster, probe)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert sorted(cluster.nodes) == json.loads(ok.stdout.strip().splitlines()[-1])
    wrong = cluster.root / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    refused = driver(cluster, probe, env={**cluster.env, "RAY_AUTH_TOKEN_PATH": str(wrong)})
    assert refused.returncode != 0
    assert "InvalidAuthToken" in refused.stderr or "Authentication" in refused.stderr, refused.stderr[-2000:]


def test_a_catalog_runs_across_both_nodes_and_survives_a_dead_worker_node(
        tmp_path: Path, cluster: Cluster, s3: dict[str, Any]) -> None:  # noqa: F811
    cat = write_catalog(tmp_path)
    prof = cluster_profile(tmp_path, cluster, s3, "cluster")
    t0 = time.perf_counter()
    run, log = v2v_run(cluster, cat, prof)
    out = finish(run, log)
    first_s = time.perf_counter() - t0
    assert run.returncode == 0, out[-4000:]
    store = ArtifactStore(f"s3://{s3['bucket']}/store")
    ran_on = {cluster.nodes.get(n, n) for job in JOBS for n in nodes_of(store, job).values()}
    assert ran_on == {"head", "worker"}, ran_on  # stages ran on both nodes, and on no other
    for job in JOBS:  # the videos are in the bucket (exported by whichever node ran the export)
        assert s3["fs"].cat_file(f"{s3['bucket']}/out/{job}/video.mp4")[4:8] == b"ftyp"

    local_store = tmp_path / "local"
    local, _ = run_catalog(str(cat), profile=offline_profile(tmp_path / "local-out"), store=str(local_store),
                           request={"params": SMALL}, orchestrator="inline")
    assert finished(local)
    reference = ArtifactStore(local_store)
    for job in JOBS:
        assert store.job(job)["artifacts"] == reference.job(job)["artifacts"], job
        ref = ArtifactRef("generate", store.job(job)["artifacts"]["generate"])
        assert np.array_equal(store.read(ref)["video"], reference.read(ref)["video"]), job

    # Fault: new keys (8 frames); the worker node SIGKILLed (raylet and workers) while it runs a stage of this run.
    store.fs.invalidate_cache()
    known = {ref for ref, _ in store.iter_artifacts()}
    worker_id = cluster.worker.node_id()
    raylet = cluster.worker.raylet()
    t1 = time.perf_counter()
    run, log = v2v_run(cluster, cat, prof, "--set", "ingest.n_frames=8")
    killed_at, in_rotation, task = None, False, None
    while run.poll() is None and time.perf_counter() - t1 < 600:
        if not in_rotation:  # the worker node has committed a stage of this run: it takes this run's tasks
            store.fs.invalidate_cache()  # s3fs caches listings: see what the nodes committed since
            new = [ref for ref, _ in store.iter_artifacts() if ref not in known]
            in_rotation = any(store.attrs(ref).get("node") == worker_id for ref in new)
            time.sleep(0.2)
        elif (task := running_task(raylet)) is not None:  # ... and is running one now, still 50 ms later
            time.sleep(0.05)
            if running_task(raylet) == task:
                # The node dies: its raylet and, at the same instant, the worker processes under it (a raylet
                # killed alone leaves a running task to finish and hand its result straight to the driver).
                for pid in [raylet, *_descendants(raylet)]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                killed_at = time.perf_counter() - t1
                break
        else:
            time.sleep(0.02)
    assert killed_at is not None and run.poll() is None, "the run ended before the worker node ran a stage"
    out = finish(run, log)
    fault_s = time.perf_counter() - t1
    jobs = {j: store.job(j) for j in JOBS}
    failed = {j: d.get("error") for j, d in jobs.items() if d["status"] == "failed"}
    # Ray resubmits the tasks the dead node was running: the run finishes on the head, or a job fails and says
    # that a node or worker died (never a stage's own error, never a hang).
    assert run.returncode == (1 if failed else 0), out[-4000:]
    # The task running on the node was lost with it: Ray said it resubmits it, or its job failed saying why.
    retried = "will be retried" in out
    assert retried or failed, f"no task was lost with the node:\n{out[-3000:]}"
    for job, error in failed.items():
        assert error and any(w in error for w in ("Node", "node", "Worker", "worker", "died", "crash")), (job, error)
    after = [cluster.nodes.get(n, n) for job in JOBS for s, n in nodes_of(store, job).items()
             if ArtifactRef(s, store.job(job)["artifacts"][s]) not in known]
    assert "head" in after, after  # the head carried on after the kill
    split = {n: after.count(n) for n in sorted(set(after))}

    # The next run completes on the head alone; nothing in the store is damaged.
    t2 = time.perf_counter()
    run, log = v2v_run(cluster, cat, prof, "--set", "ingest.n_frames=8")
    out = finish(run, log)
    again_s = time.perf_counter() - t2
    assert run.returncode == 0, out[-4000:]
    assert all(store.job(j)["status"] in ("done", "cached") for j in JOBS)
    # What the retried and the surviving tasks committed is what a local run computes.
    eight = {"ingest": {**SMALL["ingest"], "n_frames": 8}}
    local8, _ = run_catalog(str(cat), profile=offline_profile(tmp_path / "local-out"), store=str(local_store),
                            request={"params": eight}, orchestrator="inline")
    assert finished(local8)
    for job in JOBS:
        assert store.job(job)["artifacts"] == reference.job(job)["artifacts"], job
        ref = ArtifactRef("generate", store.job(job)["artifacts"]["generate"])
        assert np.array_equal(store.read(ref)["video"], reference.read(ref)["video"]), job
    verified = store_verify(store.url)
    assert verified.returncode == 0 and " 0 damaged" in verified.stdout, verified.stdout + verified.stderr
    print(f"\ntwo-node run {first_s:.1f} s; fault run {fault_s:.1f} s (raylet killed at {killed_at:.1f} s, "
          f"while it ran {task}, {len(failed)} job(s) failed, stage artifacts by node {split}, "
          f"Ray retried a task: {retried}); "
          f"next run {again_s:.1f} s")
