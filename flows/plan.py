"""Planning: from a job and a profile to the stage calls (with their keys), before anything runs.

The DAG comes from the stage declarations: a stage's used inputs are array names produced by an upstream
stage's outputs or supplied by the job (externals). A stage whose inputs cannot be satisfied for a job is
skipped (with the reason). Every key is known up front, so ``v2v plan`` says per stage "cached" or "run"
and why, and the flows hand Prefect the very key the store uses.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from flows.catalog import EDIT_MODE_INPUTS, Catalog, Job, RowError
from flows.execute import StageCall, Upstream, make_call
from flows.externals import JobExternals
from flows.profiles import Profile
from stages import PIPELINE, available_stages
from stages.base import Stage, StageInputError
from storage.store import ArtifactNotFound, ArtifactRef, ArtifactStore

Status = Literal["cached", "run", "skip"]
CANVAS_FIELDS = ("canvas", "width", "height")


@dataclass
class StagePlan:
    stage: str
    status: Status
    reason: str
    call: StageCall | None = None
    upstream: tuple[str, ...] = ()  # stages of this job it reads
    externals: tuple[str, ...] = ()  # job arrays it reads
    gpu: bool = False

    @property
    def key(self) -> str:
        return self.call.key if self.call else ""


@dataclass
class JobPlan:
    job_id: str
    job: Job | None
    stages: dict[str, StagePlan] = field(default_factory=dict)
    error: str | None = None
    externals: JobExternals | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_run(self) -> list[str]:
        return [s for s, p in self.stages.items() if p.status == "run"]

    def refs(self) -> dict[str, ArtifactRef]:
        return {s: p.call.ref for s, p in self.stages.items() if p.call is not None}

    def descendants(self, stage: str) -> set[str]:
        out = {stage}
        for name, p in self.stages.items():  # stages are in topological order
            if out & set(p.upstream):
                out.add(name)
        return out


# ---- the stage graph ----------------------------------------------------------------------------------

def ordered_stages(stages: Mapping[str, Stage] | None = None) -> dict[str, Stage]:
    """Available stages in dependency order (PIPELINE order breaks ties)."""
    stages = dict(stages if stages is not None else available_stages())
    producer = {out: name for name, st in stages.items() for out in st.outputs}
    deps = {name: {producer[i] for i in st.inputs if i in producer and producer[i] != name}
            for name, st in stages.items()}
    rank = {n: i for i, n in enumerate(PIPELINE)}
    order: list[str] = []
    pending = sorted(stages, key=lambda n: rank.get(n, len(rank)))
    while pending:
        ready = [n for n in pending if deps[n] <= set(order)]
        if not ready:
            raise RuntimeError(f"stage declarations form a cycle among {pending}")
        order.append(ready[0])
        pending.remove(ready[0])
    return {n: stages[n] for n in order}


# ---- parameters and backends ---------------------------------------------------------------------------

# Backends that ignore the job-level prompt/seed/instruction although their stage has such fields: giving
# them those values would only change their keys (and re-run everything downstream) for identical output.
IGNORES_JOB_TEXT = {("edit", "provided")}


def _param_layers(stage: Stage, job: Job, profile: Profile, cli_params: Mapping[str, Mapping[str, Any]],
                  backend: str | None = None) -> tuple[dict[str, Any], set[str]]:
    """Merged parameter overrides (profile < job-level < row < CLI) and the keys set explicitly."""
    fields = set(stage.params.model_fields)
    merged: dict[str, Any] = dict(profile.params.get(stage.name, {}))
    if (stage.name, backend) not in IGNORES_JOB_TEXT:
        merged.update({k: v for k, v in job.common_params().items() if k in fields})
    row = dict(job.params.get(stage.name, {}))
    cli = dict(cli_params.get(stage.name, {}))
    merged.update(row)
    merged.update(cli)
    explicit = set(profile.params.get(stage.name, {})) | set(row) | set(cli)
    return merged, explicit


# Arrays that exist only when the user gave them (a mask for the source, the edited shape). A backend that
# reads one is the user's explicit choice of data, so ``auto`` prefers it when the job supplies it.
USER_INPUTS = ("provided_masks", "provided_shape")


def _candidates(stage: Stage, choice: str, profile: Profile) -> list[str]:
    """Backends to try, best first. ``auto``: backends reading user-given masks (the default first), then
    learned ones whose weights are present, then the offline default, then other weight-free backends;
    the planner takes the first whose inputs the job can satisfy."""
    if choice != "auto":
        return [choice]
    names = sorted(stage.backends, key=lambda n: n != stage.default_backend)  # default first, stable
    user = [n for n in names if set(stage.used_inputs(n)) & set(USER_INPUTS)
            and (not stage.backends[n].needs_weights or profile.has_weights(n))]
    learned = [n for n in names if stage.backends[n].needs_weights and profile.has_weights(n)]
    offline = [n for n in names if not stage.backends[n].needs_weights]
    return list(dict.fromkeys(user + learned + offline))


def _backend_choice(stage: Stage, job: Job, profile: Profile, cli_backends: Mapping[str, str]) -> str:
    if stage.name in cli_backends:
        return cli_backends[stage.name]
    if stage.name == "edit":
        return _edit_backend(stage, job)
    return job.backends.get(stage.name) or profile.backends.get(stage.name) or "auto"


def _edit_backend(stage: Stage, job: Job) -> str:
    """The edit backend of the job's mode; by the external it reads when the name differs."""
    name = job.edit_backend
    if name in stage.backends:
        return name
    wanted = EDIT_MODE_INPUTS.get(job.mode or "")
    for bname, be in stage.backends.items():
        if wanted and be.uses is not None and wanted in be.uses:
            return bname
    raise StageInputError(f"edit mode {job.mode!r}: the edit stage has no backend {name!r} "
                          f"(backends: {sorted(stage.backends)})")


