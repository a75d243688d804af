"""Keys cover exactly what a backend reads: its declared parameter fields and the inputs it uses.

* every backend declares ``reads``;
* changing a field the backend does not read leaves its key unchanged, changing one it reads changes it;
* run on real arrays (the bear clip through the offline pipeline), changing every unread field at once leaves
  the output byte-identical, and a backend reading an undeclared field fails loudly (``ParamsView``).
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_flow_catalog import offline_profile, write_catalog

from flows.api import run_catalog
from flows.plan.calls import make_call
from stages import available_stages
from stages.base import Params, ParamsView, Stage, StageInputError, UndeclaredParamRead
from storage import open_job

STAGES = available_stages()
BACKENDS = [(s, b) for s, st in STAGES.items() for b in st.backends]


def _candidates(annotation: Any, default: Any) -> list[Any]:
    """Values to try in place of ``default`` for a field of this type."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return list(typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return [c for a in typing.get_args(annotation) if a is not type(None)
                for c in _candidates(a, default if isinstance(a, type) and isinstance(default, a) else None)]
    if annotation is bool:
        return [not default]
    if annotation is int:
        base = default if isinstance(default, int) else 1
        return [base + 1, base - 1, base * 2, 1, 2, 64]
    if annotation is float:
        base = float(default) if isinstance(default, int | float) else 0.5
        return [base * 1.5 + 0.1, base * 0.5, base + 1.0, 0.25, 0.75]
    if annotation is str:
        return [f"{default}, changed" if default else "a changed text"]
    return []


def other_value(params: type[Params], name: str) -> Any:
    """A valid value of field ``name`` different from its default (pytest.skip when none exists)."""
    info = params.model_fields[name]
    default = info.get_default(call_default_factory=True)
    hints = typing.get_type_hints(params)
    for value in _candidates(hints[name], default):
        if value == default:
            continue
        try:
            params(**{name: value})
        except Exception:
            continue
        return value
    return None


def _key(stage: Stage, backend: str, params: dict[str, Any]) -> str:
    inputs = {n: f"{n}-digest" for n in stage.used_inputs(backend)}
    return make_call(stage, backend=backend, params=params, inputs=inputs).key


def test_every_backend_declares_what_it_reads() -> None:
    undeclared = [f"{s}.{b}" for s, b in BACKENDS if STAGES[s].backends[b].reads is None]
    assert not undeclared, f"backends without reads=: {undeclared}"


@pytest.mark.parametrize(("stage_name", "backend"), BACKENDS)
def test_key_follows_read_fields_only(stage_name: str, backend: str) -> None:
    stage = STAGES[stage_name]
    base = _key(stage, backend, {})
    reads = set(stage.read_fields(backend))
    tried = 0
    for name in stage.params.model_fields:
        value = other_value(stage.params, name)
        if value is None:
            continue
        tried += 1
        changed = _key(stage, backend, {name: value})
        if name in reads:
            assert changed != base, f"{stage_name}.{backend}: reading {name} but its key ignores it"
        else:
            assert changed == base, f"{stage_name}.{backend}: {name} is not read but changes the key"
    assert tried or not stage.params.model_fields


def test_an_undeclared_read_fails_loudly() -> None:
    stage = STAGES["depth_sim"]
    view = ParamsView(stage.params(), frozenset(), "stage 'depth_sim' (paste)")
    with pytest.raises(UndeclaredParamRead, match="params.mode"):
        _ = view.mode
    assert ParamsView(stage.params(), frozenset({"mode"}), "x").mode == stage.params().mode


# ---- on real arrays ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bear_arrays(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """Every array of the offline pipeline on the bear clip (4 frames, 128x128)."""
    tmp = tmp_path_factory.mktemp("reads")
    cat = write_catalog(tmp)
    report, plans = run_catalog(cat, profile=offline_profile(tmp / "out"), store=str(tmp / "store"),
                                orchestrator="inline")
    assert report.jobs[0].status == "done", report.jobs[0].error
    ds = open_job(str(tmp / "store"), plans[0].job_id)
    arrays = {name: np.asarray(ds[name].values) for name in ds.data_vars}
    arrays.update(plans[0].externals.arrays(["first_frame_image"]))
    return arrays


def _runnable() -> list[tuple[str, str]]:
    out = []
    for s, b in BACKENDS:
        be = STAGES[s].backends[b]
        if s != "ingest" and not be.needs_weights and be.load is None:
            out.append((s, b))
    return out


@pytest.mark.parametrize(("stage_name", "backend"), _runnable())
def test_unread_fields_leave_the_output_unchanged(stage_name: str, backend: str,
                                                  bear_arrays: dict[str, np.ndarray]) -> None:
    stage = STAGES[stage_name]
    used = stage.used_inputs(backend)
    missing = [n for n in used if n not in bear_arrays]
    if missing:
        pytest.skip(f"the offline bear job does not make {missing}")
    arrays = {n: bear_arrays[n] for n in used}
    reads = set(stage.read_fields(backend))
    unread: dict[str, Any] = {}
    for name in stage.params.model_fields:
        value = other_value(stage.params, name)
        if name not in reads and value is not None:
            try:
                stage.params(**{**unread, name: value})
            except Exception:  # a cross-field rule: keep the fields that validate together
                continue
            unread[name] = value
    try:
        base = stage.run(arrays, {}, backend)
    except StageInputError as exc:  # e.g. `provided` masks need one mask per frame; the bear row gives one
        pytest.skip(f"not for the bear job's arrays: {exc}")
    changed = stage.run(arrays, unread, backend)
    assert set(base) == set(changed)
    for name in base:
        assert np.array_equal(base[name], changed[name]), f"{stage_name}.{backend}: {name} depends on {unread}"


def test_a_prompt_change_reruns_nothing_on_the_offline_defaults(tmp_path: Path) -> None:
    cat = write_catalog(tmp_path)
    prof = offline_profile(tmp_path / "out")
    run_catalog(cat, profile=prof, store=str(tmp_path / "store"), orchestrator="inline")
    text = cat.read_text().replace("prompt: ", "prompt: changed ", 1)
    cat.write_text(text)
    _, plans = run_catalog(cat, profile=prof, store=str(tmp_path / "store"), orchestrator="inline")
    assert plans[0].to_run() == [], [(s, p.reason) for s, p in plans[0].stages.items() if p.status == "run"]
