"""Bytes held per JobPlan: tracemalloc over plan_catalog of N tiny jobs (warm store: fingerprints indexed).

Run: .venv/bin/python bench/scale.py --sizes 1000 --no-run   (writes the clips and catalog-tiny-1000.yaml), then
     .venv/bin/python bench/plan_memory.py /tmp/v2v-scale/catalog-tiny-1000.yaml /tmp/v2v-planmem-store
"""
from __future__ import annotations

import gc
import sys
import tracemalloc
from collections import Counter

sys.path.insert(0, ".")
from bench.scale import KINDS, OFFLINE  # noqa: E402
from flows.config.catalog import load_catalog  # noqa: E402
from flows.config.profiles import Profile  # noqa: E402
from flows.plan.planner import plan_catalog  # noqa: E402
from storage.store import open_store  # noqa: E402


def main() -> None:
    catalog_path, store_url = sys.argv[1], sys.argv[2]
    profile = Profile(name="scale", store=store_url, backends=OFFLINE, params=KINDS["tiny"]["params"])
    store = open_store(store_url)
    cat = load_catalog(catalog_path)
    plan_catalog(cat, profile, store)  # once first: imports, the fingerprint index in memory
    gc.collect()
    tracemalloc.start(1)
    before = tracemalloc.take_snapshot()
    plans = plan_catalog(cat, profile, store)
    gc.collect()
    after = tracemalloc.take_snapshot()
    stats = after.compare_to(before, "filename")
    total = sum(s.size_diff for s in stats)
    n = len(plans)
    print(f"{n} plans, {total / n:.0f} bytes per JobPlan held (tracemalloc diff, filename groups):")
    by = Counter()
    for s in stats:
        by[s.traceback[0].filename.replace("/work/main/", "")] += s.size_diff
    for name, size in by.most_common(12):
        print(f"  {size / n:8.0f} B/job  {name}")
    assert all(p.ok for p in plans), [p.error for p in plans if not p.ok][:1]


if __name__ == "__main__":
    main()
