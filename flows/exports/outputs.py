"""What a finished job leaves for people: the exported video, a contact sheet, and its record in the store.

Both files are stamped with the artifact keys they were made from (``.v2v-outputs.json``), so a cached re-run
rewrites nothing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flows.plan.planner import JobPlan
from storage.store import ArtifactRef, ArtifactStore

THUMB = 128  # contact sheet cell height, px
MAX_COLUMNS = 8


# ---- contact sheet ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutputsConfig:
    """Where and how finished jobs are exported (see :func:`job_outputs`)."""

    out_root: str
    formats: tuple[str, ...] = ("mp4", "gif", "png")
    restore_source: bool = False

    @classmethod
    def of(cls, profile: Any) -> OutputsConfig:
        """A profile's export settings (its ``out``, ``formats`` and ``restore_source``)."""
        return cls(str(Path(profile.out).resolve()), tuple(profile.formats), bool(profile.restore_source))


def _to_rgb(frame: np.ndarray) -> np.ndarray:
    """One 2-D or 3-D array slice -> uint8 RGB for display."""
    import cv2

    if frame.ndim == 3 and frame.shape[-1] == 2:  # flow (x, y): HSV wheel, saturation = magnitude
        mag, ang = cv2.cartToPolar(frame[..., 0].astype(np.float32), frame[..., 1].astype(np.float32))
        hsv = np.zeros((*frame.shape[:2], 3), np.uint8)
        hsv[..., 0] = (ang * 90 / np.pi).astype(np.uint8)
        hsv[..., 1] = 255
        top = float(np.percentile(mag, 99)) or 1.0
        hsv[..., 2] = np.clip(mag / top * 255, 0, 255).astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if frame.ndim == 3 and frame.shape[-1] in (3, 4):
        rgb = frame[..., :3]
        if rgb.dtype != np.uint8:
            rgb = np.clip(np.nan_to_num(rgb.astype(np.float32)) * (255 if rgb.max() <= 1 else 1), 0, 255)
        return np.ascontiguousarray(rgb.astype(np.uint8))
    if frame.ndim != 2:
        frame = frame.reshape(frame.shape[0], -1)
    if frame.dtype == bool:
        grey = frame.astype(np.uint8) * 255
    else:
        f = np.nan_to_num(frame.astype(np.float32))
        lo, hi = float(f.min()), float(f.max())
        grey = ((f - lo) / (hi - lo) * 255).astype(np.uint8) if hi > lo else np.zeros(f.shape, np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def _frames_of(name: str, data: np.ndarray, dims: tuple[str, ...]) -> list[np.ndarray]:
    if data.ndim == 0 or data.size == 0:
        return []
    if dims and dims[0] in ("frame", "pair", "mask_frame") and data.ndim >= 3:
        idx = np.linspace(0, data.shape[0] - 1, min(MAX_COLUMNS, data.shape[0])).round().astype(int)
        return [data[i] for i in dict.fromkeys(idx.tolist())]
    if data.ndim in (2, 3):
        return [data]
    return []


def contact_sheet(store: ArtifactStore, refs: dict[str, ArtifactRef], path: Path) -> Path | None:
    """One labelled row per array of every stage output (frames sampled across the clip)."""
    import cv2

    rows: list[np.ndarray] = []
    metrics: list[str] = []  # 0-d and 1-d arrays (scores per frame): one text line each
    label_w = 220
    for stage, ref in sorted(refs.items(), key=lambda item: _pipeline_rank(item[0])):
        try:
            arrays = store.read(ref)
        except Exception:
            continue
        # The declared order (arrays read from memory keep it, from the store come sorted by name).
        declared = list(_declared_outputs(stage))
        for name in sorted(arrays, key=lambda n: (declared.index(n) if n in declared else len(declared), n)):
            data = arrays[name]
            if stage == "ingest" and name == "source_frame_index":
                continue
            if data.ndim <= 1 and data.size and data.dtype.kind in "fiub":
                vals = data.astype(np.float64).ravel()
                text = f"{vals[0]:.4g}" if vals.size == 1 else \
                    f"mean {np.nanmean(vals):.4g}  min {np.nanmin(vals):.4g}  max {np.nanmax(vals):.4g}"
                metrics.append(f"{stage}.{name}: {text}")
                continue
            dims = _declared_dims(stage, name) or _guess_dims(name, data)
            frames = _frames_of(name, data, dims)
            if not frames:
                continue
            cells = []
            for fr in frames:
                rgb = _to_rgb(fr)
                h, w = rgb.shape[:2]
                cells.append(cv2.resize(rgb, (max(1, round(w * THUMB / h)), THUMB), interpolation=cv2.INTER_AREA))
            strip = np.concatenate(cells, axis=1)
            label = np.full((THUMB, label_w, 3), 255, np.uint8)
            cv2.putText(label, stage, (6, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
            cv2.putText(label, name, (6, 60), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (40, 40, 160), 1, cv2.LINE_AA)
            cv2.putText(label, f"{data.dtype} {'x'.join(map(str, data.shape))}", (6, 90),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.4, (90, 90, 90), 1, cv2.LINE_AA)
            rows.append(np.concatenate([label, strip], axis=1))
    if metrics:
        panel = np.full((22 * len(metrics) + 12, max(720, label_w + 4 * THUMB), 3), 255, np.uint8)
        for i, line in enumerate(metrics):
            cv2.putText(panel, line, (6, 24 + 22 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        rows.append(panel)
    if not rows:
        return None
    width = max(r.shape[1] for r in rows)
    sheet = np.concatenate([np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)), constant_values=255)
                            for r in rows], axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    cv2.imwrite(str(tmp), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    os.replace(tmp, path)
    return path


def _pipeline_rank(stage: str) -> int:
    from stages import PIPELINE

    return PIPELINE.index(stage) if stage in PIPELINE else len(PIPELINE)


def _declared_outputs(stage: str) -> dict[str, Any]:
    """The stage's output declarations (name -> ArraySpec), in declared order."""
    try:
        from stages import get_stage

        return dict(get_stage(stage).outputs)
    except Exception:  # a stage module gone since the artifact was written
        return {}


def _declared_dims(stage: str, name: str) -> tuple[str, ...]:
    spec = _declared_outputs(stage).get(name)
    return tuple(spec.dims) if spec is not None else ()


def _guess_dims(name: str, data: np.ndarray) -> tuple[str, ...]:
    if name in ("flows", "simulated_flows"):
        return ("pair", "y", "x", "component")
    if data.ndim >= 3 and name not in ("edited_frame",):
        return ("frame",) + ("y", "x", "channel")[: data.ndim - 1]
    return ("y", "x", "channel")[: data.ndim]


# ---- finalising a job ---------------------------------------------------------------------------------------

def _stamp_ok(folder: Path, stamp: dict[str, Any]) -> dict[str, str] | None:
    try:
        old = json.loads((folder / ".v2v-outputs.json").read_text())
    except (OSError, ValueError):
        return None
    if old.get("stamp") != stamp or not all(Path(p).exists() for p in old.get("files", {}).values()):
        return None
    return dict(old["files"])


def job_outputs(store_url: str, store_options: dict[str, Any] | None, job_id: str, refs: dict[str, str],
                out_root: str, formats: tuple[str, ...], restore_source: bool, contact: bool = True
                ) -> dict[str, str]:
    """Export the job's video and contact sheet into ``out_root/job_id`` (nothing when up to date).

    Runs on a worker like a stage (slim, picklable arguments); returns the written paths by kind (and
    ``_seconds``, the time it took).
    """
    import time

    from storage.write_behind import store_for

    t0 = time.perf_counter()
    store = store_for(store_url, store_options)
    store.flush(refs.values())  # this process's writes behind the compute: committed before anything exports
    done = {s: ArtifactRef(s, k) for s, k in refs.items()}
    folder = Path(out_root) / job_id
    stamp = {"refs": dict(refs), "formats": list(formats), "restore_source": restore_source, "contact": contact}
    files = _stamp_ok(folder, stamp)
    if files is None:
        files = _write_outputs(store, done, folder, formats=formats, restore_source=restore_source,
                               contact=contact)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".v2v-outputs.json").write_text(json.dumps({"stamp": stamp, "files": files}, indent=1))
    return {**files, "_seconds": f"{time.perf_counter() - t0:.4f}"}


def record(store: ArtifactStore, plan: JobPlan, result: Any) -> None:
    """The job's manifest in the store: which artifact each stage uses (views, gc, inspect), status, outputs."""
    done = done_refs(plan, result)
    extra: dict[str, Any] = {"status": result.status, "error": result.error, "outputs": result.outputs,
                             "stages": {s: {"status": r.status, "seconds": r.seconds, "error": r.error}
                                        for s, r in result.stages.items()}}
    if plan.job is not None:
        extra.update({"source": str(plan.job.source), "mode": plan.job.mode, "prompt": plan.job.prompt})
    store.record_job(plan.job_id, done, extra)


def done_refs(plan: JobPlan, result: Any) -> dict[str, ArtifactRef]:
    return {s: plan.stages[s].call.ref for s, r in result.stages.items()  # type: ignore[union-attr]
            if r.status in ("computed", "cached") and plan.stages[s].call is not None}


def _write_outputs(store: ArtifactStore, done: dict[str, ArtifactRef], folder: Path, *, formats: tuple[str, ...],
                   restore_source: bool, contact: bool) -> dict[str, str]:
    files: dict[str, str] = {}
    video_stage = next((s for s, ref in done.items() if "video" in store.attrs(ref).get("checksums", {})), None)
    if video_stage is not None:
        try:
            from stages.export import export_video
        except ImportError:
            export_video = None
        if export_video is not None:
            ref = done[video_stage]
            video = store.read(ref, ["video"])["video"]
            fps = int(store.attrs(ref).get("params", {}).get("fps", 16))
            geometry = store.attrs(done["ingest"]).get("geometry") if "ingest" in done else None
            written = export_video(video, folder, fps=fps, formats=formats, geometry=geometry,
                                   restore_source=restore_source)
            files.update({k: str(v) for k, v in written.items()})
    if contact:
        sheet = contact_sheet(store, done, folder / "contact-sheet.png")
        if sheet is not None:
            files["contact_sheet"] = str(sheet)
    return files
