"""Memory and time of streaming a catalog: tracemalloc peak and seconds to load and iterate YAML/CSV catalogs.

For each format and size: the load (whole file checked, rows counted), a plain iteration (seconds), the same
under tracemalloc (peak bytes: what a run holds for the catalog), and, for comparison, the peak of holding
every validated entry at once (``Catalog.entries``: what every run held before catalogs streamed).

Run: .venv/bin/python bench/catalog_memory.py [--sizes 1000 10000] [--no-materialised]
"""
from __future__ import annotations

import argparse
import csv
import gc
import os
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, ".")
from flows.config.catalog import load_catalog  # noqa: E402

BEAR = Path("tests/data/bear").resolve()
FRAMES, EDIT = BEAR / "frames", BEAR / "edited-first-frame-elephant.png"


def yaml_catalog(path: Path, n: int) -> Path:
    """Rows like a real batch's: an id, paths, a prompt, a seed and one stage parameter, plus defaults."""
    with open(path, "w") as fh:
        fh.write("defaults:\n  params: {ingest: {n_frames: 16}}\njobs:\n")
        for i in range(n):
            fh.write(f"  - id: job-{i:05d}\n    source: {FRAMES}\n    first_frame: {EDIT}\n    prompt: row {i}\n"
                     f"    seed: {i}\n    params: {{motion: {{paste_margin_px: 2}}}}\n")
    return path


def csv_catalog(path: Path, n: int) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "source", "first_frame", "prompt", "seed", "ingest.n_frames", "motion.paste_margin_px"])
        w.writerows([f"job-{i:05d}", FRAMES, EDIT, f"row {i}", i, 16, 2] for i in range(n))
    return path


def measure(path: Path, materialised: bool) -> dict[str, float]:
    load_catalog(path)  # imports and caches first
    gc.collect()
    t0 = time.perf_counter()
    cat = load_catalog(path)
    t1 = time.perf_counter()
    n = sum(1 for _ in cat.stream())
    t2 = time.perf_counter()
    assert n == len(cat)
    del cat
    gc.collect()
    tracemalloc.start()
    cat = load_catalog(path)
    load_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    for _ in cat.stream():
        pass
    stream_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    out = {"rows": n, "load_s": t1 - t0, "iterate_s": t2 - t1, "load_peak": load_peak, "stream_peak": stream_peak}
    if materialised:
        del cat
        gc.collect()
        tracemalloc.start()
        entries = load_catalog(path).entries
        out["entries_peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del entries
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--no-materialised", action="store_true", help="skip the hold-every-entry comparison")
    args = ap.parse_args()
    makers: dict[str, Callable[[Path, int], Path]] = {"yaml": yaml_catalog, "csv": csv_catalog}
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (2 shared cores: times are noisy)")
    print(f"{'format':6} {'rows':>6} {'load s':>7} {'iter s':>7} {'us/row':>7} {'load peak':>10} {'iter peak':>10} "
          f"{'B/row':>6} {'entries peak':>13}")
    with tempfile.TemporaryDirectory(prefix="v2v-catmem-") as tmp:
        for fmt, make in makers.items():
            for n in args.sizes:
                r = measure(make(Path(tmp) / f"c{n}.{fmt}", n), not args.no_materialised)
                held = f"{r['entries_peak'] / 1e6:10.1f} MB" if "entries_peak" in r else f"{'-':>13}"
                print(f"{fmt:6} {n:6d} {r['load_s']:7.2f} {r['iterate_s']:7.2f} {r['iterate_s'] / n * 1e6:7.0f} "
                      f"{r['load_peak'] / 1e6:7.2f} MB {r['stream_peak'] / 1e6:7.2f} MB "
                      f"{r['stream_peak'] / n:6.0f} {held}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
