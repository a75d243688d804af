"""From a run's parameters (catalog, profile, store, request) to its plans: shared by the API and the flows."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from flows.config.catalog import Catalog
from flows.config.profiles import Profile, load_profile
from flows.config.request import RunRequest, load_catalog_arg
from flows.plan.planner import JobPlan, iter_plans
from storage.store import ArtifactStore, open_store

RequestArg = RunRequest | Mapping[str, Any] | None


def resolve(profile: str | Profile | None, store: str | None, request: RequestArg = None
            ) -> tuple[Profile, ArtifactStore]:
    """The profile with the request applied, and its store."""
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    prof = RunRequest.coerce(request).apply(prof, store)
    return prof, open_store(prof.store)


def prepare_catalog(catalog: str | Path | Catalog | dict[str, Any] | None, profile: str | Profile | None,
                    store: str | None, request: RequestArg = None, on_job: Callable[[JobPlan], None] | None = None
                    ) -> tuple[Profile, ArtifactStore, list[JobPlan], str]:
    """Plan a catalog (or ``request.video``): the profile, the store, one plan per job and the out folder (the
    plans of :func:`stream_catalog`, all made first: tests and small catalogs)."""
    prof, st, _, stream = stream_catalog(catalog, profile, store, request)
    plans = []
    for plan in stream:
        plans.append(plan)
        if on_job:
            on_job(plan)
    return prof, st, plans, prof.out


def stream_catalog(catalog: str | Path | Catalog | dict[str, Any] | None, profile: str | Profile | None,
                   store: str | None, request: RequestArg = None
                   ) -> tuple[Profile, ArtifactStore, int, Iterator[JobPlan]]:
    """The profile, the store, the number of jobs and their plans as a generator: each job is planned when
    the run pulls it, so a run starts computing at once and holds only the plans in flight."""
    req = RunRequest.coerce(request)
    prof, st = resolve(profile, store, req)
    cat = load_catalog_arg(catalog, req)
    return prof, st, len(cat), iter_plans(cat, prof, st, cli_params=req.params, cli_backends=req.backends)
