"""What a run reports: one :class:`StageResult` per stage of a job, a :class:`JobResult` per job, the
:class:`RunReport`; and the :class:`Reporter` that sees them as they come (the CLI's progress bars)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from flows.plan.planner import JobPlan
from flows.run.outcomes import FailureKind


@dataclass(slots=True)  # one per stage of every job of a run: kept small
class StageResult:
    stage: str
    status: str  # computed | cached | failed | skipped | blocked
    seconds: float = 0.0
    error: str | None = None
    pid: int | None = None  # the worker process that ran it
    io_seconds: float = 0.0  # store reads and the artifact write around the computation
    failure: FailureKind | None = None  # failed or blocked: what kind of failure


@dataclass(slots=True)
class JobResult:
    job_id: str
    status: str = "pending"  # done | cached | failed
    seconds: float = 0.0  # wall time from the run's start to this job's end
    compute_seconds: float = 0.0
    outputs_seconds: float = 0.0  # exporting the video and the contact sheet
    stages: dict[str, StageResult] = field(default_factory=dict)
    error: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    failure: FailureKind | None = None  # failed: the kind of the failure ``error`` describes
    notes: list[str] = field(default_factory=list)  # what the run did about trouble (a damaged artifact redone)

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
                 "reason": j.error or "; ".join(j.notes)} for j in self.jobs]


class Reporter(Protocol):
    """Sees a run as it goes: ``start`` with the catalog's job count (None: not known), each job once it is
    planned (plans stream in while the first jobs compute), each stage's and each job's end."""

    def start(self, total: int | None) -> None: ...
    def job_planned(self, plan: JobPlan) -> None: ...
    def stage_done(self, job_id: str, result: StageResult) -> None: ...
    def job_done(self, result: JobResult) -> None: ...


class NullReporter:
    def start(self, total: int | None) -> None: ...
    def job_planned(self, plan: JobPlan) -> None: ...
    def stage_done(self, job_id: str, result: StageResult) -> None: ...
    def job_done(self, result: JobResult) -> None: ...
