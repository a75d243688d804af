"""The reliability suite's counts: damage kinds, gc races, kills, hostile inputs: cases tried, handled, lost.

    .venv/bin/python bench/reliability.py [-k EXPR]

Runs the reliability test files (each test is one attack or fault case, parametrised cases counted one by one)
and prints, per area, how many cases were tried, handled (the test passed: the fault was caught, reported and
nothing was lost) and lost (failed). Exit status 1 when any case was lost.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AREAS = {
    "store damage (flip, truncate, delete chunk, marker, metadata, manifest, symlink)": "tests/test_store_damage.py",
    "gc beside runs (leases, killed gc, symlinks)": "tests/test_gc.py",
    "kills by signal (no leaked servers or workers)": "tests/test_no_leaks.py",
    "hostile inputs (sizes, pixel formats, fingerprints)": "tests/test_hostile_inputs.py",
    "hostile catalogs and CLI text (ids, YAML bombs, markup, read-only store)": "tests/test_hostile_catalogs.py",
    "bad rows at scale": "tests/test_catalog_scale.py",
    "usage mistakes": "tests/test_cli.py",
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-k", default=None, help="pytest -k expression")
    args = ap.parse_args()
    present = {area: f for area, f in AREAS.items() if (ROOT / f).exists()}
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
               *present.values()] + (["-k", args.k] if args.k else [])
        subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cases = list(ET.parse(xml).getroot().iter("testcase"))
    total_lost = 0
    print(f"{'area':78s} {'tried':>6s} {'handled':>8s} {'lost':>5s} {'skipped':>8s}")
    for area, f in present.items():
        mod = f.removesuffix(".py").replace("/", ".")
        mine = [c for c in cases if c.get("classname", "").startswith(mod)]
        lost = [c for c in mine if c.find("failure") is not None or c.find("error") is not None]
        skipped = [c for c in mine if c.find("skipped") is not None]
        handled = len(mine) - len(lost) - len(skipped)
        total_lost += len(lost)
        print(f"{area:78s} {len(mine):6d} {handled:8d} {len(lost):5d} {len(skipped):8d}")
        for c in lost:
            print(f"    lost: {c.get('name')}")
    missing = sorted(set(AREAS) - set(present))
    for area in missing:
        print(f"{area:78s} (no test file)")
    return 1 if total_lost else 0


if __name__ == "__main__":
    raise SystemExit(main())
