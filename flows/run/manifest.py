"""A finished job's record in the store: which artifact each stage used, its status and its exported files."""

from __future__ import annotations

import errno
from typing import Any

from flows.plan.planner import JobPlan
from flows.run.results import JobResult
from storage.store import ArtifactRef, ArtifactStore


def record(store: ArtifactStore, plan: JobPlan, result: JobResult) -> None:
    """The job's manifest in the store: which artifact each stage uses (views, gc, inspect), status, outputs."""
    done = done_refs(plan, result)
    extra: dict[str, Any] = {"status": result.status, "error": result.error, "outputs": result.outputs,
                             "stages": {s: {"status": r.status, "seconds": r.seconds, "error": r.error}
                                        for s, r in result.stages.items()}}
    if plan.job is not None:
        extra.update({"source": str(plan.job.source), "mode": plan.job.mode, "prompt": plan.job.prompt})
    try:
        store.record_job(plan.job_id, done, extra)
    except OSError as exc:  # a read-only store still serves cached runs: their manifest is already there
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise


def done_refs(plan: JobPlan, result: JobResult) -> dict[str, ArtifactRef]:
    """The artifacts of the job's stages that finished (computed, or found in the store)."""
    return {s: plan.stages[s].call.ref for s, r in result.stages.items()  # type: ignore[union-attr]
            if r.status in ("computed", "cached") and plan.stages[s].call is not None}
