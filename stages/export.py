"""Export the edited video: H.264 mp4 (PyAV, with the source's audio), GIF (Pillow) and PNG frames.

Not a stage (it writes files, not arrays): the flows call :func:`export_video` on the stored ``video``
array. Every file appears atomically: written under a temporary name in the same folder, then renamed, so a
crash never leaves a half-written video where a finished one is expected.

Delivery at the source's size (:func:`deliver`): the generators work on the canvas; outside the edit region
(:func:`edit_region`) the exported frame is the source frame itself, decoded at full resolution, and inside
it the canvas output mapped back (:func:`composite_at_source`). The frame rate is the source's divided by
ingest's stride (:func:`probe_source`), and the source's audio is cut to the exported span (:func:`read_audio`).
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from stages.base import StageInputError

FORMATS = ("mp4", "gif", "png")


def _check_video(video: np.ndarray) -> np.ndarray:
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8 or video.shape[0] == 0:
        raise StageInputError(f"export: video must be uint8 [frame, y, x, 3] with frames, got {video.dtype} "
                              f"{video.shape}")
    return video


def restore_video(video: np.ndarray, geometry: Mapping[str, Any]) -> np.ndarray:
    """Every frame brought back to the source aspect ratio and size (ingest's ``geometry`` attrs)."""
    from stages.ingest import restore_from_canvas

    cw, ch = geometry["canvas_size"]
    if video.shape[1:3] != (ch, cw):
        raise StageInputError(f"export: video is {video.shape[2]}x{video.shape[1]} but the geometry's canvas "
                              f"is {cw}x{ch}")
    return np.stack([restore_from_canvas(np.ascontiguousarray(f), dict(geometry)) for f in video])


# ---- delivery at the source's size ---------------------------------------------------------------------

def _grow(mask: np.ndarray, px: int) -> np.ndarray:
    if px <= 0 or not mask.any():
        return mask.astype(bool, copy=True)
    return cv2.dilate(mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1,) * 2)) > 0


def _per_frame(masks: np.ndarray | None, n: int, shape: tuple[int, int], what: str) -> np.ndarray:
    if masks is None or masks.size == 0:
        return np.zeros((n, *shape), bool)
    masks = np.asarray(masks, bool)
    if masks.ndim != 3 or masks.shape[1:] != shape or len(masks) not in (1, n):
        raise StageInputError(f"export: {what} must be [frame, y, x] bool on the {shape[1]}x{shape[0]} canvas, "
                              f"got {masks.shape}")
    return np.broadcast_to(masks, (n, *shape)) if len(masks) == 1 else masks


def edit_region(frames: np.ndarray, video: np.ndarray, object_masks: np.ndarray | None = None,
                shape_masks: np.ndarray | None = None, edited_frame: np.ndarray | None = None, *,
                grow_px: int = 4, reach_px: int = 48, change_level: int = 12, rim_px: int = 4,
                global_fraction: float = 0.3) -> np.ndarray | None:
    """The canvas pixels [frame, y, x] the edit may have touched; ``None`` = the whole frame.

    Per frame: the old object ``O_t`` and the new shape ``S_t`` grown by ``grow_px``; the pixels the
    generator changed by more than ``change_level`` (any channel) within ``reach_px`` of them (the old
    shadow ``propagate`` removed, with its search reach; a learned generator's shadow of the new object);
    and any change at all within ``rim_px`` of those (anti-aliased edges, the fill's ramp). ``None`` when
    no mask is known, or when the edited first frame changed more than ``global_fraction`` of frame 0 away
    from the masks, at coarse scale (a restyle: the edit is the whole frame).
    """
    video = _check_video(video)
    if frames.shape != video.shape:
        raise StageInputError(f"export: video {video.shape} and canvas frames {frames.shape} differ")
    if object_masks is None and shape_masks is None:
        return None
    n, shape = len(video), video.shape[1:3]
    masks = _per_frame(object_masks, n, shape, "object_masks") | _per_frame(shape_masks, n, shape, "shape_masks")
    if edited_frame is not None and edited_frame.shape == frames.shape[1:]:
        # Low-passed: an editor's VAE re-rendering (noise at fine scales: the bear's reference edit, median
        # 2.7 levels) is not a restyle (a colour or style change of the whole frame: a mild tint, 26).
        away = ~_grow(masks[0], reach_px)
        blur = [cv2.GaussianBlur(x.astype(np.float32), (0, 0), 4.0) for x in (edited_frame, frames[0])]
        diff = np.abs(blur[0] - blur[1]).max(-1) > change_level
        if away.any() and float(diff[away].mean()) > global_fraction:
            return None
    close = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    region = np.zeros((n, *shape), bool)
    for t in range(n):
        diff = np.abs(video[t].astype(np.int16) - frames[t]).max(-1)
        changed = (diff > change_level) & _grow(masks[t], reach_px)
        changed = cv2.morphologyEx(changed.astype(np.uint8), cv2.MORPH_CLOSE, close) > 0  # no pinholes
        core = _grow(masks[t], grow_px) | changed
        region[t] = core | ((diff > 0) & _grow(core, rim_px))
    return region


