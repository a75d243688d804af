"""Large catalogs through Prefect: one Prefect task per group of jobs instead of one per stage call.

A Prefect task run costs about 20 ms of this process's CPU (and a few events for the server) whatever it does;
on a catalog of thousands of small clips, where a stage computes in tens of milliseconds, one task per stage
call would spend more on Prefect than on the work. Here each group of jobs that share no artifact key with any
other group (:func:`flows.plan.groups.job_groups`) is one task run, whose body runs the same scheduler with the
inline executor: artifacts, keys, exports and manifests are exactly those of a stage-task run, and the UI shows
one task run per job (group) with its outcome.
"""

from __future__ import annotations

import queue
import time
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.exports.outputs import OutputsConfig
from flows.plan.groups import job_groups
from flows.plan.planner import JobPlan
from flows.run.executors import InlineExecutor
from flows.run.results import JobResult, Reporter, RunReport, StageResult
from flows.run.scheduler import schedule
from storage.store import ArtifactStore


class _Shared:
    """A reporter shared by every group: ``start`` was already called once with the whole catalog."""

    def __init__(self, inner: Reporter | None) -> None:
        self.inner = inner

    def start(self, plans: list[JobPlan]) -> None:
        return None

    def stage_done(self, job_id: str, result: StageResult) -> None:
        if self.inner is not None:
            self.inner.stage_done(job_id, result)

    def job_done(self, result: JobResult) -> None:
        if self.inner is not None:
            self.inner.job_done(result)


@task(name="jobs", cache_policy=NO_CACHE, persist_result=False)
def jobs_task(plans: list[JobPlan], store: ArtifactStore, device: str, outputs: OutputsConfig,
              reporter: Any = None) -> list[JobResult]:
    """Run a group's stages and exports in this worker thread (failures are results, not exceptions)."""
    executor = InlineExecutor(store, device, 1)
    try:
        return schedule(plans, executor, store, reporter, outputs).jobs
    finally:
        executor.close()


def use_job_tasks(plans: list[JobPlan], runner: Any) -> bool:
    """Whether this run takes job tasks (``runner.prefect_tasks``; ``auto``: large catalogs, local runner)."""
    if runner.prefect_tasks != "auto":
        return bool(runner.prefect_tasks == "job")
    return runner.kind == "local" and len(plans) >= runner.job_tasks_from


def run_job_tasks(plans: list[JobPlan], store: ArtifactStore, device: str, slots: int,
                  reporter: Reporter | None, outputs: OutputsConfig, start: float) -> RunReport:
    """One task per job group, at most ``slots`` in flight (each computes one stage at a time): the same
    bound on stages computing at once as the stage-task runner's, and memory follows the groups in flight."""
    if reporter is not None:
        reporter.start(plans)
    shared = _Shared(reporter)
    rank = {p.job_id: i for i, p in enumerate(plans)}
    groups = job_groups(plans)
    finished: queue.Queue[int] = queue.Queue()
    futures: dict[int, Any] = {}
    results: list[JobResult] = []

    def collect(i: int) -> None:
        try:
            results.extend(futures.pop(i).result())
        except Exception as exc:  # the task itself broke (a stage's failure is a result, not an exception)
            for plan in groups[i]:
                res = JobResult(plan.job_id, "failed", error=f"{type(exc).__name__}: {exc}")
                shared.job_done(res)
                results.append(res)

    for i, group in enumerate(groups):
        if not any(p.ok for p in group):  # rows that failed planning: reported here, no task for them
            results.extend(jobs_task.fn(group, store, device, outputs, shared))
            continue
        while len(futures) >= slots:
            collect(finished.get())
        name = group[0].job_id + (f" +{len(group) - 1}" if len(group) > 1 else "")
        futures[i] = jobs_task.with_options(task_run_name=f"{name}:jobs").submit(group, store, device, outputs,
                                                                                  shared)
        futures[i].add_done_callback(lambda _, i=i: finished.put(i))
    while futures:
        collect(finished.get())
    results.sort(key=lambda r: rank[r.job_id])
    return RunReport(results, time.perf_counter() - start, "prefect (job tasks)")
