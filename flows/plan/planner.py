"""Planning: from a job and a profile to the stage calls (with their keys), before anything runs.

The DAG comes from the stage declarations: a stage's used inputs are array names produced by an upstream
stage's outputs or supplied by the job (externals). A stage whose inputs cannot be satisfied for a job is
skipped (with the reason). Every key is known up front, so ``v2v plan`` says per stage "cached" or "run"
and why, and the flows hand Prefect the very key the store uses.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from flows.config.catalog import Catalog, Job, RowError
from flows.config.profiles import Profile
from flows.plan import causes as cz
from flows.plan.backends import beyond_canvas, candidates, checked_weights, job_facts
from flows.plan.calls import StageCall, StageKeys, Upstream
from flows.plan.externals import SOURCE_ARRAYS, JobExternals, decode_limits
from flows.plan.fingerprints import flush_indexes
from stages import DELIVERABLE, PIPELINE, available_stages
from stages.base import Stage, StageInputError
from storage.keys import weights_digest
from storage.names import JOBS
from storage.store import ArtifactRef, ArtifactStore

Status = Literal["cached", "run", "skip"]


@dataclass(slots=True)
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


@dataclass(slots=True)
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


# ---- why a stage must run --------------------------------------------------------------------------------

def _previous(store: ArtifactStore, job_id: str) -> dict[str, str]:
    """The stage keys of the job's last run; {} for none or a damaged manifest (DocumentDamaged: rewritten at the
    end of the run). A local store first looks whether there is one (a stat: cheaper than a failed read)."""
    if store.local and not os.path.lexists(posixpath.join(store.root, JOBS, f"{job_id}.json")):
        return {}
    try:
        doc = store.find_job(job_id)
    except ValueError:
        return {}
    return dict(doc.get("artifacts", {})) if doc else {}


def _why(store: ArtifactStore, stage: Stage, call: StageCall, previous: Mapping[str, str]) -> tuple[cz.Cause, ...]:
    prev_key = previous.get(stage.name)
    if prev_key is None:
        return _NEW
    if prev_key == call.key:
        return (cz.ArtifactMissing(),)
    try:
        old = store.attrs(ArtifactRef(stage.name, prev_key))
    except Exception:  # gone, unreadable or damaged: it cannot tell what changed
        return (cz.PreviousGone(),)
    return tuple(cz.diff_causes(old, version=stage.code_version(call.backend), backend=call.backend,
                                weights_digest=call.weights_digest, params=call.key_params,
                                inputs=call.input_keys()))


# ---- planning -------------------------------------------------------------------------------------------

_IN_STORE = (cz.InStore(),)  # causes shared by every plan (frozen, equal anyway)
_NEW = (cz.New(),)


def plan_job(job: Job, profile: Profile, store: ArtifactStore, *, stages: Mapping[str, Stage] | None = None,
             cli_params: Mapping[str, Mapping[str, Any]] | None = None,
             cli_backends: Mapping[str, str] | None = None) -> JobPlan:
    """Plan one job; a user error (bad parameter, unreadable file, missing weights) goes into ``error``."""
    return Planner(profile, store, ordered_stages(stages), cli_params, cli_backends).plan(job)


class Planner:
    """Plans the jobs of one catalog (one profile, store, stage set and CLI choices). What does not depend on
    the job is worked out once: parameter layers and their checks, backend facts and key templates, backend
    candidates and checked weights (one view of the weights for the catalog), weights digests, and resolved
    parameters with their key JSON per distinct set of overrides. One per planning run, so a changed profile,
    parameter, weights file or stage is never served from an earlier run's cache."""

    def __init__(self, profile: Profile, store: ArtifactStore, stages: dict[str, Stage],
                 cli_params: Mapping[str, Mapping[str, Any]] | None = None,
                 cli_backends: Mapping[str, str] | None = None) -> None:
        self.profile, self.store, self.stages = profile, store, stages  # stages in dependency order
        self.cli_params, self.cli_backends = cli_params or {}, cli_backends or {}
        self.known = set(PIPELINE) | set(stages)
        self.fixed_error: str | None = None  # the profile's or the CLI's unknown stages: every job fails alike
        for where, names in (("profile params", profile.params), ("profile backends", profile.backends),
                             ("--set", self.cli_params), ("--backend", self.cli_backends)):
            unknown = sorted(set(names) - self.known)
            if unknown and self.fixed_error is None:
                self.fixed_error = f"{where}: unknown stage(s) {unknown}; stages are {list(PIPELINE)}"
        # stage -> (profile layer, CLI layer, its parameter fields)
        self.layers = {name: (dict(profile.params.get(name, {})), dict(self.cli_params.get(name, {})),
                              frozenset(st.params.model_fields)) for name, st in stages.items()}
        self.keys = {name: StageKeys(st) for name, st in stages.items()}
        self.source = next((st for st in stages.values() if set(st.inputs) & set(SOURCE_ARRAYS)), None)
        self.makes_deliverable = any(DELIVERABLE in st.outputs for st in stages.values())
        self.limits = decode_limits(profile.limits)
        self._candidates: dict[tuple[str, str, frozenset[str]], list[str]] = {}
        self._weights: dict[tuple[str, str], tuple[str | None, str | None]] = {}  # -> (path, error)
        self._digests: dict[str | None, str] = {}
        self._tuples: dict[tuple[str, ...], tuple[str, ...]] = {}  # one copy of each upstream/externals tuple

    def candidates(self, stage: Stage, choice: str, facts: frozenset[str]) -> list[str]:
        k = (stage.name, choice, facts)
        if k not in self._candidates:
            self._candidates[k] = candidates(stage, choice, self.profile, set(facts))
        return self._candidates[k]

    def checked_weights(self, stage: Stage, backend: str) -> str | None:
        k = (stage.name, backend)
        if k not in self._weights:
            try:
                self._weights[k] = (checked_weights(stage, backend, self.profile), None)
            except StageInputError as exc:
                self._weights[k] = (None, str(exc))
        path, error = self._weights[k]
        if error is not None:
            raise StageInputError(error)
        return path

    def digest(self, weights: str | None) -> str:
        if weights not in self._digests:
            self._digests[weights] = weights_digest(weights)
        return self._digests[weights]

    def shared(self, names: list[str]) -> tuple[str, ...]:
        t = tuple(dict.fromkeys(names))
        return self._tuples.setdefault(t, t)

    def _layers(self, name: str, job: Job, common: Mapping[str, Any]) -> tuple[dict[str, Any], Mapping[str, Any]]:
        """Merged overrides (profile < job-level < row < CLI) and the row's own. Job texts (prompt, seed, ...) go
        to every stage with such a field; only backends that read them get them in their key."""
        prof, cli, fields = self.layers[name]
        merged = dict(prof)
        merged.update({k: v for k, v in common.items() if k in fields})
        row = job.params.get(name) or {}
        merged.update(row)
        merged.update(cli)
        return merged, row

    def plan(self, job: Job) -> JobPlan:
        """Plan one job; a user error (bad parameter, unreadable file, missing weights) goes into ``error``."""
        plan = JobPlan(job.id, job)
        try:
            self._plan_stages(plan, job)
        except StageInputError as exc:
            plan.error = str(exc)
        except (OSError, ValueError) as exc:
            plan.error = f"{type(exc).__name__}: {exc}"
        return plan

    def _plan_stages(self, plan: JobPlan, job: Job) -> None:
        stages, store = self.stages, self.store
        for where, names in (("params", job.params), ("backends", job.backends)):
            unknown = sorted(set(names) - self.known)
            if unknown:
                raise StageInputError(f"{where}: unknown stage(s) {unknown}; stages are {list(PIPELINE)}")
        if self.fixed_error is not None:
            raise StageInputError(self.fixed_error)
        previous = _previous(store, job.id)
        if self.source is None:
            raise StageInputError("no stage reads the source clip")
        common, job_backends = job.common_params(), job.stage_backends()
        source_params = self.keys[self.source.name].resolve(self._layers(self.source.name, job, common)[0])
        ext = JobExternals(job, source_params, store, limits=self.limits)
        resolved: dict[str, Mapping[str, Any]] = {self.source.name: source_params}  # stage -> its resolved params
        plan.externals = ext
        available_ext = ext.names()
        produced: dict[str, str] = {}  # array name -> stage of this job producing it
        made: dict[str, Upstream] = {}  # stage -> its artifact, as an input of later stages
        facts = frozenset(job_facts(job))
        for name, stage in stages.items():
            keys = self.keys[name]
            choice = self.cli_backends[name] if name in self.cli_backends else (
                job_backends.get(name) or self.profile.backends.get(name) or "auto")
            if choice != "auto" and choice not in stage.backends:
                raise StageInputError(f"stage {name!r} has no backend {choice!r}; choose one of "
                                      f"{sorted(stage.backends)} or 'auto'")
            chosen, missing = None, []
            for cand in self.candidates(stage, choice, facts):
                too_big = beyond_canvas(stage, cand, source_params)
                if too_big and choice != "auto":
                    raise StageInputError(too_big)
                if too_big:
                    continue
                missing = [i for i in keys.used_inputs(cand) if i not in produced and i not in available_ext]
                if not missing:
                    chosen = cand
                    break
            if chosen is None:
                keys.resolve(self._layers(name, job, common)[0])  # a bad value is still bad
                plan.stages[name] = StagePlan(name, "skip", _skip_causes(missing, stages, plan))
                continue
            be = stage.backend(chosen)
            weights = self.checked_weights(stage, chosen)
            overrides, row = self._layers(name, job, common)
            for f, leader in stage.params.follows.items():  # e.g. the canvas: ingest's, for every stage
                if leader == name or leader not in resolved or f not in resolved[leader]:
                    continue
                prof, cli, _ = self.layers[name]
                if (f in prof or f in row or f in cli) and overrides[f] != resolved[leader][f]:
                    raise StageInputError(f"stage {name!r}: {f}={overrides[f]!r} differs from {leader}'s "
                                          f"({f}={resolved[leader][f]!r}); set it on {leader} instead")
                overrides[f] = resolved[leader][f]
            inputs: dict[str, Upstream | str] = {}
            upstream: list[str] = []
            ext_used: list[str] = []
            for i in keys.used_inputs(chosen):
                if i in produced:
                    inputs[i] = made[produced[i]]
                    upstream.append(produced[i])
                else:
                    inputs[i] = ext.digest(i)
                    ext_used.append(i)
            call = keys.call(chosen, overrides, inputs, weights, self.digest)
            there, damage = store.presence(call.ref)
            if there and damage is None:
                status: Status = "cached"
                why: tuple[cz.Cause, ...] = _IN_STORE
            elif damage is not None:  # the run's write quarantines it and puts a fresh one in its place
                status, why = "run", (cz.ArtifactDamaged(damage),)
            else:
                status, why = "run", _why(store, stage, call, previous)
            plan.stages[name] = StagePlan(name, status, why, call, self.shared(upstream), self.shared(ext_used),
                                          gpu=be.gpu)
            resolved[name] = call.params
            made[name] = Upstream(name, call.key)
            for out in stage.outputs:
                needs = stage.output_needs_input.get(out)
                if needs is not None and not ext.supplies(needs):
                    continue
                produced[out] = name
        if DELIVERABLE not in produced and self.makes_deliverable:
            # The first skip in the chain says why (the later ones only say "stage X skipped").
            root = next((sp for sp in plan.stages.values() if sp.status == "skip" and any(
                isinstance(c, cz.MissingInput) and not c.why.startswith("stage ") for c in sp.causes)), None)
            why_not = f"stage {root.stage} is skipped: {root.reason}" if root else "its stage is skipped"
            raise StageInputError(f"no {DELIVERABLE} can be made: {why_not}")


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


