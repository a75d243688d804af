"""The generate stage's offline backend, ``propagate``: the edited object moved over the source frames.

Kept out of ``stages/generate.py`` so that the stage's declaration and the CIG wiring stay short; this
module holds plain numpy/OpenCV functions and imports nothing from the stage module at run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

from stages.base import StageInputError

if TYPE_CHECKING:
    from stages.generate import GenerateParams

# ---- propagate: the offline generator ------------------------------------------------------------
#
# Layers, back to front: the background (source frames with the old object removed, its area and the area
# the editor changed taken from a mosaic of the edited frame and the other frames, registered by the camera
# motion fitted to the background flow, then inpainted), the edited object (the edited frame's pixels
# inside S_0 moved with the chained simulated flow, cut to S_t), and source pixels nearer than the object.


def _disk(r: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _grow(mask: np.ndarray, r: int) -> np.ndarray:
    if r <= 0 or not mask.any():
        return mask.astype(bool, copy=True)
    return cv2.dilate(mask.astype(np.uint8), _disk(r)) > 0


def _soft(mask: np.ndarray, sigma: float) -> np.ndarray:
    m = mask.astype(np.float32)
    return cv2.GaussianBlur(m, (0, 0), sigma) if sigma > 0 else m


def camera_homographies(flows: np.ndarray, object_masks: np.ndarray, margin_px: int) -> np.ndarray:
    """G_t [frame, 3, 3]: frame-t pixel coordinates -> frame-0 coordinates (camera motion).

    Each pair's homography is fitted (RANSAC) to the flow outside the grown object mask of frame t+1, on
    whose grid the flow lives; a pair with too little background falls back to its median translation.
    """
    n, h, w = object_masks.shape
    g = np.repeat(np.eye(3)[None], n, axis=0)
    step = max(4, min(h, w) // 64)
    ys, xs = np.mgrid[step // 2:h:step, step // 2:w:step]
    corners = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], np.float64)
    for t in range(n - 1):
        fl = flows[t][ys, xs].astype(np.float64)
        ok = ~_grow(object_masks[t + 1], margin_px)[ys, xs] & np.isfinite(fl).all(-1)
        shift = np.median(fl[ok], axis=0) if ok.any() else np.zeros(2)
        hmat = np.array([[1, 0, shift[0]], [0, 1, shift[1]], [0, 0, 1]], np.float64)
        if ok.sum() >= 32:
            src = np.stack([xs[ok], ys[ok]], -1).astype(np.float64)
            fit, _ = cv2.findHomography(src, src + fl[ok], cv2.RANSAC, 1.0)
            if fit is not None and np.isfinite(fit).all():
                moved = cv2.perspectiveTransform(corners[None], fit)[0]
                # A wild fit (degenerate background) would fling the mosaic: keep the translation then.
                if np.abs(moved - corners - shift).max() < 0.1 * max(h, w):
                    hmat = fit
        g[t + 1] = g[t] @ hmat
    return g


def object_positions(simulated_flows: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Phi_t as remap maps: where frame t's pixel came from in frame 0, chaining the simulated flow."""
    h, w = simulated_flows.shape[1:3]
    bx, by = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    dx, dy = np.zeros((h, w), np.float32), np.zeros((h, w), np.float32)
    out = [(bx, by)]
    for f in simulated_flows:
        px, py = bx + f[..., 0], by + f[..., 1]
        # Displacements (not positions) are resampled, so the border replicates motion, not places.
        dx = px - bx + cv2.remap(dx, px, py, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        dy = py - by + cv2.remap(dy, px, py, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        out.append((bx + dx, by + dy))
    return out


def edit_region(edited: np.ndarray, first: np.ndarray, sigma: float = 3.0, level: float = 12.0) -> np.ndarray:
    """Where the editor changed the scene: low-pass difference of the edited and source frame 0.

    Low-passing first ignores the editor's fine re-synthesis noise (VAE) and keeps changed structure.
    """
    a = cv2.GaussianBlur(edited.astype(np.float32), (0, 0), sigma)
    b = cv2.GaussianBlur(first.astype(np.float32), (0, 0), sigma)
    changed = (np.abs(a - b).mean(-1) > level).astype(np.uint8)
    changed = cv2.morphologyEx(changed, cv2.MORPH_OPEN, _disk(2))
    changed = cv2.morphologyEx(changed, cv2.MORPH_CLOSE, _disk(8))
    return changed > 0


def _tone(edited: np.ndarray, first: np.ndarray, valid: np.ndarray, sigma: float = 24.0) -> np.ndarray:
    """Low-frequency colour change edited - source over ``valid`` (normalised convolution)."""
    v = valid.astype(np.float32)
    if v.sum() < 64:
        return np.zeros(edited.shape, np.float32)
    diff = (edited.astype(np.float32) - first.astype(np.float32)) * v[..., None]
    num = cv2.GaussianBlur(diff, (0, 0), sigma)
    den = cv2.GaussianBlur(v, (0, 0), sigma)[..., None]
    mean = diff.sum((0, 1)) / v.sum()
    weight = np.clip(den / 0.2, 0, 1)  # far from any valid pixel: the global mean change
    return weight * num / np.maximum(den, 1e-6) + (1 - weight) * mean


def _mosaic(edited: np.ndarray, sources: list[np.ndarray], valids: list[np.ndarray], g: np.ndarray,
            radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Background in frame-0 coordinates (padded): edited frame first, then frames 1.., then inpainting.

    Returns the mosaic and the translation T (frame-0 coords -> mosaic pixels).
    """
    h, w = edited.shape[:2]
    corners = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], np.float64)
    pts = np.concatenate([cv2.perspectiveTransform(corners[None], m)[0] for m in g])
    lo = np.clip(np.floor(pts.min(0)), [-w // 2, -h // 2], [0, 0]).astype(int)
    hi = np.clip(np.ceil(pts.max(0)), [w - 1, h - 1], [w - 1 + w // 2, h - 1 + h // 2]).astype(int)
    tr = np.array([[1, 0, -lo[0]], [0, 1, -lo[1]], [0, 0, 1]], np.float64)
    size = (int(hi[0] - lo[0] + 1), int(hi[1] - lo[1] + 1))
    mosaic = np.zeros((size[1], size[0], 3), np.uint8)
    known = np.zeros((size[1], size[0]), bool)
    seen = np.zeros_like(known)
    for i, (img, valid) in enumerate(zip([edited, *sources], valids, strict=True)):
        a = tr @ g[i]
        warped = cv2.warpPerspective(img, a, size, flags=cv2.INTER_LINEAR)
        ok = cv2.warpPerspective(valid.astype(np.float32), a, size, flags=cv2.INTER_LINEAR) > 0.999
        seen |= cv2.warpPerspective(np.ones((h, w), np.float32), a, size, flags=cv2.INTER_LINEAR) > 0.5
        take = ok & ~known
        mosaic[take] = warped[take]
        known |= take
    if (seen & ~known).any():
        # Unseen padding counts as hole too, so that neither Telea nor the mirror copies its black.
        mosaic = fill_holes(mosaic, ~known, radius)
    return mosaic, tr


def fill_holes(image: np.ndarray, hole: np.ndarray, radius: int = 5) -> np.ndarray:
    """Inpaint ``hole``: low frequencies from cv2.inpaint (Telea), texture mirrored across the boundary.

    Telea alone smears a revealed strip into a blur that trails the moving object; mirroring the known
    side's texture (pixel p takes 2q - p, q its nearest known pixel) keeps the ground looking like ground.
    """
    h, w = hole.shape
    smooth = cv2.inpaint(image, hole.astype(np.uint8), radius, cv2.INPAINT_TELEA)
    _, labels = cv2.distanceTransformWithLabels(hole.astype(np.uint8), cv2.DIST_L2, 5,
                                                labelType=cv2.DIST_LABEL_PIXEL)
    ky, kx = np.nonzero(~hole)  # label k (1-based, scan order) is the k-th known pixel
    py, px = np.nonzero(hole)
    lab = labels[py, px] - 1
    my, mx = 2 * ky[lab] - py, 2 * kx[lab] - px
    ok = (my >= 0) & (my < h) & (mx >= 0) & (mx < w)
    ok[ok] &= ~hole[my[ok], mx[ok]]
    mirrored = smooth.astype(np.float32)
    mirrored[py[ok], px[ok]] = image[my[ok], mx[ok]]
    texture = mirrored - cv2.GaussianBlur(mirrored, (0, 0), 3)
    out = image.copy()
    mixed = np.clip(texture + cv2.GaussianBlur(smooth.astype(np.float32), (0, 0), 3) + 0.5, 0, 255)
    out[hole] = mixed.astype(np.uint8)[hole]
    return out


def _check(frames: np.ndarray, edited_frame: np.ndarray, **arrays: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise StageInputError(f"generate: frames must be [frame, y, x, 3], got {frames.shape}")
    n, h, w = frames.shape[:3]
    if edited_frame.shape != (h, w, 3):
        raise StageInputError(f"generate: edited_frame is {edited_frame.shape}, frames are {(h, w, 3)} "
                              "(the edited frame must be on the canvas)")
    want = {"object_masks": (n, h, w), "shape_masks": (n, h, w), "depth": (n, h, w),
            "flows": (n - 1, h, w, 2), "simulated_flows": (n - 1, h, w, 2)}
    for name, arr in arrays.items():
        if arr.shape != want[name]:
            raise StageInputError(f"generate: {name} has shape {arr.shape}, expected {want[name]} "
                                  f"for {n} frames of {w}x{h}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise StageInputError(f"generate: {name} contains NaN or infinite values")


def propagate_video(*, params: GenerateParams, frames: np.ndarray, flows: np.ndarray,
                    object_masks: np.ndarray, depth: np.ndarray, edited_frame: np.ndarray,
                    shape_masks: np.ndarray, simulated_flows: np.ndarray) -> np.ndarray:
    """The edited video [frame, y, x, 3] uint8; frame 0 is the edited frame itself."""
    _check(frames, edited_frame, flows=flows, object_masks=object_masks, depth=depth,
           shape_masks=shape_masks, simulated_flows=simulated_flows)
    n, h, w = frames.shape[:3]
    objs, shapes = object_masks.astype(bool), shape_masks.astype(bool)
    video = np.empty_like(frames)
    video[0] = edited_frame
    if n == 1:
        return video
    margin = params.removal_margin_px
    g = camera_homographies(flows, objs, margin)
    changed = edit_region(edited_frame, frames[0]) | _grow(objs[0], margin) | _grow(shapes[0], 2)
    if params.background == "edited":
        changed[:] = True
    tone0 = np.zeros((h, w, 3), np.float32)
    if params.carry_edit_tone:
        tone0 = _tone(edited_frame, frames[0], ~changed)

    def to_frame(img: np.ndarray, t: int, border: int = cv2.BORDER_REPLICATE) -> np.ndarray:
        """Frame-0-coordinate image seen from frame t (background motion)."""
        return cv2.warpPerspective(img, g[t], (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                   borderMode=border)

    tones = [to_frame(tone0, t) for t in range(n)]
    sources = [np.clip(frames[t] + tones[t], 0, 255).astype(np.uint8) for t in range(1, n)]
    valids = [~_grow(shapes[0], 2)]
    valids += [~_grow(objs[t], margin) if params.fill_from_frames else np.zeros((h, w), bool)
               for t in range(1, n)]
    mosaic, tr = _mosaic(edited_frame, sources, valids, g, params.inpaint_radius)
    positions = object_positions(simulated_flows.astype(np.float32))
    shape0 = _soft(shapes[0], params.feather_px)
    edited_f = edited_frame.astype(np.float32)
    for t in range(1, n):
        bg_fill = cv2.warpPerspective(mosaic, tr @ g[t], (w, h), borderMode=cv2.BORDER_REPLICATE,
                                      flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP).astype(np.float32)
        changed_t = to_frame(changed.astype(np.float32), t, cv2.BORDER_CONSTANT) > 0.5
        hole = changed_t | _grow(objs[t], margin)
        k = _soft(_grow(hole, 2), 1.5)[..., None]
        background = k * bg_fill + (1 - k) * sources[t - 1].astype(np.float32)
        mx, my = positions[t]
        # Nearest sampling: the object moves by whole pixels and keeps the edited frame's exact texture;
        # bilinear would blur it by an amount that changes with the shift's fraction (shimmer).
        obj = cv2.remap(edited_f, mx, my, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE)
        alpha = cv2.remap(shape0, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        a = np.minimum(alpha, _soft(shapes[t], params.feather_px))[..., None]
        out = a * obj + (1 - a) * background
        if params.occlusion and objs[t].any() and shapes[t].any():
            # Front layer: source pixels nearer than the object, shown as they are in the source frame.
            occ = _occluders(depth[t], objs[t], shapes[t], changed_t, params)
            front = np.maximum(occ, _soft(occ, params.feather_px))  # opaque, feathered outwards only
            out += front[..., None] * (frames[t].astype(np.float32) + tones[t] - out)
        video[t] = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    return video


def _occluders(depth: np.ndarray, obj: np.ndarray, shape: np.ndarray, edited: np.ndarray,
               params: GenerateParams) -> np.ndarray:
    """Source pixels in front of the moved object: nearer than the old object's nearest part.

    Only where the source scene still stands: not the old object itself, not the area the editor changed
    (there the edited frame decided what is in front). The old object's p95 depth is its front (feet on
    the ground), so the ground it stands on does not occlude the new one.
    """
    d = depth.astype(np.float32)
    lo, hi = np.percentile(d, [2, 98])
    front = np.percentile(d[obj], 95)
    occ = (d > front + params.occlusion_margin * max(hi - lo, 1e-6)) & _grow(shape, 2) & ~obj & ~edited
    return cv2.morphologyEx(occ.astype(np.uint8), cv2.MORPH_OPEN, _disk(1)) > 0
