"""Running planned jobs: one scheduler, two executors (inline threads, or Prefect tasks on any task runner).

The scheduler submits every stage call once per key (jobs that share a source share its source stages) as
soon as the artifacts it reads exist, updates the progress reporter as calls finish, then submits each job's
export (video files, contact sheet), records the job in the store and builds the summary. A failing stage
blocks its job's downstream stages only; other jobs run on.
"""

from __future__ import annotations

import concurrent.futures as cf
import heapq
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from flows.exports.outputs import OutputsConfig
from flows.plan.planner import JobPlan, StagePlan
from flows.run.execute import execute
from storage.store import ArtifactStore
from storage.write_behind import CommitError, flush_all, store_for


@dataclass
class StageResult:
    stage: str
    status: str  # computed | cached | failed | skipped | blocked
    seconds: float = 0.0
    error: str | None = None
    pid: int | None = None  # the worker process that ran it
    io_seconds: float = 0.0  # store reads and the artifact write around the computation


@dataclass
class JobResult:
    job_id: str
    status: str = "pending"  # done | cached | failed
    seconds: float = 0.0  # wall time from the run's start to this job's end
    compute_seconds: float = 0.0
    outputs_seconds: float = 0.0  # exporting the video and the contact sheet
    stages: dict[str, StageResult] = field(default_factory=dict)
    error: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def computed(self) -> int:
        return sum(r.status == "computed" for r in self.stages.values())

    @property
    def cached(self) -> int:
        return sum(r.status == "cached" for r in self.stages.values())


@dataclass
class RunReport:
    jobs: list[JobResult]
    wall_seconds: float
    orchestrator: str

    @property
    def failed(self) -> list[JobResult]:
        return [j for j in self.jobs if j.status == "failed"]

    @property
    def compute_seconds(self) -> float:
        return sum(j.compute_seconds for j in self.jobs)

    @property
    def io_seconds(self) -> float:
        return sum(r.io_seconds for j in self.jobs for r in j.stages.values() if r.status == "computed")

    @property
    def outputs_seconds(self) -> float:
        return sum(j.outputs_seconds for j in self.jobs)

    def rows(self) -> list[dict[str, Any]]:
        return [{"job": j.job_id, "status": j.status, "seconds": round(j.seconds, 2),
                 "stages run": j.computed, "stages cached": j.cached,
                 "output": j.outputs.get("mp4") or j.outputs.get("contact_sheet") or "",
                 "reason": j.error or ""} for j in self.jobs]


class Reporter(Protocol):
    def start(self, plans: list[JobPlan]) -> None: ...
    def stage_done(self, job_id: str, result: StageResult) -> None: ...
    def job_done(self, result: JobResult) -> None: ...


class NullReporter:
    def start(self, plans: list[JobPlan]) -> None: ...
    def stage_done(self, job_id: str, result: StageResult) -> None: ...
    def job_done(self, result: JobResult) -> None: ...


class Executor(Protocol):
    """Runs stage calls: ``submit`` returns a handle, ``on_done`` calls back (any thread) when it finishes.

    ``stage_slots``: stage calls in flight at once (None: the runner queues them itself). Exports do not
    take a slot, so a finished job's encoding overlaps the next job's stages."""

    name: str
    stage_slots: int | None

    def submit(self, job_id: str, sp: StagePlan, externals: dict[str, Any] | None) -> Any: ...
    def submit_outputs(self, job_id: str, kwargs: dict[str, Any]) -> Any: ...
    def on_done(self, handle: Any, fn: Callable[[], None]) -> None: ...
    def outcome(self, handle: Any) -> tuple[dict[str, Any] | None, str | None]: ...


# ---- the task body (shared by every executor) --------------------------------------------------------

_THREADS: list[int] = []