def iter_plans(catalog: Catalog, profile: Profile, store: ArtifactStore, *,
               stages: Mapping[str, Stage] | None = None,
               cli_params: Mapping[str, Mapping[str, Any]] | None = None,
               cli_backends: Mapping[str, str] | None = None) -> Iterator[JobPlan]:
    """Plan job after job, lazily: a run consumes them while it computes, and memory holds only the plans in
    flight. Rows that failed validation become failed plans with their reason. The fingerprint index's last
    batch is written when the catalog is exhausted."""
    planner = Planner(profile, store, ordered_stages(stages), cli_params, cli_backends)
    for where, entry in catalog.stream():  # a file catalog is read row by row as the run pulls plans
        if isinstance(entry, RowError):
            yield JobPlan(entry.job_id, None, error=str(entry))
            continue
        plan = planner.plan(entry)
        if plan.error is not None and where:  # named like a load error: the row's line, then the field
            plan.error = f"{where}: {plan.error}"
        yield plan
    try:
        flush_indexes()  # now rather than at exit
    except Exception:  # noqa: BLE001 - an index that cannot be written only costs a re-hash next time
        pass


def plan_catalog(catalog: Catalog, profile: Profile, store: ArtifactStore, *,
                 stages: Mapping[str, Stage] | None = None,
                 cli_params: Mapping[str, Mapping[str, Any]] | None = None,
                 cli_backends: Mapping[str, str] | None = None,
                 on_job: Any = None) -> list[JobPlan]:
    """Plan every job (a list: ``v2v plan`` and the tests; a run streams :func:`iter_plans`)."""
    plans = []
    for plan in iter_plans(catalog, profile, store, stages=stages, cli_params=cli_params, cli_backends=cli_backends):
        plans.append(plan)
        if on_job:
            on_job(plan)
    return plans
