"""What a stage is: a pure function over named arrays plus a small declaration.

A stage never imports Prefect, Zarr or Ray. Orchestration (``flows/``) and storage (``storage/``) wrap
stages through this declaration only:

* ``inputs`` are *global array names* (``frames``, ``object_masks``, ``flows`` ...). Each name is produced
  by exactly one upstream stage or supplied by the job itself (an "external" array such as the user's
  edited first frame), so the DAG is derived from the declarations rather than written by hand.
* ``outputs`` map array names to their dims and dtype; ``xarray`` views use the dims as they are.
* ``params`` is a frozen pydantic model; its JSON dump enters the artifact key.
* ``backends`` are alternative implementations. A backend says which inputs it really uses (only those
  enter its key and its DAG edges) and, for learned ones, how to load its model. Models are loaded once per
  worker process by :func:`load_model` and passed to the backend function.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict


class Params(BaseModel):
    """Base class of every stage's parameters: strict, immutable, JSON-able."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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


@dataclass(frozen=True)
class Backend:
    """One way of computing a stage.

    ``fn(model=..., params=..., **arrays)`` returns the output arrays. ``uses`` lists the stage inputs
    this backend reads (``None``: all required inputs). ``load(weights_path, device)`` builds the model;
    it runs once per worker process and weights path (see :func:`load_model`).
    """

    name: str
    fn: Callable[..., dict[str, np.ndarray]]
    uses: tuple[str, ...] | None = None
    load: Callable[[str | None, str], Any] | None = None
    needs_weights: bool = False
    gpu: bool = False


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
    doc: str = ""
    attrs_fn: Callable[..., dict[str, Any]] | None = field(default=None, repr=False)

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
        missing = [n for n in needed if n not in arrays]
        if missing:
            raise StageInputError(f"stage {self.name!r} ({be.name}): missing inputs {missing}")
        model = load_model(self, be, weights, device) if be.load else None
        out = be.fn(model=model, params=resolved, **{n: arrays[n] for n in needed})
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
