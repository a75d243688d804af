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
from pathlib import Path
from typing import Any, Literal

from flows.config.catalog import Catalog, Job, RowError
from flows.config.profiles import Profile
from flows.plan import causes as cz
from flows.plan.calls import StageCall, Upstream, make_call
from flows.plan.externals import SOURCE_ARRAYS, JobExternals, flush_indexes
from stages import DELIVERABLE, PIPELINE, available_stages
from stages.base import Stage, StageInputError
from storage.store import ArtifactNotFound, ArtifactRef, ArtifactStore

Status = Literal["cached", "run", "skip"]


@dataclass
class StagePlan:
    stage: str
    status: Status
    causes: tuple[cz.Cause, ...]  # why it is cached, runs or is skipped
    call: StageCall | None = None
    upstream: tuple[str, ...] = ()  # stages of this job it reads
    externals: tuple[str, ...] = ()  # job arrays it reads
    gpu: bool = False

    @property
    def key(self) -> str:
        return self.call.key if self.call else ""

    @property
    def reason(self) -> str:
        return cz.render(self.causes)


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

def _param_layers(stage: Stage, job: Job, profile: Profile, cli_params: Mapping[str, Mapping[str, Any]],
                  ) -> tuple[dict[str, Any], set[str]]:
    """Merged parameter overrides (profile < job-level < row < CLI) and the keys set explicitly.

    Job texts (prompt, seed, ...) go to every stage with such a field; only backends that read them get
    them in their key (``Stage.key_params``)."""
    fields = set(stage.params.model_fields)
    merged: dict[str, Any] = dict(profile.params.get(stage.name, {}))
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


def job_facts(job: Job) -> set[str]:
    """Facts about the job's own data that backends may prefer (``Backend.preferred_when``), from its paths."""
    from stages.ingest import davis_masks

    facts: set[str] = set()
    masks = Path(job.masks) if job.masks else davis_masks(Path(job.source))
    if masks is not None and masks.is_dir() and sum(1 for p in masks.iterdir() if p.is_file()) > 1:
        facts.add("per_frame_masks")
    return facts


def _candidates(stage: Stage, choice: str, profile: Profile, facts: set[str] | None = None) -> list[str]:
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


def _backend_choice(stage: Stage, job: Job, profile: Profile, cli_backends: Mapping[str, str]) -> str:
    if stage.name in cli_backends:
        return cli_backends[stage.name]
    return job.stage_backends().get(stage.name) or profile.backends.get(stage.name) or "auto"


def _checked_weights(stage: Stage, backend: str, profile: Profile) -> str | None:
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


# ---- why a stage must run --------------------------------------------------------------------------------

