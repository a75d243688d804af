"""Which backend a stage takes for a job: the candidates best first, the weights they need (checked before any
compute), and whether a backend can take the job's canvas. Pure functions of the stage declarations, the
profile and the job's paths: the planner caches their answers per catalog."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flows.config.catalog import Job
from flows.config.profiles import Profile
from stages.base import Stage, StageInputError

# Arrays that exist only when the user gave them (a mask for the source, the edited shape). A backend that
# reads one is the user's explicit choice of data, so ``auto`` prefers it when the job supplies it.
USER_INPUTS = ("provided_masks", "provided_shape")


def job_facts(job: Job) -> set[str]:
    """Facts about the job's own data that backends may prefer (``Backend.preferred_when``), from its paths."""
    from stages.ingest import davis_masks

    facts: set[str] = set()
    masks = Path(job.masks) if job.masks else davis_masks(Path(job.source))
    if masks is not None and masks.is_dir() and sum(1 for p in masks.iterdir() if p.is_file()) > 1:
        facts.add("per_frame_masks")
    return facts


def candidates(stage: Stage, choice: str, profile: Profile, facts: set[str] | None = None) -> list[str]:
    """Backends to try, best first. ``auto``: backends reading user-given masks (the default first), then
    learned ones whose weights are present, then the offline default, then other weight-free backends;
    the planner takes the first whose inputs the job can satisfy."""
    if choice != "auto":
        return [choice]
    names = sorted(stage.backends, key=lambda n: n != stage.default_backend)  # default first, stable
    preferred = [n for n in names if stage.backends[n].preferred_when in (facts or set())]
    names = preferred + [n for n in names if n not in preferred]
    user = [n for n in names if set(stage.used_inputs(n)) & set(USER_INPUTS)
            and (not stage.backends[n].needs_weights or profile.has_weights(n))]
    learned = [n for n in names if stage.backends[n].needs_weights and profile.has_weights(n)]
    offline = [n for n in names if not stage.backends[n].needs_weights]
    return list(dict.fromkeys(user + learned + offline))


def checked_weights(stage: Stage, backend: str, profile: Profile) -> str | None:
    """The backend's weights path, checked before any compute (present, and in its published layout)."""
    be = stage.backend(backend)
    weights = profile.weights_for(backend) if be.needs_weights or be.load else None
    if be.needs_weights and not weights:
        from stages.models import fetchable

        how = f"`v2v models fetch {backend}`, " if fetchable(backend) else ""
        raise StageInputError(f"stage {stage.name!r}: backend {backend!r} needs weights: set weights.{backend} in "
                              f"the profile or --weights {backend}=PATH ({how}or choose another backend)")
    if weights and not os.path.exists(weights):
        raise StageInputError(f"stage {stage.name!r}: weights for {backend!r} not found: {weights}")
    if weights:
        from stages.models import check_weights

        problems = check_weights(stage.name, backend, weights)
        if problems:
            raise StageInputError(f"stage {stage.name!r}: weights for {backend!r} at {weights} are incomplete or "
                                  f"not the published layout: {'; '.join(problems[:3])}"
                                  + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""))
    return weights



def beyond_canvas(stage: Stage, backend: str, source_params: Mapping[str, Any]) -> str | None:
    """Why ``backend`` cannot take the job's canvas (its ``max_canvas``), or None."""
    limit = stage.backend(backend).max_canvas
    w, h = source_params.get("width"), source_params.get("height")
    if limit is None or not w or not h or max(w, h) <= limit:
        return None
    return (f"stage {stage.name!r} ({backend}): the canvas {w}x{h} is beyond what this backend takes ({limit} px "
            f"a side); use a smaller canvas (ingest width/height) or the offline backend {stage.default_backend!r}")


