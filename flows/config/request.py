"""What one run asks for on top of its catalog and profile: the command line's flags, typed.

A :class:`RunRequest` is JSON-able, so it is also a Prefect flow parameter: ``v2v run``, ``v2v schedule``
and ``prefect deploy`` hand the flow the same object.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flows.config.profiles import Profile, ProfileError, parse_assignments


class SingleVideo(BaseModel):
    """``v2v edit``: one video with its edit input, instead of a catalog."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str
    prompt: str = ""
    first_frame: str | None = None
    instruction: str | None = None
    reference: str | None = None
    sketch: str | None = None
    masks: str | None = None
    shape: str | None = None
    seed: int | None = None
    job_id: str | None = None

    def fields(self) -> dict[str, Any]:
        """The catalog fields of the job (everything given but the source and prompt)."""
        return {k: v for k, v in self.model_dump().items() if v is not None and k not in ("source", "prompt")}


class RunRequest(BaseModel):
    """Overrides of one run, highest precedence (see README "Profiles")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    params: dict[str, dict[str, Any]] = Field(default_factory=dict, description="stage -> {param: value}")
    backends: dict[str, str] = Field(default_factory=dict, description="stage -> backend")
    weights: dict[str, str] = Field(default_factory=dict, description="backend -> weights path")
    out: str | None = None
    device: str | None = None
    runner: Literal["local", "ray"] | None = None
    workers: int | None = Field(None, ge=1)
    ray_address: str | None = None
    video: SingleVideo | None = None

    @classmethod
    def coerce(cls, value: RunRequest | Mapping[str, Any] | None) -> RunRequest:
        """A request from itself, a mapping of its fields (API callers, tests) or nothing."""
        if isinstance(value, RunRequest):
            return value
        try:
            return cls.model_validate(dict(value or {}))
        except ValueError as exc:
            raise ProfileError(f"bad run options: {exc}") from None

    @classmethod
    def from_cli(cls, *, set_: list[str] | None = None, backend: list[str] | None = None,
                 weights: list[str] | None = None, out: str | None = None, device: str | None = None,
                 runner: str | None = None, workers: int | None = None) -> RunRequest:
        params = parse_assignments(set_, "--set")
        flat = [k for k, v in params.items() if not isinstance(v, dict)]
        if flat:
            raise ProfileError(f"--set: use STAGE.PARAM=VALUE (got {flat[0]!r})")
        if runner and runner not in ("local", "ray"):
            raise ProfileError(f"--runner must be 'local' or 'ray', got {runner!r}")
        return cls.coerce({
            "params": params, "backends": {k: str(v) for k, v in parse_assignments(backend, "--backend").items()},
            "weights": {k: str(v) for k, v in parse_assignments(weights, "--weights").items()}, "out": out,
            "device": device, "runner": runner, "workers": workers})

    def apply(self, profile: Profile, store: str | None = None) -> Profile:
        """The profile with this request's run settings (and ``store``) applied."""
        prof = profile.with_overrides(store=store, device=self.device, runner=self.runner, workers=self.workers,
                                      ray_address=self.ray_address, weights=self.weights)
        return prof.model_copy(update={"out": self.out}) if self.out else prof


# ---- catalogs as flow parameters ------------------------------------------------------------------------

CatalogArg = str | dict[str, Any]  # a catalog file, or an in-memory catalog as :func:`catalog_payload`


def catalog_payload(catalog: Any) -> CatalogArg:
    """A catalog as a JSON-able flow parameter: its file when it has one, else its entries."""
    from dataclasses import asdict

    from flows.config.catalog import Job

    if catalog.path is not None:
        return str(catalog.path)
    pairs = list(catalog.stream())
    return {"jobs": [e.model_dump(mode="json") if isinstance(e, Job) else {"error": asdict(e)} for _, e in pairs],
            "wheres": {e.id: w for w, e in pairs if isinstance(e, Job) and w}}  # planning errors name the row


def load_catalog_arg(catalog: Any, request: RunRequest) -> Any:
    """The :class:`Catalog` a run works on: ``request.video``'s one job, a file, or a payload."""
    from pathlib import Path

    from flows.config.catalog import Catalog, Job, RowError, load_catalog, single_job

    if request.video is not None:
        return single_job(request.video.source, prompt=request.video.prompt, **request.video.fields())
    if isinstance(catalog, Catalog):
        return catalog
    if isinstance(catalog, dict):
        return Catalog(None, [RowError(**e["error"]) if "error" in e else Job.model_validate(e)
                              for e in catalog.get("jobs", [])], catalog.get("wheres"))
    if catalog is None:
        raise ProfileError("no catalog given")
    return load_catalog(Path(catalog))
