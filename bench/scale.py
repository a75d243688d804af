"""Catalogs at scale: plan seconds (cold, warm) and peak RSS for N new clips, then run seconds and run peak RSS.

Rows: N = 10, 100, 1,000 and 10,000 tiny clips (160x120, 10 frames, H.264, each with its own edited first
frame) and 20 and 100 synthetic 1080p clips (16 frames). Every clip differs (its own moving square), so every
job is new. Each plan and each run is a fresh child process; peak RSS is that process's VmHWM, its RSS after
the imports beside it.

Plans (``stream_catalog`` consumed as ``v2v plan`` does, catalog parsing included, imports not):

* cold: an empty store (no fingerprint index): every source and first frame is hashed;
* warm: the same catalog again (sources unchanged): fingerprints from the index.

Runs (every row but ``--plan-only``): ``flows.api.run_catalog`` into a fresh store and ``out`` folder, offline
backends, planning included (``keep_plans=False`` when the API has it: what ``v2v run`` does), with

* inline: the thread executor, ``--workers`` stage slots, no Prefect;
* prefect: the Prefect flow, local runner (``--workers`` slots), against one ``v2v server`` the bench starts;
* ray: the Prefect flow, stages sent to a two-node Ray cluster the bench starts (``ray start``, one CPU per
  node, token auth): 2 slots. The run's peak RSS is the driver's; the workers (separate processes, new ones
  for each run) are reported apart: the sum of each worker's VmHWM, sampled while the run runs.

The bench stops what it started (server, nodes) at the end, on Ctrl-C and on errors; the clips are written
once under ``--root`` (default ``/tmp/v2v-scale``) and reused; stores and outputs are removed after each row.

Run: .venv/bin/python bench/scale.py [--sizes 10,100,1000,10000] [--hd 20,100] [--plan-only 10000]
     [--orchestrators inline,prefect,ray] [--workers 2] [--no-run] [--root /tmp/v2v-scale]
Goals (issue 12): cold plan of 10,000 <= 60 s, warm <= 10 s; plan peak RSS about the same at 100 and 10,000;
a run's peak RSS set by the slots in flight, not by N.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _services as services  # noqa: E402  (bench/ is no package: its helper beside it)

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"source_masks": "track", "flow": "dis", "depth": "ground-prior", "shape_mask": "change",
           "refine": "flow-fill", "generate": "propagate", "evaluate": "metrics"}
KINDS = {"tiny": {"size": (160, 120), "frames": 10, "params": {"ingest": {"n_frames": 8, "width": 128,
                                                                          "height": 128}}},
         "hd": {"size": (1920, 1080), "frames": 16, "params": {"ingest": {"n_frames": 16}}}}


def _floor(kind: str, i: int) -> np.ndarray:
    w, h = KINDS[kind]["size"]
    yy, xx = np.mgrid[0:h, 0:w]
    return (96 + 40 * np.sin(xx / 7.0 + i) * np.cos(yy / 9.0)).astype(np.uint8)


def _frames(kind: str, i: int) -> np.ndarray:
    """A textured floor with a square moving across it; ``i`` sets its colour, start and speed."""
    w, h = KINDS[kind]["size"]
    n = KINDS[kind]["frames"]
    rng = np.random.default_rng(i)
    floor = _floor(kind, i)
    side = max(8, h // 5)
    colour = rng.integers(40, 255, 3)
    x0, y0 = rng.integers(0, w // 3), rng.integers(0, h - side)
    vx = 1 + (i % 5) * max(1, w // 160)
    out = np.repeat(floor[None, :, :, None], n, axis=0).repeat(3, axis=3)
    for t in range(n):
        x = (x0 + vx * t) % (w - side)
        out[t, y0:y0 + side, x:x + side] = colour
    return out


def _write_clip(kind: str, i: int, folder: Path) -> tuple[Path, Path, Path]:
    """The clip, its edited first frame and the square's frame-0 mask."""
    import av
    from PIL import Image

    clip, first = folder / f"{kind}-{i:05d}.mp4", folder / f"{kind}-{i:05d}-first.png"
    mask = folder / f"{kind}-{i:05d}-mask.png"
    if clip.exists() and first.exists() and mask.exists():
        return clip, first, mask
    frames = _frames(kind, i)
    grey = frames[0].astype(int)
    Image.fromarray((np.abs(grey - _floor(kind, i)[..., None]).max(axis=2) > 0).astype(np.uint8) * 255).save(mask)
    tmp = clip.with_name(f".{clip.name}.tmp.mp4")
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "20"}
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        out.mux(stream.encode(None))
    edited = frames[0].copy()
    edited[: edited.shape[0] // 4] = (30, 160, 60)  # an edited first frame: a green band
    Image.fromarray(edited).save(first)
    os.replace(tmp, clip)
    return clip, first, mask


def make_catalog(kind: str, n: int, root: Path) -> Path:
    clips = root / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    lines = ["jobs:"]
    for i in range(n):
        clip, first, mask = _write_clip(kind, i, clips)
        lines += [f"  - id: {kind}-{i:05d}", f"    source: {clip}", f"    masks: {mask}", f"    first_frame: {first}",
                  "    prompt: a square"]
    path = root / f"catalog-{kind}-{n}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def peak_rss_mb() -> float:
    """This process' peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child
    of a big parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child_plan(catalog: str, store: str, kind: str) -> None:
    """One plan in this process, as `v2v plan` makes it (streamed: each job's plan dropped once counted; the
    catalog's rows are parsed whole first): prints seconds (wall and CPU), peak RSS and the RSS after imports."""
    from flows.api import stream_catalog
    from flows.config.profiles import Profile
    from flows.plan.fingerprints import flush_indexes

    base = peak_rss_mb()
    profile = Profile(name="scale", store=store, backends=OFFLINE, params=KINDS[kind]["params"])
    t, c = time.perf_counter(), _cpu()
    _, _, _, plans = stream_catalog(catalog, profile, store)
    jobs, bad = 0, []
    for plan in plans:
        jobs += 1
        if not plan.ok:
            bad.append(plan.error)
    flush_indexes()  # the index's last batch: part of the plan's cost
    seconds, cpu = time.perf_counter() - t, _cpu() - c
    print(json.dumps({"seconds": seconds, "cpu": cpu, "rss_mb": peak_rss_mb(), "base_mb": base, "jobs": jobs,
                      "failed": len(bad), "first_error": bad[:1]}))


def _plan(catalog: Path, store: Path, kind: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", str(catalog), str(store), kind], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_run(spec: dict[str, Any]) -> None:
    """One run in this process (``run_catalog``, the public API); prints its figures after RESULT."""
    import inspect

    from flows.api import run_catalog
    from flows.config.profiles import Profile

    orch = spec["orchestrator"]
    if orch != "inline":  # imports outside the figures, as for the plans
        import flows.orchestrate.prefect_flows  # noqa: F401
    if orch == "ray":
        import flows.orchestrate.ray_dispatch  # noqa: F401
    base = peak_rss_mb()
    runner = ({"kind": "ray", "address": spec["address"], "cpus_per_task": 1} if orch == "ray"
              else {"max_workers": spec["workers"]})
    profile = Profile(name="scale-run", store=spec["store"], out=spec["out"], backends=OFFLINE, runner=runner,
                      params=KINDS[spec["kind"]]["params"])
    # What `v2v run` does once the API streams plans; the same call before that.
    stream = {"keep_plans": False} if "keep_plans" in inspect.signature(run_catalog).parameters else {}
    t, c = time.perf_counter(), _cpu()
    report, _ = run_catalog(spec["catalog"], profile=profile, store=spec["store"],
                            orchestrator="inline" if orch == "inline" else "prefect", **stream)
    seconds, cpu = time.perf_counter() - t, _cpu() - c
    bad = [j.error for j in report.jobs if j.status == "failed"]
    print("RESULT " + json.dumps({"seconds": seconds, "cpu": cpu, "rss_mb": peak_rss_mb(), "base_mb": base,
                                  "jobs": len(report.jobs), "failed": len(bad), "first_error": bad[:1],
                                  "streamed": bool(stream), "orchestrator": report.orchestrator}), flush=True)


class WorkerSampler:
    """The Ray workers' peak RSS and CPU during one run: each worker's VmHWM and CPU time, read every 0.2 s until
    it exits (Ray starts new workers for each driver and ends them with it, so none carries another run's)."""

    def __init__(self, cluster: services.RayCluster) -> None:
        self.cluster = cluster
        self.seen: dict[tuple[int, str | None], tuple[int, float]] = {}  # (pid, start) -> (VmHWM KiB, CPU s)

    def sample(self) -> None:
        for pid, started in self.cluster.workers():
            hwm = services.status_kb(pid)
            try:
                ticks = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu = (int(ticks[11]) + int(ticks[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError, ValueError):
                continue
            if hwm is not None:
                self.seen[(pid, started)] = (max(hwm, self.seen.get((pid, started), (0, 0))[0]), cpu)

    def figures(self) -> dict[str, float]:
        peaks = [h / 1024 for h, _ in self.seen.values()]
        return {"workers": len(peaks), "workers_mb": sum(peaks), "worker_max_mb": max(peaks, default=0.0),
                "workers_cpu": sum(c for _, c in self.seen.values())}


def _run(catalog: Path, kind: str, n: int, orch: str, root: Path, args: argparse.Namespace,
         env: dict[str, str], cluster: services.RayCluster | None) -> dict[str, Any]:
    folder = root / "runs" / f"{kind}-{n}-{orch}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    spec = {"catalog": str(catalog), "store": str(folder / "store"), "out": str(folder / "out"), "kind": kind,
            "orchestrator": orch, "workers": args.workers, "address": cluster.address if cluster else None}
    log = root / "runs" / f"{kind}-{n}-{orch}.log"
    sampler = WorkerSampler(cluster) if orch == "ray" else None
    with open(log, "wb") as out:  # a file, not a pipe: nobody reads a pipe while we poll
        proc = subprocess.Popen([sys.executable, __file__, "--child-run", json.dumps(spec)], cwd=folder, env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=services.die_with_parent(signal.SIGKILL))  # even if we are SIGKILLed
    try:
        deadline = time.monotonic() + args.run_timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if sampler:
                sampler.sample()
            time.sleep(0.2)
    finally:
        if proc.poll() is None:  # timed out, Ctrl-C or an error here: the run ends with the bench
            proc.kill()
            proc.wait(30)
        shutil.rmtree(folder, ignore_errors=True)  # 1080p outputs are big
    text = log.read_text(errors="replace")
    found = [line[7:] for line in text.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not found:
        why = "timed out" if proc.returncode == -9 else f"exit {proc.returncode}"
        return {"error": f"{why}; log {log}: " + " | ".join(text.strip().splitlines()[-3:])[-300:]}
    return {**json.loads(found[-1]), **(sampler.figures() if sampler else {})}


def _load() -> str:
    return f"{os.getloadavg()[0]:4.1f}"


def print_plans(rows: list[tuple[str, int]], root: Path) -> dict[tuple[str, int], Path]:
    head = (f"{'clips':>16} | {'plan cold s':>11} {'cpu s':>6} {'ms/job':>7} | {'plan warm s':>11} {'cpu s':>6} "
            f"{'ms/job':>7} | {'peak RSS MB':>11} {'warm':>6} {'(imports)':>9} | load | failed")
    print(head)
    print("-" * len(head))
    catalogs = {}
    for kind, n in rows:
        t = time.perf_counter()
        catalogs[(kind, n)] = catalog = make_catalog(kind, n, root)
        made = time.perf_counter() - t
        store = root / f"store-{kind}-{n}"
        shutil.rmtree(store, ignore_errors=True)
        cold = _plan(catalog, store, kind)
        warm = _plan(catalog, store, kind)
        print(f"{_label(kind, n):>16} | {cold['seconds']:11.2f} {cold['cpu']:6.1f} {1e3 * cold['seconds'] / n:7.2f} | "
              f"{warm['seconds']:11.2f} {warm['cpu']:6.1f} {1e3 * warm['seconds'] / n:7.2f} | "
              f"{cold['rss_mb']:11.0f} {warm['rss_mb']:6.0f} {cold['base_mb']:9.0f} | {_load()} | {cold['failed']}"
              + (f" {cold['first_error']}" if cold["failed"] else "")
              + (f"   (clips written in {made:.0f} s)" if made > 5 else ""), flush=True)
        shutil.rmtree(store, ignore_errors=True)
    print("plan: stream_catalog (what `v2v plan` runs: catalog parse + every job's keys, each plan dropped once "
          "made) in a fresh process; "
          "cold: empty store; warm: the same catalog again; cpu: its user + system seconds (wall minus waiting "
          f"for a core, on {os.cpu_count()} cores); peak RSS: VmHWM of the planning process; load: 1-min load "
          "average after the row\n", flush=True)
    return catalogs


def _label(kind: str, n: int) -> str:
    return f"{n} {'tiny' if kind == 'tiny' else '1080p'}"


def print_runs(rows: list[tuple[str, int]], catalogs: dict[tuple[str, int], Path], orchs: list[str], root: Path,
               args: argparse.Namespace) -> None:
    with contextlib.ExitStack() as stack:
        env, cluster = services.clean_env(), None
        wide = "ray" in orchs  # the Ray workers' column
        if set(orchs) & {"prefect", "ray"}:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="v2vb-prefect-")))
            env["PREFECT_API_URL"] = url = stack.enter_context(services.prefect_server(tmp))
            print(f"Prefect server up at {url}", flush=True)
        if "ray" in orchs:
            # A short folder: Ray's Unix sockets live under it (108-byte limit).
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="v2vb-ray-")))
            cluster = stack.enter_context(services.ray_cluster(tmp, env.get("PREFECT_API_URL")))
            print(f"Ray cluster up at {cluster.address} (2 nodes, 1 CPU each)", flush=True)
        head = (f"{'clips':>16} | {'run':<7} | {'wall s':>8} {'cpu s':>7} {'s/job':>6} | {'peak RSS MB':>11} "
                f"{'(imports)':>9} | " + (f"{'Ray workers: n, sum of peaks MB, max, cpu s':<44} | " if wide else "")
                + "load | failed")
        print(head)
        print("-" * len(head), flush=True)
        streamed = None
        for kind, n in rows:
            for orch in orchs:
                r = _run(catalogs[(kind, n)], kind, n, orch, root, args,
                         {**env, **(cluster.driver_env if orch == "ray" and cluster else {})}, cluster)
                if "error" in r:
                    print(f"{_label(kind, n):>16} | {orch:<7} | {r['error']}", flush=True)
                    continue
                streamed = r["streamed"]
                ray = (f"{r['workers']:3d} {r['workers_mb']:8.0f} {r['worker_max_mb']:6.0f} {r['workers_cpu']:7.1f}"
                       if orch == "ray" else "")
                ray = f"{ray:<44} | " if wide else ""
                print(f"{_label(kind, n):>16} | {orch:<7} | {r['seconds']:8.1f} {r['cpu']:7.1f} "
                      f"{r['seconds'] / n:6.2f} | {r['rss_mb']:11.0f} {r['base_mb']:9.0f} | {ray}{_load()} | "
                      f"{r['failed']}" + (f" {r['first_error']}" if r["failed"] else ""), flush=True)
    print(f"run: run_catalog (planning included; plans {'streamed, keep_plans=False' if streamed else 'all first'}) "
          f"into a fresh store in a fresh process; inline/prefect: {args.workers} stage slots (local runner); ray: "
          "the Prefect flow, stages on 2 nodes x 1 CPU; cpu: the process' user + system seconds (ray: the driver's; "
          "the workers' apart); peak RSS: VmHWM of the run process (ray: the driver); Ray workers: how many ran, the "
          "sum and the largest of their VmHWM (sampled every 0.2 s), their CPU seconds; not counted: the Prefect "
          "server, Ray's own node processes")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10,100,1000,10000", help="tiny-clip catalog sizes")
    ap.add_argument("--hd", default="20,100", help="1080p catalog sizes ('' or 0: none)")
    ap.add_argument("--plan-only", default="10000", help="tiny sizes planned but not run")
    ap.add_argument("--orchestrators", default="inline,prefect,ray")
    ap.add_argument("--workers", type=int, default=2, help="stage slots of the inline and prefect runs")
    ap.add_argument("--no-run", action="store_true", help="plans only")
    ap.add_argument("--run-timeout", type=float, default=7200, help="seconds one run may take")
    ap.add_argument("--root", default="/tmp/v2v-scale")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--child-run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_plan(*args.child)
        return
    if args.child_run:
        child_run(json.loads(args.child_run))
        return
    orchs = [o for o in args.orchestrators.split(",") if o]
    if unknown := set(orchs) - {"inline", "prefect", "ray"}:
        ap.error(f"unknown orchestrators {sorted(unknown)}")
    # SIGTERM / SIGHUP unwind like Ctrl-C, so the server and the nodes are stopped.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    root = Path(args.root)
    rows = [("tiny", n) for n in _ints(args.sizes)] + [("hd", n) for n in _ints(args.hd) if n > 0]
    runs = [(k, n) for k, n in rows if not (k == "tiny" and n in _ints(args.plan_only))]
    try:
        catalogs = print_plans(rows, root)
        if not args.no_run and runs and orchs:
            print_runs(runs, catalogs, orchs, root, args)
    except KeyboardInterrupt:  # what we started is stopped by now
        sys.exit("interrupted")


if __name__ == "__main__":
    main()
