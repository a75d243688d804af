"""Planning's fast paths give exactly what the plain computation gives (bench/scale.py measures the speed).

* ``canonical_json``'s fast path (already-JSON values go straight to the encoder) writes the very text of the
  reference encoder below (the normalising walk as it was), on awkward values: bools and ints as keys,
  ints vs floats, -0.0, nested lists/tuples, unicode, numpy scalars, subclasses, other mappings;
* keys made part by part (``KeyTemplate``) and by ``StageKeys`` (parameters validated once, memoised per set
  of overrides) equal the reference key of every stage and backend, with the parameters varied one by one;
* one planner per catalog: each job's plan equals that job planned alone, a job's key is the reference key
  of its own resolved parameters, and a changed profile, CLI parameter or weights choice is never served
  from an earlier plan.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_reads import other_value

from flows.config.catalog import load_catalog
from flows.config.demo_clip import make_demo_clip
from flows.config.profiles import Profile
from flows.plan import causes as cz
from flows.plan.calls import StageKeys, Upstream, make_call
from flows.plan.planner import JobPlan, plan_catalog, plan_job
from stages import available_stages
from stages.base import ArraySpec, Backend, Params, Stage
from storage.keys import KEY_SCHEMA, KeyTemplate, artifact_key, canonical_json
from storage.store import ArtifactRef, open_store

STAGES = available_stages()
BACKENDS = [(s, b) for s, stg in STAGES.items() for b in stg.backends]
OFFLINE = {"source_masks": "track", "flow": "dis", "depth": "ground-prior", "shape_mask": "change",
           "refine": "flow-fill", "generate": "propagate", "evaluate": "metrics"}
SMALL = {"ingest": {"n_frames": 4, "width": 128, "height": 128}}


# ---- the reference: canonical JSON as it was before any fast path --------------------------------------

def _reference_normalise(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _reference_normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_reference_normalise(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"non-finite float {value!r}")
        return 0.0 if value == 0 else value
    if value is None or isinstance(value, (bool, int, str)):
        return value
    raise TypeError(f"cannot put {type(value).__name__} into an artifact key")


def reference_json(value: Any) -> str:
    return json.dumps(_reference_normalise(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def reference_key(stage: str, version: str, params: Any, backend: str, weights: str, inputs: Any) -> str:
    record = {"schema": KEY_SCHEMA, "stage": stage, "version": version, "params": params, "backend": backend,
              "weights": weights, "inputs": inputs}
    return hashlib.sha256(reference_json(record).encode("utf-8")).hexdigest()


def _outcome(fn: Any, value: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(value)
    except Exception as exc:  # noqa: BLE001 - the same failure on both sides is the same behaviour
        return "error", type(exc)


class UnionParams(Params):
    x: bool | int | float = 0


class Str(str):
    pass


class Int(int):
    pass


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


AWKWARD = [0.0, -0.0, 1.0, 1, True, False, None, 1e16, 1e-7, 5e-324, -1e308, 2**63, -(2**70), "", "é",
           "\u2028", '"\\\x00', "日本語", float("nan"), float("inf"), -float("inf")]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(), st.sampled_from(AWKWARD),
    st.integers(-(2**63), 2**63 - 1).map(np.int64), st.floats(width=32).map(np.float32),
    st.floats().map(np.float64), st.booleans().map(np.bool_), st.text().map(Str), st.integers().map(Int),
    st.sampled_from(list(Level)), st.just(Path("/tmp/a.png")), st.just(b"bytes"),
)
ANY_KEYS = st.one_of(st.text(), st.integers(), st.booleans(), st.none(), st.floats(allow_nan=False),
                     st.sampled_from(["1", "True", "None", "0.0"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.lists(inner, max_size=4).map(tuple),
    st.dictionaries(st.text(max_size=6), inner, max_size=4),
    st.dictionaries(ANY_KEYS, inner, max_size=4),
    st.dictionaries(st.text(max_size=6), inner, max_size=4).map(MappingProxyType),
    st.dictionaries(st.text(max_size=6), inner, max_size=4).map(OrderedDict),
), max_leaves=24)


# What parameter dumps are made of (the fast path's own ground), -0.0 and non-finite floats included.
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(), st.sampled_from(AWKWARD)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.lists(inner, max_size=4).map(tuple),
                            st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=16)


@settings(max_examples=600, deadline=None)
@given(VALUES)
def test_canonical_json_is_the_reference_encoder(value: Any) -> None:
    assert _outcome(canonical_json, value) == _outcome(reference_json, value)


@settings(max_examples=600, deadline=None)
@given(JSON_VALUES)
def test_json_values_take_the_fast_path_to_the_same_text(value: Any) -> None:
    assert _outcome(canonical_json, value) == _outcome(reference_json, value)


@pytest.mark.parametrize("value", AWKWARD + [{True: 1, "b": [1, 1.0, (2, -0.0)]}, {1: "a", "1": "b"},
                                             {None: 1}, [np.float32(0.1), np.int8(-3), np.bool_(True)],
                                             {"x": {"y": [{"z": -0.0}]}}, (), {}, []])
def test_awkward_values_encode_as_before(value: Any) -> None:
    assert _outcome(canonical_json, value) == _outcome(reference_json, value)


@settings(max_examples=300, deadline=None)
@given(params=st.dictionaries(st.text(max_size=8), VALUES, max_size=5),
       inputs=st.dictionaries(st.text(max_size=8), st.text(max_size=70), max_size=4),
       names=st.tuples(st.text(max_size=8), st.text(max_size=4), st.text(max_size=8), st.text(max_size=64)))
def test_keys_made_part_by_part_are_the_reference_keys(params: dict[str, Any], inputs: dict[str, str],
                                                        names: tuple[str, str, str, str]) -> None:
    stage, version, backend, weights = names
    expected = _outcome(lambda p: reference_key(stage, version, p, backend, weights, inputs), params)
    assert _outcome(lambda p: artifact_key(stage, version, p, backend, weights, inputs), params) == expected
    if expected[0] == "ok":
        template = KeyTemplate(stage, version, backend, weights)
        assert template.key(canonical_json(params), inputs, plain=True) == expected[1]
        assert template.key(canonical_json(params), inputs) == expected[1]


# ---- every stage and backend: the memoised call is the reference call --------------------------------------

def reference_call(stage: Stage, backend: str, params: Mapping[str, Any], inputs: Mapping[str, Any]
                   ) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """make_call as it was: params validated, dumped, validated again for the read fields."""
    be = stage.backend(backend)
    resolved = stage.resolve_params(params).model_dump(mode="json")
    read = stage.key_params(be.name, resolved)
    keys = {n: (inputs[n].key if isinstance(inputs[n], Upstream) else f"external:{inputs[n]}")
            for n in stage.used_inputs(be.name)}
    return reference_key(stage.name, stage.code_version(be.name), read, be.name, "", keys), resolved, read


def _variants(stage: Stage) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{}]
    for name in stage.params.model_fields:
        value = other_value(stage.params, name)
        if value is not None:
            out.append({name: value})
    return out


@pytest.mark.parametrize(("stage_name", "backend"), BACKENDS)
def test_stage_keys_equal_the_reference_call(stage_name: str, backend: str) -> None:
    stage = STAGES[stage_name]
    keys = StageKeys(stage)  # one for every variant: its memo must tell them apart
    inputs = {n: (Upstream("up", f"{n}-key") if i % 2 else f"{n}-digest")
              for i, n in enumerate(stage.inputs)}
    for _ in range(2):  # the second round comes from the memo
        for params in _variants(stage):
            key, resolved, read = reference_call(stage, backend, params, inputs)
            call = keys.call(backend, dict(params), inputs)
            assert (call.key, dict(call.params), dict(call.key_params)) == (key, resolved, read), params
            assert make_call(stage, backend=backend, params=params, inputs=inputs).key == key


def test_memo_tells_types_and_signs_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    generate, ingest = STAGES["generate"], STAGES["ingest"]
    gk, ik = StageKeys(generate), StageKeys(ingest)
    monkeypatch.setattr(StageKeys, "MEMO", 3)  # cleared and refilled along the way
    for overrides in ({"feather_px": 0.0}, {"feather_px": -0.0}, {"feather_px": 0}, {"feather_px": 0.0},
                      {"shadow_level": 8}, {"shadow_level": 8.0}, {"feather_px": -0.0}, {}):
        got = gk.resolve(dict(overrides))
        fresh = generate.resolve_params(overrides).model_dump(mode="json")
        assert got == fresh and [math.copysign(1, got["feather_px"])] == [math.copysign(1, fresh["feather_px"])]
    for overrides in ({"n_frames": True}, {"n_frames": 1}, {"n_frames": None}, {"n_frames": 1}):
        got = ik.resolve(dict(overrides))
        assert got == ingest.resolve_params(overrides).model_dump(mode="json")
        assert type(got["n_frames"]) is type(ingest.resolve_params(overrides).model_dump(mode="json")["n_frames"])
    assert gk.resolve({"feather_px": 2.0}) is gk.resolve({"feather_px": 2.0})  # one dict for equal overrides
    # A union keeps what it is given: 1, 1.0 and True are three different parameter values (and keys).
    union = Stage("union", "1", ("a",), {"b": ArraySpec(("x",), "uint8")}, UnionParams,
                  {"one": Backend("one", lambda *, model, params, a: {"b": a}, reads=("x",))}, "one")
    uk = StageKeys(union)
    seen = {}
    for x in (1, 1.0, True, 1, True, 1.0):
        call = uk.call("one", {"x": x}, {"a": "d"})
        assert call.params == {"x": x} and type(call.params["x"]) is type(x)
        assert call.key == reference_call(union, "one", {"x": x}, {"a": "d"})[0]
        seen[type(x)] = call.key
    assert len(set(seen.values())) == 3


# ---- a catalog: one planner for all jobs ------------------------------------------------------------------

def _catalog(tmp: Path) -> Path:
    ball = make_demo_clip(tmp / "ball")
    rows = [("plain", ball["mask"], ""),
            ("twin", ball["mask"], ""),
            ("margin", ball["mask"], "    params: {motion: {paste_margin_px: 5}, generate: {feather_px: -0.0}}\n"),
            ("texts", ball["mask"], "    prompt: a red ball\n    seed: 3\n"),
            ("per-frame", ball["masks"], ""),
            ("bad", ball["mask"], "    params: {refine: {window: 4, window_overlap: 6}}\n"),
            ("after-bad", ball["mask"], "    params: {motion: {paste_margin_px: 5}}\n")]
    text = "jobs:\n" + "".join(f"  - id: {i}\n    source: {ball['clip']}\n    masks: {m}\n"
                               f"    first_frame: {ball['first_frame']}\n{extra}" for i, m, extra in rows)
    path = tmp / "c.yaml"
    path.write_text(text)
    return path


def _summary(plan: JobPlan) -> dict[str, Any]:
    return {"error": plan.error, "stages": {
        name: (sp.status, sp.causes, sp.reason, sp.key, sp.upstream, sp.externals, sp.gpu,
               None if sp.call is None else (sp.call.backend, dict(sp.call.params), dict(sp.call.key_params),
                                             sp.call.input_keys(), sp.call.weights, sp.call.weights_digest))
        for name, sp in plan.stages.items()}}


def _check_keys(plan: JobPlan) -> None:
    """Each stage's key is the reference key of its own resolved parameters and inputs."""
    for name, sp in plan.stages.items():
        if sp.call is not None:
            key, resolved, read = reference_call(STAGES[name], sp.call.backend, sp.call.params, sp.call.inputs)
            assert (sp.key, dict(sp.call.params), dict(sp.call.key_params)) == (key, resolved, read), name