def limit_threads(threads: int | None) -> None:
    """Cap OpenCV's (and torch's, once imported) intra-op threads to the task's CPU share, once per process.

    Ray reserves ``cpus_per_task`` CPUs per task but OpenCV would still start a thread per core in every
    worker; two workers on two cores would then run four busy threads."""
    if not threads or _THREADS:
        return
    _THREADS.append(threads)
    import sys

    import cv2

    cv2.setNumThreads(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


_GATES: dict[int, threading.BoundedSemaphore] = {}


def compute_gate(slots: int) -> threading.BoundedSemaphore:
    """This process's bound on stages computing at once (shared by every call asking for ``slots``)."""
    return _GATES.setdefault(slots, threading.BoundedSemaphore(slots))


def run_stage(call: Any, store_url: str, store_options: dict[str, Any] | None, device: str,
              externals: dict[str, Any] | None, threads: int | None = None, write_behind: bool = False,
              compute_slots: int | None = None) -> dict[str, Any]:
    """Execute one stage call against the store; returns a small reference (never arrays).

    ``write_behind``: commit the artifact on this process's writer thread (in-process executors, whose
    next stage reads the arrays from memory; see :mod:`storage.write_behind`). ``compute_slots``: at most that
    many stages of this process compute at once, while more calls may be in flight (their orchestration and
    input reads overlap the computing ones)."""
    limit_threads(threads)
    t0 = time.perf_counter()
    gate = compute_gate(compute_slots) if compute_slots else None
    out = execute(call, store_for(store_url, store_options), externals, device, write_behind=write_behind,
                  compute_gate=gate)
    # Reading inputs, writing the artifact (or the cache check); not the wait for a compute slot.
    io = time.perf_counter() - t0 - out.seconds - out.waited
    return {"stage": call.stage, "key": call.key, "cached": out.cached, "seconds": round(out.seconds, 4),
            "io_seconds": round(io, 4), "pid": os.getpid()}


def error_text(exc: BaseException) -> str:
    from stages.base import StageInputError

    if isinstance(exc, StageInputError | CommitError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


# ---- inline executor: a thread pool, no Prefect ----------------------------------------------------------

class InlineExecutor:
    name = "inline"
    stage_slots = None  # the stage pool's size is the limit

    def __init__(self, store: ArtifactStore, device: str, max_workers: int = 1) -> None:
        self.store, self.device = store, device
        self.pool = cf.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="v2v-stage")
        self.exports = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="v2v-export")

    def submit(self, job_id: str, sp: StagePlan, externals: dict[str, Any] | None) -> Any:
        return self.pool.submit(run_stage, sp.call, self.store.url, self.store.storage_options or None,
                                self.device, externals, write_behind=True)

    def submit_outputs(self, job_id: str, kwargs: dict[str, Any]) -> Any:
        from flows.exports.outputs import job_outputs

        return self.exports.submit(job_outputs, **kwargs)

    def on_done(self, handle: Any, fn: Callable[[], None]) -> None:
        handle.add_done_callback(lambda _: fn())

    def outcome(self, handle: Any) -> tuple[dict[str, Any] | None, str | None]:
        exc = handle.exception()
        return (handle.result(), None) if exc is None else (None, error_text(exc))

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.exports.shutdown(wait=True)


# ---- the scheduler -----------------------------------------------------------------------------------------

