"""Catalogs at scale: plan seconds (cold and warm) and plan peak RSS for N new clips.

Rows: N = 10, 100, 1,000 and 10,000 tiny clips (160x120, 10 frames, H.264, each with its own edited first
frame) and 20 synthetic 1080p clips (16 frames). Every clip differs (its own moving square), so every job is
new. Each plan runs in a fresh process (``prepare_catalog``, what ``v2v plan`` calls, catalog parsing
included, imports not); peak RSS is that process's ``ru_maxrss``, its baseline after the imports beside it.

* cold: an empty store (no fingerprint index): every source and first frame is hashed;
* warm: the same catalog again (sources unchanged): fingerprints from the index.

The clips are written once under ``--root`` (default ``/tmp/v2v-scale``) and reused; the stores are fresh.
Run columns (inline, Prefect, Ray) are not measured here yet.

Run: .venv/bin/python bench/scale.py [--sizes 10,100,1000,10000] [--hd 20] [--root /tmp/v2v-scale]
Goals (issue 12): cold plan of 10,000 <= 60 s, warm <= 10 s; peak RSS about the same at 100 and 10,000.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

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
    """One plan in this process: prints seconds (wall and CPU), peak RSS and the RSS after imports (JSON)."""
    from flows.api import prepare_catalog
    from flows.config.profiles import Profile
    from flows.plan.externals import flush_indexes

    base = peak_rss_mb()
    profile = Profile(name="scale", store=store, backends=OFFLINE, params=KINDS[kind]["params"])
    t, c = time.perf_counter(), _cpu()
    _, _, plans, _ = prepare_catalog(catalog, profile, store)
    flush_indexes()  # the index's last batch: part of the plan's cost
    seconds, cpu = time.perf_counter() - t, _cpu() - c
    bad = [p.error for p in plans if not p.ok]
    print(json.dumps({"seconds": seconds, "cpu": cpu, "rss_mb": peak_rss_mb(), "base_mb": base, "jobs": len(plans),
                      "failed": len(bad), "first_error": bad[:1]}))


def _plan(catalog: Path, store: Path, kind: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", str(catalog), str(store), kind], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10,100,1000,10000", help="tiny-clip catalog sizes")
    ap.add_argument("--hd", type=int, default=20, help="1080p clips (0: none)")
    ap.add_argument("--root", default="/tmp/v2v-scale")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_plan(*args.child)
        return
    root = Path(args.root)
    rows = [("tiny", int(n)) for n in args.sizes.split(",") if n] + ([("hd", args.hd)] if args.hd else [])
    head = (f"{'clips':>16} | {'plan cold s':>11} {'cpu s':>6} {'ms/job':>7} | {'plan warm s':>11} {'cpu s':>6} "
            f"{'ms/job':>7} | {'peak RSS MB':>11} {'warm':>6} {'(imports)':>9} | failed")
    print(head)
    print("-" * len(head))
    for kind, n in rows:
        t = time.perf_counter()
        catalog = make_catalog(kind, n, root)
        made = time.perf_counter() - t
        store = root / f"store-{kind}-{n}"
        shutil.rmtree(store, ignore_errors=True)
        cold = _plan(catalog, store, kind)
        warm = _plan(catalog, store, kind)
        label = f"{n} {'tiny' if kind == 'tiny' else '1080p'}"
        print(f"{label:>16} | {cold['seconds']:11.2f} {cold['cpu']:6.1f} {1e3 * cold['seconds'] / n:7.2f} | "
              f"{warm['seconds']:11.2f} {warm['cpu']:6.1f} {1e3 * warm['seconds'] / n:7.2f} | "
              f"{cold['rss_mb']:11.0f} {warm['rss_mb']:6.0f} "
              f"{cold['base_mb']:9.0f} | {cold['failed']}" + (f" {cold['first_error']}" if cold["failed"] else "")
              + (f"   (clips written in {made:.0f} s)" if made > 5 else ""), flush=True)
        shutil.rmtree(store, ignore_errors=True)
    print("plan: prepare_catalog (what `v2v plan` runs: catalog parse + every job's keys) in a fresh process; "
          "cold: empty store; warm: the same catalog again; cpu: its user + system seconds (wall minus waiting "
          f"for a core: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores now); "
          "peak RSS: VmHWM of the planning process")


if __name__ == "__main__":
    main()
