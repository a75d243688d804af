"""Ingest: decode a source clip (video file, frame folder or DAVIS clip) onto the working canvas.

Reading (``read_source``) is separate from the pure stage function (``to_canvas``): the decoded frames are
the stage's input, so the source key is the hash of the decoded pixels and the parameters, whatever the
file is called or how it was encoded.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
from pydantic import Field, field_validator

from stages.base import ArraySpec, Backend, Params, Stage, StageInputError

log = logging.getLogger("v2v.ingest")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".webm", ".mkv", ".m4v"}


class CanvasParams(Params):
    """The working canvas; every stage that brings an image onto it (ingest, a provided edit) shares it."""

    follows: ClassVar[Mapping[str, str]] = {"canvas": "ingest", "width": "ingest", "height": "ingest"}

    canvas: Literal["squash", "letterbox", "crop"] = "squash"
    width: int = 512
    height: int = 512

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_64(cls, v: int) -> int:
        if v % 64 or not 64 <= v <= 1024:
            raise ValueError(f"canvas sides must be multiples of 64 between 64 and 1024, got {v}")
        return v


class IngestParams(CanvasParams):
    n_frames: int | None = Field(16, ge=1, description="frames to take; None = all from start")
    start: int = Field(0, ge=0)
    stride: int = Field(1, ge=1)
    mask_object_id: int | None = Field(None, ge=1, description="DAVIS palette id; None = every object")


# ---- geometry ---------------------------------------------------------------------------------------

def canvas_geometry(src_w: int, src_h: int, params: CanvasParams) -> dict[str, Any]:
    """Mapping source -> canvas: ``canvas = source * scale + offset`` (pixel-edge coordinates)."""
    cw, ch = params.width, params.height
    if params.canvas == "squash":
        sx, sy = cw / src_w, ch / src_h
    else:
        pick = min if params.canvas == "letterbox" else max
        sx = sy = pick(cw / src_w, ch / src_h)
    ox, oy = (cw - src_w * sx) / 2, (ch - src_h * sy) / 2
    return {"mode": params.canvas, "source_size": [src_w, src_h], "canvas_size": [cw, ch],
            "scale": [sx, sy], "offset": [ox, oy]}


def warp_to_canvas(image: np.ndarray, geometry: dict[str, Any], *, is_mask: bool = False) -> np.ndarray:
    (sx, sy), (ox, oy) = geometry["scale"], geometry["offset"]
    cw, ch = geometry["canvas_size"]
    # Pixel-centre convention: canvas pixel centre c maps to source (c + 0.5 - offset) / scale - 0.5.
    m = np.array([[sx, 0, ox + 0.5 * sx - 0.5], [0, sy, oy + 0.5 * sy - 0.5]], dtype=np.float64)
    src = image.astype(np.float32) if is_mask else image
    shrink = sx < 1 or sy < 1
    if geometry["mode"] == "squash" or not is_mask:
        interp = cv2.INTER_AREA if shrink and not is_mask else cv2.INTER_LINEAR
        if geometry["mode"] == "squash":
            out = cv2.resize(src, (cw, ch), interpolation=interp)
            return out > 0.5 if is_mask else out
    out = cv2.warpAffine(src, m, (cw, ch), flags=cv2.INTER_LINEAR if is_mask or not shrink else cv2.INTER_AREA,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out > 0.5 if is_mask else out


def restore_from_canvas(image: np.ndarray, geometry: dict[str, Any]) -> np.ndarray:
    """Bring a canvas-sized image back to the source geometry (the covered part, for ``crop``)."""
    (sx, sy), (ox, oy) = geometry["scale"], geometry["offset"]
    sw, sh = geometry["source_size"]
    if geometry["mode"] == "squash":
        return cv2.resize(image, (sw, sh), interpolation=cv2.INTER_LINEAR)
    m = np.array([[sx, 0, ox + 0.5 * sx - 0.5], [0, sy, oy + 0.5 * sy - 0.5]], dtype=np.float64)
    return cv2.warpAffine(image, m, (sw, sh), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


# ---- the pure stage function ----------------------------------------------------------------------

def to_canvas(*, model: None, params: IngestParams, source_frames: np.ndarray,
              source_frame_index: np.ndarray, source_masks: np.ndarray | None = None) -> dict[str, np.ndarray]:
    if source_frames.ndim != 4 or source_frames.shape[-1] != 3 or source_frames.dtype != np.uint8:
        raise StageInputError(f"source frames must be uint8 [frame, y, x, 3], got {source_frames.dtype} "
                              f"{source_frames.shape}")
    h, w = source_frames.shape[1:3]
    geometry = canvas_geometry(w, h, params)
    frames = np.stack([warp_to_canvas(f, geometry) for f in source_frames]).astype(np.uint8)
    out = {"frames": frames, "source_frame_index": source_frame_index.astype(np.int64)}
    if source_masks is not None and source_masks.size:
        out["provided_masks"] = np.stack([warp_to_canvas(m, geometry, is_mask=True) for m in source_masks])
    return out


def _geometry_attrs(params: IngestParams, source_frames: np.ndarray, **_: Any) -> dict[str, Any]:
    return {"geometry": canvas_geometry(source_frames.shape[2], source_frames.shape[1], params)}


STAGE = Stage(
    name="ingest",
    version="1",
    inputs=("source_frames", "source_frame_index", "source_masks"),
    outputs={
        "frames": ArraySpec(("frame", "y", "x", "channel"), "uint8"),
        "source_frame_index": ArraySpec(("frame",), "int64"),
        "provided_masks": ArraySpec(("mask_frame", "y", "x"), "bool"),
    },
    optional_outputs=("provided_masks",),
    output_needs_input={"provided_masks": "source_masks"},
    params=IngestParams,
    backends={"decode": Backend("decode", to_canvas)},
    default_backend="decode",
    doc="Source clip on the working canvas (squash, letterbox or crop), with the map back to the source.",
    attrs_fn=_geometry_attrs,
)


# ---- reading sources ------------------------------------------------------------------------------

@dataclass
class SourceClip:
    """Decoded source pixels: the external inputs of the ingest stage."""

    frames: np.ndarray  # [frame, y, x, 3] uint8 at source resolution
    frame_index: np.ndarray  # indices into the source sequence
    masks: np.ndarray | None  # [mask_frame, y, x] bool, mask_frame = frames or 1
    available: int  # frames the source has

    def arrays(self) -> dict[str, np.ndarray]:
        masks = self.masks if self.masks is not None else np.zeros((0, 0, 0), dtype=bool)
        return {"source_frames": self.frames, "source_frame_index": self.frame_index, "source_masks": masks}


def _numeric_key(path: Path) -> tuple[Any, ...]:
    parts = re.split(r"(\d+)", path.stem)
    return tuple(int(p) if p.isdigit() else p for p in parts) + (path.suffix,)


def _selection(available: int, params: IngestParams, what: str) -> list[int]:
    if available == 0:
        raise StageInputError(f"{what}: no frames found")
    if params.start >= available:
        raise StageInputError(f"{what}: start={params.start} but the clip has only {available} frames")
    if params.n_frames is None:
        return list(range(params.start, available, params.stride))
    last = params.start + (params.n_frames - 1) * params.stride
    if last >= available:
        raise StageInputError(
            f"{what}: asked for {params.n_frames} frames (start {params.start}, stride {params.stride}, "
            f"up to index {last}) but the clip has only {available} frames")
    return list(range(params.start, last + 1, params.stride))


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise StageInputError(f"{folder}: not a folder")
    files = []
    for p in sorted(folder.iterdir(), key=_numeric_key):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            files.append(p)
        elif p.is_file():
            log.warning("%s: skipping %s (not an image)", folder, p.name)
    if not files:
        raise StageInputError(f"{folder}: empty folder (no image files)")
    return files


def _read_image(path: Path, *, mask: bool = False) -> np.ndarray:
    """RGB uint8; with ``mask``: a bool mask (grey >= 128) or, for palette PNGs, the object ids."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if not mask:
                return np.asarray(im.convert("RGB"))
            if im.mode == "P":  # DAVIS annotations: pixel value = object id
                return np.asarray(im).astype(np.int64)
            return np.asarray(im.convert("L")) >= 128
    except FileNotFoundError:
        raise StageInputError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise StageInputError(f"{path}: unreadable or corrupt image ({exc})") from None


