"""Commits behind the compute: artifacts a second committed by 1, 2, 3 threads side by side.

    .venv/bin/python bench/write_behind.py [--artifacts 220] [--writers 1,2,3] [--size 64] [--store DIR]

Writes ``--artifacts`` artifacts shaped like a tiny job's (10 frames at 64x64: frames, masks, a flow, a
depth) with ``ArtifactStore.write`` from a pool of N threads into a fresh local store, with nothing computing
beside it, and prints wall seconds, artifacts a second and this process's CPU seconds for each N (the load
average beside it: the machine is shared). ``storage.write_behind`` commits on one thread; this says whether
more would help: a job of the offline pipeline commits about 11 artifacts.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def shapes(size: int) -> list[tuple[str, tuple[int, ...], np.dtype, tuple[str, ...]]]:
    return [("frames", (10, size, size, 3), np.dtype(np.uint8), ("frame", "y", "x", "channel")),
            ("masks", (10, size, size), np.dtype(np.uint8), ("frame", "y", "x")),
            ("flow", (9, size, size, 2), np.dtype(np.float32), ("pair", "y", "x", "component")),
            ("depth", (10, size, size), np.dtype(np.float32), ("frame", "y", "x"))]


def run(writers: int, n: int, size: int, root: Path) -> tuple[float, float]:
    from storage import ArtifactRef, ArtifactStore

    rng = np.random.default_rng(writers)
    store = ArtifactStore(str(root))
    items = []
    for i in range(n):
        name, shape, dtype, dims = shapes(size)[i % 4]
        arr = (rng.random(shape) * 255).astype(dtype)
        items.append((ArtifactRef("bench", f"{writers:02x}{i:06x}" + "0" * 56), {name: arr}, {name: dims}))
    cpu0, start = time.process_time(), time.perf_counter()
    with cf.ThreadPoolExecutor(max_workers=writers) as pool:
        for done in [pool.submit(store.write, ref, arrays, dims, {}) for ref, arrays, dims in items]:
            done.result()
    return time.perf_counter() - start, time.process_time() - cpu0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", type=int, default=220)
    ap.add_argument("--writers", default="1,2,3")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--store", default=None, help="a folder for the stores (default: a temporary one)")
    args = ap.parse_args()
    base = Path(args.store or tempfile.mkdtemp(prefix="v2v-write-behind-"))
    print(f"{args.artifacts} artifacts ({args.size}x{args.size}, 10 frames), {os.cpu_count()} CPUs, store {base}")
    print(f"  {'writers':>7s} {'wall s':>7s} {'art/s':>7s} {'cpu s':>6s} {'load':>5s}")
    for writers in (int(w) for w in args.writers.split(",")):
        root = base / f"store-{writers}"
        seconds, cpu = run(writers, args.artifacts, args.size, root)
        print(f"  {writers:7d} {seconds:7.2f} {args.artifacts / seconds:7.1f} {cpu:6.2f} {os.getloadavg()[0]:5.2f}",
              flush=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
