"""Run one stage against the store: key, cache check, compute, atomic write. No Prefect here.

The Prefect tasks, the Ray workers and the tests all call :func:`execute`. A call is described by a
:class:`StageCall`, whose key is computable before anything runs (it only needs the upstream keys), so
``v2v plan`` and Prefect's cache policy use the very same key as the store.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stages import get_stage
from stages.base import Stage
from storage.keys import array_digest, artifact_key, weights_digest
from storage.store import ArtifactRef, ArtifactStore


@dataclass(frozen=True)
class Upstream:
    """Where an input array comes from: an artifact in the store."""

    stage: str
    key: str

    @property
    def ref(self) -> ArtifactRef:
        return ArtifactRef(self.stage, self.key)


@dataclass(frozen=True)
class StageCall:
    stage: str
    backend: str
    params: Mapping[str, Any]  # resolved, JSON-able
    inputs: Mapping[str, Upstream | str]  # array name -> upstream artifact, or content digest of an external
    weights: str | None = None
    weights_digest: str = ""
    key: str = field(default="")

    @property
    def ref(self) -> ArtifactRef:
        return ArtifactRef(self.stage, self.key)

    def input_keys(self) -> dict[str, str]:
        return {name: (src.key if isinstance(src, Upstream) else f"external:{src}")
                for name, src in self.inputs.items()}


def make_call(stage: Stage | str, *, params: Mapping[str, Any] | None = None, backend: str | None = None,
              inputs: Mapping[str, Upstream | np.ndarray | str], weights: str | None = None) -> StageCall:
    """Resolve parameters and backend, keep the inputs the backend uses, and compute the key.

    An external input may be given as its array or as its content digest (``array_digest``) when the
    caller knows it without loading the array (the flows' fingerprint index)."""
    st = get_stage(stage) if isinstance(stage, str) else stage
    be = st.backend(backend)
    resolved = st.resolve_params(params).model_dump(mode="json")
    used = st.used_inputs(be.name)
    missing = [n for n in used if n not in inputs]
    if missing:
        raise ValueError(f"stage {st.name!r} ({be.name}) needs inputs {missing}")
    srcs: dict[str, Upstream | str] = {
        n: inputs[n] if isinstance(inputs[n], (Upstream, str)) else array_digest(np.asarray(inputs[n]))
        for n in used}
    wdigest = weights_digest(weights) if (be.needs_weights or weights) else ""
    call = StageCall(st.name, be.name, resolved, srcs, weights if be.load else None, wdigest)
    key = artifact_key(st.name, st.version, resolved, be.name, wdigest, call.input_keys())
    return StageCall(st.name, be.name, resolved, srcs, call.weights, wdigest, key)


@dataclass
class Outcome:
    ref: ArtifactRef
    cached: bool
    seconds: float
    waited: float = 0.0  # seconds spent waiting for ``compute_gate``


# Counts actual stage computations in this process (tests prove cached runs compute nothing).
COMPUTE_COUNT: dict[str, int] = {}


def execute(
    call: StageCall,
    store: ArtifactStore,
    externals: Mapping[str, np.ndarray] | None = None,
    device: str = "cpu",
    on_compute: Callable[[StageCall], None] | None = None,
    *,
    write_behind: bool = False,
    compute_gate: AbstractContextManager[Any] | None = None,
) -> Outcome:
    """Return the stored artifact for ``call``, computing and committing it if absent.

    ``write_behind``: hand the commit to the store's writer thread (``store.write_later``) and return.
    ``compute_gate``: held while the stage computes (a semaphore bounding the stages computing at once; the
    orchestration around a call, reading its inputs included, runs outside it)."""
    ref = call.ref
    if store.exists(ref):
        return Outcome(ref, True, 0.0)
    stage = get_stage(call.stage)
    arrays: dict[str, np.ndarray] = {}
    by_artifact: dict[ArtifactRef, list[str]] = {}
    for name, src in call.inputs.items():
        if isinstance(src, Upstream):
            by_artifact.setdefault(src.ref, []).append(name)
        else:
            if externals is None or name not in externals:
                raise ValueError(f"stage {call.stage!r}: external input {name!r} was not supplied")
            if array_digest(externals[name]) != src:
                raise ValueError(f"stage {call.stage!r}: external input {name!r} changed since planning")
            arrays[name] = externals[name]
    for upstream, names in by_artifact.items():
        arrays.update(store.read(upstream, names))
    if on_compute:
        on_compute(call)
    waiting = time.perf_counter()
    with compute_gate or contextlib.nullcontext():
        start = time.perf_counter()
        out = stage.run(arrays, call.params, call.backend, call.weights, device)
        seconds = time.perf_counter() - start
    COMPUTE_COUNT[call.stage] = COMPUTE_COUNT.get(call.stage, 0) + 1
    attrs: dict[str, Any] = {
        "version": stage.version,
        "params": dict(call.params),
        "backend": call.backend,
        "weights_digest": call.weights_digest,
        "inputs": call.input_keys(),
        "compute_seconds": round(seconds, 4),
    }
    if stage.attrs_fn:
        attrs.update(stage.attrs_fn(stage.resolve_params(call.params), **arrays))
    dims = {name: stage.outputs[name].dims for name in out}
    if write_behind and hasattr(store, "write_later"):
        store.write_later(ref, out, dims, attrs)
    else:
        store.write(ref, out, dims, attrs)
    return Outcome(ref, False, seconds, start - waiting)
