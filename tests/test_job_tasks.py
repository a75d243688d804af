"""Large catalogs through Prefect as one task per job group: same artifacts, bounded stages, honest failures,
plans pulled from a stream as the run goes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from test_flow_catalog import BEAR, offline_profile, prefect_server, write_catalog

from flows.api import run_catalog
from flows.config.profiles import RunnerConfig
from flows.plan.groups import job_groups, stream_groups
from flows.plan.planner import JobPlan
from flows.plan.run_plan import prepare_catalog
from flows.run.results import JobResult, StageResult
from storage import open_job
from storage.store import open_store

__all__ = ["prefect_server"]  # the module-scoped server fixture, shared with test_flow_catalog


class Recorder:
    """A reporter that remembers what it was told, and the Prefect flow run and task run it was told in."""

    def __init__(self, yielded: list[int] | None = None) -> None:
        self.lock = threading.Lock()
        self.totals: list[int | None] = []
        self.planned: list[str] = []
        self.done: list[JobResult] = []
        self.stages: list[tuple[str, str]] = []
        self.flow_runs: set[str] = set()
        self.task_runs: set[str] = set()
        self.yielded = yielded  # the plan generator's count: read when the first group task reports
        self.yielded_at_first: int | None = None
        self.held: list[int] = []  # plans yielded and not ended, at each job's end
        self.yielded_at_first_end: int | None = None

    def start(self, total: int | None) -> None:
        self.totals.append(total)

    def job_planned(self, plan: JobPlan) -> None:
        from prefect.context import TaskRunContext

        ctx = TaskRunContext.get()
        with self.lock:
            if self.yielded is not None and self.yielded_at_first is None:
                self.yielded_at_first = self.yielded[0]
            self.planned.append(plan.job_id)
            if ctx is not None:  # rows refused at planning are reported outside any task
                self.flow_runs.add(str(ctx.task_run.flow_run_id))
                self.task_runs.add(str(ctx.task_run.id))

    def stage_done(self, job_id: str, result: StageResult) -> None:
        with self.lock:
            self.stages.append((job_id, result.stage))

    def job_done(self, result: JobResult) -> None:
        with self.lock:
            self.done.append(result)
            if self.yielded is not None:
                self.held.append(self.yielded[0] - len(self.done) + 1)
                if self.yielded_at_first_end is None:
                    self.yielded_at_first_end = self.yielded[0]


def task_run_names(flow_run: str, expected: int, timeout: float = 20.0) -> list[str]:
    """Names of one flow run's task runs, once Prefect has recorded ``expected`` of them (the temporary
    server records task-run events in batches, every second)."""
    import time

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + timeout
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run])))
            if len(runs) >= expected or time.monotonic() > deadline:
                return sorted(r.name for r in runs)
            time.sleep(0.5)


def test_jobs_sharing_a_key_fall_in_one_group(tmp_path: Path) -> None:
    cat = write_catalog(tmp_path)
    _, _, plans, _ = prepare_catalog(cat, offline_profile(tmp_path / "out"), str(tmp_path / "store"))
    groups = [[p.job_id for p in g] for g in job_groups(plans)]
    # The two bear jobs share every source stage; the ball shares nothing with them.
    assert sorted(groups, key=len) == [["ball"], ["bear", "bear-seed7"]]
    keys = [{sp.key for p in g for sp in p.stages.values() if sp.key} for g in job_groups(plans)]
    assert not keys[0] & keys[1]
    # Streamed with a look-ahead of one job, the bear jobs (not adjacent: the ball is between) part: still
    # correct, the second group finds the shared artifacts cached (or computes them once more).
    pulled: list[str] = []

    def stream() -> Iterator[JobPlan]:
        for plan in plans:
            pulled.append(plan.job_id)
            yield plan

    seen = []
    for group in stream_groups(stream(), window=1):
        seen.append(([p.job_id for _, p in group], len(pulled)))
    assert seen == [(["bear"], 1), (["ball"], 2), (["bear-seed7"], 3)]
    # A look-ahead of three: the ball holds no key of the bears, bear-seed7 joins bear's group when it comes.
    assert [[(r, p.job_id) for r, p in g] for g in stream_groups(plans, window=3)] == [
        [(0, "bear"), (2, "bear-seed7")], [(1, "ball")]]
    # ``settle``: a group goes once that many later jobs did not join it (here one: the ball), not waiting for
    # bear-seed7; with two it waits, and bear-seed7 joins.
    assert [[p.job_id for _, p in g] for g in stream_groups(plans, settle=1)] == [["bear"], ["ball"], ["bear-seed7"]]
    assert [[p.job_id for _, p in g] for g in stream_groups(plans, settle=2)] == [["bear", "bear-seed7"], ["ball"]]


def test_job_tasks_give_the_inline_outputs(tmp_path: Path, prefect_server: str) -> None:
    extra = f"""  - id: broken
    source: {BEAR / 'frames'}
    masks: {BEAR / 'mask-00000.png'}
    first_frame: {tmp_path / 'absent.png'}
