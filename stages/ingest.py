"""Ingest: decode a source clip (video file, frame folder or DAVIS clip) onto the working canvas.

The stage's input is a :class:`SourceRef`: the files and a digest of their bytes, so planning keys a source
without decoding it (the key covers the bytes and the parameters, whatever the files are called), and the
worker running ingest decodes only the frames it takes (``start``, ``stride``, ``n_frames``), one at a time
straight onto the canvas. File reading, pixel formats and size limits are in :mod:`stages.source_io`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
from pydantic import Field, field_validator

from stages.base import ArraySpec, Backend, Params, Stage, StageInputError
from stages.source_io import (
    DECODE_STATS,
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    DecodeLimits,
    VideoRead,
    image_files,
    image_size,
    iter_video,
    read_image,
    selection,
    sha256_file,
    video_size,
)

__all__ = ["DECODE_STATS", "IMAGE_SUFFIXES", "MAX_CANVAS", "STAGE", "VIDEO_SUFFIXES", "CanvasParams", "DecodeLimits",
           "IngestParams", "SourceClip", "SourceRef", "canvas_geometry", "read_source", "restore_from_canvas",
           "source_ref", "source_size", "to_canvas", "warp_to_canvas", "with_digest"]


MAX_CANVAS = 4096  # px per side; 16 frames at 4096² are ~0.8 GB of RGB and ~4 GB of flow fields


class CanvasParams(Params):
    """The working canvas; every stage that brings an image onto it (ingest, a provided edit) shares it."""

    follows: ClassVar[Mapping[str, str]] = {"canvas": "ingest", "width": "ingest", "height": "ingest"}

    canvas: Literal["squash", "letterbox", "crop"] = "squash"
    width: int = 512
    height: int = 512

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_64(cls, v: int) -> int:
        # The offline backends take any canvas the memory allows; learned ones have their own limits.
        if v % 64 or not 64 <= v <= MAX_CANVAS:
            raise ValueError(f"canvas sides must be multiples of 64 between 64 and {MAX_CANVAS}, got {v}")
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


# ---- the source: a reference to files, decoded where ingest runs -----------------------------------------

@dataclass(frozen=True)
class SourceRef:
    """The ingest stage's input: which files, and a digest of their bytes (what the artifact key covers).

    Small and JSON-able (:meth:`to_json`): planning hashes the files without decoding them, and the worker
    that runs ingest decodes only the frames it takes, checking the bytes it reads against ``digest``."""

    path: str  # the video file or the frames folder (absolute)
    digest: str = ""  # "" = not hashed (read as is, nothing to check)
    frames: tuple[str, ...] = ()  # frames folder: the files taken, in order (names inside ``path``)
    index: tuple[int, ...] = ()  # frames folder: their positions in the folder's sequence
    available: int = 0  # frames folder: its images; video: 0 (known once decoded)
    masks: str | None = None  # a mask file (frame 0, or every frame of a one-frame clip) or a folder of them
    mask_files: tuple[str, ...] = ()  # in ``masks`` (a folder): every mask, in numeric order
    content: str = ""  # video: sha256 of the file's bytes
    stat: tuple[int, int] = (0, 0)  # video: (size, mtime_ns) when planned (the check for files too big to re-hash)
    limits: DecodeLimits = DecodeLimits()

    @property
    def is_video(self) -> bool:
        return not self.frames

    @property
    def has_masks(self) -> bool:
        return self.masks is not None

    def files(self) -> list[Path]:
        """Every file the digest covers (the fingerprint index stamps them)."""
        out = [Path(self.path)] if self.is_video else [Path(self.path, f) for f in self.frames]
        return out + self.mask_paths()

    def mask_paths(self) -> list[Path]:
        if self.masks is None:
            return []
        return [Path(self.masks, f) for f in self.mask_files] if self.mask_files else [Path(self.masks)]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SourceRef:
        doc = dict(doc)
        doc["limits"] = DecodeLimits(**doc.get("limits", {}))
        for name in ("frames", "index", "mask_files", "stat"):
            doc[name] = tuple(doc.get(name, ()))
        return cls(**doc)


def davis_masks(path: Path) -> Path | None:
    """``<root>/JPEGImages/<res?>/<name>`` layout: its Annotations twin, if there is one."""
    parts = path.parts
    if "JPEGImages" not in parts:
        return None
    i = parts.index("JPEGImages")
    ann = Path(*parts[:i], "Annotations", *parts[i + 1:])
    return ann if ann.is_dir() else None


def source_ref(path: str | os.PathLike[str], params: IngestParams | None = None,
               masks: str | os.PathLike[str] | None = None, *, limits: DecodeLimits | None = None,
               hashed: bool = True) -> SourceRef:
    """A reference to the source as ``params`` takes it: the layout checked (cheaply: names and sizes, no pixel
    decoded), the files hashed unless ``hashed=False`` (then :func:`with_digest` can add it later)."""
    params = params or IngestParams()
    limits = limits or DecodeLimits()
    src = Path(path).expanduser().absolute()
    if not src.exists():
        raise StageInputError(f"{src}: no such file or folder")
    if params.n_frames is not None:
        limits.check_frames(str(src), params.n_frames)
    mask_src = Path(masks).expanduser().absolute() if masks else davis_masks(src)
    if mask_src is not None and not mask_src.exists():
        raise StageInputError(f"{mask_src}: masks not found")
    mask_files = tuple(f.name for f in image_files(mask_src)) if mask_src is not None and mask_src.is_dir() else ()
    if src.is_file():
        if src.suffix.lower() not in VIDEO_SUFFIXES:
            raise StageInputError(f"{src}: not a video ({', '.join(sorted(VIDEO_SUFFIXES))}) or a frame folder")
        st = src.stat()
        limits.check_bytes(src, st.st_size, video=True)
        ref = SourceRef(str(src), masks=str(mask_src) if mask_src else None, mask_files=mask_files,
                        stat=(st.st_size, st.st_mtime_ns), limits=limits)
    else:
        files = image_files(src)
        index = selection(len(files), params.start, params.stride, params.n_frames, str(src))
        limits.check_frames(str(src), len(index))
        for i in index:
            limits.check_bytes(files[i], files[i].stat().st_size, video=False)
        if mask_src is not None:
            _mask_choice(mask_src, len(mask_files) or 1, index, len(files), mask_src.is_file())
        ref = SourceRef(str(src), frames=tuple(files[i].name for i in index), index=tuple(index),
                        available=len(files), masks=str(mask_src) if mask_src else None, mask_files=mask_files,
                        limits=limits)
    return with_digest(ref) if hashed else ref


def _mask_choice(where: Path, count: int, index: list[int], available: int, is_file: bool) -> list[int] | None:
    """Which masks the frames take: None = the one mask (frame 0), else a mask per frame taken."""
    if count == 1:
        if index[0] != 0 and not is_file:
            raise StageInputError(f"{where}: one mask given (frame 0) but the clip starts at frame {index[0]}")
        return None
    if count >= available:
        return index
    raise StageInputError(f"{where}: {count} masks for {available} frames (give one per frame, or one for frame 0)")


def _combine(ref: SourceRef, part_digests: list[str], mask_digests: list[str]) -> str:
    record = {"v": 1, "video": ref.is_video, "index": list(ref.index), "parts": part_digests,
              "masks": None if ref.masks is None else [bool(ref.mask_files), mask_digests]}
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def with_digest(ref: SourceRef) -> SourceRef:
    """The reference with its files hashed (streamed: a file's bytes never sit in memory whole)."""
    content = sha256_file(Path(ref.path)) if ref.is_video else ""
    parts = [content] if ref.is_video else [sha256_file(Path(ref.path, f)) for f in ref.frames]
    digest = _combine(ref, parts, [sha256_file(p) for p in ref.mask_paths()])
    return dataclasses.replace(ref, digest=digest, content=content)


# ---- decoding on the worker -----------------------------------------------------------------------

class _Reader:
    """Reads a reference's files once each, hashing what it reads: the digest is checked before any output."""

    def __init__(self, ref: SourceRef) -> None:
        self.ref = ref
        self.parts: list[str] = []  # digests of the frames' files (a video: of the file)

    def frames(self, params: Any, found: VideoRead) -> Iterator[tuple[int, np.ndarray]]:
        ref = self.ref
        if ref.is_video:
            self.parts = [self._video_content()]
            yield from iter_video(Path(ref.path), params.start, params.stride, params.n_frames, ref.limits, found)
            return
        for i, name in zip(ref.index, ref.frames, strict=True):
            data, digest = self._read(Path(ref.path, name))
            self.parts.append(digest)
            DECODE_STATS["frames"] += 1
            yield i, read_image(Path(ref.path, name), limits=ref.limits, data=data)

    def _video_content(self) -> str:
        ref, path = self.ref, Path(self.ref.path)
        if not ref.digest:
            return ""
        st = path.stat()
        if st.st_size <= REHASH_VIDEO_BYTES:
            return sha256_file(path)
        if (st.st_size, st.st_mtime_ns) != tuple(ref.stat):  # too big to re-read: its stat stands for it
            raise StageInputError(f"{path}: the file changed since planning (size or mtime); plan again")
        return ref.content

    def _read(self, path: Path) -> tuple[bytes, str]:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise StageInputError(f"{path}: file not found") from None
        self.ref.limits.check_bytes(path, size, video=False)
        data = path.read_bytes()
        return data, hashlib.sha256(data).hexdigest() if self.ref.digest else ""

    def masks(self, index: list[int], available: int, size: tuple[int, int], params: Any) -> np.ndarray | None:
        """The masks the frames taken use (all mask files are read: the digest covers them all)."""
        ref = self.ref
        paths = ref.mask_paths()
        read = [self._read(p) for p in paths]
        self.check([d for _, d in read])
        if ref.masks is None:
            return None
        chosen = _mask_choice(Path(ref.masks), len(paths), index, available, not ref.mask_files)
        out = []
        for i in [0] if chosen is None else chosen:
            m = read_image(paths[i], mask=True, limits=ref.limits, data=read[i][0])
            if m.shape != size:
                raise StageInputError(f"{paths[i]}: mask is {m.shape[1]}x{m.shape[0]}, frames are {size[1]}x{size[0]}")
            if m.dtype != bool:  # object ids
                m = m == params.mask_object_id if params.mask_object_id is not None else m > 0
            out.append(m)
        return np.stack(out)

    def check(self, mask_digests: list[str]) -> None:
        ref = self.ref
        if ref.digest and _combine(ref, self.parts, mask_digests) != ref.digest:
            raise StageInputError(f"{ref.path}: the source changed since planning; plan again")


REHASH_VIDEO_BYTES = 64 << 20  # a video up to this size is re-hashed where it is decoded


def _stream(ref: SourceRef, params: Any, each: Any) -> tuple[list[Any], list[int], np.ndarray | None, int]:
    """Frames taken, each passed through ``each(frame, source_size)`` as it is decoded (one source frame in
    memory at a time), their indices, the masks at source size and the frames the source has."""
    reader = _Reader(ref)
    found = VideoRead()
    out: list[Any] = []
    index: list[int] = []
    first: tuple[int, ...] | None = None
    for i, frame in reader.frames(params, found):
        if first is None:
            first = frame.shape
        elif frame.shape != first:
            names = (f" ({ref.frames[0]} is {first[1]}x{first[0]}, {ref.frames[len(index)]} differs)"
                     if ref.frames else "")
            raise StageInputError(f"{ref.path}: mixed frame sizes {sorted({first, frame.shape})}{names}")
        out.append(each(frame, (frame.shape[1], frame.shape[0])))
        index.append(i)
    if not out:
        raise StageInputError(f"{ref.path}: no frames decoded")
    available = ref.available or found.seen
    return out, index, reader.masks(index, available, first[:2], params), available


def decode(*, model: None, params: IngestParams, source: SourceRef | SourceClip) -> dict[str, np.ndarray]:
    """The stage's backend: frames taken from the source, streamed onto the canvas."""
    if isinstance(source, SourceClip):  # decoded already (tests, benches): taken as it is
        return to_canvas(model=None, params=params, source_frames=source.frames,
                         source_frame_index=source.frame_index, source_masks=source.masks)
    geometry: dict[str, Any] = {}

    def place(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        geometry.setdefault("g", canvas_geometry(size[0], size[1], params))
        return warp_to_canvas(frame, geometry["g"])

    frames, index, masks, _ = _stream(source, params, place)
    out = {"frames": np.stack(frames).astype(np.uint8), "source_frame_index": np.asarray(index, dtype=np.int64)}
    if masks is not None:
        out["provided_masks"] = np.stack([warp_to_canvas(m, geometry["g"], is_mask=True) for m in masks])
    return out


def source_size(source: SourceRef | SourceClip) -> tuple[int, int]:
    """(width, height) from the file's header (nothing decoded)."""
    if isinstance(source, SourceClip):
        return source.frames.shape[2], source.frames.shape[1]
    if source.is_video:
        return video_size(Path(source.path))
    return image_size(Path(source.path, source.frames[0]))


def _geometry_attrs(params: IngestParams, source: SourceRef | SourceClip, **_: Any) -> dict[str, Any]:
    return {"geometry": canvas_geometry(*source_size(source), params)}


STAGE = Stage(
    name="ingest",
    version="2",  # 2: decoded where it runs from a source reference; 16-bit and alpha images converted
    inputs=("source",),
    outputs={
        "frames": ArraySpec(("frame", "y", "x", "channel"), "uint8"),
        "source_frame_index": ArraySpec(("frame",), "int64"),
        "provided_masks": ArraySpec(("mask_frame", "y", "x"), "bool"),
    },
    optional_outputs=("provided_masks",),
    # Not a stage input: whether the source reference has masks (the planner asks the job's externals).
    output_needs_input={"provided_masks": "source_masks"},
    params=IngestParams,
    backends={"decode": Backend("decode", decode, reads=("canvas", "width", "height", "n_frames", "start",
                                                         "stride", "mask_object_id"))},
    default_backend="decode",
    doc="Source clip on the working canvas (squash, letterbox or crop), with the map back to the source.",
    attrs_fn=_geometry_attrs,
)


# ---- decoded at source resolution (tests, benches) ---------------------------------------------------

@dataclass
class SourceClip:
    """A source decoded at its own resolution (what :func:`read_source` gives)."""

    frames: np.ndarray  # [frame, y, x, 3] uint8 at source resolution
    frame_index: np.ndarray  # indices into the source sequence
    masks: np.ndarray | None  # [mask_frame, y, x] bool, mask_frame = frames or 1
    available: int  # frames the source has (a video stopped early: the frames decoded)

    def arrays(self) -> dict[str, Any]:
        """The ingest stage's inputs: the clip as its source (``STAGE.run(clip.arrays(), params)``)."""
        return {"source": self}


def read_source(path: str | os.PathLike[str], params: IngestParams | None = None,
                masks: str | os.PathLike[str] | None = None, *, limits: DecodeLimits | None = None) -> SourceClip:
    """Decode the frames (and masks) that ``params`` selects; clear errors name the file."""
    params = params or IngestParams()
    ref = source_ref(path, params, masks, limits=limits, hashed=False)
    frames, index, mask_arr, available = _stream(ref, params, lambda f, _: f)
    return SourceClip(frames=np.stack(frames), frame_index=np.asarray(index, dtype=np.int64), masks=mask_arr,
                      available=available)