def schedule(plans: list[JobPlan], executor: Executor, store: ArtifactStore, reporter: Reporter | None = None,
             outputs: OutputsConfig | None = None, *, start: float | None = None) -> RunReport:
    """Run every planned stage once per key, each as soon as its upstream stages are done; then each job's
    exports, also on the workers.

    Tasks are submitted when their inputs exist (never with futures as arguments): a worker never waits
    inside a task for another one, so Ray keeps exactly its worker processes busy (a task blocked in
    ``ray.get`` makes Ray start extra workers) and threads never idle on upstream work.
    """
    from flows.exports.outputs import done_refs, record

    reporter = reporter or NullReporter()
    start = start if start is not None else time.perf_counter()
    results = {p.job_id: JobResult(p.job_id) for p in plans}
    by_id = {p.job_id: p for p in plans}
    reporter.start(plans)
    users: dict[str, list[tuple[JobPlan, StagePlan]]] = {}  # key -> (job, stage) using it, first = owner
    needs: dict[str, set[str]] = {}  # key -> upstream keys not yet done
    children: dict[str, set[str]] = {}
    pending: dict[str, set[str]] = {}  # job -> keys not finished
    done_q: queue.Queue[tuple[str, str]] = queue.Queue()
    handles: dict[tuple[str, str], Any] = {}  # ("stage", key) / ("outputs", job) -> handle
    failed: set[str] = set()
    # Ready stage calls waiting for a slot, earliest job first (its export can then start early).
    ready: list[tuple[int, int, str]] = []
    rank = {p.job_id: i for i, p in enumerate(plans)}
    in_flight = [0]

    def end_job(plan: JobPlan) -> None:
        res = results[plan.job_id]
        if res.status == "pending":
            bad = any(r.status in ("failed", "blocked") for r in res.stages.values())
            res.status = "failed" if bad else ("done" if res.computed else "cached")
        refs = {s: r.key for s, r in done_refs(plan, res).items()}
        if outputs is not None and refs and res.status != "failed" and plan.job is not None:
            item = ("outputs", plan.job_id)
            handles[item] = executor.submit_outputs(plan.job_id, {
                "store_url": store.url, "store_options": store.storage_options or None, "job_id": plan.job_id,
                "refs": refs, "out_root": outputs.out_root, "formats": tuple(outputs.formats),
                "restore_source": outputs.restore_source})
            executor.on_done(handles[item], lambda: done_q.put(item))
            return
        close_job(plan)

    def close_job(plan: JobPlan) -> None:
        res = results[plan.job_id]
        try:  # artifacts written behind the compute are committed before the job's manifest points at them
            store_for(store.url, store.storage_options or None).flush(
                sp.key for sp in plan.stages.values() if sp.key)
        except Exception as exc:
            res.status, res.error = "failed", res.error or error_text(exc)
        if plan.job is not None:
            record(store, plan, res)
        res.seconds = time.perf_counter() - start
        reporter.job_done(res)

    for plan in plans:
        res = results[plan.job_id]
        if not plan.ok:
            res.status, res.error = "failed", plan.error
            reporter.job_done(res)
            continue
        pending[plan.job_id] = set()
        for sp in plan.stages.values():
            if sp.status == "skip":
                res.stages[sp.stage] = StageResult(sp.stage, "skipped", error=sp.reason)
                continue
            users.setdefault(sp.key, []).append((plan, sp))
            pending[plan.job_id].add(sp.key)
            ups = {plan.stages[u].key for u in sp.upstream}
            needs.setdefault(sp.key, set()).update(ups)
            for u in ups:
                children.setdefault(u, set()).add(sp.key)

    def submit(key: str) -> None:
        plan, sp = users[key][0]
        slots = executor.stage_slots
        if slots is not None and in_flight[0] >= slots:
            heapq.heappush(ready, (rank[plan.job_id], len(ready), key))
            return
        externals = None
        if sp.status == "run" and sp.externals and plan.externals is not None:
            try:
                externals = plan.externals.arrays(list(sp.externals))
            except Exception as exc:  # unreadable after planning: fails like the stage would
                complete(key, None, error_text(exc))
                return
        item = ("stage", key)
        in_flight[0] += 1
        handles[item] = executor.submit(plan.job_id, sp, externals)
        executor.on_done(handles[item], lambda: done_q.put(item))

    def complete(key: str, ref: dict[str, Any] | None, error: str | None) -> None:
        """Record one finished key for every job using it; block its descendants on failure."""
        for i, (plan, sp) in enumerate(users[key]):
            res = results[plan.job_id]
            if ref is not None:
                # Computed once, for the first job that needed it; a cache hit for the jobs sharing it.
                computed = not ref["cached"] and i == 0
                sr = StageResult(sp.stage, "computed" if computed else "cached",
                                 ref["seconds"] if computed else 0.0, pid=ref.get("pid"),
                                 io_seconds=ref.get("io_seconds", 0.0) if computed else 0.0)
                res.compute_seconds += sr.seconds
            elif error == "blocked":
                sr = StageResult(sp.stage, "blocked", error="an upstream stage failed")
            else:
                sr = StageResult(sp.stage, "failed", error=error)
                if res.error is None:
                    res.error = f"{sp.stage}: {error}"
            res.stages[sp.stage] = sr
            reporter.stage_done(plan.job_id, sr)
            pending[plan.job_id].discard(key)
            if not pending[plan.job_id]:
                end_job(plan)
        if ref is None:
            failed.add(key)
        for child in sorted(children.get(key, ())):
            needs[child].discard(key)
            if ref is None and child not in failed:
                failed.add(child)
                complete(child, None, "blocked")
            elif not needs[child] and child not in failed and ("stage", child) not in handles:
                submit(child)

    for plan in plans:
        if plan.ok and not pending[plan.job_id]:
            end_job(plan)
    for key in [k for k in users if not needs[k]]:
        submit(key)
    finished: set[tuple[str, str]] = set()
    while len(finished) < len(handles):
        item = done_q.get()  # completion callbacks come from worker threads (or Ray's)
        finished.add(item)
        kind, name = item
        ref, error = executor.outcome(handles[item])
        if kind == "stage":
            in_flight[0] -= 1
            complete(name, ref, error)  # may submit the stages that were waiting for it
            while ready and (executor.stage_slots is None or in_flight[0] < executor.stage_slots):
                submit(heapq.heappop(ready)[2])
            continue
        res = results[name]
        if error is not None:  # an export (or commit) problem fails this job only
            res.status, res.error = "failed", error if error.startswith("store: ") else f"export: {error}"
        else:
            files = dict(ref or {})
            res.outputs_seconds = float(files.pop("_seconds", 0.0))
            res.outputs = files
        close_job(by_id[name])
    flush_all()
    jobs = sorted(results.values(), key=lambda r: rank[r.job_id])
    return RunReport(jobs, time.perf_counter() - start, executor.name)
