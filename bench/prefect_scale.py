"""Many small jobs through Prefect against ``--inline``: stage tasks, job tasks.

    .venv/bin/python bench/prefect_scale.py [--jobs 1000] [--frames 10]

Writes N distinct tiny clips (160x120 frame folders with a moving square and its frame-0 mask), runs the
catalog on the offline defaults at a 64x64 canvas into fresh stores: inline, Prefect with one task per job
group (`prefect_tasks: job`), and, for N <= 200, Prefect with one task per stage call; prints wall seconds and
the ratio to inline.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--frames", type=int, default=10)
    args = ap.parse_args()
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
    base = dict(name="bench", backends={"source_masks": "track", "flow": "dis", "depth": "ground-prior",
                                        "shape_mask": "change", "refine": "flow-fill", "generate": "propagate",
                                        "evaluate": "metrics"},
                params={"ingest": {"n_frames": args.frames, "width": 64, "height": 64}}, formats=("png",))
    prefect_env.ensure_server()  # started once, outside the timings (a running `v2v server` is the same)
    rows = []
    for name, runner, orch in (("inline", RunnerConfig(), "inline"),
                               ("prefect, job tasks", RunnerConfig(prefect_tasks="job"), "prefect"),
                               ("prefect, stage tasks", RunnerConfig(prefect_tasks="stage"), "prefect")):
        if name.endswith("stage tasks") and args.jobs > 200:
            continue
        prof = Profile(**base, runner=runner, out=str(tmp / f"out-{len(rows)}"))
        start = time.perf_counter()
        report, _ = run_catalog(cat, profile=prof, store=str(tmp / f"store-{len(rows)}"), orchestrator=orch)
        seconds = time.perf_counter() - start
        failed = len(report.failed)
        rows.append((name, seconds, failed))
    ref = rows[0][1]
    print(f"{args.jobs} tiny jobs ({args.frames} frames, 64x64 canvas), offline defaults")
    for name, seconds, failed in rows:
        print(f"  {name:22s} {seconds:8.1f} s  {seconds / args.jobs * 1000:7.1f} ms/job  {seconds / ref:5.2f}x inline"
              + (f"  ({failed} failed)" if failed else ""))


if __name__ == "__main__":
    main()