def test_each_job_plans_as_if_alone(tmp_path: Path) -> None:
    cat = load_catalog(_catalog(tmp_path))
    prof = Profile(name="t", out=str(tmp_path / "out"), params=SMALL, backends={**OFFLINE, "source_masks": "auto"})
    store = open_store(tmp_path / "store")
    plans = plan_catalog(cat, prof, store)
    assert [p.ok for p in plans] == [True, True, True, True, True, False, True]
    assert "window_overlap" in (plans[5].error or "")
    for plan in plans:
        alone = plan_job(plan.job, prof, store)
        assert _summary(plan)["stages"] == _summary(alone)["stages"], plan.job_id
        assert (plan.error is None) == (alone.error is None)
        assert plan.error is None or plan.error.endswith(alone.error or "?")  # the catalog names the row
        _check_keys(plan)
    by = {p.job_id: p for p in plans}
    assert by["per-frame"].stages["source_masks"].call.backend == "provided"  # auto, per job's own masks
    assert by["plain"].stages["source_masks"].call.backend == "track"
    assert by["plain"].stages["motion"].key == by["twin"].stages["motion"].key
    assert by["margin"].stages["motion"].key != by["plain"].stages["motion"].key
    assert by["margin"].stages["motion"].key == by["after-bad"].stages["motion"].key
    assert by["margin"].stages["generate"].call.params["feather_px"] == 0.0  # -0.0: kept as given
    assert math.copysign(1, by["margin"].stages["generate"].call.params["feather_px"]) == -1
    assert by["texts"].stages["generate"].call.params["prompt"] == "a red ball"
    assert by["texts"].stages["generate"].key == by["plain"].stages["generate"].key  # propagate reads no text
    assert by["plain"].stages["motion"].call.params is by["twin"].stages["motion"].call.params  # one copy


