"""A stage call: what one stage computes for one job, with its artifact key, known before anything runs.

The key hashes exactly what the backend reads (``Stage.key_params``: the parameter fields it declares, the
inputs it uses, its weights' digest), so ``v2v plan``, Prefect's cache policy and the store agree on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stages import get_stage
from stages.base import Stage
from storage.keys import array_digest, artifact_key, weights_digest
from storage.store import ArtifactRef


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
    params: Mapping[str, Any]  # resolved, JSON-able: what the backend is called with
    inputs: Mapping[str, Upstream | str]  # array name -> upstream artifact, or content digest of an external
    weights: str | None = None
    weights_digest: str = ""
    key: str = field(default="")
    key_params: Mapping[str, Any] = field(default_factory=dict)  # the fields the backend reads: in the key

    @property
    def ref(self) -> ArtifactRef:
        return ArtifactRef(self.stage, self.key)

    def input_keys(self) -> dict[str, str]:
        return {name: (src.key if isinstance(src, Upstream) else f"external:{src}")
                for name, src in self.inputs.items()}


def make_call(stage: Stage | str, *, params: Mapping[str, Any] | None = None, backend: str | None = None,
              inputs: Mapping[str, Upstream | np.ndarray | str], weights: str | None = None) -> StageCall:
    """Resolve parameters and backend, keep the inputs the backend uses, and compute the key from what the
    backend reads.

    An external input may be given as its array or as its content digest (``array_digest``) when the
    caller knows it without loading the array (the flows' fingerprint index)."""
    st = get_stage(stage) if isinstance(stage, str) else stage
    be = st.backend(backend)
    resolved = st.resolve_params(params).model_dump(mode="json")
    read = st.key_params(be.name, resolved)
    used = st.used_inputs(be.name)
    missing = [n for n in used if n not in inputs]
    if missing:
        raise ValueError(f"stage {st.name!r} ({be.name}) needs inputs {missing}")
    srcs: dict[str, Upstream | str] = {
        n: inputs[n] if isinstance(inputs[n], (Upstream, str)) else array_digest(np.asarray(inputs[n]))
        for n in used}
    wdigest = weights_digest(weights) if (be.needs_weights or weights) else ""
    call = StageCall(st.name, be.name, resolved, srcs, weights if be.load else None, wdigest)
    key = artifact_key(st.name, st.code_version(be.name), read, be.name, wdigest, call.input_keys())
    return StageCall(st.name, be.name, resolved, srcs, call.weights, wdigest, key, read)
