"""Many small jobs through Prefect against ``--inline``: stage tasks, job tasks.

    .venv/bin/python bench/prefect_scale.py [--jobs 1000] [--frames 10] [--modes inline,job,stage] [--rounds 1]

Writes N distinct tiny clips (160x120 frame folders with a moving square and its frame-0 mask), runs the
catalog on the offline defaults at a 64x64 canvas into fresh stores, once per mode: ``inline`` (no Prefect),
``job`` (Prefect, one task per job group: `prefect_tasks: job`), ``stage`` (Prefect, one task per stage call;
by default only for N <= 200), ``--rounds`` times interleaved. Prints, per mode, wall seconds, this process's
CPU seconds and the Prefect server's (a temporary server is a child of this process), the stages' compute
seconds, the load average around it (the machine is shared: compare ratios within a round, not seconds
across runs) and the ratio to that round's inline run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tiny_clip(folder: Path, seed: int, frames: int) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(seed)
    (folder / "frames").mkdir(parents=True, exist_ok=True)
    floor = rng.integers(40, 200, (120, 200, 3), dtype=np.uint8)
    x0, y0, v = int(rng.integers(20, 60)), int(rng.integers(30, 70)), int(rng.integers(2, 6))
    for t in range(frames):
        img = floor[:, t * 2: t * 2 + 160].copy()
        x = x0 + v * t
        img[y0:y0 + 24, x:x + 24] = (220, 40, 40)
        Image.fromarray(img).save(folder / "frames" / f"{t:05d}.png")
    mask = np.zeros((120, 160), np.uint8)
    mask[y0:y0 + 24, x0:x0 + 24] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    edited = np.asarray(Image.open(folder / "frames" / "00000.png")).copy()
    edited[y0:y0 + 24, x0:x0 + 24] = (40, 200, 40)
    Image.fromarray(edited).save(folder / "edited.png")
    return folder / "frames", folder / "mask.png", folder / "edited.png"


def _tree_cpu(root: int) -> float:
    """CPU seconds used so far by ``root``'s descendants (the Prefect server), from /proc (Linux; else 0)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        cpu[int(entry.name)] = sum(int(f) for f in fields[11:15]) / tick  # utime stime cutime cstime
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        kids = [c for c, p in parents.items() if p == pid]
        total += sum(cpu[c] for c in kids)
        todo.extend(kids)
    return total


