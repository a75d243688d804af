"""Where stage calls run: the :class:`Executor` protocol the scheduler drives, the task body every executor
runs (:func:`run_stage`), and the inline executor (a thread pool, no Prefect)."""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from flows.plan.planner import StagePlan
from flows.run.execute import execute
from flows.run.outcomes import TaskOutcome, outcome_of_future
from storage.store import ArtifactStore
from storage.write_behind import store_for


class Executor(Protocol):
    """Runs stage calls: ``submit`` returns a handle, ``on_done`` calls back (any thread) when it finishes,
    ``outcome`` (called once it has) says how it ended: :class:`Done` or a typed :class:`Failed`.

    ``stage_slots``: stage calls in flight at once (None: the runner queues them itself). Exports do not
    take a slot, so a finished job's encoding overlaps the next job's stages."""

    name: str
    stage_slots: int | None

    def submit(self, job_id: str, sp: StagePlan, externals: dict[str, Any] | None) -> Any: ...
    def submit_outputs(self, job_id: str, kwargs: dict[str, Any]) -> Any: ...
    def on_done(self, handle: Any, fn: Callable[[], None]) -> None: ...
    def outcome(self, handle: Any) -> TaskOutcome: ...


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

    def outcome(self, handle: Any) -> TaskOutcome:
        return outcome_of_future(handle)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.exports.shutdown(wait=True)