def test_a_changed_profile_or_parameter_is_planned_afresh(tmp_path: Path) -> None:
    cat = load_catalog(_catalog(tmp_path))
    store = open_store(tmp_path / "store")
    prof = Profile(name="t", out=str(tmp_path / "out"), params=SMALL, backends=OFFLINE)
    first = plan_catalog(cat, prof, store)[0]
    prof.params["flow"] = {"dis_preset": "fast"}  # the same profile object, changed between plans
    second = plan_catalog(cat, prof, store)[0]
    fresh = plan_catalog(cat, Profile(name="t", out=str(tmp_path / "out"), backends=OFFLINE,
                                      params={**SMALL, "flow": {"dis_preset": "fast"}}), store)[0]
    assert _summary(second) == _summary(fresh)
    assert second.stages["flow"].key != first.stages["flow"].key
    assert second.stages["ingest"].key == first.stages["ingest"].key
    cli = plan_catalog(cat, prof, store, cli_params={"flow": {"dis_preset": "ultrafast"}})[0]
    assert cli.stages["flow"].call.key_params["dis_preset"] == "ultrafast"
    assert cli.stages["flow"].key not in (first.stages["flow"].key, second.stages["flow"].key)
    assert _summary(plan_catalog(cat, prof, store)[0]) == _summary(second)  # the CLI's choice is not kept
    prof.backends["flow"] = "deepflow"
    third = plan_catalog(cat, prof, store)[0]
    assert third.stages["flow"].call.backend == "deepflow"
    prof.backends["flow"] = "raft"  # learned, no weights: every job says so
    assert all("needs weights" in (p.error or "") for p in plan_catalog(cat, prof, store) if p.job_id != "bad")
    _check_keys(third)