# ---- why a stage must run --------------------------------------------------------------------------------

def _why(store: ArtifactStore, stage: str, call: StageCall, previous: Mapping[str, str]) -> str:
    prev_key = previous.get(stage)
    if prev_key is None:
        return "new"
    if prev_key == call.key:
        return "artifact missing (never finished, or removed)"
    try:
        old = store.attrs(ArtifactRef(stage, prev_key))
    except (ArtifactNotFound, Exception):
        return "changed since last run (previous artifact gone)"
    reasons = []
    if old.get("version") is not None and str(old.get("version")) != _stage_version(stage):
        reasons.append(f"code version {old.get('version')} -> {_stage_version(stage)}")
    if old.get("backend") != call.backend:
        reasons.append(f"backend {old.get('backend')} -> {call.backend}")
    if old.get("weights_digest", "") != call.weights_digest:
        reasons.append("weights changed")
    old_params = old.get("params", {})
    diff = sorted(k for k in set(old_params) | set(call.params) if old_params.get(k) != call.params.get(k))
    if diff:
        reasons.append("params " + ", ".join(f"{k}={call.params.get(k)!r} (was {old_params.get(k)!r})"
                                             for k in diff[:4]))
    old_inputs = old.get("inputs", {})
    new_inputs = call.input_keys()
    changed = sorted(n for n in set(old_inputs) | set(new_inputs) if old_inputs.get(n) != new_inputs.get(n))
    if changed:
        reasons.append("input " + ", ".join(changed) + " changed")
    return "; ".join(reasons) or "changed"


def _stage_version(stage: str) -> str:
    from stages import get_stage

    return get_stage(stage).version


# ---- planning -------------------------------------------------------------------------------------------

def plan_job(job: Job, profile: Profile, store: ArtifactStore, *, stages: Mapping[str, Stage] | None = None,
             cli_params: Mapping[str, Mapping[str, Any]] | None = None,
             cli_backends: Mapping[str, str] | None = None) -> JobPlan:
    """Plan one job; a user error (bad parameter, unreadable file, missing weights) goes into ``error``."""
    cli_params, cli_backends = cli_params or {}, cli_backends or {}
    plan = JobPlan(job.id, job)
    try:
        _plan_stages(plan, job, profile, store, ordered_stages(stages), cli_params, cli_backends)
    except StageInputError as exc:
        plan.error = str(exc)
    except (OSError, ValueError) as exc:
        plan.error = f"{type(exc).__name__}: {exc}"
    return plan


