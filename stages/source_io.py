"""Reading source files for ingest: images in any pixel format, videos streamed frame by frame, size limits.

Everything here refuses bad input with a one-line :class:`StageInputError` naming the file, and checks the
limits (:class:`DecodeLimits`) before decoding: bytes from ``stat``, pixels from the header (Pillow's lazy open,
the video stream's codec parameters), frames as they are taken.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from stages.base import StageInputError

log = logging.getLogger("v2v.ingest")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".webm", ".mkv", ".m4v"}
# A start frame from here on is reached by seeking to the keyframe before it, not by decoding through.
SEEK_FROM = 64
# Frames this process decoded (videos: every frame out of the decoder, taken or not; folders: images read).
DECODE_STATS: dict[str, int] = {"frames": 0}


@dataclass(frozen=True)
class DecodeLimits:
    """Most a source may ask of a worker; the profile's ``limits:`` section (same names, same defaults)."""

    max_pixels: int = 40_000_000  # one frame or image (8K UHD is 33.2 M)
    max_frames: int = 2_000  # frames one job takes from its source
    max_video_bytes: int = 64 << 30
    max_image_bytes: int = 256 << 20

    def check_bytes(self, path: Path, size: int, video: bool) -> None:
        most = self.max_video_bytes if video else self.max_image_bytes
        if size > most:
            raise StageInputError(f"{path}: {size:,} bytes, over the limit of {most:,} "
                                  f"(limits.max_{'video' if video else 'image'}_bytes)")

    def check_pixels(self, path: Path | str, w: int, h: int) -> None:
        if w * h > self.max_pixels:
            raise StageInputError(f"{path}: {w}x{h} is {w * h / 1e6:.1f} Mpx, over the limit of "
                                  f"{self.max_pixels / 1e6:.1f} Mpx (limits.max_pixels)")

    def check_frames(self, what: str, n: int) -> None:
        if n > self.max_frames:
            raise StageInputError(f"{what}: {n} frames taken, over the limit of {self.max_frames} "
                                  "(limits.max_frames; take fewer with n_frames or stride)")


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    """Streamed: memory stays one block whatever the file's size."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- folders ---------------------------------------------------------------------------------------

def numeric_key(path: Path) -> tuple[Any, ...]:
    parts = re.split(r"(\d+)", path.stem)
    return tuple(int(p) if p.isdigit() else p for p in parts) + (path.suffix,)


def image_files(folder: Path) -> list[Path]:
    """The folder's images in numeric order (frame10 after frame9); other files are skipped with a warning."""
    if not folder.is_dir():
        raise StageInputError(f"{folder}: not a folder")
    files = []
    with os.scandir(folder) as it:
        entries = [(Path(e.path), e.is_file()) for e in it]
    for p, is_file in sorted(entries, key=lambda e: numeric_key(e[0])):
        if is_file and p.suffix.lower() in IMAGE_SUFFIXES:
            files.append(p)
        elif is_file and not p.name.startswith("."):
            log.warning("%s: skipping %s (not an image)", folder, p.name)
    if not files:
        raise StageInputError(f"{folder}: empty folder (no image files)")
    return files


def selection(available: int, start: int, stride: int, n_frames: int | None, what: str) -> list[int]:
    if available == 0:
        raise StageInputError(f"{what}: no frames found")
    if start >= available:
        raise StageInputError(f"{what}: start={start} but the clip has only {available} frames")
    if n_frames is None:
        return list(range(start, available, stride))
    last = start + (n_frames - 1) * stride
    if last >= available:
        raise StageInputError(
            f"{what}: asked for {n_frames} frames (start {start}, stride {stride}, "
            f"up to index {last}) but the clip has only {available} frames")
    return list(range(start, last + 1, stride))


# ---- images ----------------------------------------------------------------------------------------