def test_previous_runs_are_read_per_job(tmp_path: Path) -> None:
    """The job manifest decides New / ArtifactMissing / PreviousGone, also after another job had none."""
    cat = load_catalog(_catalog(tmp_path))
    store = open_store(tmp_path / "store")
    prof = Profile(name="t", out=str(tmp_path / "out"), params=SMALL, backends=OFFLINE)
    plans = {p.job_id: p for p in plan_catalog(cat, prof, store)}
    refs = plans["twin"].refs()
    refs["flow"] = ArtifactRef("flow", "0" * 64)  # a key of an older run, its artifact gone
    store.record_job("twin", refs)
    again = {p.job_id: p for p in plan_catalog(cat, prof, store)}
    assert again["plain"].stages["ingest"].causes == (cz.New(),)
    assert again["twin"].stages["ingest"].causes == (cz.ArtifactMissing(),)
    assert again["twin"].stages["flow"].causes == (cz.PreviousGone(),)
    (tmp_path / "store" / "jobs" / "twin.json").write_text("{not json")  # damaged: as if none
    assert plan_catalog(cat, prof, store)[1].stages["ingest"].causes == (cz.New(),)


def test_plans_pickle(tmp_path: Path) -> None:
    cat = load_catalog(_catalog(tmp_path))
    store = open_store(tmp_path / "store")
    plan = plan_catalog(cat, Profile(name="t", out=str(tmp_path / "out"), params=SMALL, backends=OFFLINE), store)[0]
    back = pickle.loads(pickle.dumps(plan))
    assert _summary(back) == _summary(plan)
    assert back.externals.digest("source") == plan.externals.digest("source")
    call = plan.stages["motion"].call
    assert pickle.loads(pickle.dumps(call)) == call
    assert pickle.loads(pickle.dumps(Upstream("a", "b"))) == Upstream("a", "b")


def test_presence_stops_at_the_first_missing_folder(tmp_path: Path) -> None:
    store = open_store(tmp_path / "store")
    ref = ArtifactRef("flow", "ab" * 32)
    assert store.presence(ref) == (False, None)  # no store at all
    (tmp_path / "store" / "flow").mkdir(parents=True)
    assert store.presence(ref) == (False, None)  # stage folder, no prefix
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "store" / "flow" / "ab").symlink_to(tmp_path / "elsewhere")
    assert store.presence(ref) == (True, "its prefix folder is a symlink")
    (tmp_path / "store" / "flow" / "ab").unlink()
    (tmp_path / "store" / "flow").rmdir()
    (tmp_path / "store" / "flow").symlink_to(tmp_path / "elsewhere")
    assert store.presence(ref) == (True, "its stage folder is a symlink")
    assert not store.exists(ref)
