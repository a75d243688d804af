"""Running planned jobs: a small state machine over artifact keys and jobs, driven by an :class:`Executor`.

Each key (one stage call, shared by every job that plans it) moves through

    WAITING --(its upstream keys are DONE)--> READY --(a stage slot is free)--> RUNNING --> DONE | FAILED
    WAITING --(an upstream key FAILED or was BLOCKED)--> BLOCKED

and each job through STAGES (some of its keys unfinished) -> EXPORTING (its video and contact sheet, on the
workers, outside the stage slots) -> ENDED (artifacts committed, manifest recorded, reported). Executors report
typed outcomes (:class:`Done`, :class:`Failed` with a :class:`FailureKind`); the transitions below are the only
places results are written. All of it runs on the caller's thread: executors' completion callbacks only
queue an event.

Plans stream in: the scheduler pulls them from an iterable (the planner yields them one by one) while the
first jobs compute, keeping at most ``window`` jobs in flight, and forgets a job's plan and its finished keys
once it has ended. Memory follows the jobs in flight, never the catalog; only the small results are kept.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import queue
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flows.exports.outputs import OutputsConfig
from flows.plan.planner import JobPlan, StagePlan
from flows.run.executors import Executor
from flows.run.lease import ProtectedPlans
from flows.run.manifest import done_refs, record
from flows.run.outcomes import BLOCKED, Done, Failed, FailureKind, TaskOutcome, failure_of
from flows.run.results import JobResult, NullReporter, Reporter, RunReport, StageResult
from storage.leases import Lease
from storage.store import ArtifactStore
from storage.write_behind import flush_all, forget_arrays, store_for


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
    outcome: TaskOutcome | None = None  # how it ended: what a job planned later that shares it gets


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

    ``plans`` may be a generator: it is pulled while the run goes, at most ``window`` jobs in flight (refilled
    a quarter-window at a time, so that the lease is rewritten once per batch, not per job).
    """

    def __init__(self, plans: Iterable[JobPlan], executor: Executor, store: ArtifactStore,
                 reporter: Reporter | None = None, outputs: OutputsConfig | None = None, *,
                 start: float | None = None, window: int | None = None, total: int | None = None,
                 lease: Lease | None = None) -> None:
        self.executor, self.store, self.outputs = executor, store, outputs
        self.reporter = reporter or NullReporter()
        self.start = start if start is not None else time.perf_counter()
        self.total = total if total is not None else (len(plans) if isinstance(plans, list | tuple) else None)
        self.source: Iterator[JobPlan] | None = iter(plans)
        slots = executor.stage_slots or 1
        self.window = max(window or 8, 2 * slots, 1)
        self.ranks = itertools.count()
        self.keys: dict[str, KeyTask] = {}
        self.jobs: dict[str, JobTask] = {}  # jobs in flight (planned, not ended)
        self.ended: list[tuple[int, JobResult]] = []  # (catalog rank, result) of every job that ended
        self.book = ProtectedPlans(lease)  # the artifacts of the jobs in flight, protected from gc
        self.failed: dict[str, Failed] = {}  # keys that failed for jobs that have ended (the run's failures only)
        self.ready: list[tuple[int, int, str]] = []  # (job rank, arrival, key): a heap
        self.arrival = itertools.count()
        self.running = 0  # stage calls in flight (exports take no slot)
        self.handles: dict[tuple[str, str], Any] = {}  # ("stage", key) / ("export", job id) -> handle
        self.events: queue.Queue[tuple[str, str]] = queue.Queue()

    # ---- the run ------------------------------------------------------------------------------------------

    def run(self) -> RunReport:
        self.reporter.start(self.total)
        self._refill(force=True)
        self._dispatch()
        while self.handles or self.source is not None:
            if not self.handles:  # everything pulled so far ended at once (cached, refused): pull more
                if not self._refill(force=True):
                    break
                self._dispatch()
                continue
            item = self.events.get()  # completion callbacks come from worker threads (or Ray's)
            outcome = self.executor.outcome(self.handles.pop(item))
            kind, name = item
            if kind == "stage":
                self.running -= 1
                self._key_finished(self.keys[name], outcome)  # may make the keys waiting for it ready
            else:
                self._export_finished(self.jobs[name], outcome)
            self._refill()
            self._dispatch()
        flush_all()
        results = [r for _, r in sorted(self.ended, key=lambda e: e[0])]
        return RunReport(results, time.perf_counter() - self.start, self.executor.name)

    def _refill(self, force: bool = False) -> bool:
        """Pull plans until ``window`` jobs are in flight; once a quarter of it is free (or ``force``).

        Returns whether any plan was pulled. The pulled jobs' artifacts are protected from gc before any of
        them is submitted; those of jobs that ended since are released (their manifests reference them)."""
        free = self.window - len(self.jobs)
        if self.source is None or (not force and free < max(1, self.window // 4)):
            return False
        pulled: list[JobTask] = []
        while len(pulled) < free:
            plan = next(self.source, None)
            if plan is None:
                self.source = None
                break
            pulled.append(JobTask(plan, next(self.ranks), JobResult(plan.job_id)))
        self.book.protect(job.plan for job in pulled if job.plan.ok)  # a refused plan ends below, never in flight
        for job in pulled:
            self.reporter.job_planned(job.plan)
            if not job.plan.ok:  # refused at load or planning: reported on its own, never in ``jobs``
                res = job.result
                res.status, res.error, res.failure = "failed", job.plan.error, FailureKind.INPUT
                job.state = JobState.ENDED
                self.ended.append((job.rank, res))
                self.reporter.job_done(res)
                continue
            self.jobs[job.plan.job_id] = job
            self._add(job)
        return bool(pulled)

    def _add(self, job: JobTask) -> None:
        """A job's keys join the graph. A key shared with a job in flight is joined, not computed again; one that
        already ended gives this job its outcome at once (a cache hit, or the same failure)."""
        plan, res = job.plan, job.result
        fresh: list[KeyTask] = []
        late: list[tuple[KeyTask, StagePlan]] = []
        for sp in plan.stages.values():  # first every key, so that no result below ends the job too early
            if sp.status == "skip":
                res.stages[sp.stage] = StageResult(sp.stage, "skipped", error=sp.reason)
                continue
            job.open.add(sp.key)
            task = self.keys.get(sp.key)
            if task is None:
                task = self._task(sp.key)
                fresh.append(task)
            elif task.users:
                late.append((task, sp))
            else:
                fresh.append(task)
            task.users.append((plan, sp))
        for task in fresh:  # in the plan's (topological) order: upstream keys first
            sp = task.users[-1][1]
            if task.key in self.failed:  # failed for a job that has ended: once per run, not once per job
                task.state, task.outcome = KeyState.FAILED, self.failed[task.key]
                self._user_finished(plan, sp, task.outcome, computed=False)
                continue
            ups = [self._task(plan.stages[u].key) for u in dict.fromkeys(sp.upstream)]
            for up in ups:
                up.children.add(task.key)
            task.needs = {up.key for up in ups if up.state is not KeyState.DONE}
            if any(up.state in (KeyState.FAILED, KeyState.BLOCKED) for up in ups):
                self._block(task)
            elif not task.needs:
                self._make_ready(task)
        for task, sp in late:
            if task.state is KeyState.BLOCKED:
                self._stage_result(plan, sp, StageResult(sp.stage, "blocked", error=BLOCKED.message,
                                                         failure=FailureKind.BLOCKED))
            elif task.outcome is not None:
                self._user_finished(plan, sp, task.outcome, computed=False)
        if job.state is JobState.STAGES and not job.open:  # every stage skipped, or ended already
            self._stages_ended(job)

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
        task.outcome = outcome
        for i, (plan, sp) in enumerate(list(task.users)):
            # Computed once, for the first job that needed it; a cache hit for the jobs sharing it.
            self._user_finished(plan, sp, outcome, computed=i == 0)
        for child in sorted(task.children):
            child_task = self.keys.get(child)
            if child_task is None:  # ended and forgotten
                continue
            if task.state is KeyState.FAILED:
                self._block(child_task)
                continue
            child_task.needs.discard(task.key)
            if not child_task.needs and child_task.state is KeyState.WAITING:
                self._make_ready(child_task)

    def _user_finished(self, plan: JobPlan, sp: StagePlan, outcome: TaskOutcome, *, computed: bool) -> None:
        res = self.jobs[plan.job_id].result
        if isinstance(outcome, Done):
            computed = computed and not outcome.ref["cached"]
            sr = StageResult(sp.stage, "computed" if computed else "cached",
                             outcome.ref["seconds"] if computed else 0.0, pid=outcome.ref.get("pid"),
                             io_seconds=outcome.ref.get("io_seconds", 0.0) if computed else 0.0)
            res.compute_seconds += sr.seconds
        else:
            assert isinstance(outcome, Failed)
            sr = StageResult(sp.stage, "failed", error=outcome.message, failure=outcome.kind)
            if res.error is None:
                res.error, res.failure = f"{sp.stage}: {outcome.message}", outcome.kind
        self._stage_result(plan, sp, sr)

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
            if child in self.keys:
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
        self._forget(job)

    def _forget(self, job: JobTask) -> None:
        """Drop an ended job's plan and every key no job in flight uses any more (only its result stays)."""
        del self.jobs[job.plan.job_id]
        self.ended.append((job.rank, job.result))
        gone: list[str] = []
        for sp in job.plan.stages.values():
            task = self.keys.get(sp.key) if sp.key else None
            if task is None:
                continue
            task.users = [(p, s) for p, s in task.users if p is not job.plan]
            if not task.users and task.state in (KeyState.DONE, KeyState.FAILED, KeyState.BLOCKED):
                del self.keys[sp.key]
                gone.append(sp.key)
                if task.state is KeyState.FAILED and isinstance(task.outcome, Failed):
                    self.failed[sp.key] = task.outcome
        self.book.ended(job.plan)
        forget_arrays(gone)  # this process's copies of them: memory follows the jobs in flight


def schedule(plans: Iterable[JobPlan], executor: Executor, store: ArtifactStore, reporter: Reporter | None = None,
             outputs: OutputsConfig | None = None, *, start: float | None = None, window: int | None = None,
             total: int | None = None, lease: Lease | None = None) -> RunReport:
    """Run every planned stage once per key, each as soon as its upstream stages are done; then each job's
    exports, also on the workers (see :class:`Scheduler`). ``plans`` may be a generator, pulled as the run goes
    (``window`` jobs in flight); ``lease`` protects the jobs' artifacts from gc while they run."""
    return Scheduler(plans, executor, store, reporter, outputs, start=start, window=window, total=total,
                     lease=lease).run()
