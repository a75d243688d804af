"""What a stage is: a pure function over named arrays plus a small declaration.

A stage never imports Prefect, Zarr or Ray. Orchestration (``flows/``) and storage (``storage/``) wrap
stages through this declaration only:

* ``inputs`` are *global array names* (``frames``, ``object_masks``, ``flows`` ...). Each name is produced
  by exactly one upstream stage or supplied by the job itself (an "external" array such as the user's
  edited first frame), so the DAG is derived from the declarations rather than written by hand.
* ``outputs`` map array names to their dims and dtype; ``xarray`` views use the dims as they are.
* ``params`` is a frozen pydantic model; its JSON dump enters the artifact key.
* ``backends`` are alternative implementations. A backend declares exactly what it reads, and only that
  enters its key: the stage inputs it uses (derived from its function's keyword-only arguments) and the
  parameter fields it reads (``reads``; job texts such as the prompt and seed are parameter fields too).
  The declaration is enforced: the backend is handed a :class:`ParamsView` that refuses any field it did
  not declare, so a wrong declaration fails loudly instead of serving stale artifacts. For learned
  backends it also says how to load the model; models are loaded once per worker process by
  :func:`load_model` and passed to the backend function.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict


class Params(BaseModel):
    """Base class of every stage's parameters: strict, immutable, JSON-able.

    ``follows`` maps fields whose value a stage takes from another stage's parameters (field -> stage):
    every stage that places images on the canvas uses ingest's canvas, say. The planner copies them."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    follows: ClassVar[Mapping[str, str]] = {}


class StageInputError(ValueError):
    """Bad input (user data or upstream arrays): never retried; the message says what is wrong."""


class MissingWeightsError(StageInputError):
    """A learned backend was chosen but its weights are not configured or not found."""


@dataclass(frozen=True)
class ArraySpec:
    dims: tuple[str, ...]
    dtype: str

    def check(self, stage: str, name: str, value: np.ndarray) -> None:
        if not isinstance(value, np.ndarray):
            raise TypeError(f"stage {stage!r}: output {name!r} is {type(value).__name__}, not an ndarray")
        if value.ndim != len(self.dims):
            raise ValueError(f"stage {stage!r}: output {name!r} has {value.ndim} dims, declared {self.dims}")
        if value.dtype != np.dtype(self.dtype):
            raise ValueError(f"stage {stage!r}: output {name!r} is {value.dtype}, declared {self.dtype}")


class UndeclaredParamRead(RuntimeError):
    """A backend read a parameter field it does not declare in ``reads`` (a bug in the declaration).

    Not an AttributeError on purpose: ``getattr(params, name, default)`` must not swallow it."""


