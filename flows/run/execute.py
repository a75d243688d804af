"""Run one stage call against the store: cache check, input reads, compute, atomic write. No Prefect here.

The Prefect tasks, the Ray workers and the tests all call :func:`execute` with a
:class:`flows.plan.calls.StageCall` planned beforehand.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np

from flows.plan.calls import StageCall, Upstream
from flows.run.outcomes import UpstreamDamaged
from stages import get_stage
from storage.errors import ArtifactDamaged
from storage.keys import array_digest
from storage.store import ArtifactRef, ArtifactStore


@dataclass
class Outcome:
    ref: ArtifactRef
    cached: bool
    seconds: float
    waited: float = 0.0  # seconds spent waiting for ``compute_gate``


# Counts actual stage computations in this process (tests prove cached runs compute nothing).
COMPUTE_COUNT: dict[str, int] = {}


def _node() -> str:
    """Where a stage ran: the Ray node id in a process Ray runs (a cluster's runs can be audited), else the host."""
    ray = sys.modules.get("ray")  # loaded only where Ray is in use: never import it for this
    if ray is not None and ray.is_initialized():
        return str(ray.get_runtime_context().get_node_id())
    return socket.gethostname()


def external_digest(value: Any) -> str:
    """An external input's content digest: an array's own, or the one a reference carries (ingest's
    ``SourceRef``: its files' bytes, hashed at planning; the stage checks what it reads against it)."""
    if isinstance(value, np.ndarray):
        return array_digest(value)
    digest = getattr(value, "digest", None)
    if not isinstance(digest, str) or not digest:
        raise TypeError(f"external input of type {type(value).__name__}: neither an array nor a hashed reference")
    return digest


def execute(
    call: StageCall,
    store: ArtifactStore,
    externals: Mapping[str, Any] | None = None,
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
    arrays: dict[str, Any] = {}  # upstream arrays, external arrays or references
    by_artifact: dict[ArtifactRef, list[str]] = {}
    for name, src in call.inputs.items():
        if isinstance(src, Upstream):
            by_artifact.setdefault(src.ref, []).append(name)
        else:
            if externals is None or name not in externals:
                raise ValueError(f"stage {call.stage!r}: external input {name!r} was not supplied")
            if external_digest(externals[name]) != src:
                raise ValueError(f"stage {call.stage!r}: external input {name!r} changed since planning")
            arrays[name] = externals[name]
    for upstream, names in by_artifact.items():
        try:
            arrays.update(store.read(upstream, names))
        except ArtifactDamaged as exc:  # never compute from damaged data: move it aside, have it recomputed
            store.quarantine(exc.ref, exc.what)
            raise UpstreamDamaged(upstream.stage, upstream.key, exc.what) from None
    if on_compute:
        on_compute(call)
    waiting = time.perf_counter()
    with compute_gate or contextlib.nullcontext():
        start = time.perf_counter()
        out = stage.run(arrays, call.params, call.backend, call.weights, device)
        seconds = time.perf_counter() - start
    COMPUTE_COUNT[call.stage] = COMPUTE_COUNT.get(call.stage, 0) + 1
    attrs: dict[str, Any] = {
        "version": stage.code_version(call.backend),
        "params": dict(call.key_params),  # what the key covers; unread fields did not shape this artifact
        "backend": call.backend,
        "weights_digest": call.weights_digest,
        "inputs": call.input_keys(),
        "compute_seconds": round(seconds, 4),
        "node": _node(),
    }
    if stage.attrs_fn:
        attrs.update(stage.attrs_fn(stage.resolve_params(call.params), **arrays))
    dims = {name: stage.outputs[name].dims for name in out}
    if write_behind and hasattr(store, "write_later"):
        store.write_later(ref, out, dims, attrs)
    else:
        store.write(ref, out, dims, attrs)
    return Outcome(ref, False, seconds, start - waiting)
