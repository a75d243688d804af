"""Running planned jobs: one scheduler, two executors (inline threads, or Prefect tasks on any task runner).

The scheduler submits every stage call once per key (jobs that share a source share its source stages) as
soon as the artifacts it reads exist, updates the progress reporter as calls finish, then submits each job's
export (video files, contact sheet), records the job in the store and builds the summary. A failing stage
blocks its job's downstream stages only; other jobs run on.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from flows.execute import execute
from flows.plan import JobPlan, StagePlan
from storage.store import ArtifactStore


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
    """Runs stage calls: ``submit`` returns a handle, ``on_done`` calls back (any thread) when it finishes."""

    name: str

    def submit(self, job_id: str, sp: StagePlan, externals: dict[str, Any] | None) -> Any: ...
    def submit_outputs(self, job_id: str, kwargs: dict[str, Any]) -> Any: ...
    def on_done(self, handle: Any, fn: Callable[[], None]) -> None: ...
    def outcome(self, handle: Any) -> tuple[dict[str, Any] | None, str | None]: ...


# ---- the task body (shared by every executor) --------------------------------------------------------

class ArrayCache:
    """Recently written or read artifact arrays of this process, up to a byte budget (LRU).

    Artifacts are immutable (content-addressed), so a copy from memory equals a read from the store. A stage
    usually reads what the previous one wrote a moment ago in the same worker: the cache spares decoding
    it again. Budget: ``$V2V_ARRAY_CACHE_MB`` (default 512; 0 disables).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.items: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self.size = 0
        self.lock = threading.Lock()

    def get(self, key: str, name: str) -> np.ndarray | None:
        with self.lock:
            arr = self.items.get((key, name))
            if arr is None:
                return None
            self.items.move_to_end((key, name))
            return arr.copy()  # stages may write into their inputs

    def put(self, key: str, name: str, arr: np.ndarray) -> None:
        if arr.nbytes > self.max_bytes:
            return
        with self.lock:
            if (key, name) in self.items:
                return
            self.items[(key, name)] = arr.copy()
            self.size += arr.nbytes
            while self.size > self.max_bytes:
                _, old = self.items.popitem(last=False)
                self.size -= old.nbytes


ARRAYS = ArrayCache(int(float(os.environ.get("V2V_ARRAY_CACHE_MB", "512")) * 2**20))


class CachedStore:
    """The store with reads served from (and writes kept in) :data:`ARRAYS`; everything else delegated."""

    def __init__(self, store: ArtifactStore) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def read(self, ref: Any, names: list[str] | None = None) -> dict[str, np.ndarray]:
        if names is not None:
            hits = {n: ARRAYS.get(ref.key, n) for n in names}
            if all(v is not None for v in hits.values()):
                return hits  # type: ignore[return-value]
        out = self._store.read(ref, names)
        for n, arr in out.items():
            ARRAYS.put(ref.key, n, arr)
        return out

    def write(self, ref: Any, arrays: Mapping[str, np.ndarray], *args: Any, **kwargs: Any) -> Any:
        result = self._store.write(ref, arrays, *args, **kwargs)
        for n, arr in arrays.items():
            ARRAYS.put(ref.key, n, arr)
        return result


_STORES: dict[tuple[str, str], ArtifactStore] = {}


def store_for(url: str, options: dict[str, Any] | None = None) -> ArtifactStore:
    """One store object per process and URL (workers reopen by URL), reading through :data:`ARRAYS`."""
    key = (url, repr(sorted((options or {}).items())))
    if key not in _STORES:
        store = ArtifactStore(url, **(options or {}))
        _STORES[key] = CachedStore(store) if ARRAYS.max_bytes else store  # type: ignore[assignment]
    return _STORES[key]


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


def run_stage(call: Any, store_url: str, store_options: dict[str, Any] | None, device: str,
              externals: dict[str, Any] | None, threads: int | None = None) -> dict[str, Any]:
    """Execute one stage call against the store; returns a small reference (never arrays)."""
    limit_threads(threads)
    t0 = time.perf_counter()
    out = execute(call, store_for(store_url, store_options), externals, device)
    io = time.perf_counter() - t0 - out.seconds  # reading inputs, writing the artifact (or the cache check)
    return {"stage": call.stage, "key": call.key, "cached": out.cached, "seconds": round(out.seconds, 4),
            "io_seconds": round(io, 4), "pid": os.getpid()}


def error_text(exc: BaseException) -> str:
    from stages.base import StageInputError

    if isinstance(exc, StageInputError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


# ---- inline executor: a thread pool, no Prefect ----------------------------------------------------------

class InlineExecutor:
    name = "inline"

    def __init__(self, store: ArtifactStore, device: str, max_workers: int = 1) -> None:
        self.store, self.device = store, device
        self.pool = cf.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="v2v-stage")

    def submit(self, job_id: str, sp: StagePlan, externals: dict[str, Any] | None) -> Any:
        return self.pool.submit(run_stage, sp.call, self.store.url, self.store.storage_options or None,
                                self.device, externals)

    def submit_outputs(self, job_id: str, kwargs: dict[str, Any]) -> Any:
        from flows.outputs import job_outputs

        return self.pool.submit(job_outputs, **kwargs)

    def on_done(self, handle: Any, fn: Callable[[], None]) -> None:
        handle.add_done_callback(lambda _: fn())

    def outcome(self, handle: Any) -> tuple[dict[str, Any] | None, str | None]:
        exc = handle.exception()
        return (handle.result(), None) if exc is None else (None, error_text(exc))

    def close(self) -> None:
        self.pool.shutdown(wait=True)


# ---- the scheduler -----------------------------------------------------------------------------------------

@dataclass
class OutputsConfig:
    """Where and how finished jobs are exported (see :func:`flows.outputs.job_outputs`)."""

    out_root: str
    formats: tuple[str, ...] = ("mp4", "gif", "png")
    restore_source: bool = False


def schedule(plans: list[JobPlan], executor: Executor, store: ArtifactStore, reporter: Reporter | None = None,
             outputs: OutputsConfig | None = None, *, start: float | None = None) -> RunReport:
    """Run every planned stage once per key, each as soon as its upstream stages are done; then each job's
    exports, also on the workers.

    Tasks are submitted when their inputs exist (never with futures as arguments): a worker never waits
    inside a task for another one, so Ray keeps exactly its worker processes busy (a task blocked in
    ``ray.get`` makes Ray start extra workers) and threads never idle on upstream work.
    """
    from flows.outputs import done_refs, record

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
        externals = None
        if sp.status == "run" and sp.externals and plan.externals is not None:
            try:
                externals = plan.externals.arrays(list(sp.externals))
            except Exception as exc:  # unreadable after planning: fails like the stage would
                complete(key, None, error_text(exc))
                return
        item = ("stage", key)
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
            complete(name, ref, error)  # may submit the stages that were waiting for it
            continue
        res = results[name]
        if error is not None:  # an export problem fails this job only
            res.status, res.error = "failed", f"export: {error}"
        else:
            files = dict(ref or {})
            res.outputs_seconds = float(files.pop("_seconds", 0.0))
            res.outputs = files
        close_job(by_id[name])
    order = {p.job_id: i for i, p in enumerate(plans)}
    jobs = sorted(results.values(), key=lambda r: order[r.job_id])
    return RunReport(jobs, time.perf_counter() - start, executor.name)
