"""Running planned jobs: a small state machine over artifact keys and jobs, driven by an :class:`Executor`.

Each key (one stage call, shared by every job that plans it) moves through

    WAITING --(its upstream keys are DONE)--> READY --(a stage slot is free)--> RUNNING --> DONE | FAILED
    WAITING --(an upstream key FAILED or was BLOCKED)--> BLOCKED

and each job through STAGES (some of its keys unfinished) -> EXPORTING (its video and contact sheet, on the
workers, outside the stage slots) -> ENDED (artifacts committed, manifest recorded, reported). Executors report
typed outcomes (:class:`Done`, :class:`Failed` with a :class:`FailureKind`); the transitions below are the only
places results are written. All of it runs on the caller's thread: executors' completion callbacks only
queue an event.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import queue
import time
from dataclasses import dataclass, field
from typing import Any

from flows.exports.outputs import OutputsConfig
from flows.plan.planner import JobPlan, StagePlan
from flows.run.executors import Executor
from flows.run.manifest import done_refs, record
from flows.run.outcomes import BLOCKED, Done, Failed, FailureKind, TaskOutcome, failure_of
from flows.run.results import JobResult, NullReporter, Reporter, RunReport, StageResult
from storage.store import ArtifactStore
from storage.write_behind import flush_all, store_for


class KeyState(enum.Enum):
    WAITING = "waiting"  # some upstream key is not done yet
    READY = "ready"  # its inputs exist: waiting for a stage slot
    RUNNING = "running"  # submitted to the executor
    DONE = "done"
    FAILED = "failed"
    BLOCKED = "blocked"  # an upstream key failed: never submitted


class JobState(enum.Enum):
    STAGES = "stages"  # some of its keys are unfinished
    EXPORTING = "exporting"
    ENDED = "ended"


@dataclass
class KeyTask:
    key: str
    users: list[tuple[JobPlan, StagePlan]] = field(default_factory=list)  # the first one computes it
    needs: set[str] = field(default_factory=set)  # upstream keys not done yet
    children: set[str] = field(default_factory=set)
    state: KeyState = KeyState.WAITING
    redone: bool = False  # computed again once after its artifact was found damaged (never twice)


@dataclass
class JobTask:
    plan: JobPlan
    rank: int  # catalog order: the earliest job gets a free slot first (its export can then start early)
    result: JobResult
    open: set[str] = field(default_factory=set)  # its keys not finished
    state: JobState = JobState.STAGES


class Scheduler:
    """Runs every planned stage once per key as soon as the artifacts it reads exist, then each job's exports.

    Tasks are submitted when their inputs exist (never with futures as arguments): a worker never waits
    inside a task for another one, so Ray keeps exactly its worker processes busy (a task blocked in
    ``ray.get`` makes Ray start extra workers) and threads never idle on upstream work.
    """

    def __init__(self, plans: list[JobPlan], executor: Executor, store: ArtifactStore,
                 reporter: Reporter | None = None, outputs: OutputsConfig | None = None, *,
                 start: float | None = None) -> None:
        self.plans, self.executor, self.store, self.outputs = plans, executor, store, outputs
        self.reporter = reporter or NullReporter()
        self.start = start if start is not None else time.perf_counter()
        self.keys: dict[str, KeyTask] = {}
        self.jobs = {p.job_id: JobTask(p, i, JobResult(p.job_id)) for i, p in enumerate(plans) if p.ok}
        # Rows refused at load are reported on their own: one may share its id with a valid row (a duplicate).
        self.refused = [JobTask(p, i, JobResult(p.job_id)) for i, p in enumerate(plans) if not p.ok]
        self.ready: list[tuple[int, int, str]] = []  # (job rank, arrival, key): a heap
        self.arrival = itertools.count()
        self.running = 0  # stage calls in flight (exports take no slot)
        self.handles: dict[tuple[str, str], Any] = {}  # ("stage", key) / ("export", job id) -> handle
        self.events: queue.Queue[tuple[str, str]] = queue.Queue()

    # ---- the run ------------------------------------------------------------------------------------------

    def run(self) -> RunReport:
        self.reporter.start(self.plans)
        for job in [*self.refused, *self.jobs.values()]:
            self._add(job)
        for job in self.jobs.values():
            if job.state is JobState.STAGES and not job.open:  # every stage skipped
                self._stages_ended(job)
        for task in self.keys.values():
            if task.users and not task.needs:
                self._make_ready(task)
        self._dispatch()
        while self.handles:
            item = self.events.get()  # completion callbacks come from worker threads (or Ray's)
            outcome = self.executor.outcome(self.handles.pop(item))
            kind, name = item
            if kind == "stage":
                self.running -= 1
                self._key_finished(self.keys[name], outcome)  # may make the keys waiting for it ready
                self._dispatch()
            else:
                self._export_finished(self.jobs[name], outcome)
        flush_all()
        results = [j.result for j in sorted([*self.refused, *self.jobs.values()], key=lambda j: j.rank)]
        return RunReport(results, time.perf_counter() - self.start, self.executor.name)

    def _add(self, job: JobTask) -> None:
        plan, res = job.plan, job.result
        if not plan.ok:
            res.status, res.error, res.failure = "failed", plan.error, FailureKind.INPUT
            job.state = JobState.ENDED
            self.reporter.job_done(res)
            return
        for sp in plan.stages.values():
            if sp.status == "skip":
                res.stages[sp.stage] = StageResult(sp.stage, "skipped", error=sp.reason)
                continue
            task = self._task(sp.key)
            task.users.append((plan, sp))
            job.open.add(sp.key)
            ups = {plan.stages[u].key for u in sp.upstream}
            task.needs |= ups
            for up in ups:
                self._task(up).children.add(sp.key)

    def _task(self, key: str) -> KeyTask:
        return self.keys.setdefault(key, KeyTask(key))

    # ---- key transitions ----------------------------------------------------------------------------------

    def _make_ready(self, task: KeyTask) -> None:
        """WAITING -> READY: queued for a slot, by its first user's catalog order."""
        task.state = KeyState.READY
        owner = task.users[0][0].job_id
        heapq.heappush(self.ready, (self.jobs[owner].rank, next(self.arrival), task.key))

    def _dispatch(self) -> None:
        slots = self.executor.stage_slots
        while self.ready and (slots is None or self.running < slots):
            self._submit(self.keys[heapq.heappop(self.ready)[2]])

    def _submit(self, task: KeyTask) -> None:
        """READY -> RUNNING (or FAILED when the job's own arrays cannot be read any more)."""
        plan, sp = task.users[0]
        externals = None
        if sp.status == "run" and sp.externals and plan.externals is not None:
            try:
                externals = plan.externals.arrays(list(sp.externals))
            except Exception as exc:  # unreadable after planning: fails like the stage would
                self._key_finished(task, failure_of(exc))
                return
        task.state = KeyState.RUNNING
        self.running += 1
        item = ("stage", task.key)
        self.handles[item] = self.executor.submit(plan.job_id, sp, externals)
        self.executor.on_done(self.handles[item], lambda: self.events.put(item))

    def _key_finished(self, task: KeyTask, outcome: TaskOutcome) -> None:
        """RUNNING -> DONE (children may become READY) | FAILED (its descendants are BLOCKED)."""
        if isinstance(outcome, Failed) and outcome.kind is FailureKind.BLOCKED:
            self._block(task)  # an executor that saw the upstream failure itself (Prefect's NotReady)
            return
        if isinstance(outcome, Failed) and outcome.kind is FailureKind.DAMAGED and self._redo(task, outcome):
            return
        task.state = KeyState.DONE if isinstance(outcome, Done) else KeyState.FAILED
        for i, (plan, sp) in enumerate(task.users):
            res = self.jobs[plan.job_id].result
            if isinstance(outcome, Done):
                # Computed once, for the first job that needed it; a cache hit for the jobs sharing it.
                computed = not outcome.ref["cached"] and i == 0
                sr = StageResult(sp.stage, "computed" if computed else "cached",
                                 outcome.ref["seconds"] if computed else 0.0, pid=outcome.ref.get("pid"),
                                 io_seconds=outcome.ref.get("io_seconds", 0.0) if computed else 0.0)
                res.compute_seconds += sr.seconds
            else:
                sr = StageResult(sp.stage, "failed", error=outcome.message, failure=outcome.kind)
                if res.error is None:
                    res.error, res.failure = f"{sp.stage}: {outcome.message}", outcome.kind
            self._stage_result(plan, sp, sr)
        for child in sorted(task.children):
            child_task = self.keys[child]
            if task.state is KeyState.FAILED:
                self._block(child_task)
                continue
            child_task.needs.discard(task.key)
            if not child_task.needs and child_task.state is KeyState.WAITING:
                self._make_ready(child_task)

    def _redo(self, task: KeyTask, outcome: Failed) -> bool:
        """An input of ``task`` was damaged (and quarantined): its key goes READY again, ``task`` WAITING on it.

        Once per key: a second damage of the same artifact is a failure like any other."""
        up = self.keys.get(outcome.damaged or "")
        if up is None or up.redone or up.state is not KeyState.DONE:
            return False
        up.redone, up.state = True, KeyState.WAITING
        for plan, _ in task.users + up.users:
            note = f"{up.users[0][1].stage}: {outcome.message}, recomputed"
            if note not in self.jobs[plan.job_id].result.notes:
                self.jobs[plan.job_id].result.notes.append(note)
        task.state, task.needs = KeyState.WAITING, {up.key}
        up.children.add(task.key)
        self._make_ready(up)
        return True

    def _block(self, task: KeyTask) -> None:
        """-> BLOCKED, and every descendant with it (a key blocked twice is reported once)."""
        if task.state in (KeyState.FAILED, KeyState.BLOCKED):
            return
        task.state = KeyState.BLOCKED
        for plan, sp in task.users:
            self._stage_result(plan, sp, StageResult(sp.stage, "blocked", error=BLOCKED.message,
                                                     failure=FailureKind.BLOCKED))
        for child in sorted(task.children):
            self._block(self.keys[child])

    def _stage_result(self, plan: JobPlan, sp: StagePlan, sr: StageResult) -> None:
        job = self.jobs[plan.job_id]
        job.result.stages[sp.stage] = sr
        self.reporter.stage_done(plan.job_id, sr)
        job.open.discard(sp.key)
        if not job.open and job.state is JobState.STAGES:
            self._stages_ended(job)

    # ---- job transitions ----------------------------------------------------------------------------------

    def _stages_ended(self, job: JobTask) -> None:
        """STAGES -> EXPORTING (a job with finished artifacts and exports configured) or ENDED."""
        plan, res = job.plan, job.result
        if res.status == "pending":
            bad = any(r.status in ("failed", "blocked") for r in res.stages.values())
            res.status = "failed" if bad else ("done" if res.computed else "cached")
        refs = {s: r.key for s, r in done_refs(plan, res).items()}
        if self.outputs is None or not refs or res.status == "failed" or plan.job is None:
            self._end(job)
            return
        job.state = JobState.EXPORTING
        item = ("export", plan.job_id)
        self.handles[item] = self.executor.submit_outputs(plan.job_id, {
            "store_url": self.store.url, "store_options": self.store.storage_options or None,
            "job_id": plan.job_id, "refs": refs, "out_root": self.outputs.out_root,
            "formats": tuple(self.outputs.formats), "output": self.outputs.output, "source": str(plan.job.source),
            "source_fps": plan.job.fps})
        self.executor.on_done(self.handles[item], lambda: self.events.put(item))

    def _export_finished(self, job: JobTask, outcome: TaskOutcome) -> None:
        """EXPORTING -> ENDED; an export (or the commit it waits for) failing fails this job only."""
        res = job.result
        if isinstance(outcome, Failed):
            store = outcome.kind is FailureKind.STORE  # its message says "store: ..." already
            res.status, res.failure = "failed", FailureKind.STORE if store else FailureKind.EXPORT
            res.error = outcome.message if store else f"export: {outcome.message}"
        else:
            files = dict(outcome.ref)
            res.outputs_seconds = float(files.pop("_seconds", 0.0))
            res.outputs = files
        self._end(job)

    def _end(self, job: JobTask) -> None:
        """-> ENDED: the job's artifacts written behind the compute are committed before its manifest points
        at them; then the manifest, then the report."""
        plan, res = job.plan, job.result
        try:
            store_for(self.store.url, self.store.storage_options or None).flush(
                sp.key for sp in plan.stages.values() if sp.key)
        except Exception as exc:
            failure = failure_of(exc)
            res.status = "failed"
            if res.error is None:
                res.error, res.failure = failure.message, failure.kind
        if plan.job is not None:
            record(self.store, plan, res)
        res.seconds = time.perf_counter() - self.start
        job.state = JobState.ENDED
        self.reporter.job_done(res)


def schedule(plans: list[JobPlan], executor: Executor, store: ArtifactStore, reporter: Reporter | None = None,
             outputs: OutputsConfig | None = None, *, start: float | None = None) -> RunReport:
    """Run every planned stage once per key, each as soon as its upstream stages are done; then each job's
    exports, also on the workers (see :class:`Scheduler`)."""
    return Scheduler(plans, executor, store, reporter, outputs, start=start).run()