def _read_video(path: Path, params: IngestParams) -> tuple[np.ndarray, list[int], int]:
    import av

    last = None if params.n_frames is None else params.start + (params.n_frames - 1) * params.stride
    frames: list[np.ndarray] = []
    count = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise StageInputError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if count >= params.start and (count - params.start) % params.stride == 0:
                    frames.append(frame.to_ndarray(format="rgb24"))
                count += 1
                if last is not None and count > last:
                    break
    except StageInputError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise StageInputError(f"{path}: unreadable or corrupt video ({exc})") from None
    index = _selection(count, params, str(path))  # raises "only N frames" when the clip is short
    return _stack(frames[: len(index)], path), index, count


def _stack(frames: list[np.ndarray], where: Path, names: list[str] | None = None) -> np.ndarray:
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        detail = ""
        if names:
            first = frames[0].shape
            odd = next(n for n, f in zip(names, frames, strict=True) if f.shape != first)
            detail = f" ({names[0]} is {first[1]}x{first[0]}, {odd} differs)"
        raise StageInputError(f"{where}: mixed frame sizes {sorted(shapes)}{detail}")
    return np.stack(frames)


def _davis_paths(path: Path) -> tuple[Path, Path | None] | None:
    """``<root>/JPEGImages/<res?>/<name>`` layout: the frames folder and its Annotations twin."""
    parts = path.parts
    if "JPEGImages" not in parts:
        return None
    i = parts.index("JPEGImages")
    ann = Path(*parts[:i], "Annotations", *parts[i + 1:])
    return path, ann if ann.is_dir() else None