class ParamsView:
    """A backend's window on its stage's parameters: the declared fields, nothing else."""

    __slots__ = ("_params", "_reads", "_label")

    def __init__(self, params: Params, reads: frozenset[str], label: str) -> None:
        object.__setattr__(self, "_params", params)
        object.__setattr__(self, "_reads", reads)
        object.__setattr__(self, "_label", label)

    def __getattr__(self, name: str) -> Any:
        params = object.__getattribute__(self, "_params")
        if name in type(params).model_fields and name not in object.__getattribute__(self, "_reads"):
            raise UndeclaredParamRead(
                f"{object.__getattribute__(self, '_label')} reads params.{name} but does not declare it in "
                "reads=: add it (the key must cover it) or stop reading it")
        return getattr(params, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("parameters are read-only")

    def __repr__(self) -> str:
        reads = sorted(object.__getattribute__(self, "_reads"))
        params = object.__getattribute__(self, "_params")
        return f"ParamsView({', '.join(f'{k}={getattr(params, k)!r}' for k in reads)})"


_NOT_INPUTS = ("model", "params")


def signature_inputs(fn: Callable[..., Any]) -> tuple[str, ...] | None:
    """The array inputs a backend function takes: its keyword-only arguments but ``model`` and ``params``.

    ``None`` when it takes ``**arrays`` (then ``uses`` must say, or it gets every stage input)."""
    sig = inspect.signature(fn)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return tuple(n for n, p in sig.parameters.items()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in _NOT_INPUTS)


@dataclass(frozen=True)
class Backend:
    """One way of computing a stage.

    ``fn(model=..., params=..., **arrays)`` returns the output arrays. What it reads is its key:

    * ``uses``: the stage inputs it reads; by default its function's keyword-only array arguments
      (:func:`signature_inputs`), all stage inputs if it takes ``**arrays``.
    * ``reads``: the parameter fields it reads (``None``: every field, the cautious default of a backend
      not yet declared). Fields outside ``reads`` neither enter the key nor reach the function.

    ``load(weights_path, device)`` builds the model; it runs once per worker process and weights path
    (see :func:`load_model`).
    """

    name: str
    fn: Callable[..., dict[str, np.ndarray]]
    uses: tuple[str, ...] | None = None
    load: Callable[[str | None, str], Any] | None = None
    needs_weights: bool = False
    gpu: bool = False
    reads: tuple[str, ...] | None = None
    # The backend's own code version (its code outside the stage module: a network runner in stages/nets/),
    # bumped when what it computes changes; it enters the key after the stage's version.
    version: str = ""
    # A fact about the job's own data under which ``auto`` prefers this backend over the stage's default
    # (``"per_frame_masks"``: the row gives a mask for every frame, so `provided` beats `track`).
    preferred_when: str | None = None
    # Inputs in ``uses`` the backend reads when they are there (a direct ``Stage.run`` may leave them out).
    optional: tuple[str, ...] = ()
    # The largest canvas side (px) the backend takes (a network's memory or training size); None: any.
    max_canvas: int | None = None

    def __post_init__(self) -> None:
        if self.uses is None:
            object.__setattr__(self, "uses", signature_inputs(self.fn))


@dataclass(frozen=True)
class Stage:
    name: str
    version: str
    inputs: tuple[str, ...]
    outputs: Mapping[str, ArraySpec]
    params: type[Params]
    backends: Mapping[str, Backend]
    default_backend: str
    optional_outputs: tuple[str, ...] = ()
    # Optional outputs that exist only when the job supplies an input (output -> that input): ingest makes
    # provided_masks only from masks the catalog row gives.
    output_needs_input: Mapping[str, str] = field(default_factory=dict)
    doc: str = ""
    attrs_fn: Callable[..., dict[str, Any]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        fields = set(self.params.model_fields)
        for be in self.backends.values():
            unknown = set(be.uses or ()) - set(self.inputs)
            if unknown:
                raise TypeError(f"stage {self.name!r}: backend {be.name!r} uses undeclared inputs {sorted(unknown)}")
            unknown = set(be.reads or ()) - fields
            if unknown:
                raise TypeError(f"stage {self.name!r}: backend {be.name!r} reads unknown params {sorted(unknown)}")

    def backend(self, name: str | None) -> Backend:
        name = name or self.default_backend
        try:
            return self.backends[name]
        except KeyError:
            raise StageInputError(
                f"stage {self.name!r} has no backend {name!r}; choose one of {sorted(self.backends)}"
            ) from None

    def used_inputs(self, backend: str | None) -> tuple[str, ...]:
        uses = self.backend(backend).uses
        return self.inputs if uses is None else uses

    def code_version(self, backend: str | None) -> str:
        """The version an artifact of this backend records and its key covers: the stage's, then the
        backend's own when it has one (``1`` or ``1.2``)."""
        own = self.backend(backend).version
        return f"{self.version}.{own}" if own else self.version

    def read_fields(self, backend: str | None) -> tuple[str, ...]:
        """The parameter fields the backend reads (in the params model's order)."""
        reads = self.backend(backend).reads
        fields = tuple(self.params.model_fields)
        return fields if reads is None else tuple(f for f in fields if f in reads)

    def key_params(self, backend: str | None, params: Mapping[str, Any] | Params | None) -> dict[str, Any]:
        """The resolved parameters that enter the backend's artifact key: those it reads, JSON-able."""
        dumped = self.resolve_params(params).model_dump(mode="json")
        return {f: dumped[f] for f in self.read_fields(backend)}

    def resolve_params(self, overrides: Mapping[str, Any] | Params | None = None) -> Params:
        if isinstance(overrides, self.params):
            return overrides
        try:
            return self.params(**dict(overrides or {}))
        except Exception as exc:  # pydantic's message names the field
            raise StageInputError(f"stage {self.name!r}: bad parameters: {exc}") from None

    def run(
        self,
        arrays: Mapping[str, np.ndarray],
        params: Mapping[str, Any] | Params | None = None,
        backend: str | None = None,
        weights: str | None = None,
        device: str = "cpu",
    ) -> dict[str, np.ndarray]:
        """Compute the stage; validates inputs present and outputs as declared."""
        be = self.backend(backend)
        resolved = self.resolve_params(params)
        needed = self.used_inputs(be.name)
        missing = [n for n in needed if n not in arrays and n not in be.optional]
        if missing:
            raise StageInputError(f"stage {self.name!r} ({be.name}): missing inputs {missing}")
        model = load_model(self, be, weights, device) if be.load else None
        view = ParamsView(resolved, frozenset(self.read_fields(be.name)), f"stage {self.name!r} ({be.name})")
        out = be.fn(model=model, params=view, **{n: arrays[n] for n in needed if n in arrays})
        for name, spec in self.outputs.items():
            if name not in out:
                if name in self.optional_outputs:
                    continue
                raise ValueError(f"stage {self.name!r} ({be.name}) did not return {name!r}")
            spec.check(self.name, name, out[name])
        extra = set(out) - set(self.outputs)
        if extra:
            raise ValueError(f"stage {self.name!r} returned undeclared arrays {sorted(extra)}")
        return out


# ---- models, loaded once per worker process -------------------------------------------------------

_MODELS: dict[tuple[str, str, str | None, str], Any] = {}
_MODELS_LOCK = threading.Lock()
LOAD_SECONDS: dict[tuple[str, str, str | None, str], float] = {}


def load_model(stage: Stage, backend: Backend, weights: str | None, device: str) -> Any:
    """Return the backend's model, building it on first use in this process only."""
    if backend.needs_weights and not weights:
        raise MissingWeightsError(
            f"stage {stage.name!r}: backend {backend.name!r} needs weights; set "
            f"weights.{backend.name} in the profile (or choose another backend)"
        )
    cache_key = (stage.name, backend.name, weights, device)
    with _MODELS_LOCK:
        if cache_key not in _MODELS:
            start = time.perf_counter()
            assert backend.load is not None
            _MODELS[cache_key] = backend.load(weights, device)
            LOAD_SECONDS[cache_key] = time.perf_counter() - start
        return _MODELS[cache_key]


def loaded_models() -> list[tuple[str, str, str | None, str]]:
    """Which models this process holds (tests use it to prove models load once)."""
    return list(_MODELS)
