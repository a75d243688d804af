"""Store throughput vs plain .npy: write/read MB/s and bytes on disk; what checking checksums on read costs;
what fingerprint stamps that cannot go stale cost.

Arrays: a 16x512x512x3 uint8 clip (the real bear frames, squashed to 512²) and a 15x512x512x2 float32
flow (DIS flow of the same clip: real data compresses like real data, random data would not).
Run: .venv/bin/python bench/store.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from storage import ArtifactRef, ArtifactStore, array_digest
from storage.stamps import stamp

BEAR = Path(__file__).resolve().parents[1] / "tests" / "data" / "bear" / "frames"


def bear_arrays() -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
    frames = np.stack([cv2.resize(cv2.imread(str(p))[..., ::-1], (512, 512), interpolation=cv2.INTER_AREA)
                       for p in sorted(BEAR.glob("*.jpg"))[:16]])
    grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    flows = np.stack([dis.calc(grey[t + 1], grey[t], None) for t in range(15)]).astype(np.float32)
    return {"frames": (np.ascontiguousarray(frames), ("frame", "y", "x", "channel")),
            "flows": (flows, ("pair", "y", "x", "component"))}


def disk_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def evict(path: Path) -> None:
    """Drop a file's (or a folder's files') pages from the page cache: the next read comes from the disk."""
    for p in ([path] if path.is_file() else [q for q in path.rglob("*") if q.is_file()]):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def best_seconds(fn: Callable[[], object], repeat: int, before: Callable[[], None] | None = None) -> float:
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(name: str, data: np.ndarray, dims: tuple[str, ...], tmp: Path, repeat: int) -> dict[str, float]:
    mb = data.nbytes / 1e6
    npy = tmp / f"{name}.npy"
    store = ArtifactStore(tmp / "store")
    keys = (f"{i:064x}" for i in itertools.count())  # a fresh key per write: no cache hits

    def write_store() -> None:
        store.write(ArtifactRef(name, next(keys)), {name: data}, {name: dims}, {})

    row = {"MB": mb}
    row["npy_write"] = mb / best_seconds(lambda: np.save(npy, data), repeat)
    row["npy_read"] = mb / best_seconds(lambda: np.load(npy), repeat)
    row["npy_bytes"] = disk_bytes(npy) / 1e6
    row["zarr_write"] = mb / best_seconds(write_store, repeat)
    first = ArtifactRef(name, f"{0:064x}")
    row["zarr_read"] = mb / best_seconds(lambda: store.read(first), repeat)
    row["zarr_bytes"] = disk_bytes(tmp / "store" / first.path) / 1e6
    row["npy_cold"] = mb / best_seconds(lambda: np.load(npy), repeat, lambda: evict(npy))
    row["zarr_cold"] = mb / best_seconds(lambda: store.read(first), repeat,
                                         lambda: evict(tmp / "store" / first.path))
    assert np.array_equal(store.read(first)[name], data)
    return row


def measure_verify(name: str, data: np.ndarray, dims: tuple[str, ...], tmp: Path, repeat: int) -> dict[str, float]:
    """Milliseconds: a read without and with the per-array sha256 check, the hash alone, and a lazy xarray load
    (structure checked at open, a crc32c per chunk as decoded)."""
    import google_crc32c

    store = ArtifactStore(tmp / "verify")
    ref = store.write(ArtifactRef(name, f"{1:064x}"), {name: data}, {name: dims}, {})
    raw = np.ascontiguousarray(data).tobytes()
    return {
        "read_plain": 1e3 * best_seconds(lambda: store.read(ref, verify=False), repeat),
        "read_verified": 1e3 * best_seconds(lambda: store.read(ref), repeat),
        "sha256": 1e3 * best_seconds(lambda: array_digest(data), repeat),
        "crc32c": 1e3 * best_seconds(lambda: google_crc32c.value(raw), repeat),
        "lazy_load": 1e3 * best_seconds(lambda: store.open(ref)[name].values, repeat),
    }