def _plan_stages(plan: JobPlan, job: Job, profile: Profile, store: ArtifactStore, stages: dict[str, Stage],
                 cli_params: Mapping[str, Mapping[str, Any]], cli_backends: Mapping[str, str]) -> None:
    known = set(PIPELINE) | set(stages)
    for where, names in (("params", job.params), ("backends", job.backends), ("profile params", profile.params),
                         ("profile backends", profile.backends), ("--set", cli_params),
                         ("--backend", cli_backends)):
        unknown = sorted(set(names) - known)
        if unknown:
            raise StageInputError(f"{where}: unknown stage(s) {unknown}; stages are {list(PIPELINE)}")
    if "ingest" not in stages:
        raise StageInputError("no ingest stage available")
    previous: dict[str, str] = {}
    try:
        previous = dict(store.job(job.id).get("artifacts", {}))
    except (ArtifactNotFound, ValueError):
        pass
    ingest_over, _ = _param_layers(stages["ingest"], job, profile, cli_params)
    ingest_params = stages["ingest"].resolve_params(ingest_over).model_dump(mode="json")
    ext = JobExternals(job, ingest_params, store)
    plan.externals = ext
    available_ext = ext.names()
    produced: dict[str, str] = {}  # array name -> stage of this job producing it
    for name, stage in stages.items():
        choice = _backend_choice(stage, job, profile, cli_backends)
        if choice != "auto" and choice not in stage.backends:
            raise StageInputError(f"stage {name!r} has no backend {choice!r}; choose one of "
                                  f"{sorted(stage.backends)} or 'auto'")
        chosen, missing = None, []
        for cand in _candidates(stage, choice, profile):
            need = stage.used_inputs(cand)
            missing = [i for i in need if i not in produced and i not in available_ext]
            if not missing:
                chosen = cand
                break
        if chosen is None:
            plan.stages[name] = StagePlan(name, "skip", _skip_reason(name, missing, stages, plan))
            continue
        be = stage.backend(chosen)
        weights = profile.weights_for(chosen) if be.needs_weights or be.load else None
        if be.needs_weights and not weights:
            raise StageInputError(f"stage {name!r}: backend {chosen!r} needs weights; set weights.{chosen} in the "
                                  f"profile (or `v2v models fetch {chosen}`), or choose another backend")
        if weights and not os.path.exists(weights):
            raise StageInputError(f"stage {name!r}: weights for {chosen!r} not found: {weights}")
        overrides, explicit = _param_layers(stage, job, profile, cli_params, chosen)
        if name != "ingest":
            for f in CANVAS_FIELDS:  # stages that place images on the canvas use ingest's canvas
                if f in stage.params.model_fields and f in ingest_params:
                    if f in explicit and overrides[f] != ingest_params[f]:
                        raise StageInputError(f"stage {name!r}: {f}={overrides[f]!r} differs from the ingest "
                                              f"canvas ({f}={ingest_params[f]!r}); set it on ingest instead")
                    overrides[f] = ingest_params[f]
        inputs: dict[str, Upstream | str] = {}
        upstream: list[str] = []
        ext_used: list[str] = []
        for i in stage.used_inputs(chosen):
            if i in produced:
                src = plan.stages[produced[i]]
                inputs[i] = Upstream(src.stage, src.key)
                upstream.append(src.stage)
            else:
                inputs[i] = ext.digest(i)
                ext_used.append(i)
        call = make_call(stage, params=overrides, backend=chosen, inputs=inputs, weights=weights)
        if store.exists(call.ref):
            status: Status = "cached"
            reason = "artifact in store"
        else:
            status, reason = "run", _why(store, name, call, previous)
        plan.stages[name] = StagePlan(name, status, reason, call, tuple(dict.fromkeys(upstream)), tuple(ext_used),
                                      gpu=be.gpu)
        for out in stage.outputs:
            if name == "ingest" and out == "provided_masks" and not _has_masks(ext):
                continue
            produced[out] = name


def _has_masks(ext: JobExternals) -> bool:
    if ext.has_masks is None:
        ext.source_digests()
    return bool(ext.has_masks)


def _skip_reason(name: str, missing: list[str], stages: Mapping[str, Stage], plan: JobPlan) -> str:
    parts = []
    for m in missing:
        producer = next((s for s, st in stages.items() if m in st.outputs), None)
        if producer and plan.stages.get(producer) and plan.stages[producer].status == "skip":
            parts.append(f"{m} (stage {producer} skipped)")
        elif m == "provided_masks":
            parts.append("provided_masks (give masks in the catalog row, or choose another backend)")
        elif producer:
            parts.append(f"{m} (not produced for this job)")
        else:
            parts.append(f"{m} (no stage produces it and the job does not give it)")
    return "needs " + ", ".join(parts)


def plan_catalog(catalog: Catalog, profile: Profile, store: ArtifactStore, *,
                 stages: Mapping[str, Stage] | None = None,
                 cli_params: Mapping[str, Mapping[str, Any]] | None = None,
                 cli_backends: Mapping[str, str] | None = None,
                 on_job: Any = None) -> list[JobPlan]:
    """Plan every job; rows that failed validation become failed plans with their reason."""
    ordered = ordered_stages(stages)
    plans = []
    for entry in catalog.entries:
        if isinstance(entry, RowError):
            plan = JobPlan(entry.job_id, None, error=str(entry))
        else:
            plan = plan_job(entry, profile, store, stages=ordered, cli_params=cli_params,
                            cli_backends=cli_backends)
        plans.append(plan)
        if on_job:
            on_job(plan)
    return plans
