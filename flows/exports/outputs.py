"""What a finished job leaves for people: the exported video and a contact sheet (its record in the store:
:mod:`flows.run.manifest`).

Both files are stamped with the artifact keys they were made from (``.v2v-outputs.json``), so a cached re-run
rewrites nothing.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from stages import DELIVERABLE
from storage.store import ArtifactRef, ArtifactStore

log = logging.getLogger("v2v.exports")
OUTPUTS = ("source", "canvas")  # at the source's size (untouched pixels are the source's), or the canvas as is

THUMB = 128  # contact sheet cell height, px
MAX_COLUMNS = 8


# ---- contact sheet ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutputsConfig:
    """Where and how finished jobs are exported (see :func:`job_outputs`)."""

    out_root: str
    formats: tuple[str, ...] = ("mp4", "gif", "png")
    output: str = "source"

    @classmethod
    def of(cls, profile: Any) -> OutputsConfig:
        """A profile's export settings (its ``out``, ``formats`` and ``output``; a profile of before
        ``output`` existed: ``restore_source`` true = ``source``, false = ``canvas``)."""
        out = str(profile.out)
        output = getattr(profile, "output", None) or ("source" if getattr(profile, "restore_source", False)
                                                      else "canvas")
        return cls(out if is_url(out) else str(Path(out).resolve()), tuple(profile.formats), output)

    @property
    def restore_source(self) -> bool:
        """The old switch, for callers that still pass it to :func:`job_outputs`."""
        return self.output == "source"


def is_url(out: str) -> bool:
    """Whether ``out`` is an fsspec URL (``s3://bucket/out``): exports are then uploaded there."""
    return "://" in out


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
            if name == "source_frame_index":  # bookkeeping (which source frames), not a picture
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
    if not cv2.imwrite(str(tmp), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):  # False on a full disk: no sheet
        raise OSError(f"could not write the contact sheet {tmp}")
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
                out_root: str, formats: tuple[str, ...], restore_source: bool | None = None, contact: bool = True,
                *, output: str | None = None, source: str | None = None, source_fps: float | None = None
                ) -> dict[str, str]:
    """Export the job's video and contact sheet into ``out_root/job_id`` (nothing when up to date).

    ``output``: ``source`` (default) = at the source's size, the source frames themselves outside the edit
    region (:func:`stages.export.deliver`; needs ``source``, the job's clip), ``canvas`` = the generator's
    canvas as it is. The frame rate is the source's over ingest's stride (``source_fps``: a frame folder's,
    else 16) and the mp4 carries the source's audio for the exported span. ``restore_source`` is the old
    switch (true = ``source``, false = ``canvas``) for callers that do not pass ``output``; without
    ``source``, ``source`` output falls back to mapping the whole canvas back (what that switch did).

    Runs on a worker like a stage (slim, picklable arguments); returns the written paths by kind (and
    ``_seconds``, the time it took).
    """
    import time

    from storage.write_behind import store_for

    output = output or ("source" if restore_source or restore_source is None else "canvas")
    if output not in OUTPUTS:
        raise ValueError(f"export: output must be one of {list(OUTPUTS)}, got {output!r}")
    t0 = time.perf_counter()
    store = store_for(store_url, store_options)
    store.flush(refs.values())  # this process's writes behind the compute: committed before anything exports
    done = {s: ArtifactRef(s, k) for s, k in refs.items()}
    folder = Path(out_root) / job_id
    stamp = {"refs": dict(refs), "formats": list(formats), "output": output, "source": source,
             "source_fps": source_fps, "contact": contact}
    if is_url(out_root):
        return {**_publish(store, done, out_root, job_id, stamp), "_seconds": f"{time.perf_counter() - t0:.4f}"}
    files = _stamp_ok(folder, stamp)
    if files is None:
        files = _write_outputs(store, done, folder, job_id, **_options(stamp))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".v2v-outputs.json").write_text(json.dumps({"stamp": stamp, "files": files}, indent=1))
    return {**files, "_seconds": f"{time.perf_counter() - t0:.4f}"}


def _options(stamp: dict[str, Any]) -> dict[str, Any]:
    return {"formats": tuple(stamp["formats"]), "output": stamp["output"], "source": stamp["source"],
            "source_fps": stamp["source_fps"], "contact": stamp["contact"]}


def holder(done: dict[str, ArtifactRef], array: str) -> ArtifactRef | None:
    """The job's artifact holding ``array``, found by the stages' declared outputs (never by a stage's name)."""
    return next((ref for stage, ref in done.items() if array in _declared_outputs(stage)), None)