"""
    cat = write_catalog(tmp_path, extra)
    prof = offline_profile(tmp_path / "out")
    jobs_prof = prof.model_copy(update={"runner": RunnerConfig(prefect_tasks="job"), "out": str(tmp_path / "o2")})
    rec = Recorder()
    report, plans = run_catalog(cat, profile=jobs_prof, store=str(tmp_path / "jobs-store"), reporter=rec)
    assert report.orchestrator == "prefect (job tasks)"
    status = {j.job_id: j.status for j in report.jobs}
    assert status == {"bear": "done", "ball": "done", "bear-seed7": "done", "broken": "failed"}
    assert [j.job_id for j in report.jobs] == [p.job_id for p in plans]  # catalog order
    # The reporter: started once with the catalog's size, every job planned and ended once.
    assert rec.totals == [4]
    assert sorted(rec.planned) == sorted(status) and sorted(r.job_id for r in rec.done) == sorted(status)
    # One Prefect task run per group (the failed row never reaches a task): bear + bear-seed7, ball; both in
    # the flow run of this run.
    assert len(rec.flow_runs) == 1 and len(rec.task_runs) == 2
    names = task_run_names(rec.flow_runs.pop(), expected=2)
    assert names == ["ball:jobs", "bear +1:jobs"], names
    inline, _ = run_catalog(cat, profile=prof, store=str(tmp_path / "inline-store"), orchestrator="inline")
    a_store, b_store = open_store(str(tmp_path / "jobs-store")), open_store(str(tmp_path / "inline-store"))
    for job in ("bear", "ball", "bear-seed7"):
        # The same artifact for every stage, and the same arrays in it.
        assert a_store.job(job)["artifacts"] == b_store.job(job)["artifacts"]
        a, b = open_job(a_store, job), open_job(b_store, job)
        for name in ("video", "frames"):
            assert np.array_equal(a[name].values, b[name].values), (job, name)
        files = {k: Path(v).name for k, v in report.jobs[[j.job_id for j in report.jobs].index(job)].outputs.items()}
        assert files == {k: Path(v).name for k, v in inline.jobs[[j.job_id for j in inline.jobs].index(job)]
                         .outputs.items()}
    assert (tmp_path / "o2" / "bear" / "video.mp4").is_file()
    # Through Prefect again, everything cached: the cached rows share one task, and nothing changes.
    again_rec = Recorder()
    again, _ = run_catalog(cat, profile=jobs_prof, store=str(tmp_path / "jobs-store"), reporter=again_rec,
                           skip_when_cached=False)
    assert [j.status for j in again.jobs] == ["cached"] * 3 + ["failed"]
    assert [j.outputs for j in again.jobs] == [j.outputs for j in report.jobs]
    assert task_run_names(again_rec.flow_runs.pop(), expected=1) == ["bear +2:jobs"]


def test_a_plan_stream_is_pulled_as_the_groups_go(tmp_path: Path, prefect_server: str) -> None:
    from flows.config.demo_clip import make_demo_clip
    from flows.exports.outputs import OutputsConfig
    from flows.orchestrate import prefect_flows  # noqa: F401 - Prefect configured the way the flows have it
    from flows.orchestrate.job_tasks import bounds, run_job_tasks
    from flows.run.lease import run_lease

    window, slots = 2, 1
    in_flight = bounds(slots)[1]  # groups at their stages, and those only exporting
    n = in_flight + window + 2
    rows = []
    for v in range(n):
        clip = make_demo_clip(tmp_path / f"ball{v}", variant=v + 1)
        rows.append(f"  - id: ball-{v}\n    source: {clip['clip']}\n    masks: {clip['mask']}\n"
                    f"    first_frame: {clip['first_frame']}\n    prompt: a green cone")
    cat = tmp_path / "catalog.yaml"
    cat.write_text("jobs:\n" + "\n".join(rows) + "\n")
    prof = offline_profile(tmp_path / "out")
    _, store, plans, _ = prepare_catalog(cat, prof, str(tmp_path / "store"))
    yielded = [0]

    def stream() -> Iterator[JobPlan]:
        for plan in plans:
            yielded[0] += 1
            yield plan

    from prefect import flow

    rec = Recorder(yielded)
    protected: list[int] = []

    @flow(name="job-tasks-stream")
    def body() -> Any:
        with run_lease(store) as lease:
            real = lease.protect

            def protect(refs: Any) -> None:
                refs = list(refs)
                protected.append(len(refs))
                real(refs)

            lease.protect = protect  # type: ignore[method-assign]
            return run_job_tasks(stream(), store, prof.device, slots, rec, OutputsConfig.of(prof), 0.0,
                                 total=n, lease=lease, window=window)

    report = body()
    assert [j.job_id for j in report.jobs] == [f"ball-{v}" for v in range(n)]
    assert all(j.status == "done" for j in report.jobs), [j.error for j in report.jobs]
    # The first group's task started, and its job ended, before the stream was through: never more plans
    # held than the groups in flight and the look-ahead.
    assert rec.yielded_at_first is not None and rec.yielded_at_first_end is not None
    assert rec.yielded_at_first <= rec.yielded_at_first_end <= in_flight + window < n
    assert max(rec.held) <= in_flight + window
    # The lease was given the plans' artifacts in batches as they were pulled, not all at once.
    assert len(protected) > 1 and sum(protected) == sum(len(p.stages) for p in plans)
    assert rec.totals == [n] and len(rec.task_runs) == n


class LinkCounter(Recorder):
    """Also counts, at each job's end, the result links Prefect holds in the flow run's context."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[int] = []

    def job_done(self, result: JobResult) -> None:
        from prefect.context import FlowRunContext

        super().job_done(result)
        ctx = FlowRunContext.get()
        if ctx is not None:
            self.links.append(len(ctx.run_results))


def test_a_flow_run_does_not_keep_every_task_result(tmp_path: Path, prefect_server: str) -> None:
    """Prefect links each task result to its state for the rest of the flow run; v2v never passes results
    between tasks, so it drops them once read: what the flow holds follows the tasks in flight, not the jobs."""
    cat = write_catalog(tmp_path)
    prof = offline_profile(tmp_path / "out")
    run_catalog(cat, profile=prof, store=str(tmp_path / "store"), orchestrator="inline")  # everything cached next
    stage_prof = prof.model_copy(update={"runner": RunnerConfig(prefect_tasks="stage", max_workers=1)})
    rec = LinkCounter()
    report, plans = run_catalog(cat, profile=stage_prof, store=str(tmp_path / "store"), reporter=rec,
                                skip_when_cached=False)
    assert report.orchestrator.startswith("prefect") and [j.status for j in report.jobs] == ["cached"] * 3
    stage_tasks = sum(len(p.stages) for p in plans)  # one task per stage and an export per job, all read
    assert len(rec.links) == 3 and stage_tasks >= 20
    # At the last job's end every task has ended: without the clean-up Prefect would still hold all of them.
    assert rec.links[-1] < stage_tasks // 3, rec.links
