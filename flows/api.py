"""The one entry point behind ``v2v run``/``edit``, the Prefect flows, the tests and the benchmark.

``run_catalog`` plans every job (keys known up front, cheap thanks to the fingerprint index), then:

* nothing to run: finalise in-process and return, without starting Prefect (a cached re-run of a catalog
  costs a few milliseconds per job);
* work to do: run the ``edit_catalog`` Prefect flow on the profile's task runner (threads or Ray), or the
  inline thread executor with ``orchestrator="inline"`` (no Prefect at all).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from flows.config.catalog import Catalog, load_catalog, single_job
from flows.config.profiles import Profile, load_profile
from flows.plan.planner import JobPlan, plan_catalog
from flows.run.engine import InlineExecutor, OutputsConfig, Reporter, RunReport, schedule
from storage.store import ArtifactStore, open_store

Orchestrator = Literal["prefect", "inline"]


def resolve(profile: str | Profile | None, store: str | None, overrides: Mapping[str, Any] | None
            ) -> tuple[Profile, ArtifactStore]:
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    ov = dict(overrides or {})
    prof = prof.with_overrides(store=store, device=ov.get("device"), runner=ov.get("runner"),
                               workers=ov.get("workers"), ray_address=ov.get("ray_address"),
                               weights=ov.get("weights"))
    if ov.get("out"):
        prof = prof.model_copy(update={"out": str(ov["out"])})
    return prof, open_store(prof.store)


def load_jobs(catalog: str | Path | Catalog | None, overrides: Mapping[str, Any] | None) -> Catalog:
    if isinstance(catalog, Catalog):
        return catalog
    single = (overrides or {}).get("_single")
    if single:
        fields = dict(single)
        return single_job(fields.pop("source"), prompt=fields.pop("prompt", ""), **fields)
    if catalog is None:
        raise ValueError("no catalog given")
    return load_catalog(catalog)


def prepare_catalog(catalog: str | Path | Catalog | None, profile: str | Profile | None, store: str | None,
                    overrides: Mapping[str, Any] | None = None, on_job: Callable[[JobPlan], None] | None = None
                    ) -> tuple[Profile, ArtifactStore, list[JobPlan], str]:
    ov = dict(overrides or {})
    prof, st = resolve(profile, store, ov)
    cat = load_jobs(catalog, ov)
    plans = plan_catalog(cat, prof, st, cli_params=ov.get("params"), cli_backends=ov.get("backends"),
                         on_job=on_job)
    return prof, st, plans, prof.out


def outputs_config(profile: Profile, out: str | Path | None) -> OutputsConfig:
    return OutputsConfig(str(Path(out or profile.out).resolve()), tuple(profile.formats), profile.restore_source)


def run_plans(plans: list[JobPlan], profile: Profile, store: ArtifactStore, *, out: str | Path | None = None,
              orchestrator: Orchestrator = "prefect", reporter: Reporter | None = None,
              start: float | None = None, flow_params: Mapping[str, Any] | None = None,
              skip_when_cached: bool = True) -> RunReport:
    """Run planned jobs. ``skip_when_cached=False`` goes through the Prefect flow even when every stage is
    cached (the tasks then return at once; tests use it to show Prefect adds no compute)."""
    start = start if start is not None else time.perf_counter()
    out_root = Path(out or profile.out)
    work = any(p.ok and p.to_run() for p in plans) or not skip_when_cached
    if not work or orchestrator == "inline":
        executor = InlineExecutor(store, profile.device, profile.runner.max_workers)
        try:
            report = schedule(plans, executor, store, reporter, outputs_config(profile, out_root), start=start)
        finally:
            executor.close()
        report.orchestrator = "none (all cached)" if not work else "inline"
        return report
    from flows.orchestrate import prefect_flows as pipeline

    token = pipeline.prepare(plans, reporter)
    pipeline._PREPARED[token].update(profile=profile, store=store, out=str(out_root), start=start)
    fp = dict(flow_params or {})
    flow_name = fp.pop("flow", "edit_catalog")  # edit_video for one clip (v2v edit)
    base = {"catalog": "-"} if flow_name == "edit_catalog" else {}
    params = {**base, "profile": profile.name, "store": store.url, **fp, "prepared": token}
    report = pipeline.run_flow(flow_name, params, profile)
    report.wall_seconds = time.perf_counter() - start
    return report


def run_catalog(catalog: str | Path | Catalog | None, *, profile: str | Profile | None = None,
                store: str | None = None, overrides: Mapping[str, Any] | None = None,
                orchestrator: Orchestrator = "prefect", reporter: Reporter | None = None,
                on_job: Callable[[JobPlan], None] | None = None, skip_when_cached: bool = True
                ) -> tuple[RunReport, list[JobPlan]]:
    """Plan and run a catalog (or, with ``overrides['_single']``, one video); returns the report and plans."""
    start = time.perf_counter()
    prof, st, plans, out = prepare_catalog(catalog, profile, store, overrides, on_job)
    name = str(catalog) if isinstance(catalog, str | Path) else "adhoc"
    report = run_plans(plans, prof, st, out=out, orchestrator=orchestrator, reporter=reporter, start=start,
                       flow_params={"catalog": name}, skip_when_cached=skip_when_cached)
    return report, plans


__all__ = ["open_store", "prepare_catalog", "run_catalog", "run_plans"]