def _write_outputs(store: ArtifactStore, done: dict[str, ArtifactRef], folder: Path, job_id: str, *,
                   formats: tuple[str, ...], output: str, source: str | None, source_fps: float | None,
                   contact: bool) -> dict[str, str]:
    files: dict[str, str] = {}
    for ref in done.values():  # what a stage found worth saying about this job's inputs (edit: an aspect fit)
        for warning in store.attrs(ref).get("warnings", ()):
            log.warning("job %s: %s", job_id, warning)
    ref = holder(done, DELIVERABLE)
    if ref is not None:
        from stages.export import export_video

        video = store.read(ref, [DELIVERABLE])[DELIVERABLE]
        placed = holder(done, "source_frame_index")  # the artifact that put the source on the canvas
        ingest = store.attrs(placed) if placed is not None else {}
        geometry = ingest.get("geometry")
        fps, audio = _rate_and_audio(store, done, ingest, len(video), formats, source, source_fps,
                                     int(store.attrs(ref).get("params", {}).get("fps", 16)))
        if output == "source" and geometry is not None:
            video = _at_source(store, done, video, ingest, source)
        written = export_video(video, folder, fps=fps, formats=formats, audio=audio)
        files.update({k: str(v) for k, v in written.items()})
    if contact:
        sheet = contact_sheet(store, done, folder / "contact-sheet.png")
        if sheet is not None:
            files["contact_sheet"] = str(sheet)
    return files


def _rate_and_audio(store: ArtifactStore, done: dict[str, ArtifactRef], ingest: dict[str, Any], n: int,
                    formats: tuple[str, ...], source: str | None, source_fps: float | None, fallback: int
                    ) -> tuple[Fraction, Any]:
    """The export's frame rate (the source's / stride) and the source's audio for the exported span."""
    from stages.export import probe_source, read_audio

    if source is None:  # a caller that does not say where the clip is: the generator's rate, no audio
        return Fraction(fallback), None
    stride = int(ingest.get("params", {}).get("stride", 1))
    media = probe_source(source)
    if media.fps is None:  # a frame folder
        return Fraction(source_fps or 16).limit_denominator(1001) / stride, None
    placed = holder(done, "source_frame_index")
    if not media.has_audio or "mp4" not in formats or placed is None:
        return media.fps / stride, None
    first = int(store.read(placed, ["source_frame_index"])["source_frame_index"][0])
    start = media.start + float(first / media.fps)
    return media.fps / stride, read_audio(source, start, float(n * stride / media.fps))


def _at_source(store: ArtifactStore, done: dict[str, ArtifactRef], video: np.ndarray, ingest: dict[str, Any],
               source: str | None) -> np.ndarray:
    """The video at the source's size: untouched pixels from the source frames, decoded again at full
    resolution and checked against the frames ingest made (mapped onto the canvas the same way)."""
    from stages.base import StageInputError
    from stages.export import deliver, restore_video
    from stages.ingest import IngestParams, read_source, warp_to_canvas

    geometry = ingest["geometry"]
    if source is None:
        return restore_video(video, geometry)
    params = IngestParams(**{k: v for k, v in ingest.get("params", {}).items() if k in IngestParams.model_fields})
    clip = read_source(source, params)
    a = store.read(holder(done, "source_frame_index"), ["frames", "source_frame_index"])  # type: ignore[arg-type]
    # The same clip: the same frames taken, and on the canvas what ingest stored (a level of slack, in case a
    # decoder differs in its last bit; another clip is tens of levels away).
    same = np.array_equal(clip.frame_index, a["source_frame_index"]) and clip.frames.shape[1:3] == tuple(
        geometry["source_size"][::-1]) and all(
        np.abs(warp_to_canvas(f, geometry).astype(np.int16) - c).mean() <= 1.0
        for f, c in zip(clip.frames, a["frames"], strict=True))
    if not same:
        raise StageInputError(f"export: {source} is not the clip ingest read (its frames changed): run the job "
                              "again")
    for name in ("object_masks", "shape_masks", "edited_frame"):
        ref = holder(done, name)
        if ref is not None:
            a.update(store.read(ref, [name]))
    return deliver(video, clip.frames, geometry, a["frames"], a.get("object_masks"), a.get("shape_masks"),
                   a.get("edited_frame"))


def _publish(store: ArtifactStore, done: dict[str, ArtifactRef], out_url: str, job_id: str, stamp: dict[str, Any]
             ) -> dict[str, str]:
    """Export into a local temporary folder, then upload to ``out_url/job_id``: the files only once all are
    written (each object appears whole), the stamp last (a stamp there means its files are). Returns URLs."""
    import tempfile

    import fsspec

    fs, root = fsspec.core.url_to_fs(out_url)
    remote, base = f"{root.rstrip('/')}/{job_id}", f"{out_url.rstrip('/')}/{job_id}"
    try:
        old = json.loads(fs.cat_file(f"{remote}/.v2v-outputs.json"))
        if old.get("stamp") == stamp and all(fs.exists(f"{remote}/{Path(p).name}") for p in old["files"].values()):
            return dict(old["files"])
    except (OSError, ValueError, KeyError, AttributeError):  # absent or unreadable: export again
        pass
    with tempfile.TemporaryDirectory(prefix="v2v-out-") as tmp:
        local = _write_outputs(store, done, Path(tmp), job_id, **_options(stamp))
        files = {kind: f"{base}/{Path(path).name}" for kind, path in local.items()}
        for path in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):  # the png frames are a folder
            fs.put_file(str(path), f"{remote}/{path.relative_to(tmp).as_posix()}")
    fs.pipe_file(f"{remote}/.v2v-outputs.json", json.dumps({"stamp": stamp, "files": files}, indent=1).encode())
    return files
