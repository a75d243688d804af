"""Synthetic clips with exact truth: an object moving (and growing or shrinking) over a background.

Every pixel is drawn from a closed form, so the true object mask, the true background behind it and the
true motion (the object's centre displacement, and the exact backward flow field) are known in every frame.
The family covers what the offline shape aligner must survive: flat-coloured objects (no texture inside,
where optical flow collapses), textured objects, flat and textured backgrounds, speeds of 2-15 px per frame,
growing/shrinking objects, an optional shadow that moves with the object, and a camera pan.

Conventions are the pipeline's: frames ``[frame, y, x, 3]`` uint8 RGB; flows pair t on frame t+1's grid,
pointing into frame t (``frame_t(p + F_t(p)) = frame_{t+1}(p)``); motion in (x, y) pixels.

Used by the tests (small canvases, few frames) and by ``bench/masks.py`` / ``bench/quality.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np

Shape = Literal["disc", "square", "ellipse", "star"]
SHAPES: tuple[Shape, ...] = ("disc", "square", "ellipse", "star")

# Flat objects: a colour whose grey level is the textured background's mean, so the grey images optical flow
# sees have little contrast at the boundary (DIS then averages ~2 px inside a disc moving 10 px per frame).
OBJECT_COLOUR = (150, 120, 100)
NEW_COLOUR = (40, 170, 60)
SHADOW_DARKEN = 0.45  # the shadow keeps 45 % of the light


def inside(shape: Shape, ux: np.ndarray, uy: np.ndarray, r: float) -> np.ndarray:
    """Object-space membership: (ux, uy) relative to the centre, ``r`` the nominal radius."""
    if shape == "disc":
        return ux**2 + uy**2 <= r**2
    if shape == "square":
        return np.maximum(np.abs(ux), np.abs(uy)) <= 0.85 * r
    if shape == "ellipse":
        return (ux / (1.3 * r)) ** 2 + (uy / (0.7 * r)) ** 2 <= 1
    if shape == "star":
        theta = np.arctan2(uy, ux)
        return np.hypot(ux, uy) <= r * (0.8 + 0.25 * np.cos(5 * theta))
    raise ValueError(f"unknown shape {shape!r}")


def texture(h: int, w: int, seed: int, lo: float = 40, hi: float = 215, blur: float = 1.5) -> np.ndarray:
    """Band-limited colour noise (float32): something optical flow can hold on to. The blur takes contrast
    away; it is put back (mean (lo + hi) / 2, standard deviation (hi - lo) / 4, clipped to lo..hi)."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((h, w, 3)).astype(np.float32)
    if blur > 0:
        noise = cv2.GaussianBlur(noise, (0, 0), blur)
    noise /= max(float(noise.std()), 1e-6)
    return np.clip((lo + hi) / 2 + noise * (hi - lo) / 4, lo, hi)


@dataclass
class Clip:
    frames: np.ndarray  # [frame, y, x, 3] uint8
    masks: np.ndarray  # [frame, y, x] bool: the object (its shadow excluded)
    background: np.ndarray  # [frame, y, x, 3] uint8: the scene without the object and its shadow
    shadows: np.ndarray  # [frame, y, x] bool: the object's shadow outside the object (empty without one)
    centres: np.ndarray  # [frame, 2] float: object centre (x, y)
    scales: np.ndarray  # [frame] float: object size relative to frame 0
    flows: np.ndarray  # [pair, y, x, 2] float32: exact backward flow (object and background)
    pan: int  # px per frame the background moves left (camera pans right)
    params: dict[str, object] = field(default_factory=dict)

    @property
    def motion(self) -> np.ndarray:
        """[pair, 2]: the object's true displacement from frame t to t+1 (x, y)."""
        return np.diff(self.centres, axis=0)


