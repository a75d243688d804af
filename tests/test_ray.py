"""The ``ray`` profile: the demo catalog on a local Ray with 2 workers (stage bodies as Ray tasks, and through
prefect-ray's task runner)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_flow_catalog import OFFLINE

from flows.api import run_catalog
from flows.config.catalog import build_catalog
from flows.config.profiles import load_profile
from storage.store import ArtifactRef, ArtifactStore

CATALOGS = Path(__file__).resolve().parent.parent / "catalogs"
TINY = {"ingest": {"n_frames": 4, "width": 128, "height": 128}}


def test_a_local_ray_started_by_v2v_prints_no_auth_notice(capfd: pytest.CaptureFixture[str]) -> None:
    """Ray's notice that it enabled token auth by default is dropped for the cluster v2v starts (it cut into
    the progress bars); it starts and stops cleanly."""
    ray = pytest.importorskip("ray")
    from flows.orchestrate.ray_dispatch import call, ray_session

    if ray.is_initialized():
        pytest.skip("a Ray is already running in this process")
    prof = load_profile("ray")
    prof = prof.model_copy(update={"runner": prof.runner.model_copy(update={"num_cpus": 1})})
    from storage.keys import canonical_json

    with ray_session(prof):
        assert call(canonical_json, {"num_cpus": 1}, {"b": 1, "a": 2}) == canonical_json({"a": 2, "b": 1})
    assert not ray.is_initialized()
    out, err = capfd.readouterr()
    assert "Token authentication is enabled" not in out + err


@pytest.fixture(scope="module")
def local_ray() -> object:
    ray = pytest.importorskip("ray")
    from flows.orchestrate import prefect_env

    url = prefect_env.ensure_server()
    os.environ["PREFECT_API_URL"] = url  # the workers inherit it from the raylet started below
    os.environ.setdefault("RAY_worker_niceness", "0")  # as v2v's own local Ray
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()
    os.environ.pop("PREFECT_API_URL", None)


def demo_catalog(tmp_path: Path):  # type: ignore[no-untyped-def]
    """catalogs/demo.yaml as it is, with its generated clip made in tmp_path instead of the repo."""
    from flows.config.demo_clip import make_demo_clip

    ball = make_demo_clip(tmp_path / "rolling-ball")
    data = yaml.safe_load((CATALOGS / "demo.yaml").read_text())
    rows = []
    for i, job in enumerate(data["jobs"]):
        for field in ("source", "masks", "first_frame"):
            if str(job.get(field, "")).startswith("generated/rolling-ball/"):
                name = Path(job[field]).name
                job[field] = str(ball[{"clip.mp4": "clip", "masks": "masks", "mask-00000.png": "mask",
                                       "edited-first-frame.png": "first_frame"}[name]])
        rows.append((f"demo.yaml job {i + 1}", job))
    return build_catalog(rows, base=CATALOGS, defaults=data.get("defaults"))


def test_ray_profile_runs_the_demo_catalog_on_two_workers(tmp_path: Path, local_ray: object) -> None:
    cat = demo_catalog(tmp_path)
    assert [j.id for j in cat.jobs] == ["bear-elephant", "ball-cone"] and not cat.errors
    prof = load_profile("ray").model_copy(update={"out": str(tmp_path / "out"), "backends": OFFLINE,
                                                  "params": TINY})
    assert prof.runner.kind == "ray" and prof.runner.num_cpus == 2
    store = str(tmp_path / "store")
    report, plans = run_catalog(cat, profile=prof, store=store, request={"params": TINY})
    assert report.orchestrator == "prefect"
    assert [j.status for j in report.jobs] == ["done", "done"], [j.error for j in report.jobs]
    # Every stage ran in one of the 2 long-lived Ray workers (never in this process), and workers were
    # reused across stages and jobs (a model would load once per worker, not per task).
    pids = [r.pid for j in report.jobs for r in j.stages.values() if r.status == "computed"]
    assert len(pids) >= 10 and os.getpid() not in pids and len(set(pids)) <= 2
    for job in report.jobs:
        assert Path(job.outputs["mp4"]).stat().st_size > 0

    # Same keys and arrays as the local runner.
    ref_store = str(tmp_path / "local")
    local, _ = run_catalog(cat, profile=prof.model_copy(update={"runner": load_profile("local").runner}),
                           store=ref_store, request={"params": TINY}, orchestrator="inline")
    a, b = ArtifactStore(store), ArtifactStore(ref_store)
    for job in ("bear-elephant", "ball-cone"):
        assert a.job(job)["artifacts"] == b.job(job)["artifacts"]
        key = a.job(job)["artifacts"]["generate"]
        assert np.array_equal(a.read(ArtifactRef("generate", key))["video"],
                              b.read(ArtifactRef("generate", key))["video"])


@pytest.mark.parametrize("dispatch", ["ray", "prefect-ray"])
def test_a_bad_input_on_ray_fails_its_job_with_its_reason(tmp_path: Path, local_ray: object, dispatch: str
                                                          ) -> None:
    """Both dispatches: the worker's own error message reaches the summary, and the other job finishes."""
    cat = demo_catalog(tmp_path)
    prof = load_profile("ray")
    prof = prof.model_copy(update={
        "out": str(tmp_path / "out"), "params": TINY,
        "backends": {**OFFLINE, "source_masks": "provided"},  # the bear job has a mask for frame 0 only
        "runner": prof.runner.model_copy(update={"dispatch": dispatch})})
    report, _ = run_catalog(cat, profile=prof, store=str(tmp_path / "store"), request={"params": TINY})
    jobs = {j.job_id: j for j in report.jobs}
    assert jobs["bear-elephant"].status == "failed"
    assert jobs["bear-elephant"].error.startswith("source_masks: source_masks (provided): 1 masks for 4 frames"), \
        jobs["bear-elephant"].error
    assert "Traceback" not in jobs["bear-elephant"].error
    assert jobs["ball-cone"].status == "done", jobs["ball-cone"].error
    pids = {r.pid for r in jobs["ball-cone"].stages.values() if r.status == "computed"}
    assert pids and os.getpid() not in pids
