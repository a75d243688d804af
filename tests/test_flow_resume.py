"""Kill ``v2v run`` with SIGKILL in the middle of a catalog; the next run does only the missing work and the
outputs equal those of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_flow_catalog import OFFLINE, SMALL, counts, delta, offline_profile, write_catalog

from flows.api import prepare_catalog, run_catalog
from storage.store import ArtifactRef, ArtifactStore

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prefect_server() -> str:
    from flows.orchestrate import prefect_env

    return prefect_env.ensure_server()


def committed(store: Path) -> int:
    if not store.exists():
        return 0
    return sum(1 for _ in ArtifactStore(str(store)).iter_artifacts())


def test_sigkill_mid_catalog_then_resume(tmp_path: Path, prefect_server: str) -> None:
    cat = write_catalog(tmp_path)
    store, out = tmp_path / "store", tmp_path / "out"
    profile_file = tmp_path / "offline.yaml"
    profile_file.write_text(yaml.safe_dump({"name": "offline", "backends": OFFLINE, "params": SMALL}))
    prof = offline_profile(out)
    _, _, fresh, _ = prepare_catalog(cat, prof, str(tmp_path / "empty"))
    total = len({sp.key for p in fresh for sp in p.stages.values() if sp.call})
    # The child talks to this session's Prefect server (no second server start).
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-m", "flows.cli.main", "run", str(cat), "--profile", str(profile_file),
                              "--store", str(store), "--out", str(out)], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while committed(store) < 4:  # some work done, most still to do
            assert child.poll() is None, f"run ended before it could be killed: {child.stderr.read()!r}"
            assert time.monotonic() < deadline, "no artifact appeared"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    done_before = committed(store)
    assert 4 <= done_before < total, (done_before, total)

    # Resume: the plan lists exactly the missing artifacts, and only those are computed.
    _, _, plans, _ = prepare_catalog(cat, prof, str(store))
    missing = {sp.key: sp.stage for p in plans for sp in p.stages.values() if sp.status == "run"}
    assert len(missing) == total - done_before
    before = counts()
    report, _ = run_catalog(cat, profile=prof, store=str(store))
    assert [j.status for j in report.jobs] == ["done"] * 3, [j.error for j in report.jobs]
    assert delta(before) == dict(Counter(missing.values()))
    assert committed(store) == total

    # An uninterrupted run elsewhere gives the same keys and the same arrays.
    ref_store = tmp_path / "reference"
    run_catalog(cat, profile=offline_profile(tmp_path / "out-ref"), store=str(ref_store), orchestrator="inline")
    a, b = ArtifactStore(str(store)), ArtifactStore(str(ref_store))
    for job in ("bear", "ball", "bear-seed7"):
        assert a.job(job)["artifacts"] == b.job(job)["artifacts"]
        key = a.job(job)["artifacts"]["generate"]
        va = a.read(ArtifactRef("generate", key))["video"]
        vb = b.read(ArtifactRef("generate", key))["video"]
        assert va.shape[0] == 4 and np.array_equal(va, vb)
    mp4 = {j.job_id: Path(j.outputs["mp4"]).read_bytes() for j in report.jobs}
    assert all(len(v) > 0 for v in mp4.values())