def _mask_to_source(mask: np.ndarray, geometry: Mapping[str, Any]) -> np.ndarray:
    """A canvas mask at the source's size: every source pixel the canvas mask touches (none outside the
    canvas's cover, for ``crop``)."""
    sw, sh = geometry["source_size"]
    m = mask.astype(np.float32)
    if geometry["mode"] == "squash":
        return cv2.resize(m, (sw, sh), interpolation=cv2.INTER_LINEAR) > 0
    (sx, sy), (ox, oy) = geometry["scale"], geometry["offset"]
    aff = np.array([[sx, 0, ox + 0.5 * sx - 0.5], [0, sy, oy + 0.5 * sy - 0.5]], dtype=np.float64)
    return cv2.warpAffine(m, aff, (sw, sh), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0) > 0


def composite_at_source(video: np.ndarray, source_frames: np.ndarray, region: np.ndarray | None,
                        geometry: Mapping[str, Any], *, feather_px: float = 4.0) -> np.ndarray:
    """Source frames with the canvas ``video`` mapped back inside ``region`` (``None``: everywhere).

    The region is grown by ``feather_px`` canvas px and mapped to the source; the blend weight ramps from
    0 at its edge to 1 a feather width inside (smoothstep of the distance), so it is 1 on the region itself
    and exactly 0 outside: there the output is the source frame, byte for byte.
    """
    from stages.ingest import restore_from_canvas

    video = _check_video(video)
    sw, sh = geometry["source_size"]
    if source_frames.shape != (len(video), sh, sw, 3) or source_frames.dtype != np.uint8:
        raise StageInputError(f"export: source frames must be uint8 [{len(video)}, {sh}, {sw}, 3] (the "
                              f"geometry's source size), got {source_frames.dtype} {source_frames.shape}")
    if region is None:
        return restore_video(video, geometry)
    ramp = max(feather_px / min(geometry["scale"]), 1.0)  # in source px
    out = source_frames.copy()
    for t in range(len(video)):
        if not region[t].any():
            continue
        m = _mask_to_source(_grow(region[t], math.ceil(feather_px)), geometry)
        ys, xs = np.nonzero(m)
        if not len(ys):
            continue
        y0, y1, x0, x1 = max(ys.min() - 1, 0), min(ys.max() + 2, sh), max(xs.min() - 1, 0), min(xs.max() + 2, sw)
        dist = cv2.distanceTransform(m[y0:y1, x0:x1].astype(np.uint8), cv2.DIST_L2, 3)
        a = np.clip(dist / ramp, 0.0, 1.0)
        a = (a * a * (3 - 2 * a))[..., None]
        back = restore_from_canvas(np.ascontiguousarray(video[t]), dict(geometry))[y0:y1, x0:x1].astype(np.float32)
        src = out[t, y0:y1, x0:x1].astype(np.float32)
        blend = np.clip(src + a * (back - src) + 0.5, 0, 255).astype(np.uint8)
        out[t, y0:y1, x0:x1] = np.where(a > 0, blend, out[t, y0:y1, x0:x1])
    return out


def deliver(video: np.ndarray, source_frames: np.ndarray, geometry: Mapping[str, Any], frames: np.ndarray,
            object_masks: np.ndarray | None = None, shape_masks: np.ndarray | None = None,
            edited_frame: np.ndarray | None = None, **region_options: Any) -> np.ndarray:
    """The edited video at the source's size: :func:`edit_region` then :func:`composite_at_source`."""
    feather = float(region_options.pop("feather_px", 4.0))
    region = edit_region(frames, video, object_masks, shape_masks, edited_frame, **region_options)
    return composite_at_source(video, source_frames, region, geometry, feather_px=feather)