def _composite(im: Any) -> np.ndarray:
    """RGB over black by the alpha channel (what a transparent pixel shows on a video)."""
    rgba = np.asarray(im.convert("RGBA"), dtype=np.uint16)
    return ((rgba[..., :3] * rgba[..., 3:] + 127) // 255).astype(np.uint8)


def _wide_grey(im: Any, path: Path | str) -> np.ndarray:
    """16-bit (or 32-bit integer) grey as 0..65535 values; refuses what it cannot scale honestly."""
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        return a.astype(np.uint16)
    if im.mode == "I":
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise StageInputError(f"{path}: 32-bit integer image with values {lo}..{hi}: not an 8- or 16-bit "
                                  "image (convert it to 8 or 16 bits)")
        return (a * 257 if hi <= 255 else a).astype(np.uint16)  # 8-bit values stored wide stay as they are
    raise StageInputError(f"{path}: {im.mode} ({'floating point' if im.mode == 'F' else 'unknown'}) pixels are not "
                          "supported: save it as 8- or 16-bit RGB or grey")


def image_rgb(im: Any, path: Path | str) -> np.ndarray:
    """uint8 RGB from any Pillow mode: 16-bit scaled (not clipped), alpha over black, palette, CMYK, ..."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im)
    if mode.startswith("I") or mode == "F":
        grey = (_wide_grey(im, path) >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        return _composite(im)
    try:
        return np.asarray(im.convert("RGB"))
    except (ValueError, OSError) as exc:
        raise StageInputError(f"{path}: pixel format {mode} cannot be converted to RGB ({exc})") from None


def image_mask(im: Any, path: Path | str) -> np.ndarray:
    """A bool mask (grey >= half the full scale; transparent = background) or, for palette PNGs, object ids."""
    mode = im.mode
    if mode == "P":  # DAVIS annotations: pixel value = object id
        return np.asarray(im).astype(np.int64)
    if mode == "1":
        return np.asarray(im).astype(bool)
    if mode.startswith("I") or mode == "F":
        return _wide_grey(im, path) >= 32768
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite(im).max(axis=2) >= 128
    try:
        return np.asarray(im.convert("L")) >= 128
    except (ValueError, OSError) as exc:
        raise StageInputError(f"{path}: pixel format {mode} cannot be read as a mask ({exc})") from None


def read_image(path: Path | str, *, mask: bool = False, limits: DecodeLimits | None = None,
               data: bytes | None = None) -> np.ndarray:
    """uint8 RGB (or a mask, see :func:`image_mask`), limits checked before decoding; ``data``: the file's
    bytes when already read (then nothing is read again)."""
    from PIL import Image, UnidentifiedImageError

    limits = limits or DecodeLimits()
    p = Path(path)
    try:
        if data is None:
            limits.check_bytes(p, p.stat().st_size, video=False)
        with Image.open(io.BytesIO(data) if data is not None else p) as im:
            limits.check_pixels(p, *im.size)  # the header only: nothing decoded yet
            im.load()
            return np.ascontiguousarray(image_mask(im, p) if mask else image_rgb(im, p))
    except FileNotFoundError:
        raise StageInputError(f"{p}: file not found") from None
    except Image.DecompressionBombError:  # over Pillow's own guard (179 Mpx), raised by the lazy open
        most = 2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6
        raise StageInputError(f"{p}: refused as a decompression bomb (over Pillow's limit of {most:.0f} Mpx)"
                              ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, StageInputError):
            raise
        raise StageInputError(f"{p}: unreadable or corrupt image ({exc})") from None


def image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


# ---- videos ----------------------------------------------------------------------------------------

@dataclass
class VideoRead:
    """What streaming a video found besides the frames: frames seen (a lower bound when stopped early)."""

    seen: int = 0
    size: tuple[int, int] = (0, 0)


def video_size(path: Path) -> tuple[int, int]:
    import av

    with av.open(str(path)) as container:
        cc = container.streams.video[0].codec_context
        return cc.width, cc.height


def iter_video(path: Path, start: int, stride: int, n_frames: int | None, limits: DecodeLimits,
               found: VideoRead | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(index, RGB frame) for the frames taken, decoding no further than the last one; a start far in is reached
    by seeking to the keyframe before it. Raises, after the loop, when the clip is shorter than asked."""
    import av

    found = found if found is not None else VideoRead()
    limits.check_bytes(path, path.stat().st_size, video=True)
    try:
        try:
            yield from _decode(path, start, stride, n_frames, limits, found, seek=start >= SEEK_FROM)
        except _Overshoot:  # odd timestamps: decode through from the start instead
            yield from _decode(path, start, stride, n_frames, limits, found, seek=False)
    except StageInputError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise StageInputError(f"{path}: unreadable or corrupt video ({exc})") from None
    selection(found.seen, start, stride, n_frames, str(path))  # "only N frames" when the clip is short


class _Overshoot(Exception):
    """After a seek, the first frame decoded lies after the start frame (or has no timestamp)."""


def _decode(path: Path, start: int, stride: int, n_frames: int | None, limits: DecodeLimits, found: VideoRead,
            seek: bool) -> Iterator[tuple[int, np.ndarray]]:
    import av

    last = None if n_frames is None else start + (n_frames - 1) * stride
    taken = 0
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise StageInputError(f"{path}: no video stream")
        stream = container.streams.video[0]
        cc = stream.codec_context
        if cc.width and cc.height:
            limits.check_pixels(path, cc.width, cc.height)  # from the header: nothing decoded yet
        stream.thread_type = "AUTO"
        seeked = seek and _seek(container, stream, start)
        idx = -1
        for frame in container.decode(stream):
            DECODE_STATS["frames"] += 1
            if idx < 0:
                limits.check_pixels(path, frame.width, frame.height)
                found.size = (frame.width, frame.height)
                if seeked:
                    # Frames count on from the keyframe's timestamp (exact for constant frame rate clips).
                    first = _frame_index(frame, stream)
                    if first is None or first > start:
                        raise _Overshoot
                    idx = first - 1
            idx += 1
            found.seen = idx + 1
            if idx >= start and (idx - start) % stride == 0:
                taken += 1
                limits.check_frames(str(path), taken)
                yield idx, frame.to_ndarray(format="rgb24")
            if last is not None and idx >= last:
                break


def _frame_index(frame: Any, stream: Any) -> int | None:
    rate = stream.average_rate or stream.guessed_rate
    if frame.pts is None or not rate or not stream.time_base:
        return None
    return round((frame.pts - (stream.start_time or 0)) * stream.time_base * Fraction(rate))


def _seek(container: Any, stream: Any, start: int) -> bool:
    """Seek to the keyframe at or before frame ``start``; False when the stream has no rate to seek by."""
    rate = stream.average_rate or stream.guessed_rate
    if not rate or not stream.time_base:
        return False
    target = (stream.start_time or 0) + int(Fraction(start) / Fraction(rate) / stream.time_base)
    container.seek(target, stream=stream, backward=True, any_frame=False)
    return True