def make_clip(shape: Shape = "disc", *, speed: float = 10.0, angle_deg: float = 0.0, n: int = 16,
              size: tuple[int, int] = (128, 192), radius: float = 16.0, growth: float = 1.0,
              textured_object: bool = False, textured_background: bool = True, pan: int = 0,
              shadow: bool = False, seed: int = 0) -> Clip:
    """One clip: ``shape`` moving ``speed`` px/frame along ``angle_deg`` (0 = right, 90 = down), its size
    multiplied by ``growth`` every frame, the trajectory centred in the ``size`` = (h, w) frame."""
    h, w = size
    v = speed * np.array([np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))])
    centres = np.array([w / 2, h / 2]) + (np.arange(n)[:, None] - (n - 1) / 2) * v[None]
    scales = growth ** np.arange(n, dtype=np.float64)
    world_w = w + pan * max(n - 1, 0)
    if textured_background:
        world = texture(h, world_w, seed)
    else:
        world = np.empty((h, world_w, 3), np.float32)
        world[:] = (90, 120, 150)
    obj_tex = texture(256, 256, seed + 1000, lo=120, hi=255, blur=1.0) if textured_object else None
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    frames = np.empty((n, h, w, 3), np.uint8)
    backgrounds = np.empty_like(frames)
    masks = np.zeros((n, h, w), bool)
    shadows = np.zeros((n, h, w), bool)
    for t in range(n):
        bg = world[:, pan * t: pan * t + w].copy()
        backgrounds[t] = np.clip(bg + 0.5, 0, 255).astype(np.uint8)
        (cx, cy), s = centres[t], scales[t]
        ux, uy = (xx - cx) / s, (yy - cy) / s  # object-space coordinates (size of frame 0)
        m = inside(shape, ux, uy, radius)
        img = bg
        if shadow:  # a flat ellipse under the object, moving and scaling with it
            sh = ((ux / (1.2 * radius)) ** 2 + ((uy - 0.95 * radius) / (0.35 * radius)) ** 2 <= 1) & ~m
            img[sh] *= SHADOW_DARKEN
            shadows[t] = sh
        if obj_tex is not None:
            tx = np.clip(np.rint(ux + 128).astype(int), 0, 255)
            ty = np.clip(np.rint(uy + 128).astype(int), 0, 255)
            img[m] = obj_tex[ty[m], tx[m]]
        else:
            img[m] = OBJECT_COLOUR
        frames[t] = np.clip(img + 0.5, 0, 255).astype(np.uint8)
        masks[t] = m
    flows = np.zeros((max(n - 1, 0), h, w, 2), np.float32)
    flows[..., 0] = pan  # background: frame t+1 shows world column p + pan (t+1), frame t shows it at p + pan
    for t in range(n - 1):
        # Object pixel p of frame t+1 has object coordinate u = (p - c_{t+1}) / s_{t+1}; in frame t it was at
        # c_t + s_t u. Pixels of the object and of its shadow move with it.
        moving = masks[t + 1] | shadows[t + 1]
        k = scales[t] / scales[t + 1]
        fx = centres[t, 0] + k * (xx - centres[t + 1, 0]) - xx
        fy = centres[t, 1] + k * (yy - centres[t + 1, 1]) - yy
        flows[t, ..., 0][moving] = fx[moving]
        flows[t, ..., 1][moving] = fy[moving]
    params = dict(shape=shape, speed=speed, angle_deg=angle_deg, n=n, size=size, radius=radius, growth=growth,
                  textured_object=textured_object, textured_background=textured_background, pan=pan,
                  shadow=shadow, seed=seed)
    return Clip(frames, masks, backgrounds, shadows, centres, scales, flows, pan, params)


def new_shape_masks(clip: Clip, shape: Shape = "square", radius: float | None = None,
                    offset: tuple[float, float] = (0.0, -0.4)) -> np.ndarray:
    """The true new shape in every frame: ``shape`` (another than the clip's), its centre at the object's
    centre plus ``offset`` x the radius (a taller object standing where the old one was), moved rigidly
    with the object's centre (motion pasting moves the new shape with the object's motion, size kept)."""
    h, w = clip.frames.shape[1:3]
    r = float(clip.params["radius"]) * 1.2 if radius is None else radius  # type: ignore[arg-type]
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    out = np.zeros(clip.masks.shape, bool)
    for t, (cx, cy) in enumerate(clip.centres):
        out[t] = inside(shape, xx - cx - offset[0] * r, yy - cy - offset[1] * r, r)
    return out


def edited_first_frame(clip: Clip, new_masks: np.ndarray, colour: tuple[int, int, int] = NEW_COLOUR
                       ) -> np.ndarray:
    """A perfect edit of frame 0: the old object (and its shadow) replaced by the true background, the new
    shape painted flat over it."""
    edited = clip.frames[0].copy()
    old = clip.masks[0] | clip.shadows[0]
    edited[old] = clip.background[0][old]
    edited[new_masks[0]] = colour
    return edited


def family(n: int = 16, size: tuple[int, int] = (128, 192), speeds: tuple[float, ...] = (2.0, 6.0, 10.0, 15.0)
           ) -> list[tuple[str, Clip]]:
    """The benchmark family: every shape, flat and textured objects over texture, a flat object over a flat
    background, speeds 2-15 px per frame, growing and shrinking objects. Named (label, clip) pairs."""
    out: list[tuple[str, Clip]] = []
    for i, shape in enumerate(SHAPES):
        for speed in speeds:
            for textured_object in (False, True):
                angle = 20.0 * i - 15.0
                # The whole path stays inside the frame: widen the canvas for the fast ones.
                path = speed * (n - 1) * np.abs([np.sin(np.radians(angle)), np.cos(np.radians(angle))])
                fit = (max(size[0], int(path[0]) + 72), max(size[1], int(path[1]) + 72))
                clip = make_clip(shape, speed=speed, angle_deg=angle, n=n, size=fit, radius=14.0,
                                 textured_object=textured_object, seed=10 * i + int(speed))
                label = f"{shape} {'textured' if textured_object else 'flat'} {speed:g}px"
                out.append((label, clip))
    out.append(("disc flat on flat bg 10px", make_clip("disc", speed=10.0, n=n, size=size, radius=14.0,
                                                       textured_background=False, seed=3)))
    # 3 % per frame: 1.6x larger / 0.6x the size after 16 frames.
    out.append(("disc flat growing 4px", make_clip("disc", speed=4.0, n=n, size=size, radius=12.0,
                                                   growth=1.03, seed=4)))
    out.append(("square flat shrinking 4px", make_clip("square", speed=4.0, n=n, size=size, radius=22.0,
                                                       growth=0.97, seed=5)))
    return out
