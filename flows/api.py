"""v2v's Python API: plan and run catalogs. The CLI, the tests and the benches call these.

``run_catalog`` plans the jobs (every key known before its job runs, cheap thanks to the fingerprint index),
streamed into the run (``keep_plans=False``, what ``v2v run`` does) or all first (the default: tests), then:

* nothing to run: finalise in-process and return, without starting Prefect (a cached re-run of a catalog
  costs a few milliseconds per job);
* work to do: run the ``edit_catalog`` (or ``edit_video``) Prefect flow with the run's parameters alone (the
  flow plans again inside itself, so a deployment runs exactly what ``v2v run`` runs), or the inline thread
  executor with ``orchestrator="inline"`` (no Prefect at all).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from flows.config.catalog import Catalog
from flows.config.profiles import Profile
from flows.config.request import RunRequest, catalog_payload, load_catalog_arg
from flows.exports.outputs import OutputsConfig
from flows.plan.planner import JobPlan
from flows.plan.run_plan import RequestArg, prepare_catalog, resolve, stream_catalog
from flows.run.executors import InlineExecutor
from flows.run.lease import run_lease
from flows.run.results import Reporter, RunReport
from flows.run.scheduler import schedule
from storage.store import ArtifactStore, open_store

Orchestrator = Literal["prefect", "inline"]


def run_inline(plans: Iterable[JobPlan], profile: Profile, store: ArtifactStore, reporter: Reporter | None = None,
               start: float | None = None, *, total: int | None = None) -> RunReport:
    """Run plans (a list, or a generator pulled as the run goes) on the inline thread executor."""
    executor = InlineExecutor(store, profile.device, profile.runner.max_workers)
    try:
        with run_lease(store) as lease:
            return schedule(plans, executor, store, reporter, OutputsConfig.of(profile), start=start,
                            window=profile.runner.plan_ahead, total=total, lease=lease)
    finally:
        executor.close()


def run_planned(plans: list[JobPlan], profile: Profile, store: ArtifactStore, catalog: Any,
                request: RequestArg = None, *, orchestrator: Orchestrator = "prefect",
                reporter: Reporter | None = None, start: float | None = None,
                skip_when_cached: bool = True) -> RunReport:
    """Run what ``prepare_catalog`` planned: in-process when nothing is to run or ``inline``, else the
    Prefect flow with the run's parameters (``skip_when_cached=False`` takes the flow even then: tests use it
    to show that Prefect adds no compute)."""
    start = start if start is not None else time.perf_counter()
    req = RunRequest.coerce(request)
    work = any(p.ok and p.to_run() for p in plans) or not skip_when_cached
    if not work or orchestrator == "inline":
        report = run_inline(plans, profile, store, reporter, start)
        report.orchestrator = "none (all cached)" if not work else "inline"
        return report
    return _run_flow(profile, store, catalog, req, reporter, start)


def _run_flow(profile: Profile, store: ArtifactStore, catalog: Any, req: RunRequest, reporter: Reporter | None,
              start: float) -> RunReport:
    """The Prefect flow with the run's parameters alone: it plans (streams) the catalog again inside itself."""
    from flows.orchestrate.prefect_flows import run_flow

    if req.video is not None:
        params: dict[str, Any] = {"video": req.video.source, "prompt": req.video.prompt}
        name = "edit_video"
    else:
        cat = catalog if isinstance(catalog, str | Path) else load_catalog_arg(catalog, req)
        params, name = {"catalog": catalog_payload(cat) if isinstance(cat, Catalog) else str(cat)}, "edit_catalog"
    report = run_flow(name, {**params, "profile": profile, "store": store.url, "request": req}, profile, reporter)
    report.wall_seconds = time.perf_counter() - start
    return report


def run_catalog(catalog: str | Path | Catalog | None, *, profile: str | Profile | None = None,
                store: str | None = None, request: RequestArg = None, orchestrator: Orchestrator = "prefect",
                reporter: Reporter | None = None, on_job: Callable[[JobPlan], None] | None = None,
                skip_when_cached: bool = True, keep_plans: bool = True) -> tuple[RunReport, list[JobPlan]]:
    """Plan and run a catalog (or ``request.video``); returns the report and the plans.

    ``keep_plans=False`` (``v2v run``): the plans stream into the run as they are made, the first stages
    compute while the rest of the catalog is planned, and memory holds only the jobs in flight; the list
    returned is then empty. With Prefect, this process plans only until it finds work (nothing to do: no
    Prefect at all); the flow then plans the catalog itself."""
    start = time.perf_counter()
    if keep_plans:
        prof, st, plans, _ = prepare_catalog(catalog, profile, store, request, on_job)
        report = run_planned(plans, prof, st, catalog, request, orchestrator=orchestrator, reporter=reporter,
                             start=start, skip_when_cached=skip_when_cached)
        return report, plans
    req = RunRequest.coerce(request)
    prof, st, total, stream = stream_catalog(catalog, profile, store, req)
    if on_job is not None:
        stream = _tapped(stream, on_job)
    if orchestrator == "inline":
        report = run_inline(stream, prof, st, reporter, start, total=total)
        report.orchestrator = "inline"
        return report, []
    head: list[JobPlan] = []
    if skip_when_cached:
        for plan in stream:
            head.append(plan)
            if plan.ok and plan.to_run():
                break
        else:  # every job cached or refused: finalise here, no Prefect
            report = run_inline(head, prof, st, reporter, start, total=total)
            report.orchestrator = "none (all cached)"
            return report, []
    del head, stream  # the flow plans the catalog again (the jobs planned here are cheap to plan twice)
    return _run_flow(prof, st, catalog, req, reporter, start), []


def _tapped(plans: Iterator[JobPlan], on_job: Callable[[JobPlan], None]) -> Iterator[JobPlan]:
    for plan in plans:
        on_job(plan)
        yield plan


__all__ = ["open_store", "prepare_catalog", "resolve", "run_catalog", "run_inline", "stream_catalog", "RunRequest"]
