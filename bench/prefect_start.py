"""One video through Prefect against ``--inline``: the temporary server's start-up vs a running ``v2v server``.

    .venv/bin/python bench/prefect_start.py [--frames 16]

Each variant edits the bear clip (offline defaults, 512x512) into a fresh store, as `v2v run` does (a new
process per variant: the temporary server starts in each), and prints the wall seconds and the ratio to inline.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEAR = REPO / "tests" / "data" / "bear"


def catalog(folder: Path, frames: int) -> Path:
    path = folder / "one.yaml"
    path.write_text(f"""defaults:
  params: {{ingest: {{n_frames: {frames}}}}}
jobs:
  - id: bear
    source: {BEAR / 'frames'}
    masks: {BEAR / 'mask-00000.png'}
    first_frame: {BEAR / 'edited-first-frame-elephant.png'}
    prompt: an elephant walking on the rocks in a zoo
""")
    return path


def run(cat: Path, store: Path, env: dict[str, str], *flags: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.cli.main", "run", str(cat), "--store", str(store), "--out",
                    str(store.parent / "out"), *flags], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=16)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="v2v-prefect-start-"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "V2V_CACHE_DIR": str(tmp / "cache"), "V2V_PROFILE": ""}
    env.pop("PREFECT_API_URL", None)
    cat = catalog(tmp, args.frames)
    rows = [("inline", run(cat, tmp / "s1", env, "--inline"))]
    rows.append(("prefect, temporary server", run(cat, tmp / "s2", env)))
    server = subprocess.Popen([sys.executable, "-m", "flows.cli.main", "server", "--port", "4291"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        record = tmp / "cache" / "prefect-server.json"
        while not record.exists():
            time.sleep(0.3)
        rows.append(("prefect, running `v2v server`", run(cat, tmp / "s3", env)))
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
    base = rows[0][1]
    print(f"one bear edit, {args.frames} frames at 512x512, offline defaults, {os.cpu_count()} CPUs")
    for name, seconds in rows:
        print(f"  {name:32s} {seconds:7.1f} s   {seconds / base:5.2f}x inline")
    print(json.dumps({n: round(s, 2) for n, s in rows}))


if __name__ == "__main__":
    main()
