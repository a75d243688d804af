"""Where an object went between two frames, without optical flow: masked template registration.

Optical flow collapses inside objects without texture (a flat disc sliding 10 px per frame over texture:
DIS averages ~2 px inside it); the object's boundary against its background still says exactly where it
went. :func:`register_object` finds the shift (and scale) of an object's pixels from one frame to another;
``source_masks``' ``track`` uses it next to the flow and keeps whichever explains the frame better.
"""

from __future__ import annotations

import cv2
import numpy as np


def _ccorr(image: np.ndarray, templ: np.ndarray) -> np.ndarray:
    return cv2.matchTemplate(np.ascontiguousarray(image, np.float32), np.ascontiguousarray(templ, np.float32),
                             cv2.TM_CCORR)


def _parabola(c_minus: float, c0: float, c_plus: float) -> float:
    """Offset (-0.5..0.5) of the vertex of the parabola through three costs around a minimum."""
    den = c_minus - 2 * c0 + c_plus
    if not np.isfinite(den) or den <= 0:
        return 0.0
    return float(np.clip(0.5 * (c_minus - c_plus) / den, -0.5, 0.5))


MATCH_LEVEL = 20.0  # per channel: template pixels closer than this to the frame count as matched
TAU = 3 * MATCH_LEVEL**2
SCALE_STEP = 1.04
SCALES = (1 / SCALE_STEP**2, 1 / SCALE_STEP, 1.0, SCALE_STEP, SCALE_STEP**2)  # objects coming closer, going away


def _ssd_map(image: np.ndarray, valid: np.ndarray, templ: np.ndarray, tmask: np.ndarray, min_in_view: float
             ) -> np.ndarray | None:
    """Mean squared colour difference of ``templ`` (pixels where ``tmask``) at every top-left position in
    ``image`` (``valid``: inside the frame), over its pixels in view; inf where less than ``min_in_view`` of
    it is in view (None if nowhere)."""
    m = tmask.astype(np.float32)
    t = templ * m[..., None]
    visible = _ccorr(valid, m)
    sq = (_ccorr((image * image).sum(-1) * valid, m) - 2 * _ccorr(image * valid[..., None], t)
          + _ccorr(valid, (t * t).sum(-1)))
    ok = visible >= min_in_view * m.sum()
    return np.where(ok, np.maximum(sq, 0) / np.maximum(visible, 1.0), np.inf) if ok.any() else None


def _fit_cost(image: np.ndarray, valid: np.ndarray, templ: np.ndarray, weight: np.ndarray) -> float:
    """Robust fit of a template placed over ``image`` (same size): each pixel, weighted by what it covers,
    counts -TAU when matched and at most +TAU when not. A larger template only wins if its extra pixels
    match too, and the few edge pixels a resampled template gets wrong cannot outweigh them."""
    ssd = ((image - templ) ** 2).sum(-1)
    w = weight * valid
    return float((w * (np.minimum(ssd, 2 * TAU) - TAU)).sum())


