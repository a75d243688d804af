"""Large catalogs through Prefect as one task per job group: same artifacts, bounded stages, honest failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from test_flow_catalog import BEAR, latest_flow_task_runs, offline_profile, prefect_server, write_catalog

from flows.api import run_catalog
from flows.config.profiles import RunnerConfig
from flows.plan.groups import job_groups
from flows.plan.run_plan import prepare_catalog
from storage import open_job

__all__ = ["prefect_server"]  # the module-scoped server fixture, shared with test_flow_catalog


def test_jobs_sharing_a_key_fall_in_one_group(tmp_path: Path) -> None:
    cat = write_catalog(tmp_path)
    _, _, plans, _ = prepare_catalog(cat, offline_profile(tmp_path / "out"), str(tmp_path / "store"))
    groups = [[p.job_id for p in g] for g in job_groups(plans)]
    # The two bear jobs share every source stage; the ball shares nothing with them.
    assert sorted(groups, key=len) == [["ball"], ["bear", "bear-seed7"]]
    keys = [{sp.key for p in g for sp in p.stages.values() if sp.key} for g in job_groups(plans)]
    assert not keys[0] & keys[1]


def test_job_tasks_give_the_stage_tasks_outputs(tmp_path: Path, prefect_server: str) -> None:
    extra = f"""  - id: broken
    source: {BEAR / 'frames'}
    masks: {BEAR / 'mask-00000.png'}
    first_frame: {tmp_path / 'absent.png'}
"""
    cat = write_catalog(tmp_path, extra)
    prof = offline_profile(tmp_path / "out")
    jobs_prof = prof.model_copy(update={"runner": RunnerConfig(prefect_tasks="job"), "out": str(tmp_path / "o2")})
    report, plans = run_catalog(cat, profile=jobs_prof, store=str(tmp_path / "jobs-store"))
    assert report.orchestrator == "prefect (job tasks)"
    status = {j.job_id: j.status for j in report.jobs}
    assert status == {"bear": "done", "ball": "done", "bear-seed7": "done", "broken": "failed"}
    assert [j.job_id for j in report.jobs] == [p.job_id for p in plans]  # catalog order
    # One Prefect task run per group (the failed row never reaches a task): bear + bear-seed7, ball.
    names = latest_flow_task_runs(expected=2)
    assert {n.split(":")[-1] for n in names} == {"jobs"} and len(names) == 2, names
    inline, _ = run_catalog(cat, profile=prof, store=str(tmp_path / "inline-store"), orchestrator="inline")
    for job in ("bear", "ball", "bear-seed7"):
        a = open_job(str(tmp_path / "jobs-store"), job)
        b = open_job(str(tmp_path / "inline-store"), job)
        assert np.array_equal(a["video"].values, b["video"].values)
    assert (tmp_path / "o2" / "bear" / "video.mp4").is_file()