# ---- frame rate and audio ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceMedia:
    """What the container says: frame rate (None: a frame folder), first video timestamp (s), audio."""

    fps: Fraction | None
    start: float
    has_audio: bool


def probe_source(path: str | os.PathLike[str]) -> SourceMedia:
    import av

    src = Path(path)
    if src.is_dir():
        return SourceMedia(None, 0.0, False)
    try:
        with av.open(str(src)) as c:
            if not c.streams.video:
                raise StageInputError(f"{src}: no video stream")
            v = c.streams.video[0]
            rate = v.average_rate or v.guessed_rate
            start = float(v.start_time * v.time_base) if v.start_time is not None and v.time_base else 0.0
            return SourceMedia(Fraction(rate) if rate else None, start, bool(c.streams.audio))
    except (av.error.FFmpegError, OSError) as exc:
        raise StageInputError(f"{src}: unreadable video ({exc})") from None


@dataclass(frozen=True)
class Audio:
    samples: np.ndarray  # float32 [channel, sample]
    rate: int
    layout: str  # "mono" or "stereo"


def read_audio(path: str | os.PathLike[str], start: float, duration: float) -> Audio | None:
    """The source's first audio track from ``start`` (s, the container's timeline) for ``duration`` s, as
    float planar mono or stereo (more channels are downmixed); silence where the track has no samples."""
    import av

    with av.open(str(path)) as c:
        if not c.streams.audio:
            return None
        stream = c.streams.audio[0]
        supported = av.codec.Codec("aac", "w").audio_rates or ()
        rate = stream.rate if stream.rate in supported else 48000
        layout = "mono" if stream.channels == 1 else "stereo"
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        chunks: list[np.ndarray] = []
        first: float | None = None
        for frame in c.decode(stream):
            if first is None:
                first = float(frame.time or 0.0)
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
            if frame.time is not None and frame.time > start + duration:
                break
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray())
    n_ch = 1 if layout == "mono" else 2
    have = np.concatenate(chunks, axis=1) if chunks else np.zeros((n_ch, 0), np.float32)
    n, offset = round(duration * rate), round((start - (first or 0.0)) * rate)
    samples = np.zeros((n_ch, n), np.float32)
    lo, hi = max(offset, 0), min(offset + n, have.shape[1])
    if hi > lo:
        samples[:, lo - offset: hi - offset] = have[:, lo:hi]
    return Audio(samples, rate, layout)


def _rate(fps: float | Fraction) -> Fraction:
    return fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)


def _even(video: np.ndarray) -> np.ndarray:
    """yuv420p needs even sides: replicate the last row/column rather than dropping content."""
    h, w = video.shape[1:3]
    if h % 2 == 0 and w % 2 == 0:
        return video
    return np.pad(video, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _tmp_name(target: Path) -> Path:
    # Same folder (same filesystem: the rename is atomic) and the same suffix (encoders look at it).
    return target.with_name(f".{target.stem}.{uuid.uuid4().hex[:8]}.tmp{target.suffix}")


X264_THREADS = 4


def write_mp4(video: np.ndarray, path: Path, fps: float | Fraction = 16, crf: int = 18,
              audio: Audio | None = None) -> Path:
    """H.264 (yuv420p) at ``fps`` (a Fraction keeps 30000/1001 exact), with ``audio`` as AAC if given."""
    import av

    video = _even(_check_video(video))
    tmp = _tmp_name(path)
    try:
        with av.open(str(tmp), "w", format="mp4") as out:
            stream = out.add_stream("libx264", rate=_rate(fps))
            stream.height, stream.width = video.shape[1:3]
            stream.pix_fmt = "yuv420p"
            # A fixed thread count: x264's output depends on it, and "auto" follows the CPUs this thread may use
            # (another library pinning threads changed it mid-run): the same video gives the same bytes anywhere.
            stream.options = {"crf": str(crf), "preset": "medium", "threads": str(X264_THREADS)}
            if audio is not None and audio.samples.shape[1]:
                sound = out.add_stream("aac", rate=audio.rate, layout=audio.layout)
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio.samples, np.float32), format="fltp",
                                                   layout=audio.layout)
                frame.sample_rate, frame.pts = audio.rate, 0
                out.mux(sound.encode(frame))  # the encoder cuts it into AAC frames; the muxer interleaves
                out.mux(sound.encode(None))
            for f in video:
                out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
            out.mux(stream.encode(None))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_gif(video: np.ndarray, path: Path, fps: float | Fraction = 16) -> Path:
    from PIL import Image

    video = _check_video(video)
    # One palette for the whole clip (no colour flicker between frames), from a mosaic of up to 8 frames,
    # by fast octree and without dithering: 30x faster than Pillow's per-frame median cut on 16x256^2
    # frames, at a mean error of 2.7 instead of 2.0 levels.
    sample = video[np.linspace(0, len(video) - 1, min(8, len(video))).round().astype(int)]
    palette = Image.fromarray(np.ascontiguousarray(np.concatenate(list(sample), axis=0))).quantize(
        256, method=Image.Quantize.FASTOCTREE)
    frames = [Image.fromarray(np.ascontiguousarray(f)).quantize(palette=palette, dither=Image.Dither.NONE)
              for f in video]
    tmp = _tmp_name(path)
    try:
        # GIF stores centiseconds: 16 fps -> 60 ms (Pillow rounds 62.5 down to the format's 10 ms steps).
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                       duration=max(20, round(1000 / float(fps))), loop=0, optimize=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _imwrite(path: Path, rgb: np.ndarray) -> None:
    """cv2.imwrite, checked: it returns False (and writes nothing, or half) on a full disk or a bad path."""
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)) or not path.is_file():
        raise OSError(f"could not write {path}")