MODES = {"inline": ("inline", {}, "inline"), "job": ("prefect, job tasks", {"prefect_tasks": "job"}, "prefect"),
         "stage": ("prefect, stage tasks", {"prefect_tasks": "stage"}, "prefect")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--modes", default=None, help="comma-separated, of inline,job,stage (default: all three, "
                                                  "stage only up to 200 jobs); inline first if given")
    ap.add_argument("--workers", type=int, default=1, help="runner.max_workers")
    ap.add_argument("--rounds", type=int, default=1, help="run the modes this many times, interleaved (the "
                                                          "load of a shared machine drifts: compare within a round)")
    args = ap.parse_args()
    modes = args.modes.split(",") if args.modes else ["inline", "job"] + (["stage"] if args.jobs <= 200 else [])
    if unknown := set(modes) - set(MODES):
        ap.error(f"unknown modes {sorted(unknown)}; choose from {sorted(MODES)}")
    from flows.api import run_catalog
    from flows.config.profiles import Profile, RunnerConfig
    from flows.orchestrate import prefect_env

    tmp = Path(tempfile.mkdtemp(prefix="v2v-prefect-scale-"))
    lines = ["jobs:"]
    for i in range(args.jobs):
        frames, mask, edited = tiny_clip(tmp / "clips" / f"c{i:05d}", i, args.frames)
        lines.append(f"  - id: job-{i:05d}\n    source: {frames}\n    masks: {mask}\n    first_frame: {edited}")
    cat = tmp / "catalog.yaml"
    cat.write_text("\n".join(lines) + "\n")
    warm = tmp / "warm-up.yaml"  # other clips (seeds past the catalog's): nothing of them is cached for the runs
    warm_lines = ["jobs:"]
    for i in range(args.jobs, args.jobs + 2):
        frames, mask, edited = tiny_clip(tmp / "clips" / f"c{i:05d}", i, args.frames)
        warm_lines.append(f"  - id: warm-{i:05d}\n    source: {frames}\n    masks: {mask}\n    first_frame: {edited}")
    warm.write_text("\n".join(warm_lines) + "\n")
    base = dict(name="bench", backends={"source_masks": "track", "flow": "dis", "depth": "ground-prior",
                                        "shape_mask": "change", "refine": "flow-fill", "generate": "propagate",
                                        "evaluate": "metrics"},
                params={"ingest": {"n_frames": args.frames, "width": 64, "height": 64}}, formats=("png",))
    prefect_env.ensure_server()  # started once, outside the timings (a running `v2v server` is the same)
    if set(modes) - {"inline"}:
        import flows.orchestrate.prefect_flows  # noqa: F401 - Prefect's imports, once, outside the timings too
    # Whichever mode ran first would pay the first stage calls' imports and cold files (~10 s here): a
    # two-job inline run first, outside the timings.
    run_catalog(warm, profile=Profile(**base, out=str(tmp / "out-warm-up")), store=str(tmp / "store-warm-up"),
                orchestrator="inline", keep_plans=False)
    rows = []
    for rnd in range(args.rounds):
        for mode in modes:
            name, runner, orch = MODES[mode]
            prof = Profile(**base, runner=RunnerConfig(max_workers=args.workers, **runner),
                           out=str(tmp / f"out-{mode}-{rnd}"))
            load0, cpu0, server0 = os.getloadavg()[0], time.process_time(), _tree_cpu(os.getpid())
            start = time.perf_counter()
            # As `v2v run` does: plans streamed into the run (the flow plans the catalog itself).
            report, _ = run_catalog(cat, profile=prof, store=str(tmp / f"store-{mode}-{rnd}"), orchestrator=orch,
                                    keep_plans=False)
            seconds = time.perf_counter() - start
            cpu, server = time.process_time() - cpu0, _tree_cpu(os.getpid()) - server0
            rows.append((rnd, mode, seconds, cpu, server, report.compute_seconds, load0, os.getloadavg()[0],
                         len(report.failed)))
            print(f"  ... {name}: {seconds:.1f} s (load {load0:.2f} -> {os.getloadavg()[0]:.2f})", flush=True)
    print(f"{args.jobs} tiny jobs ({args.frames} frames, 64x64 canvas), offline defaults, max_workers "
          f"{args.workers}, {os.cpu_count()} CPUs; load average (1 min) before -> after each mode")
    print("  (cpu: this process; server: the temporary Prefect server; stages: the stages' own compute seconds)")
    print(f"  {'mode':22s} {'wall s':>8s} {'ms/job':>8s} {'cpu s':>7s} {'server cpu s':>12s} {'stages s':>9s} "
          f"{'load':>12s} {'vs inline':>9s}")
    ratios: dict[str, list[float]] = {}
    for rnd, mode, seconds, cpu, server, stages, l0, l1, failed in rows:
        ref = next((r[2] for r in rows if r[0] == rnd and r[1] == "inline"), None)
        ratio = f"{seconds / ref:8.2f}x" if ref else "        -"
        if ref:
            ratios.setdefault(mode, []).append(seconds / ref)
        print(f"  {MODES[mode][0]:22s} {seconds:8.1f} {seconds / args.jobs * 1000:8.1f} {cpu:7.1f} {server:12.1f} "
              f"{stages:9.1f} {l0:5.2f}->{l1:5.2f} {ratio}" + (f"  ({failed} failed)" if failed else ""))
    if args.rounds > 1:
        for mode, rs in ratios.items():
            if mode != "inline":
                print(f"  {MODES[mode][0]}: median {statistics.median(rs):.2f}x inline over {len(rs)} rounds "
                      f"({', '.join(f'{r:.2f}' for r in rs)})")

if __name__ == "__main__":
    main()