def _why(store: ArtifactStore, stage: Stage, call: StageCall, previous: Mapping[str, str]) -> list[cz.Cause]:
    prev_key = previous.get(stage.name)
    if prev_key is None:
        return [cz.New()]
    if prev_key == call.key:
        return [cz.ArtifactMissing()]
    try:
        old = store.attrs(ArtifactRef(stage.name, prev_key))
    except Exception:  # gone, unreadable or damaged: it cannot tell what changed
        return [cz.PreviousGone()]
    return cz.diff_causes(old, version=stage.code_version(call.backend), backend=call.backend,
                          weights_digest=call.weights_digest, params=call.key_params, inputs=call.input_keys())


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
    previous: dict[str, str] = {}
    try:
        previous = dict(store.job(job.id).get("artifacts", {}))
    except (ArtifactNotFound, ValueError):  # none, or a damaged manifest (DocumentDamaged): rewritten at the end
        pass
    source_stage = next((st for st in stages.values() if set(st.inputs) & set(SOURCE_ARRAYS)), None)
    if source_stage is None:
        raise StageInputError("no stage reads the source clip")
    source_over, _ = _param_layers(source_stage, job, profile, cli_params)
    source_params = source_stage.resolve_params(source_over).model_dump(mode="json")
    ext = JobExternals(job, source_params, store, limits=profile.limits)
    resolved: dict[str, dict[str, Any]] = {source_stage.name: source_params}  # stage -> its resolved params
    plan.externals = ext
    available_ext = ext.names()
    produced: dict[str, str] = {}  # array name -> stage of this job producing it
    facts = job_facts(job)
    for name, stage in stages.items():
        choice = _backend_choice(stage, job, profile, cli_backends)
        if choice != "auto" and choice not in stage.backends:
            raise StageInputError(f"stage {name!r} has no backend {choice!r}; choose one of "
                                  f"{sorted(stage.backends)} or 'auto'")
        chosen, missing = None, []
        for cand in _candidates(stage, choice, profile, facts):
            too_big = _beyond_canvas(stage, cand, source_params)
            if too_big and choice != "auto":
                raise StageInputError(too_big)
            if too_big:
                continue
            need = stage.used_inputs(cand)
            missing = [i for i in need if i not in produced and i not in available_ext]
            if not missing:
                chosen = cand
                break
        if chosen is None:
            stage.resolve_params(_param_layers(stage, job, profile, cli_params)[0])  # a bad value is still bad
            plan.stages[name] = StagePlan(name, "skip", _skip_causes(missing, stages, plan))
            continue
        be = stage.backend(chosen)
        weights = _checked_weights(stage, chosen, profile)
        overrides, explicit = _param_layers(stage, job, profile, cli_params)
        for f, leader in stage.params.follows.items():  # e.g. the canvas: ingest's, for every stage
            if leader == name or leader not in resolved or f not in resolved[leader]:
                continue
            if f in explicit and overrides[f] != resolved[leader][f]:
                raise StageInputError(f"stage {name!r}: {f}={overrides[f]!r} differs from {leader}'s "
                                      f"({f}={resolved[leader][f]!r}); set it on {leader} instead")
            overrides[f] = resolved[leader][f]
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
        there, damage = store.presence(call.ref)
        if there and damage is None:
            status: Status = "cached"
            why: list[cz.Cause] = [cz.InStore()]
        elif damage is not None:  # the run's write quarantines it and puts a fresh one in its place
            status, why = "run", [cz.ArtifactDamaged(damage)]
        else:
            status, why = "run", _why(store, stage, call, previous)
        plan.stages[name] = StagePlan(name, status, tuple(why), call, tuple(dict.fromkeys(upstream)), tuple(ext_used),
                                      gpu=be.gpu)
        resolved[name] = dict(call.params)
        for out in stage.outputs:
            needs = stage.output_needs_input.get(out)
            if needs is not None and not ext.supplies(needs):
                continue
            produced[out] = name
    if DELIVERABLE not in produced and any(DELIVERABLE in st.outputs for st in stages.values()):
        # The first skip in the chain says why (the later ones only say "stage X skipped").
        root = next((sp for sp in plan.stages.values() if sp.status == "skip" and any(
            isinstance(c, cz.MissingInput) and not c.why.startswith("stage ") for c in sp.causes)), None)
        why = f"stage {root.stage} is skipped: {root.reason}" if root else "its stage is skipped"
        raise StageInputError(f"no {DELIVERABLE} can be made: {why}")


def _beyond_canvas(stage: Stage, backend: str, source_params: Mapping[str, Any]) -> str | None:
    """Why ``backend`` cannot take the job's canvas (its ``max_canvas``), or None."""
    limit = stage.backend(backend).max_canvas
    w, h = source_params.get("width"), source_params.get("height")
    if limit is None or not w or not h or max(w, h) <= limit:
        return None
    return (f"stage {stage.name!r} ({backend}): the canvas {w}x{h} is beyond what this backend takes ({limit} px "
            f"a side); use a smaller canvas (ingest width/height) or the offline backend {stage.default_backend!r}")


def _skip_causes(missing: list[str], stages: Mapping[str, Stage], plan: JobPlan) -> tuple[cz.Cause, ...]:
    out: list[cz.Cause] = []
    for m in missing:
        producer = next((s for s, st in stages.items() if m in st.outputs), None)
        if producer and plan.stages.get(producer) and plan.stages[producer].status == "skip":
            out.append(cz.MissingInput(m, f"stage {producer} skipped"))
        elif producer and m in stages[producer].output_needs_input:
            given = stages[producer].output_needs_input[m]
            out.append(cz.MissingInput(m, f"{producer} makes it only from {given} the job gives: add them to "
                                          "the catalog row, or choose another backend"))
        elif producer:
            out.append(cz.MissingInput(m, "not produced for this job"))
        else:
            out.append(cz.MissingInput(m, "no stage produces it and the job does not give it"))
    return tuple(out)


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
            where = catalog.where(entry.id)
            if plan.error is not None and where:  # named like a load error: the row's line, then the field
                plan.error = f"{where}: {plan.error}"
        plans.append(plan)
        if on_job:
            on_job(plan)
    try:
        flush_indexes()  # the fingerprint index's last batch, now rather than at exit
    except Exception:  # noqa: BLE001 - an index that cannot be written only costs a re-hash next time
        pass
    return plans
