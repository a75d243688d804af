"""What an executor reports for one task: :class:`Done` with its small reference, or :class:`Failed` with a kind.

The kind says what went wrong without parsing the message; the message is the user-facing text (a bad
input's own one-line reason, a commit failure's "store: ..." line, or ``Type: text`` for anything else).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from storage.write_behind import CommitError


class FailureKind(enum.Enum):
    INPUT = "input"  # a bad input or parameter (StageInputError): fix the catalog row, not the code
    STORE = "store"  # an artifact could not be committed or read back (CommitError)
    EXPORT = "export"  # the job's video files or contact sheet could not be written
    BLOCKED = "blocked"  # an upstream stage failed: this one never ran
    DAMAGED = "damaged"  # an input artifact failed its checksums: quarantined, its stage runs again
    INTERNAL = "internal"  # any other exception: a bug, or the environment (memory, a lost worker)


@dataclass(frozen=True)
class Done:
    ref: dict[str, Any]  # run_stage's reference (stage, key, cached, seconds, ...) or an export's files


@dataclass(frozen=True)
class Failed:
    kind: FailureKind
    message: str
    damaged: str | None = None  # DAMAGED: the key of the input artifact that was quarantined


class UpstreamDamaged(RuntimeError):
    """A stage's input artifact failed verification on read; it was quarantined (its key is ``key``)."""

    def __init__(self, stage: str, key: str, what: str) -> None:
        super().__init__(stage, key, what)
        self.stage, self.key, self.what = stage, key, what

    def __str__(self) -> str:
        return f"input artifact {self.stage}/{self.key[:12]} damaged ({self.what}): quarantined"


TaskOutcome = Done | Failed

BLOCKED = Failed(FailureKind.BLOCKED, "an upstream stage failed")


def failure_of(exc: BaseException) -> Failed:
    """The typed failure for an exception a task raised (its text as the run summary shows it)."""
    from stages.base import StageInputError

    if isinstance(exc, UpstreamDamaged):
        return Failed(FailureKind.DAMAGED, str(exc), damaged=exc.key)
    if isinstance(exc, StageInputError):
        return Failed(FailureKind.INPUT, str(exc))
    if isinstance(exc, CommitError):
        return Failed(FailureKind.STORE, str(exc))
    return Failed(FailureKind.INTERNAL, f"{type(exc).__name__}: {exc}")


def outcome_of_future(future: Any) -> TaskOutcome:
    """A finished ``concurrent.futures.Future``'s outcome (executors running tasks on threads)."""
    exc = future.exception()
    return Done(future.result()) if exc is None else failure_of(exc)
