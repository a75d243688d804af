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
# Layers, back to front: the source frame itself; where the old object was in *that* frame (its source mask
# grown by the removal margin, plus its shadow), the background from a mosaic of the other frames (their
# per-pixel median, registered by the camera motion fitted to the background flow; what no frame shows from
# the edited frame, then inpainted); the edited object (the edited frame's pixels inside S_0 moved with the
# chained simulated flow, cut to S_t); source pixels nearer than the object. Everywhere else the output *is*
# the source frame, to the byte: nothing of frame 0 (the old object, its shadow, the new shape) is drawn
# where the object no longer is.


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


MOSAIC_STRIP = 64  # mosaic rows per pass: the median holds one strip of every frame, not whole frames
MOSAIC_FRAMES = 32  # at most this many frames (evenly spaced) enter the median: memory and time bounded


def _mosaic_geometry(g: np.ndarray, h: int, w: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The translation T (frame-0 coords -> mosaic pixels) and the mosaic size covering every frame
    (at most half a frame beyond frame 0 on each side)."""
    corners = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], np.float64)
    pts = np.concatenate([cv2.perspectiveTransform(corners[None], m)[0] for m in g])
    lo = np.clip(np.floor(pts.min(0)), [-w // 2, -h // 2], [0, 0]).astype(int)
    hi = np.clip(np.ceil(pts.max(0)), [w - 1, h - 1], [w - 1 + w // 2, h - 1 + h // 2]).astype(int)
    tr = np.array([[1, 0, -lo[0]], [0, 1, -lo[1]], [0, 0, 1]], np.float64)
    return tr, (int(hi[0] - lo[0] + 1), int(hi[1] - lo[1] + 1))


def _warp_strip(img: np.ndarray, a: np.ndarray, y0: int, size: tuple[int, int], rows: int) -> np.ndarray:
    """Rows y0 .. y0 + rows of ``img`` warped into the mosaic by ``a``."""
    shift = np.array([[1, 0, 0], [0, 1, -y0], [0, 0, 1]], np.float64)
    return cv2.warpPerspective(img, shift @ a, (size[0], rows), flags=cv2.INTER_LINEAR)


def background_mosaic(layers: list[tuple[np.ndarray, np.ndarray, np.ndarray]], g_first: np.ndarray | None,
                      first: tuple[np.ndarray, np.ndarray] | None, last: tuple[np.ndarray, np.ndarray] | None,
                      g: np.ndarray, h: int, w: int, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Background in frame-0 coordinates (padded): ``first`` where valid, else the per-pixel median of the
    ``layers`` (image, valid, homography to frame 0) where any is valid, else ``last``, then inpainting.

    The median, not the first frame that shows a pixel: a shadow or a reflection moving with the object
    darkens each pixel in a few frames only. ``first``/``last`` are (image, valid) on frame 0's grid.
    Returns the mosaic and the translation T (frame-0 coords -> mosaic pixels).
    """
    tr, size = _mosaic_geometry(g, h, w)
    if len(layers) > MOSAIC_FRAMES:
        layers = [layers[i] for i in np.linspace(0, len(layers) - 1, MOSAIC_FRAMES).round().astype(int)]
    mosaic = np.zeros((size[1], size[0], 3), np.uint8)
    known = np.zeros((size[1], size[0]), bool)
    seen = np.zeros_like(known)
    ones = np.ones((h, w), np.float32)
    for y0 in range(0, size[1], MOSAIC_STRIP):
        rows = min(MOSAIC_STRIP, size[1] - y0)
        sl = slice(y0, y0 + rows)
        for m in g:
            seen[sl] |= _warp_strip(ones, tr @ m, y0, size, rows) > 0.5
        done = np.zeros((rows, size[0]), bool)
        if first is not None and g_first is not None:
            img = _warp_strip(first[0], tr @ g_first, y0, size, rows)
            ok = _warp_strip(first[1].astype(np.float32), tr @ g_first, y0, size, rows) > 0.999
            mosaic[sl][ok] = img[ok]
            done |= ok
        if layers:
            values = np.full((len(layers), rows, size[0], 3), np.nan, np.float32)
            for i, (img, valid, m) in enumerate(layers):
                a = tr @ m
                ok = (_warp_strip(valid.astype(np.float32), a, y0, size, rows) > 0.999) & ~done
                values[i][ok] = _warp_strip(img, a, y0, size, rows)[ok]
            any_ok = np.isfinite(values[..., 0]).any(0)
            if any_ok.any():
                med = np.nanmedian(values[:, any_ok], axis=0)
                mosaic[sl][any_ok] = np.clip(med + 0.5, 0, 255).astype(np.uint8)
            done |= any_ok
        if last is not None:
            img = _warp_strip(last[0], tr, y0, size, rows)
            ok = (_warp_strip(last[1].astype(np.float32), tr, y0, size, rows) > 0.999) & ~done
            mosaic[sl][ok] = img[ok]
            done |= ok
        known[sl] = done
    if (seen & ~known).any():
        # Unseen padding counts as hole too, so that neither Telea nor the mirror copies its black.
        mosaic = fill_holes(mosaic, ~known, radius)
    return mosaic, tr


def fill_holes(image: np.ndarray, hole: np.ndarray, radius: int = 5) -> np.ndarray:
    """Inpaint ``hole``: low frequencies from cv2.inpaint (Telea), texture mirrored across the boundary.

    Telea alone smears a revealed strip into a blur that trails the moving object; mirroring the known
    side's texture (pixel p takes 2q - p, q its nearest known pixel) keeps the ground looking like ground.
    With nothing known (a mask over the whole frame) there is nothing to take from: the image is returned.
    """
    if not hole.any() or hole.all():
        return image.copy()
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


def shadow_region(frame: np.ndarray, background: np.ndarray, obj: np.ndarray, removed: np.ndarray,
                  reach_px: int, level: float) -> np.ndarray:
    """What must go with the old object beyond ``removed`` (its mask ``obj`` grown by the margin): its
    shadow, i.e. pixels within ``reach_px`` of it darker than the ``background`` the other frames show
    there by more than ``level`` grey levels (low-passed, so misregistered texture does not count), in
    regions touching the object. Grown by 4 px, also from the shadow's part inside the margin: the fill's
    ramp over the region's last ~3 px (:func:`_fill_weight`) must not blend the shadow back in."""
    if reach_px <= 0 or not obj.any():
        return np.zeros(obj.shape, bool)
    lum = np.array([0.299, 0.587, 0.114], np.float32)
    darker = cv2.GaussianBlur((background.astype(np.float32) - frame.astype(np.float32)) @ lum, (0, 0), 1.5)
    cand = ((darker > level) & _grow(removed, reach_px)) | obj
    _, labels = cv2.connectedComponents(cand.astype(np.uint8), connectivity=8)
    keep = np.unique(labels[obj])
    return _grow(np.isin(labels, keep[keep > 0]) & ~obj, 4) & ~removed


def _fill_weight(removed: np.ndarray, margin: int) -> np.ndarray:
    """How much of the mosaic shows: 1 inside the removed region, a ramp over its last ~3 px, 0 outside
    (exactly: the source frame stays untouched beyond the region)."""
    e = min(2, margin)
    core = cv2.erode(removed.astype(np.uint8), _disk(e)) > 0 if e else removed
    return (_soft(core, 1.0) * removed)[..., None] if e else removed.astype(np.float32)[..., None]


def propagate_video(*, params: GenerateParams, frames: np.ndarray, flows: np.ndarray,
                    object_masks: np.ndarray, depth: np.ndarray, edited_frame: np.ndarray,
                    shape_masks: np.ndarray, simulated_flows: np.ndarray) -> np.ndarray:
    """The edited video [frame, y, x, 3] uint8; frame 0 is the edited frame itself.

    With ``background="source"`` frame t >= 1 equals ``frames[t]`` exactly outside the old object of frame t
    (grown by ``removal_margin_px``, plus its shadow) and the new shape S_t (grown by its feather).
    """
    _check(frames, edited_frame, flows=flows, object_masks=object_masks, depth=depth,
           shape_masks=shape_masks, simulated_flows=simulated_flows)
    n, h, w = frames.shape[:3]
    objs, shapes = object_masks.astype(bool), shape_masks.astype(bool)
    video = np.empty_like(frames)
    video[0] = edited_frame
    if n == 1:
        return video
    margin, edited_bg = params.removal_margin_px, params.background == "edited"
    removed = [_grow(o, margin) for o in objs]
    g = camera_homographies(flows, objs, margin)
    tone = np.zeros((h, w, 3), np.float32)
    if params.match_fill_tone:  # edited - source, low frequencies, where the editor changed nothing
        changed = edit_region(edited_frame, frames[0]) | removed[0] | _grow(shapes[0], 2)
        tone = _tone(edited_frame, frames[0], ~changed)

    def to_frame(img: np.ndarray, t: int, border: int = cv2.BORDER_REPLICATE) -> np.ndarray:
        """Frame-0-coordinate image seen from frame t (background motion)."""
        return cv2.warpPerspective(img, g[t], (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                   borderMode=border)

    def shifted(img: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return np.clip(img.astype(np.float32) + delta + 0.5, 0, 255).astype(np.uint8)

    not_new = ~_grow(shapes[0], 3)  # the edited frame's background: not the new object or its edge
    sources = [(frames[k], ~removed[k] if params.fill_from_frames else np.zeros((h, w), bool), g[k])
               for k in range(n)]
    if edited_bg:  # the edited frame's look: the edited frame first, the source frames toned like it
        layers = [(shifted(f, to_frame(tone, k)), v, m) for k, (f, v, m) in enumerate(sources) if k > 0]
        mosaic, tr = background_mosaic(layers, g[0], (edited_frame, not_new), None, g, h, w,
                                       params.inpaint_radius)
    else:  # the source's look: the other frames first; what none shows from the edited frame, untoned
        mosaic, tr = background_mosaic(sources, None, None, (shifted(edited_frame, -tone), not_new & removed[0]),
                                       g, h, w, params.inpaint_radius)
    positions = object_positions(simulated_flows.astype(np.float32))
    shape0 = _soft(shapes[0], params.feather_px)
    support = int(np.ceil(3 * params.feather_px))
    edited_f = edited_frame.astype(np.float32)
    for t in range(1, n):
        source = frames[t] if not edited_bg else shifted(frames[t], to_frame(tone, t))
        bg_fill = cv2.warpPerspective(mosaic, tr @ g[t], (w, h), borderMode=cv2.BORDER_REPLICATE,
                                      flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
        hole = np.ones((h, w), bool) if edited_bg else removed[t] | shadow_region(
            frames[t], bg_fill, objs[t], removed[t], params.shadow_px, params.shadow_level)
        k = _fill_weight(hole, margin)
        out = k * bg_fill.astype(np.float32) + (1 - k) * source.astype(np.float32)
        mx, my = positions[t]
        # Nearest sampling: the object moves by whole pixels and keeps the edited frame's exact texture;
        # bilinear would blur it by an amount that changes with the shift's fraction (shimmer).
        obj = cv2.remap(edited_f, mx, my, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE)
        alpha = cv2.remap(shape0, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        reach = _grow(shapes[t], support)
        a = (np.minimum(alpha, _soft(shapes[t], params.feather_px)) * reach)[..., None]
        out = a * obj + (1 - a) * out
        if params.occlusion and objs[t].any() and shapes[t].any():
            # Front layer: source pixels nearer than the object, shown as they are in the source frame.
            occ = _occluders(depth[t], objs[t], shapes[t], params) & reach
            front = np.maximum(occ, _soft(occ, params.feather_px) * reach)  # opaque, feathered outwards only
            out += front[..., None] * (source.astype(np.float32) - out)
        frame = np.clip(out + 0.5, 0, 255).astype(np.uint8)
        if not edited_bg:
            keep = ~(hole | reach)  # untouched: the source frame itself, not a round trip through floats
            frame[keep] = frames[t][keep]
        video[t] = frame
    return video


def _occluders(depth: np.ndarray, obj: np.ndarray, shape: np.ndarray, params: GenerateParams) -> np.ndarray:
    """Source pixels in front of the moved object: nearer than the old object's nearest part.

    Only where the source scene still stands, not on the old object itself. The old object's p95 depth is
    its front (feet on the ground), so the ground it stands on does not occlude the new one.
    """
    d = depth.astype(np.float32)
    lo, hi = np.percentile(d, [2, 98])
    front = np.percentile(d[obj], 95)
    occ = (d > front + params.occlusion_margin * max(hi - lo, 1e-6)) & _grow(shape, 2) & ~obj
    return cv2.morphologyEx(occ.astype(np.uint8), cv2.MORPH_OPEN, _disk(1)) > 0