def _read_masks(source: Path, index: list[int], available: int, size: tuple[int, int],
                params: IngestParams) -> np.ndarray:
    if not source.exists():
        raise StageInputError(f"{source}: masks not found")
    files = [source] if source.is_file() else _image_files(source)
    if len(files) == 1:
        chosen = files if index[0] == 0 or source.is_file() else None
        if chosen is None:
            raise StageInputError(f"{source}: one mask given (frame 0) but the clip starts at frame {index[0]}")
    elif len(files) >= available:
        chosen = [files[i] for i in index]
    else:
        raise StageInputError(f"{source}: {len(files)} masks for {available} frames "
                              "(give one per frame, or one for frame 0)")
    masks = []
    for f in chosen:
        m = _read_image(f, mask=True)
        if m.shape != size:
            raise StageInputError(f"{f}: mask is {m.shape[1]}x{m.shape[0]}, frames are {size[1]}x{size[0]}")
        if m.dtype != bool:  # object ids
            m = m == params.mask_object_id if params.mask_object_id is not None else m > 0
        masks.append(m)
    return np.stack(masks)


def read_source(path: str | os.PathLike[str], params: IngestParams | None = None,
                masks: str | os.PathLike[str] | None = None) -> SourceClip:
    """Decode the frames (and masks) that ``params`` selects; clear errors name the file."""
    params = params or IngestParams()
    src = Path(path).expanduser()
    if not src.exists():
        raise StageInputError(f"{src}: no such file or folder")
    if src.is_file():
        if src.suffix.lower() not in VIDEO_SUFFIXES:
            raise StageInputError(f"{src}: not a video ({', '.join(sorted(VIDEO_SUFFIXES))}) or a frame folder")
        frames, index, available = _read_video(src, params)
        ann = None
    else:
        davis = _davis_paths(src)
        ann = davis[1] if davis else None
        files = _image_files(src)
        available = len(files)
        index = _selection(available, params, str(src))
        chosen = [files[i] for i in index]
        frames = _stack([_read_image(f) for f in chosen], src, [f.name for f in chosen])
    mask_src = Path(masks).expanduser() if masks else ann
    mask_arr = None
    if mask_src is not None:
        mask_arr = _read_masks(mask_src, index, available, frames.shape[1:3], params)
    return SourceClip(frames=frames, frame_index=np.asarray(index, dtype=np.int64), masks=mask_arr,
                      available=available)