def register_object(prev: np.ndarray, mask: np.ndarray, frame: np.ndarray, guess: np.ndarray,
                    search_px: int, guess_scale: float = 1.0, min_visible: float = 0.5) -> np.ndarray | None:
    """Where the object (``prev`` inside ``mask``) went in ``frame``: a 2x3 affine map (scale about the
    mask's centre, then shift) from ``prev``'s pixel coordinates to ``frame``'s.

    Unlike optical flow this needs no texture inside the object: a flat-coloured disc over texture has one
    sharp minimum, set by its boundary. 1. the shift: masked sum of squared colour differences at every
    shift within ``search_px`` of ``guess`` (x, y), averaged over the template pixels in the frame (an
    object may leave the view); 2. the scale: a robust fit (:func:`_fit_cost`) of the template resampled
    at a few scales around ``guess_scale``, each within a pixel of that shift; parabolas through the best
    and its neighbours give the fractions. None when the mask is empty or no shift keeps ``min_visible`` of
    the object in view.
    """
    if not mask.any():
        return None
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    centre = np.array([xs.mean(), ys.mean()])
    pad_px = int(np.ceil(0.1 * max(np.ptp(ys), np.ptp(xs)))) + 3  # room for the largest scale and 1 px
    y0, y1 = max(int(ys.min()) - pad_px, 0), min(int(ys.max()) + 1 + pad_px, h)
    x0, x1 = max(int(xs.min()) - pad_px, 0), min(int(xs.max()) + 1 + pad_px, w)
    th, tw = y1 - y0, x1 - x0
    gy, gx = y0 + int(round(float(guess[1]))), x0 + int(round(float(guess[0])))  # guessed top-left
    sy, ey = max(gy - search_px, -th + 1), min(gy + search_px, h - 1)
    sx, ex = max(gx - search_px, -tw + 1), min(gx + search_px, w - 1)
    if sy > ey or sx > ex:
        return None
    pad = ((th + 1, th + 1), (tw + 1, tw + 1), (0, 0))  # one more pixel: the scale fit looks 1 px around
    img = np.pad(frame.astype(np.float32), pad)[sy + th:ey + 2 * th + 2, sx + tw:ex + 2 * tw + 2]
    valid = np.pad(np.ones((h, w), np.float32), pad[:2])[sy + th:ey + 2 * th + 2, sx + tw:ex + 2 * tw + 2]
    crop = (slice(y0, y1), slice(x0, x1))
    cost = _ssd_map(img[1:-1, 1:-1], valid[1:-1, 1:-1], prev[crop].astype(np.float32), mask[crop],
                    min_visible)
    if cost is None:
        return None
    yy, xx = np.mgrid[sy:ey + 1, sx:ex + 1]
    # Among equal costs (an object as flat as its surroundings) prefer the smallest change of velocity.
    iy, ix = np.unravel_index(int(np.argmin(cost + 1e-6 * ((yy - gy) ** 2 + (xx - gx) ** 2))), cost.shape)
    m = mask.astype(np.float32)
    src = prev.astype(np.float32) * m[..., None]

    def fits_at(k: float, around: bool = False) -> np.ndarray:
        """Robust costs of scale k at the shift found (3x3 within a pixel of it if ``around``)."""
        a = np.array([[k, 0, (1 - k) * centre[0] - x0], [0, k, (1 - k) * centre[1] - y0]])
        # Resampled from the object's pixels only: its edge must not take the background's colour.
        weight = cv2.warpAffine(m, a, (tw, th), flags=cv2.INTER_LINEAR)
        templ = cv2.warpAffine(src, a, (tw, th), flags=cv2.INTER_LINEAR).reshape(th, tw, -1)
        templ /= np.maximum(weight, 1e-6)[..., None]
        steps = range(3) if around else range(1, 2)
        return np.array([[_fit_cost(img[iy + dy:iy + dy + th, ix + dx:ix + dx + tw],
                                    valid[iy + dy:iy + dy + th, ix + dx:ix + dx + tw], templ, weight)
                          for dx in steps] for dy in steps])

    scales = [guess_scale * k for k in SCALES]
    fits = [fits_at(k) for k in scales]
    for _ in range(2):  # best at an end of the steps: one more step that way
        best = [float(f.min()) for f in fits]
        i = int(np.argmin(best))
        if 0 < i < len(scales) - 1:
            break
        k = scales[i] * (SCALE_STEP if i else 1 / SCALE_STEP)
        scales.insert(len(scales) if i else 0, k)
        fits.insert(len(fits) if i else 0, fits_at(k))
    best = [float(f.min()) for f in fits]
    i = int(np.argmin(best))
    # Scale: parabola in log-scale (the steps are even there), at the integer shift (scaling is about the
    # centre, so the two hardly interact); then the shift's fraction: parabolas at that scale.
    f = _parabola(best[i - 1], best[i], best[i + 1]) if 0 < i < len(scales) - 1 else 0.0
    k = float(np.exp(np.log(scales[i]) + f * np.log(SCALE_STEP)))
    c = fits_at(k, around=True)  # the shift's fraction at the scale found
    by, bx = np.unravel_index(int(np.argmin(c)), c.shape)
    fy = _parabola(c[0, bx], c[1, bx], c[2, bx]) if by == 1 else 0.0
    fx = _parabola(c[by, 0], c[by, 1], c[by, 2]) if bx == 1 else 0.0
    tx, ty = sx + ix + bx - 1 + fx - x0, sy + iy + by - 1 + fy - y0  # shift of the best-placed template
    return np.array([[k, 0, (1 - k) * centre[0] + tx], [0, k, (1 - k) * centre[1] + ty]], np.float64)
