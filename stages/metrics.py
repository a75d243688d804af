"""Pure metric functions (numpy/OpenCV only) used by the ``evaluate`` stage and the report.

Conventions: images are uint8 RGB ``[y, x, 3]`` (or ``[frame, y, x, 3]``); flows follow ``stages.flow``
(pair t lives on frame t+1's grid and points into frame t, component 0 = x). Nothing here returns NaN:
an undefined value (no pixel to measure) is reported through a separate count or fraction.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

PSNR_CAP_DB = 100.0  # identical images: a finite, recognisable ceiling instead of +inf

# ---- fidelity -----------------------------------------------------------------------------------------


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB over all channels of the pixels in ``mask`` (all if None).

    Capped at ``PSNR_CAP_DB``; ``0.0`` when the mask selects nothing (callers report the pixel count).
    """
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ {a.shape} vs {b.shape}")
    diff = a.astype(np.float64) - b.astype(np.float64)
    if mask is not None:
        diff = diff[mask]
    if diff.size == 0:
        return 0.0
    mse = float(np.mean(diff * diff))
    if mse <= data_range**2 * 10 ** (-PSNR_CAP_DB / 10):
        return PSNR_CAP_DB
    return float(10.0 * np.log10(data_range**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0, sigma: float = 1.5,
         radius: int = 5) -> float:
    """Mean SSIM (Wang et al. 2004): Gaussian window (sigma 1.5, 11x11), K1 = 0.01, K2 = 0.03.

    Population (biased) local statistics, computed per channel and averaged over the channels; the
    ``radius``-wide border where the window leaves the image is left out (as scikit-image does).
    """
    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ {a.shape} vs {b.shape}")
    x = a.astype(np.float64)
    y = b.astype(np.float64)
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    k = 2 * radius + 1

    def blur(img: np.ndarray) -> np.ndarray:
        out = cv2.GaussianBlur(img, (k, k), sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
        return out.reshape(img.shape)

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    h, w = s.shape[:2]
    if h > 2 * radius and w > 2 * radius:
        s = s[radius:h - radius, radius:w - radius]
    return float(np.mean(s))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1.0 when both are empty (they agree)."""
    union = int(np.count_nonzero(a | b))
    if union == 0:
        return 1.0
    return float(np.count_nonzero(a & b) / union)


def dilate(mask: np.ndarray, px: int) -> np.ndarray:
    """Grow a boolean mask by a disk of radius ``px`` (Euclidean)."""
    if px <= 0 or not mask.any():
        return mask.copy()
    dist = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return dist <= px


# ---- temporal consistency -------------------------------------------------------------------------


def sample(image: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``image(p + flow(p))`` (bilinear) and whether ``p + flow(p)`` lies inside the image."""
    h, w = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    mx, my = gx + flow[..., 0], gy + flow[..., 1]
    src = image.astype(np.float32)
    out = cv2.remap(src, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    inside = (mx >= 0) & (mx <= w - 1) & (my >= 0) & (my <= h - 1)
    return out.reshape(src.shape), inside


def occlusion_mask(backward: np.ndarray, forward: np.ndarray) -> np.ndarray:
    """Pixels of frame t+1 without a reliable match in frame t (True = occluded / unreliable).

    ``backward``: flow t+1 -> t on frame t+1's grid; ``forward``: flow t -> t+1 on frame t's grid. The
    forward-backward check of Sundaram et al. (2010), as used for the warping error by Lai et al. (2018):
    |b + f(p + b)|^2 > 0.01 (|b|^2 + |f(p + b)|^2) + 0.5, plus motion boundaries
    (|grad b|^2 > 0.01 |b|^2 + 0.002) and matches that leave the image.
    """
    f_w, inside = sample(forward, backward)
    total = backward + f_w
    mag = lambda v: v[..., 0] ** 2 + v[..., 1] ** 2  # noqa: E731 - squared magnitude
    inconsistent = mag(total) > 0.01 * (mag(backward) + mag(f_w)) + 0.5
    gy_u, gx_u = np.gradient(backward[..., 0])
    gy_v, gx_v = np.gradient(backward[..., 1])
    boundary = (gx_u**2 + gy_u**2 + gx_v**2 + gy_v**2) > 0.01 * mag(backward) + 0.002
    return inconsistent | boundary | ~inside


def warping_error(prev: np.ndarray, nxt: np.ndarray, backward: np.ndarray, forward: np.ndarray
                  ) -> tuple[float, float]:
    """Warping error of one pair (Lai et al. 2018) and the fraction of pixels left out as occluded.

    Frame t (``prev``) is warped onto frame t+1 (``nxt``) with the backward flow; the error is the squared
    RGB distance (values in [0, 1], summed over channels) averaged over the non-occluded pixels. When every
    pixel is occluded the average runs over all pixels (never NaN).
    """
    warped, _ = sample(prev, backward)
    occluded = occlusion_mask(backward, forward)
    d = (warped - nxt.astype(np.float32)) / 255.0
    per_pixel = np.sum(d.astype(np.float64) ** 2, axis=-1)
    valid = ~occluded
    err = float(per_pixel[valid].mean()) if valid.any() else float(per_pixel.mean())
    return err, float(occluded.mean())


# ---- the edited object in an output video --------------------------------------------------------


def _ccorr(image: np.ndarray, templ: np.ndarray) -> np.ndarray:
    return cv2.matchTemplate(np.ascontiguousarray(image, np.float32), np.ascontiguousarray(templ, np.float32),
                             cv2.TM_CCORR)


def locate(frame: np.ndarray, templ: np.ndarray, tmask: np.ndarray, top_left: tuple[int, int],
           search_px: int, min_visible: float = 0.3) -> tuple[int, int] | None:
    """Top-left position of ``templ`` (pixels where ``tmask``) in ``frame`` near ``top_left``.

    Masked sum of squared differences, averaged over the template pixels that fall inside the frame (so an
    object partly out of view is still found); positions showing less than ``min_visible`` of it are
    rejected. Float images ``[y, x, c]``; returns None when nothing qualifies.
    """
    th, tw = tmask.shape
    h, w = frame.shape[:2]
    y0, x0 = top_left
    # Search window in frame coordinates, padded by the template size so the object may leave the view.
    ys, ye = max(y0 - search_px, -th + 1), min(y0 + search_px, h - 1)
    xs, xe = max(x0 - search_px, -tw + 1), min(x0 + search_px, w - 1)
    if ys > ye or xs > xe:
        return None
    pad = ((th, th), (tw, tw), (0, 0))
    img = np.pad(frame.astype(np.float32), pad)[ys + th:ye + 2 * th, xs + tw:xe + 2 * tw]
    valid = np.pad(np.ones((h, w), np.float32), pad[:2])[ys + th:ye + 2 * th, xs + tw:xe + 2 * tw]
    m = tmask.astype(np.float32)
    t = templ.astype(np.float32) * m[..., None]
    visible = _ccorr(valid, m)
    sq = _ccorr((img * img).sum(-1) * valid, m) - 2 * _ccorr(img * valid[..., None], t) \
        + _ccorr(valid, (t * t).sum(-1))
    ok = visible >= min_visible * m.sum()
    if not ok.any():
        return None
    cost = np.where(ok, sq / np.maximum(visible, 1.0), np.inf)
    # Prefer the smallest move among equal costs (flat regions): add a tiny distance penalty.
    gy, gx = np.mgrid[ys:ye + 1, xs:xe + 1]
    cost = cost + 1e-6 * ((gy - y0) ** 2 + (gx - x0) ** 2)
    iy, ix = np.unravel_index(int(np.argmin(cost)), cost.shape)
    return int(ys + iy), int(xs + ix)


def track_by_appearance(video: np.ndarray, reference: np.ndarray, first_mask: np.ndarray,
                        search_px: int = 48, tolerance: float = 40.0) -> np.ndarray:
    """Where the edited object (``reference`` inside ``first_mask``) is visible in each output frame.

    Per frame: find the object's translation by masked template matching against the reference (the
    edited first frame, so drift cannot accumulate), then keep the pixels of the moved mask whose colour
    matches the reference within ``tolerance`` (RGB distance after a light blur, best of a 3x3
    neighbourhood to allow for small deformations). A new object rendered with the old object's
    silhouette, or left behind, loses the pixels that do not show it.
    """
    n, h, w = video.shape[:3]
    masks = np.zeros((n, h, w), bool)
    if not first_mask.any():
        return masks
    ys, xs = np.nonzero(first_mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    ref = cv2.GaussianBlur(reference.astype(np.float32), (0, 0), 1.0)
    templ, tmask = ref[y0:y1, x0:x1], first_mask[y0:y1, x0:x1]
    pos = (int(y0), int(x0))
    for t in range(n):
        frame = cv2.GaussianBlur(video[t].astype(np.float32), (0, 0), 1.0)
        found = locate(frame, templ, tmask, pos, search_px)
        if found is None:
            continue
        pos = found
        dy, dx = pos[0] - y0, pos[1] - x0
        moved = np.zeros((h, w), bool)
        shifted = np.full((h, w, 3), np.inf, np.float32)
        sy, sx = slice(max(0, dy), min(h, h + dy)), slice(max(0, dx), min(w, w + dx))
        oy, ox = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
        moved[sy, sx] = first_mask[oy, ox]
        shifted[sy, sx] = ref[oy, ox]
        padded = np.pad(shifted, ((1, 1), (1, 1), (0, 0)), constant_values=np.inf)
        best = np.full((h, w), np.inf, np.float32)
        for ky in range(3):
            for kx in range(3):
                d = np.sqrt(((padded[ky:ky + h, kx:kx + w] - frame) ** 2).sum(-1))
                best = np.minimum(best, np.nan_to_num(d, nan=np.inf))
        keep = (moved & (best < tolerance)).astype(np.uint8)
        masks[t] = cv2.morphologyEx(keep, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)) > 0
    return masks


# ---- Fréchet distance (FVD) ------------------------------------------------------------------------


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``features`` [sample, dim], in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors [sample, dim], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) between two Gaussians.

    Tr((S1 S2)^1/2) is computed as the sum of the square roots of the eigenvalues of the symmetric PSD
    matrix S1^1/2 S2 S1^1/2 (same spectrum as S1 S2): no complex round-off, no scipy; rank-deficient
    covariances (fewer videos than feature dimensions) are fine.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    r1 = _psd_sqrt(s1)
    inner = r1 @ s2 @ r1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_sqrt = float(np.sum(np.sqrt(np.clip(eig, 0, None))))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def fvd(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet video distance between two sets of I3D features [video, dim]."""
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))


# ---- DOVER (views and score fusion of the official evaluate_a_set_of_videos.py) -----------------------

DOVER_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
DOVER_STD = np.array([58.395, 57.12, 57.375], np.float32)


def dover_frame_indices(n_frames: int, clip_len: int, fragments_t: int, interval: int) -> np.ndarray:
    """DOVER's ``UnifiedFrameSampler`` at test time without the random start (deterministic)."""
    tlen = n_frames // fragments_t
    starts = np.array([tlen * i for i in range(fragments_t)])
    idx = np.arange(clip_len)[None, :] * interval + starts[:, None]
    return np.mod(idx.reshape(-1), n_frames)


def dover_views(video: np.ndarray, tech_clips: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Aesthetic and technical views of a uint8 video [frame, y, x, 3], normalised as DOVER expects.

    Aesthetic: 32 frames (one per temporal fragment) resized to 224x224 -> [1, 3, 32, 224, 224].
    Technical: ``tech_clips`` clips of 32 frames (interval 2), each frame cut into 7x7 fragments of 32x32
    at offsets drawn once per clip (seeded here, torch.randint upstream) -> [clips, 3, 32, 224, 224].
    Frames smaller than 224 are upsampled first, as upstream.
    """
    n, h, w = video.shape[:3]
    aes_idx = dover_frame_indices(n, 1, 32, 2)
    aes = np.stack([cv2.resize(video[i], (224, 224), interpolation=cv2.INTER_AREA if min(h, w) > 224
                               else cv2.INTER_LINEAR) for i in aes_idx]).astype(np.float32)
    ratio = min(h / 224, w / 224)
    tech_src = video
    if ratio < 1:
        size = (round(w / ratio), round(h / ratio))
        tech_src = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_LINEAR) for f in video])
    th, tw = tech_src.shape[1:3]
    rng = np.random.default_rng(seed)
    tech_idx = dover_frame_indices(n, 32, tech_clips, 2).reshape(tech_clips, 32)
    hl, wl = th // 7, tw // 7
    tech = np.zeros((tech_clips, 32, 224, 224, 3), np.float32)
    for c in range(tech_clips):
        frames = tech_src[tech_idx[c]]
        for i in range(7):
            for j in range(7):
                hs, ws = min(hl * i, th - 32), min(wl * j, tw - 32)
                oy = int(rng.integers(hl - 32)) if hl > 32 else 0
                ox = int(rng.integers(wl - 32)) if wl > 32 else 0
                tech[c, :, i * 32:(i + 1) * 32, j * 32:(j + 1) * 32] = \
                    frames[:, hs + oy:hs + oy + 32, ws + ox:ws + ox + 32]
    aes = ((aes - DOVER_MEAN) / DOVER_STD).transpose(3, 0, 1, 2)[None]
    tech = ((tech - DOVER_MEAN) / DOVER_STD).transpose(0, 4, 1, 2, 3)
    return np.ascontiguousarray(aes), np.ascontiguousarray(tech)


def dover_fuse(aesthetic: float, technical: float) -> dict[str, float]:
    """Raw DOVER head outputs -> scores in [0, 1] (official calibration, LSVQ constants)."""
    t = (technical - 0.1107) / 0.07355
    a = (aesthetic + 0.08285) / 0.03774
    sig = lambda v: float(1.0 / (1.0 + np.exp(-v)))  # noqa: E731
    return {"aesthetic": sig(a), "technical": sig(t), "overall": sig(0.6104 * t + 0.3896 * a)}


# ---- summaries --------------------------------------------------------------------------------------


def mean_or_none(values: Sequence[float] | np.ndarray, weights: np.ndarray | None = None) -> float | None:
    """Mean of finite values (weighted), ``None`` when there is nothing to average."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    keep = np.isfinite(v) if weights is None else np.isfinite(v) & (np.asarray(weights).reshape(-1) > 0)
    if not keep.any():
        return None
    return float(v[keep].mean())