def measure_stamps(tmp: Path, repeat: int) -> dict[str, dict[str, float]]:
    """Milliseconds to stamp the bear frames folder (16 JPEGs, 2.6 MB) and one 64 MB file: stat only (the old
    fingerprint: size + mtime), + ctime and inode (no content), + partial hash, + full hash; full hash cold too."""
    big = tmp / "video.bin"
    big.write_bytes(np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes())
    rows: dict[str, dict[str, float]] = {}
    for label, path in (("bear frames (16 files, 2.6 MB)", BEAR), ("one 64 MB file", big)):
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
        rows[label] = {
            "stat": 1e3 * best_seconds(lambda files=files: [(p.stat().st_size, p.stat().st_mtime_ns) for p in files],
                                       repeat),
            "none": 1e3 * best_seconds(lambda path=path: stamp(path, "none"), repeat),
            "partial": 1e3 * best_seconds(lambda path=path: stamp(path, "partial"), repeat),
            "full": 1e3 * best_seconds(lambda path=path: stamp(path, "full"), repeat),
            "full_cold": 1e3 * best_seconds(lambda path=path: stamp(path, "full"), repeat,
                                            lambda path=path: evict(path)),
        }
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="v2v-bench-store-"))
    try:
        arrays = bear_arrays()
        rows = {name: measure(name, data, dims, tmp, args.repeat) for name, (data, dims) in arrays.items()}
        checks = {name: measure_verify(name, data, dims, tmp, args.repeat) for name, (data, dims) in arrays.items()}
        stamps = measure_stamps(tmp, args.repeat)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    head = (f"{'array':7} {'MB':>6} | {'npy write':>10} {'npy read':>9} {'cold':>7} {'npy MB':>7} | "
            f"{'zarr write':>10} {'zarr read':>9} {'cold':>7} {'zarr MB':>8} | {'read x':>6} {'cold x':>6} "
            f"{'write x':>7} {'size x':>6}")
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        print(f"{name:7} {r['MB']:6.1f} | {r['npy_write']:8.0f}/s {r['npy_read']:7.0f}/s {r['npy_cold']:5.0f}/s "
              f"{r['npy_bytes']:7.1f} | {r['zarr_write']:8.0f}/s {r['zarr_read']:7.0f}/s {r['zarr_cold']:5.0f}/s "
              f"{r['zarr_bytes']:8.1f} | {r['zarr_read'] / r['npy_read']:6.2f} {r['zarr_cold'] / r['npy_cold']:6.2f} "
              f"{r['npy_write'] / r['zarr_write']:7.2f} {r['npy_bytes'] / r['zarr_bytes']:6.2f}")
    print(f"MB/s, best of {args.repeat}. read: page cache warm; cold: the files' pages dropped first (fsync + "
          "POSIX_FADV_DONTNEED), read from the disk. read x / cold x = zarr read / npy read speed (goal >= 1); "
          "write x = npy write / zarr write speed (goal <= 2); size x = npy bytes / zarr bytes (goal > 1)")
    print()
    head = (f"{'array':7} | {'read, no check':>14} {'read, sha256':>12} {'cost':>6} | {'sha256 alone':>12} "
            f"{'crc32c alone':>12} | {'lazy load':>9}")
    print(head)
    print("-" * len(head))
    for name, c in checks.items():
        print(f"{name:7} | {c['read_plain']:11.1f} ms {c['read_verified']:9.1f} ms "
              f"{c['read_verified'] / c['read_plain'] - 1:6.0%} | {c['sha256']:9.1f} ms {c['crc32c']:9.1f} ms | "
              f"{c['lazy_load']:6.1f} ms")
    print("read, sha256: store.read() as stages and exports call it (every array checked against the checksum "
          "in its commit record); lazy load: store.open() + .values (structure at open, crc32c per chunk)")
    print()
    head = f"{'fingerprint stamp of':32} | {'stat':>8} {'+ctime':>8} {'+partial':>9} {'+full':>8} {'full cold':>10}"
    print(head)
    print("-" * len(head))
    for label, r in stamps.items():
        print(f"{label:32} | {r['stat']:5.2f} ms {r['none']:5.2f} ms {r['partial']:6.2f} ms {r['full']:5.1f} ms "
              f"{r['full_cold']:7.1f} ms")
    print("stat: size + mtime (misses cp -p / rsync -t / tar -x); +ctime: storage.stamps 'none' (ctime and inode); "
          "+partial: and a sha256 of the first and last 64 KiB; +full: of every byte; cold: page cache dropped")


if __name__ == "__main__":
    main()
