"""Store throughput vs plain .npy: write/read MB/s and bytes on disk.

Arrays: a 16x512x512x3 uint8 clip (the real bear frames, squashed to 512²) and a 15x512x512x2 float32
flow (DIS flow of the same clip: real data compresses like real data, random data would not).
Run: .venv/bin/python bench/store.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from storage import ArtifactRef, ArtifactStore

BEAR = Path(__file__).resolve().parents[1] / "tests" / "data" / "bear" / "frames"


def bear_arrays() -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
    frames = np.stack([cv2.resize(cv2.imread(str(p))[..., ::-1], (512, 512), interpolation=cv2.INTER_AREA)
                       for p in sorted(BEAR.glob("*.jpg"))[:16]])
    grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    flows = np.stack([dis.calc(grey[t + 1], grey[t], None) for t in range(15)]).astype(np.float32)
    return {"frames": (np.ascontiguousarray(frames), ("frame", "y", "x", "channel")),
            "flows": (flows, ("pair", "y", "x", "component"))}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    arrays = bear_arrays()
    tmp = Path(tempfile.mkdtemp(prefix="v2v-bench-store-"))
    rows = []
    try:
        for name, (data, dims) in arrays.items():
            mb = data.nbytes / 1e6
            npy = tmp / f"{name}.npy"

            def write_npy() -> None:
                np.save(npy, data)
                with open(npy, "rb+") as fh:
                    os.fsync(fh.fileno()) if False else None

            w_npy = best(write_npy, args.repeat)
            r_npy = best(lambda: np.load(npy), args.repeat)
            counter = iter(range(10**6))
            store = ArtifactStore(tmp / "store")

            def write_store() -> None:
                key = f"{next(counter):064x}"
                store.write(ArtifactRef(name, key), {name: data}, {name: dims}, {})

            w_store = best(write_store, args.repeat)
            ref = ArtifactRef(name, f"{0:064x}")
            r_store = best(lambda: store.read(ref), args.repeat)
            assert np.array_equal(store.read(ref)[name], data)
            rows.append((name, data.shape, data.dtype, mb, mb / w_npy, mb / r_npy, du(npy) / 1e6,
                         mb / w_store, mb / r_store, du(tmp / "store" / ref.path) / 1e6))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    head = (f"{'array':7} {'shape':20} {'MB':>6} | {'npy write':>10} {'npy read':>9} {'npy MB':>7} | "
            f"{'zarr write':>10} {'zarr read':>9} {'zarr MB':>8} | {'read x':>6} {'write x':>7} {'size x':>6}")
    print(head)
    print("-" * len(head))
    for name, shape, dtype, mb, wn, rn, sn, wz, rz, sz in rows:
        print(f"{name:7} {str(shape) + ' ' + str(dtype):20} {mb:6.1f} | {wn:8.0f}/s {rn:7.0f}/s {sn:7.1f} | "
              f"{wz:8.0f}/s {rz:7.0f}/s {sz:8.1f} | {rz / rn:6.2f} {wn / wz:7.2f} {sn / sz:6.2f}")
    print("MB/s (best of", args.repeat, "); read x = zarr read speed / npy read speed (goal >= 1); "
          "write x = npy write speed / zarr write speed (goal <= 2); size x = npy bytes / zarr bytes (goal > 1)")


if __name__ == "__main__":
    main()