def write_pngs(video: np.ndarray, folder: Path) -> Path:
    """``folder/00000.png`` ...; the whole folder is swapped in at once (an old one is replaced)."""
    video = _check_video(video)
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    try:
        for i, f in enumerate(video):
            _imwrite(tmp / f"{i:05d}.png", f)
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.old")
            folder.rename(old)
        tmp.rename(folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def export_video(video: np.ndarray, out_dir: str | os.PathLike[str], *, fps: float | Fraction = 16,
                 formats: Iterable[str] = FORMATS, geometry: Mapping[str, Any] | None = None,
                 restore_source: bool = False, stem: str = "video", audio: Audio | None = None
                 ) -> dict[str, Path]:
    """Write ``video`` [frame, y, x, 3] uint8 as ``<stem>.mp4`` (with ``audio``), ``<stem>.gif`` and
    ``<stem>_frames/``.

    ``restore_source`` brings the whole frames back to the source aspect ratio and size through the canvas
    first (``geometry`` = the dict ingest stores in its attrs; :func:`deliver` keeps the untouched source
    instead). Returns the written paths by format.
    """
    video = _check_video(video)
    formats = tuple(formats)
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise StageInputError(f"export: unknown formats {unknown}; choose from {list(FORMATS)}")
    if not fps > 0:
        raise StageInputError(f"export: fps must be > 0, got {fps}")
    if restore_source:
        if geometry is None:
            raise StageInputError("export: restore_source needs the ingest geometry")
        video = restore_video(video, geometry)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if "mp4" in formats:
        written["mp4"] = write_mp4(video, out / f"{stem}.mp4", fps, audio=audio)
    if "gif" in formats:
        written["gif"] = write_gif(video, out / f"{stem}.gif", fps)
    if "png" in formats:
        written["png"] = write_pngs(video, out / f"{stem}_frames")
    return written


def contact_sheet(video: np.ndarray, path: str | os.PathLike[str] | None = None, *, cols: int = 4,
                  every: int = 1, tile_width: int | None = 256) -> np.ndarray:
    """Frames side by side (every ``every``-th, last included) for a look at a clip; PNG if ``path``."""
    video = _check_video(video)
    idx = list(range(0, len(video), max(every, 1)))
    if idx[-1] != len(video) - 1:
        idx.append(len(video) - 1)
    h, w = video.shape[1:3]
    tw = tile_width or w
    th = max(1, round(h * tw / w))
    tiles = [cv2.resize(video[i], (tw, th), interpolation=cv2.INTER_AREA) if (tw, th) != (w, h) else video[i]
             for i in idx]
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % cols)
    sheet = np.vstack([np.hstack(tiles[r:r + cols]) for r in range(0, len(tiles), cols)])
    if path is not None:
        _imwrite(Path(path), sheet)
    return sheet
