"""Why a stage is cached, runs or is skipped: typed causes the planner returns and the CLI renders.

Each cause is a small frozen dataclass whose ``str()`` is the line ``v2v plan`` prints, so programs can
match on the type (``isinstance(c, ParamChanged)``) while people read the text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


class Cause:
    """Base of every plan cause."""


@dataclass(frozen=True)
class InStore(Cause):
    def __str__(self) -> str:
        return "artifact in store"


@dataclass(frozen=True)
class New(Cause):
    """The job has never been run with this stage."""

    def __str__(self) -> str:
        return "new"


@dataclass(frozen=True)
class ArtifactMissing(Cause):
    """Same key as the job's last run, but the artifact is not (or no longer) committed."""

    def __str__(self) -> str:
        return "artifact missing (never finished, or removed)"


@dataclass(frozen=True)
class ArtifactDamaged(Cause):
    """The artifact failed verification and was quarantined; it is computed again."""

    what: str

    def __str__(self) -> str:
        return f"artifact damaged ({self.what}): quarantined, recomputing"


@dataclass(frozen=True)
class PreviousGone(Cause):
    """The key changed and the last run's artifact (which would tell what changed) is gone."""

    def __str__(self) -> str:
        return "changed since last run (previous artifact gone)"


@dataclass(frozen=True)
class CodeVersion(Cause):
    old: str
    new: str

    def __str__(self) -> str:
        return f"code version {self.old} -> {self.new}"


@dataclass(frozen=True)
class BackendChanged(Cause):
    old: str
    new: str

    def __str__(self) -> str:
        return f"backend {self.old} -> {self.new}"


@dataclass(frozen=True)
class WeightsChanged(Cause):
    def __str__(self) -> str:
        return "weights changed"


@dataclass(frozen=True)
class ParamChanged(Cause):
    name: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.name}={self.new!r} (was {self.old!r})"


@dataclass(frozen=True)
class InputChanged(Cause):
    name: str

    def __str__(self) -> str:
        return f"input {self.name} changed"


@dataclass(frozen=True)
class Changed(Cause):
    """The key differs but no recorded field tells why (an old key schema, say)."""

    def __str__(self) -> str:
        return "changed"


@dataclass(frozen=True)
class MissingInput(Cause):
    """A skipped stage lacks an input; ``why`` says where it would have come from."""

    name: str
    why: str

    def __str__(self) -> str:
        return f"{self.name} ({self.why})"


def render(causes: Iterable[Cause]) -> str:
    """One line: params grouped as ``params a=1 (was 2), b=...``, inputs as ``input x, y changed``."""
    causes = list(causes)
    parts: list[str] = []
    params = [c for c in causes if isinstance(c, ParamChanged)]
    inputs = [c for c in causes if isinstance(c, InputChanged)]
    missing = [c for c in causes if isinstance(c, MissingInput)]
    for c in causes:
        if isinstance(c, ParamChanged):
            if c is params[0]:
                parts.append("params " + ", ".join(str(p) for p in params[:4])
                             + (f", +{len(params) - 4} more" if len(params) > 4 else ""))
        elif isinstance(c, InputChanged):
            if c is inputs[0]:
                parts.append("input " + ", ".join(i.name for i in inputs) + " changed")
        elif isinstance(c, MissingInput):
            if c is missing[0]:
                parts.append("needs " + ", ".join(str(m) for m in missing))
        else:
            parts.append(str(c))
    return "; ".join(parts)


def diff_causes(old: Mapping[str, Any], *, version: str, backend: str, weights_digest: str,
                params: Mapping[str, Any], inputs: Mapping[str, str]) -> list[Cause]:
    """What differs between a previous artifact's recorded attributes and a new call."""
    out: list[Cause] = []
    if old.get("version") is not None and str(old["version"]) != version:
        out.append(CodeVersion(str(old["version"]), version))
    if old.get("backend") != backend:
        out.append(BackendChanged(str(old.get("backend")), backend))
    if old.get("weights_digest", "") != weights_digest:
        out.append(WeightsChanged())
    old_params = old.get("params", {})
    for k in sorted(set(old_params) | set(params)):
        if old_params.get(k) != params.get(k):
            out.append(ParamChanged(k, old_params.get(k), params.get(k)))
    old_inputs = old.get("inputs", {})
    for n in sorted(set(old_inputs) | set(inputs)):
        if old_inputs.get(n) != inputs.get(n):
            out.append(InputChanged(n))
    return out or [Changed()]
