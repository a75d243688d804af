"""Run profiles: where the store is, how tasks run, which backend each stage uses and where weights live.

A profile is a small YAML file validated with pydantic (``profiles/local.yaml``, ``gpu.yaml``, ``ray.yaml``, or
any path). ``local`` is also embedded here, so v2v runs with no profile file at all. Precedence, lowest first:
profile file < environment (``V2V_STORE``, ``V2V_DEVICE``, ``V2V_RUNNER``, ``V2V_RAY_ADDRESS``,
``V2V_WORKERS``) < catalog row (per-stage params and backends) < CLI flags (``--set``, ``--backend`` ...).

Backend ``auto`` means: the stage's learned backend if its weights are configured or cached (see
``stages.models.find_weights``), else the stage's offline default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PROFILES_DIR = Path(__file__).resolve().parents[2] / "profiles"


class ProfileError(ValueError):
    """A profile is missing or invalid; the message says which file and field."""


class RunnerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "ray"] = "local"
    max_workers: int = Field(1, ge=1, description="local: stage tasks running at once (threads)")
    address: str | None = Field(None, description="ray: cluster address (ray://host:10001, auto); None = start "
                                                  "a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="ray: CPUs of the local Ray (None = all)")
    num_gpus: int | None = Field(None, ge=0, description="ray: GPUs of the local Ray (None = detect)")
    cpus_per_task: float = Field(1.0, gt=0, description="ray: CPUs each stage task reserves")
    gpus_per_task: float = Field(1.0, gt=0, description="ray: GPUs a GPU stage reserves (when device is cuda)")
    prefect_tasks: Literal["auto", "stage", "job"] = Field(
        "auto", description="what one Prefect task run is: 'stage' (every stage call: the finest view in the UI, "
                            "~20 ms each), 'job' (a job's stages, or jobs sharing a source, run inside one task: "
                            "for large catalogs), 'auto': 'job' from `job_tasks_from` jobs on (local runner)")
    job_tasks_from: int = Field(50, ge=1, description="auto: catalogs with at least this many jobs use job tasks")
    plan_ahead: int = Field(8, ge=1, description="jobs planned and in flight at once (at least twice the stage "
                                                 "slots): a run's memory follows this, not the catalog's size")
    dispatch: Literal["ray", "prefect-ray"] = Field(
        "ray", description="ray: Prefect tasks in this process send each stage's body to Ray as a plain task; "
                           "prefect-ray: prefect-ray's RayTaskRunner runs whole Prefect tasks in the workers "
                           "(about 150 ms more per task here, and the workers need the Prefect API)")


class LimitsConfig(BaseModel):
    """What one source may ask of a worker, checked before decoding (stages.source_io.DecodeLimits: same
    names and defaults). A job over a limit fails alone, with a one-line reason."""

    model_config = ConfigDict(extra="forbid")

    max_pixels: int = Field(40_000_000, ge=1, description="pixels of one frame or image (8K UHD is 33.2 M); "
                                                         "Pillow's own guard refuses images over 179 M regardless")
    max_frames: int = Field(2_000, ge=1, description="frames one job takes from its source")
    max_video_bytes: int = Field(64 << 30, ge=1, description="size of a source video file")
    max_image_bytes: int = Field(256 << 20, ge=1, description="size of one image file (frame, mask, first frame)")


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "local"
    store: str | None = Field(None, description="artifact store URL; None = $V2V_STORE or ./v2v-store")
    out: str = Field("out", description="where exported videos and contact sheets go (relative to the cwd)")
    device: str = "cpu"
    runner: RunnerConfig = RunnerConfig()
    backends: dict[str, str] = Field(default_factory=dict, description="stage -> backend name or 'auto'")
    weights: dict[str, str] = Field(default_factory=dict, description="backend name -> weights file/folder")
    params: dict[str, dict[str, Any]] = Field(default_factory=dict, description="stage -> parameter overrides")
    output: Literal["source", "canvas"] = Field(
        "source", description="source: the export at the source's size, aspect and frame rate with its audio, the "
                              "source's own pixels outside the edit region; canvas: the generator's canvas as it is "
                              "(the reference's squashed 512x512)")
    restore_source: bool | None = Field(None, description="before `output`: true = output source, false = canvas")
    formats: tuple[str, ...] = ("mp4", "gif", "png")
    limits: LimitsConfig = LimitsConfig()

    @model_validator(mode="after")
    def _restore_source(self) -> Profile:
        if self.restore_source is not None and "output" not in self.model_fields_set:  # a profile of before
            self.output = "source" if self.restore_source else "canvas"
        return self

    def with_overrides(self, *, store: str | None = None, device: str | None = None, runner: str | None = None,
                       workers: int | None = None, ray_address: str | None = None,
                       params: Mapping[str, Mapping[str, Any]] | None = None,
                       backends: Mapping[str, str] | None = None,
                       weights: Mapping[str, str] | None = None) -> Profile:
        """A copy with CLI/env overrides applied (None = keep)."""
        data = self.model_dump()
        if store:
            data["store"] = store
        if device:
            data["device"] = device
        if runner:
            data["runner"]["kind"] = runner
        if workers:
            data["runner"]["max_workers"] = workers
            if data["runner"]["kind"] == "ray":
                data["runner"]["num_cpus"] = workers
        if ray_address:
            data["runner"]["address"] = ray_address
        for stage, values in (params or {}).items():
            data["params"].setdefault(stage, {}).update(values)
        data["backends"].update(backends or {})
        data["weights"].update(weights or {})
        try:
            return Profile.model_validate(data)
        except ValidationError as exc:
            raise ProfileError(f"profile {self.name!r}: bad override: {_first_error(exc)}") from None

    # ---- backends ----------------------------------------------------------------------------------
    def weights_for(self, backend: str) -> str | None:
        """The configured weights path of ``backend``, else a cached one (``v2v models fetch``)."""
        path = self.weights.get(backend)
        if path:
            return str(Path(os.path.expandvars(path)).expanduser())
        return find_cached_weights(backend)


    def has_weights(self, backend: str) -> bool:
        path = self.weights_for(backend)
        return bool(path) and os.path.exists(path)  # type: ignore[arg-type]


def find_cached_weights(backend: str) -> str | None:
    """``stages.models.find_weights`` by backend name, accepting registry aliases (isnet -> isnet-medium)."""
    try:
        from stages import models
    except ImportError:  # the models module is optional while stages are being written
        return None
    names = [backend] + [n for n in getattr(models, "MODELS", {}) if n.split("-")[0] == backend and n != backend]
    for name in names:
        try:
            found = models.find_weights(name)
        except Exception:  # unknown name: try the next alias
            continue
        if found:
            return str(found)
    return None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    return f"{where}: {err['msg']}"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | None = None) -> Profile:
    """Load a profile by name (``profiles/<name>.yaml``) or path; None = ``$V2V_PROFILE`` or ``local``.

    ``local`` works without its file (embedded defaults). Environment overrides are applied here.
    """
    import yaml

    name = name_or_path or os.environ.get("V2V_PROFILE") or "local"
    path = Path(name).expanduser()
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = PROFILES_DIR / f"{name}.yaml"
    if path.is_file():
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ProfileError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ProfileError(f"{path}: a profile is a mapping of settings, got {type(data).__name__}")
        data.setdefault("name", path.stem)
        try:
            profile = Profile.model_validate(data)
        except ValidationError as exc:
            raise ProfileError(f"{path}: {_first_error(exc)}") from None
    elif name == "local":
        profile = Profile()
    else:
        known = ", ".join(available_profiles()) or "none"
        raise ProfileError(f"no profile {name!r} (no file {path}; known profiles: {known})")
    env_workers = os.environ.get("V2V_WORKERS")
    if env_workers and not env_workers.isdigit():
        raise ProfileError(f"V2V_WORKERS must be a whole number, got {env_workers!r}")
    return profile.with_overrides(
        store=os.environ.get("V2V_STORE") or None,
        device=os.environ.get("V2V_DEVICE") or None,
        runner=os.environ.get("V2V_RUNNER") or None,
        workers=int(env_workers) if env_workers else None,
        ray_address=os.environ.get("V2V_RAY_ADDRESS") or None,
    )


def parse_assignments(items: list[str] | None, what: str) -> dict[str, Any]:
    """``["stage.param=value", ...]`` -> nested dict; values are YAML scalars (``8``, ``true``, ``0.5``)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ProfileError(f"{what}: expected KEY=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        if "." in key:
            stage, _, param = key.partition(".")
            out.setdefault(stage, {})[param] = value
        else:
            out[key] = value
    return out
