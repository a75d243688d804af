"""Orchestration overhead: a 20-job catalog of small synthetic clips, local vs Ray, cold vs cached.

Prints, from one run:
* the temporary Prefect server's start-up (once per process; zero with a running server),
* local runner (Prefect, threads, one stage at a time; artifact commits on a writer thread and exports on
  an export thread, both overlapping the next stages): wall time, sum of stage compute, overhead ratio
  ``(wall - compute) / compute`` (planning, store I/O, Prefect, what is left of the exports),
* the cached re-run's seconds per job (no stage runs; Prefect is not started) and, for comparison, the same
  re-run forced through Prefect (every task a cache hit),
* Ray runner (stage bodies as Ray tasks, Ray started before timing) with 2 workers, then 1 worker: wall
  time, speedup over local and over itself with one worker (commits are synchronous on Ray workers: the next
  stage may run in another process),
* the cost of one no-op task for each way of dispatching a stage (threads, threads + Ray, prefect-ray).

Usage: python bench/orchestration.py [--jobs 20] [--frames 16] [--size 256] [--keep DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OFFLINE = {"source_masks": "provided", "flow": "dis", "depth": "ground-prior", "shape_mask": "change",
           "refine": "flow-fill", "generate": "propagate", "evaluate": "metrics"}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def per_task_seconds(n: int = 100) -> dict[str, float]:
    """Wall seconds per no-op task for each way a stage can be dispatched (Ray initialised, 2 CPUs)."""
    import ray
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_ray import RayTaskRunner

    from flows.orchestrate import ray_dispatch
    from flows.run.executors import limit_threads  # a no-op with None, importable by workers (as run_stage is)

    @task
    def noop(i: int) -> int:
        return i

    @task
    def noop_on_ray(i: int) -> None:
        return ray_dispatch.call(limit_threads, {"num_cpus": 1}, None)

    def many(t: Any) -> Any:
        @flow
        def many_tasks(k: int) -> list[int]:
            return [f.result() for f in [t.submit(i) for i in range(k)]]
        return many_tasks

    address = ray.get_runtime_context().gcs_address
    ways = {"Prefect task on threads (local runner)": (noop, ThreadPoolTaskRunner(max_workers=3)),
            "Prefect task on threads + plain Ray task (dispatch: ray)": (noop_on_ray, ThreadPoolTaskRunner(3)),
            "Prefect task inside a Ray worker (dispatch: prefect-ray)": (noop, RayTaskRunner(address=address))}
    out: dict[str, float] = {}
    for name, (t, runner) in ways.items():
        fl = many(t).with_options(task_runner=runner)
        fl(4)  # warm: imports, workers
        start = time.perf_counter()
        fl(n)
        out[name] = (time.perf_counter() - start) / n
    remote = ray.remote(limit_threads)
    ray.get([remote.remote(None) for _ in range(8)])
    start = time.perf_counter()
    ray.get([remote.remote(None) for _ in range(n)])
    out["plain Ray task (no Prefect)"] = (time.perf_counter() - start) / n
    return out


def make_catalog(folder: Path, jobs: int) -> Path:
    from flows.config.demo_clip import make_demo_clip

    lines = ["jobs:"]
    for i in range(jobs):
        clip = make_demo_clip(folder / f"clip-{i:02d}", variant=i)
        lines += [f"  - id: job-{i:02d}", f"    source: {clip['clip']}", f"    masks: {clip['masks']}",
                  f"    first_frame: {clip['first_frame']}", "    prompt: a green cone", f"    seed: {i}"]
    path = folder / "bench.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=256, help="canvas side (multiple of 64)")
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temp dir)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="v2v-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect-home"))

    from flows.api import run_catalog
    from flows.config.profiles import Profile, RunnerConfig
    from flows.orchestrate import prefect_env

    params = {"ingest": {"n_frames": args.frames, "width": args.size, "height": args.size}}
    catalog = make_catalog(work / "clips", args.jobs)
    local = Profile(name="bench-local", out=str(work / "out-local"), backends=OFFLINE, params=params,
                    runner=RunnerConfig(kind="local", max_workers=1))
    ray_prof = local.model_copy(update={"name": "bench-ray", "out": str(work / "out-ray"),
                                       "runner": RunnerConfig(kind="ray", num_cpus=2)})
    print(f"{args.jobs} jobs, {args.frames} frames at {args.size}x{args.size}, offline backends; work dir {work}")

    t = time.perf_counter()
    prefect_env.ensure_server()
    server_s = time.perf_counter() - t

    server_pid = prefect_env._SERVER.server_process.pid if prefect_env._SERVER else 0
    cpu: dict[str, float] = {}

    def run(profile: Profile, store: str, label: str, **kw: object) -> tuple[float, float, Any]:
        start = time.perf_counter()
        c0, s0 = time.process_time(), cpu_seconds(server_pid)
        report, _ = run_catalog(catalog, profile=profile, store=store, **kw)  # type: ignore[arg-type]
        wall = time.perf_counter() - start
        cpu[label] = time.process_time() - c0
        cpu[label + " server"] = cpu_seconds(server_pid) - s0
        failed = [j.job_id for j in report.jobs if j.status == "failed"]
        if failed:
            raise SystemExit(f"jobs failed: {failed}: {report.jobs[0].error}")
        return wall, report.compute_seconds, report

    local_wall, local_compute, local_report = run(local, str(work / "store-local"), "local")
    cached_wall, _, cached = run(local, str(work / "store-local"), "cached")
    forced_wall, _, _ = run(local, str(work / "store-local"), "forced", skip_when_cached=False)

    import ray

    os.environ.setdefault("RAY_worker_niceness", "0")  # as v2v's own local Ray: workers at normal priority
    ray_runs: dict[int, tuple[float, float, Any, float]] = {}
    for cpus in (2, 1):
        t = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        init_s = time.perf_counter() - t
        try:
            prof = ray_prof.model_copy(update={"out": str(work / f"out-ray{cpus}"),
                                               "runner": RunnerConfig(kind="ray", num_cpus=cpus)})
            ray_runs[cpus] = (*run(prof, str(work / f"store-ray{cpus}"), f"ray{cpus}"), init_s)
            if cpus == 2:
                dispatch_costs = per_task_seconds()
        finally:
            ray.shutdown()
    ray_wall, ray_compute, ray_report, ray_init_s = ray_runs[2]
    ray1_wall = ray_runs[1][0]
    workers = {r.pid for j in ray_report.jobs for r in j.stages.values() if r.pid}  # type: ignore[attr-defined]

    n = args.jobs
    print(f"Prefect temporary server start-up: {server_s:6.1f} s (once per process; 0 with PREFECT_API_URL; "
          "here in a fresh PREFECT_HOME, so creating its database is included)")
    print(f"local  wall time:               {local_wall:8.1f} s")
    print(f"local  sum of stage compute:    {local_compute:8.1f} s")
    io, exports = local_report.io_seconds, local_report.outputs_seconds
    rest = local_wall - local_compute - io
    print(f"local  overhead ratio:          {(local_wall - local_compute) / local_compute:8.1%} "
          "(wall - compute) / compute, of which:")
    print(f"         store I/O on the stage thread (reads, cache checks): {io:7.1f} s  {io / local_compute:7.1%}")
    print(f"         the rest (plan, Prefect, scheduling, last export):   {rest:7.1f} s  {rest / local_compute:7.1%}")
    print(f"       beside the stages (own threads): artifact commits, and exports {exports:.1f} s "
          f"(mp4/gif/png, contact sheets)")
    print(f"cached re-run:                  {cached_wall / n:8.3f} s per job ({cached.orchestrator})")  # type: ignore[attr-defined]
    print(f"cached re-run through Prefect:  {forced_wall / n:8.3f} s per job (every task a cache hit)")
    print(f"ray    init (2 CPUs):           {ray_init_s:8.1f} s (not in the wall time below)")
    print(f"ray    wall time:               {ray_wall:8.1f} s  ({len(workers)} worker processes, "
          f"sum of compute {ray_compute:.1f} s)")
    print(f"ray    wall time, 1 worker:     {ray1_wall:8.1f} s")
    print(f"ray vs local speedup:           {local_wall / ray_wall:8.2f}x")
    print(f"ray 2 workers vs 1:             {ray1_wall / ray_wall:8.2f}x")
    print("seconds per no-op task, 100 tasks, 2 CPUs:")
    for name, seconds in dispatch_costs.items():
        print(f"         {name:58s} {seconds * 1000:7.1f} ms")
    print(f"CPU seconds, Prefect server process: local {cpu['local server']:.1f}, ray {cpu['ray2 server']:.1f}, "
          f"cached re-run through Prefect {cpu['forced server']:.1f}; this process (scheduler, Prefect client; "
          f"local: the stages too): local {cpu['local']:.1f}, ray {cpu['ray2']:.1f}")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
