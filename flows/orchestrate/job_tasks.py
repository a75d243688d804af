"""Large catalogs through Prefect: one Prefect task per group of jobs instead of one per stage call.

A Prefect task run costs 10-15 ms of this process's CPU and 25-35 ms of the temporary server's (its events)
whatever it does (bench/prefect_scale.py); on a catalog of thousands of small clips, where a stage computes in
tens of milliseconds, one task per stage call would spend more on Prefect than on the work. Here each group of
jobs sharing artifact keys (:func:`flows.plan.groups.stream_groups`) is one task run, whose body runs the same
scheduler: artifacts, keys, exports and manifests are exactly those of a stage-task run, and the UI shows one
task run per job (group) with its outcome; consecutive jobs with nothing to compute share one task.

The cores stay as busy as with ``--inline``, whose structure this copies run-wide: the groups' stage calls
share ``2 * slots + 1`` stage threads and their exports one export thread, and a process-wide gate lets
``slots`` stages compute at once; more groups are at their stages (``2 * slots + 1``) than may compute, so
that while some compute, the others read their inputs, write behind, or talk to Prefect; a group whose jobs
are only exporting any more does not count among those (as the inline executor computes the next jobs'
stages while a job exports), up to ``4 * (2 * slots + 1)`` groups in flight in all. Plans are pulled from the
planner's stream as groups are formed (a bounded look-ahead), and dropped once their group's task has
ended: memory follows the groups in flight and the look-ahead, never the catalog's size.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from flows.exports.outputs import OutputsConfig
from flows.orchestrate import prefect_env
from flows.plan.groups import stream_groups
from flows.plan.planner import JobPlan, StagePlan
from flows.run.executors import run_stage
from flows.run.lease import ProtectedPlans
from flows.run.outcomes import TaskOutcome, outcome_of_future
from flows.run.results import JobResult, Reporter, RunReport, StageResult
from flows.run.scheduler import schedule
from storage.store import ArtifactStore

WINDOW = 256  # at most this many plans held for grouping, beyond those in flight
SETTLE = 32  # a group is run once this many later jobs joined it no more (jobs sharing keys are close)
CACHED_BATCH = 64  # jobs with nothing to compute, one after the other, share one task (a re-run's cached rows)


class _Shared:
    """A reporter shared by every group: ``start`` was called once for the whole run; calls from the groups'
    threads are serialised (the CLI's progress display is not thread-safe)."""

    def __init__(self, inner: Reporter | None) -> None:
        self.inner = inner
        self.lock = threading.Lock()

    def start(self, total: int | None) -> None:
        return None

    def job_planned(self, plan: JobPlan) -> None:
        if self.inner is not None:
            with self.lock:
                self.inner.job_planned(plan)

    def stage_done(self, job_id: str, result: StageResult) -> None:
        if self.inner is not None:
            with self.lock:
                self.inner.stage_done(job_id, result)

    def job_done(self, result: JobResult) -> None:
        if self.inner is not None:
            with self.lock:
                self.inner.job_done(result)


class _GroupReporter:
    """One group's view of the shared reporter; says once (``stages_over``) when each of its jobs has finished
    its stages (it is exporting, or ended): the group then no longer needs a place among those computing."""

    def __init__(self, shared: _Shared, jobs: int, stages_over: Callable[[], None]) -> None:
        self.shared, self.jobs, self.stages_over = shared, jobs, stages_over
        self.past: set[str] = set()

    def start(self, total: int | None) -> None:
        return None

    def job_planned(self, plan: JobPlan) -> None:
        self.shared.job_planned(plan)

    def stage_done(self, job_id: str, result: StageResult) -> None:
        self.shared.stage_done(job_id, result)

    def job_done(self, result: JobResult) -> None:
        self.shared.job_done(result)
        self.exporting(result.job_id)

    def exporting(self, job_id: str) -> None:
        if job_id in self.past:
            return
        self.past.add(job_id)
        if len(self.past) == self.jobs:
            self.stages_over()


@dataclass
class _Pools:
    """The run's threads, shared by every group as one inline executor's are by its jobs: ``2 * slots + 1``
    stage threads (``slots`` of them computing at once, the others reading inputs or waiting for the gate) and
    one export thread."""

    stages: cf.ThreadPoolExecutor
    exports: cf.ThreadPoolExecutor
    compute_slots: int

    @classmethod
    def of(cls, slots: int) -> _Pools:
        return cls(cf.ThreadPoolExecutor(2 * slots + 1, thread_name_prefix="v2v-stage"),
                   cf.ThreadPoolExecutor(1, thread_name_prefix="v2v-export"), slots)

    def close(self) -> None:
        self.stages.shutdown(wait=True)
        self.exports.shutdown(wait=True)


class _GroupExecutor:
    """A group's executor on the run's shared threads: a stage computes under the process-wide compute gate
    (its input reads, the cache check and the write behind run outside it)."""

    name = "inline"
    stage_slots = None  # the shared stage threads are the limit

    def __init__(self, store: ArtifactStore, device: str, pools: _Pools, reporter: Any) -> None:
        self.store, self.device, self.pools = store, device, pools
        self.exporting: Callable[[str], None] | None = getattr(reporter, "exporting", None)

    def submit(self, job_id: str, sp: StagePlan, externals: dict[str, Any] | None) -> Any:
        return self.pools.stages.submit(run_stage, sp.call, self.store.url, self.store.storage_options or None,
                                        self.device, externals, write_behind=True,
                                        compute_slots=self.pools.compute_slots)

    def submit_outputs(self, job_id: str, kwargs: dict[str, Any]) -> Any:
        from flows.exports.outputs import job_outputs

        if self.exporting is not None:
            self.exporting(job_id)
        return self.pools.exports.submit(job_outputs, **kwargs)

    def on_done(self, handle: Any, fn: Callable[[], None]) -> None:
        handle.add_done_callback(lambda _: fn())

    def outcome(self, handle: Any) -> TaskOutcome:
        return outcome_of_future(handle)


@task(name="jobs", cache_policy=NO_CACHE, persist_result=False)
def jobs_task(plans: list[JobPlan], store: ArtifactStore, device: str, outputs: OutputsConfig, reporter: Any,
              pools: Any) -> list[JobResult]:
    """Run a group's stages and exports on the run's shared threads (failures are results, not exceptions)."""
    executor = _GroupExecutor(store, device, pools, reporter)
    return schedule(plans, executor, store, reporter, outputs, window=len(plans), total=len(plans)).jobs


def use_job_tasks(total: int, runner: Any) -> bool:
    """Whether a run of ``total`` jobs takes job tasks (``runner.prefect_tasks``; ``auto``: from
    ``runner.job_tasks_from`` jobs on, local runner)."""
    if runner.prefect_tasks != "auto":
        return bool(runner.prefect_tasks == "job")
    return runner.kind == "local" and total >= runner.job_tasks_from


def _pulled(plans: Iterable[JobPlan], book: ProtectedPlans, batch: int) -> Iterator[JobPlan]:
    """``plans``, pulled ``batch`` at a time, each batch protected in the run's lease before any of it is yielded
    (the lease is rewritten once per batch, not per job)."""
    source = iter(plans)
    while chunk := list(itertools.islice(source, batch)):
        book.protect(chunk)
        yield from chunk


def _batched(groups: Iterable[list[tuple[int, JobPlan]]]) -> Iterator[list[tuple[int, JobPlan]]]:
    """The groups, with consecutive jobs that compute nothing (all cached) batched up to ``CACHED_BATCH`` a
    task: a re-run of a large catalog must not pay Prefect's ~40 ms (client and server) per cached row."""
    batch: list[tuple[int, JobPlan]] = []
    for group in groups:
        if all(p.ok and not p.to_run() for _, p in group):
            batch.extend(group)
            if len(batch) >= CACHED_BATCH:
                yield batch
                batch = []
            continue
        if batch:
            yield batch
            batch = []
        yield group
    if batch:
        yield batch


def bounds(slots: int) -> tuple[int, int]:
    """Groups at their stages, and groups in flight in all (those beyond wait for the export thread, holding
    only their plans), for ``slots`` stages computing at once."""
    return 2 * slots + 1, 4 * (2 * slots + 1)


def run_job_tasks(plans: Iterable[JobPlan], store: ArtifactStore, device: str, slots: int,
                  reporter: Reporter | None, outputs: OutputsConfig, start: float, *, total: int | None = None,
                  lease: Any = None, window: int = WINDOW, settle: int = SETTLE) -> RunReport:
    """One task per job group: ``2 * slots + 1`` groups at their stages, ``slots`` stages computing at once,
    four times as many groups in flight in all (see the module docstring). ``plans`` may be a generator (the
    planner's stream): it is pulled as groups are formed (:func:`flows.plan.groups.stream_groups` with
    ``window`` and ``settle``). ``total``: the catalog's job count, for the reporter (None: unknown);
    ``lease``: the run's lease (``flows.run.lease.run_lease``), given each batch of pulled plans' artifacts."""
    if reporter is not None:
        reporter.start(total)
    shared = _Shared(reporter)
    at_stages, in_flight = bounds(slots)
    pools = _Pools.of(slots)
    book = ProtectedPlans(lease)
    events: queue.Queue[tuple[str, int]] = queue.Queue()  # ("stages", i): its stages are over; ("end", i)
    futures: dict[int, tuple[Any, list[tuple[int, JobPlan]]]] = {}
    computing: set[int] = set()
    results: list[tuple[int, JobResult]] = []

    def wait() -> None:
        kind, i = events.get()
        computing.discard(i)
        if kind == "end":
            collect(i)

    def collect(i: int) -> None:
        future, members = futures.pop(i)
        try:
            got = future.result()
            prefect_env.forget_result_links(got)
            results.extend(zip((r for r, _ in members), got, strict=True))
        except Exception as exc:  # the task itself broke (a stage's failure is a result, not an exception)
            for rank, plan in members:
                res = JobResult(plan.job_id, "failed", error=f"{type(exc).__name__}: {exc}")
                shared.job_done(res)
                results.append((rank, res))
        for _, plan in members:  # the plans go with ``members`` here
            book.ended(plan)

    # Its own thread pool (the flow's runner has threads for stage tasks only); task runs still belong to the
    # flow run this is called in.
    with ThreadPoolTaskRunner(max_workers=in_flight) as runner, contextlib.closing(pools):
        pulled = _pulled(plans, book, max(1, min(window, 4 * settle) // 4))
        for i, members in enumerate(_batched(stream_groups(pulled, window, settle))):
            group = [plan for _, plan in members]
            if not any(p.ok for p in group):  # rows that failed planning: reported here, no task for them
                got = jobs_task.fn(group, store, device, outputs, shared, pools)
                results.extend(zip((r for r, _ in members), got, strict=True))
                for plan in group:
                    book.ended(plan)
                continue
            while len(computing) >= at_stages or len(futures) >= in_flight:
                wait()
            name = group[0].job_id + (f" +{len(group) - 1}" if len(group) > 1 else "")
            watch = _GroupReporter(shared, len(group), lambda i=i: events.put(("stages", i)))
            # quote(): Prefect would otherwise walk every plan looking for futures to resolve (CPU per task).
            params = {"plans": quote(group), "store": store, "device": device, "outputs": outputs,
                      "reporter": watch, "pools": quote(pools)}
            future = runner.submit(jobs_task.with_options(task_run_name=f"{name}:jobs"), params)
            futures[i] = (future, members)
            computing.add(i)
            future.add_done_callback(lambda _, i=i: events.put(("end", i)))
        while futures:
            wait()
    results.sort(key=lambda r: r[0])
    return RunReport([r for _, r in results], time.perf_counter() - start, "prefect (job tasks)")
