"""A stage call: what one stage computes for one job, with its artifact key, known before anything runs.

The key hashes exactly what the backend reads (``Stage.key_params``: the parameter fields it declares, the
inputs it uses, its weights' digest), so ``v2v plan``, Prefect's cache policy and the store agree on it.

:class:`StageKeys` makes the calls of one stage for many jobs: what does not depend on the job (each backend's
code version, used inputs, read fields, the key record's fixed part) is worked out once, and parameters are
validated once per distinct set of overrides (a catalog's jobs mostly share them). :func:`make_call` is the
same computation for one call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stages import get_stage
from stages.base import Params, Stage
from storage.keys import KeyTemplate, array_digest, canonical_json, weights_digest
from storage.store import ArtifactRef


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where an input array comes from: an artifact in the store."""

    stage: str
    key: str

    @property
    def ref(self) -> ArtifactRef:
        return ArtifactRef(self.stage, self.key)


@dataclass(frozen=True, slots=True)
class StageCall:
    stage: str
    backend: str
    # Resolved, JSON-able: what the backend is called with. Shared, read-only, by the calls of every job with
    # the same parameters (copy it to change it).
    params: Mapping[str, Any]
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


_MEMO_SCALARS = frozenset({str, int, bool, type(None)})


def _frozen(overrides: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """A hashable stand-in for overrides of plain scalars, or None (then nothing is memoised). Each value's
    type is part of it (``1``, ``1.0`` and ``True`` are equal in Python but not to a parameter model), and a
    float enters as its hex form (``-0.0 == 0.0`` too)."""
    out = []
    for k, v in overrides.items():
        t = type(v)
        if t is float:
            v = v.hex()
        elif t not in _MEMO_SCALARS:
            return None
        out.append((k, t, v))
    return tuple(out)


class _Backend:
    """One backend's job-independent facts."""

    __slots__ = ("be", "version", "used", "plain", "read", "templates")

    def __init__(self, stage: Stage, name: str) -> None:
        self.be = stage.backend(name)
        self.version = stage.code_version(self.be.name)
        self.used = stage.used_inputs(self.be.name)
        self.plain = all(type(n) is str for n in self.used)  # input names: JSON as they are
        self.read = stage.read_fields(self.be.name)
        self.templates: dict[str, KeyTemplate] = {}  # weights digest -> key template

    def template(self, stage: str, wdigest: str) -> KeyTemplate:
        t = self.templates.get(wdigest)
        if t is None:
            t = self.templates[wdigest] = KeyTemplate(stage, self.version, self.be.name, wdigest)
        return t


class _Resolved:
    """Resolved parameters (their JSON dump) and, per backend, the fields it reads and their canonical JSON."""

    __slots__ = ("params", "read")

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.read: dict[str, tuple[dict[str, Any], str]] = {}


class StageKeys:
    """Makes one stage's calls; build one per planning run (its memo assumes the stage does not change)."""

    MEMO = 4096  # distinct override sets remembered (per-job prompts make one each): then it starts afresh

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self._backends: dict[str | None, _Backend] = {}
        self._memo: dict[tuple[Any, ...], _Resolved] = {}

    def backend(self, name: str | None) -> _Backend:
        b = self._backends.get(name)
        if b is None:
            b = self._backends[name] = _Backend(self.stage, name)  # type: ignore[arg-type]
        return b

    def used_inputs(self, backend: str) -> tuple[str, ...]:
        return self.backend(backend).used

    def _resolve(self, overrides: Mapping[str, Any] | Params | None) -> _Resolved:
        frozen = _frozen(overrides) if isinstance(overrides, dict) else None
        if frozen is not None:
            hit = self._memo.get(frozen)
            if hit is not None:
                return hit
        res = _Resolved(self.stage.resolve_params(overrides).model_dump(mode="json"))
        if frozen is not None:
            if len(self._memo) >= self.MEMO:
                self._memo.clear()
            self._memo[frozen] = res
        return res

    def resolve(self, overrides: Mapping[str, Any] | Params | None) -> dict[str, Any]:
        """``stage.resolve_params(overrides).model_dump(mode="json")``, shared: read it, do not change it."""
        return self._resolve(overrides).params

    def call(self, backend: str | None, overrides: Mapping[str, Any] | Params | None,
             inputs: Mapping[str, Upstream | np.ndarray | str], weights: str | None = None,
             digest: Callable[[str | None], str] = weights_digest) -> StageCall:
        """What :func:`make_call` returns; ``digest`` computes a weights digest (the planner's remembers them)."""
        b = self.backend(backend)
        be = b.be
        res = self._resolve(overrides)
        read = res.read.get(be.name)
        if read is None:
            # The dump's own fields: the same as ``stage.key_params`` (which validates the dump again), since
            # a parameter model's JSON dump validates back to itself (tests/test_plan_speed.py checks).
            fields = {f: res.params[f] for f in b.read}
            read = res.read[be.name] = (fields, canonical_json(fields))
        missing = [n for n in b.used if n not in inputs]
        if missing:
            raise ValueError(f"stage {self.stage.name!r} ({be.name}) needs inputs {missing}")
        srcs: dict[str, Upstream | str] = {}
        keys: dict[str, str] = {}
        plain = b.plain
        for n in b.used:
            src = inputs[n]
            if isinstance(src, Upstream):
                keys[n] = src.key
                plain = plain and type(src.key) is str
            else:
                if not isinstance(src, str):
                    src = array_digest(np.asarray(src))
                keys[n] = f"external:{src}"
            srcs[n] = src
        wdigest = digest(weights) if (be.needs_weights or weights) else ""
        key = b.template(self.stage.name, wdigest).key(read[1], keys, plain=plain)
        return StageCall(self.stage.name, be.name, res.params, srcs, weights if be.load else None, wdigest, key,
                         read[0])


def make_call(stage: Stage | str, *, params: Mapping[str, Any] | None = None, backend: str | None = None,
              inputs: Mapping[str, Upstream | np.ndarray | str], weights: str | None = None) -> StageCall:
    """Resolve parameters and backend, keep the inputs the backend uses, and compute the key from what the
    backend reads.

    An external input may be given as its array or as its content digest (``array_digest``) when the
    caller knows it without loading the array (the flows' fingerprint index)."""
    st = get_stage(stage) if isinstance(stage, str) else stage
    return StageKeys(st).call(backend, params, inputs, weights)
