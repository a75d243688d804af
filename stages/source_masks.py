"""Source object masks O_t, one per frame (spec §3.1).

Backends:

* ``provided``: the user's masks, one per frame (ingest's ``provided_masks``).
* ``track`` (weight-free default): the frame-0 mask carried through the clip with the flows and re-fitted
  to each frame so that it does not drift (see :func:`track_masks`).
* ``isnet`` / ``u2net``: a salient-object model on every frame (the reference uses U2-Net), threshold 0.5
  (U2-Net after the reference's per-image min-max).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from pydantic import Field

from stages.base import ArraySpec, Backend, Params, Stage, StageInputError
from stages.flow import dis_engine, warp_backward
from stages.metrics import iou


class SourceMaskParams(Params):
    threshold: float = Field(0.5, gt=0, lt=1, description="saliency backends: foreground if prob > this")
    # track: see track_masks for what each knob does.
    track_anchor_gap: int = Field(8, ge=1, description="frames back to the anchor of the direct flow")
    track_anchor_agree: float = Field(
        0.5, ge=0, le=1, description="IoU the direct (anchor) warp must reach with the chained one to be "
                                     "averaged with it; below, the one that matches the frame better is kept")
    track_prior_sigma: float = Field(3.0, gt=0, description="px over which the warped boundary is trusted")
    track_colour_weight: float = Field(0.6, ge=0, description="weight of the colour log-likelihood ratio")
    track_colour_ring: int = Field(40, ge=4, description="px around the object giving the background colours")
    track_smooth_radius: int = Field(4, ge=0, description="edge-aware (guided filter) smoothing radius, px")
    track_register: bool = Field(
        True, description="also move the mask rigidly by where the object's colours went (masked template "
                          "match) and keep that where it explains the frame better than the optical flow: flow "
                          "collapses inside objects without texture")
    track_search_px: int = Field(24, ge=1, le=256, description="register: search radius around the "
                                                               "constant-velocity guess, px")


# ---- checks -----------------------------------------------------------------------------------------

def _check_frames(frames: np.ndarray) -> np.ndarray:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise StageInputError(f"source_masks: frames must be uint8 [frame, y, x, 3], got {frames.dtype} "
                              f"{frames.shape}")
    return frames


def _check_provided(provided_masks: np.ndarray, frames: np.ndarray) -> np.ndarray:
    if provided_masks.ndim != 3 or provided_masks.shape[0] == 0:
        raise StageInputError("source_masks: no provided masks (give a mask for frame 0, or choose the "
                              "isnet/u2net backend)")
    if provided_masks.shape[1:] != frames.shape[1:3]:
        raise StageInputError(f"source_masks: provided masks are {provided_masks.shape[2]}x"
                              f"{provided_masks.shape[1]}, frames are {frames.shape[2]}x{frames.shape[1]}")
    return provided_masks.astype(bool, copy=False)


# ---- provided ---------------------------------------------------------------------------------------

def provided(*, model: None, params: SourceMaskParams, frames: np.ndarray,
             provided_masks: np.ndarray) -> dict[str, np.ndarray]:
    frames = _check_frames(frames)
    masks = _check_provided(provided_masks, frames)
    n = frames.shape[0]
    if masks.shape[0] != n:
        hint = (" Only the frame-0 mask was given: use the 'track' backend to carry it through the clip."
                if masks.shape[0] == 1 else "")
        raise StageInputError(f"source_masks (provided): {masks.shape[0]} masks for {n} frames.{hint}")
    return {"object_masks": masks.copy()}


# ---- track ------------------------------------------------------------------------------------------

BINS = 32  # per RGB channel: enough to separate fur from mulch, coarse enough to generalise across frames


def _disk(r: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    """Pixels inside > 0, outside < 0 (L2 distance to the boundary)."""
    m = mask.astype(np.uint8)
    return cv2.distanceTransform(m, cv2.DIST_L2, 5) - cv2.distanceTransform(1 - m, cv2.DIST_L2, 5)


def colour_model(image: np.ndarray, mask: np.ndarray, ring: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB histograms of the object and of the background ring around it (the colours it must beat)."""
    m = mask.astype(np.uint8)
    around = ((cv2.dilate(m, _disk(ring)) > 0) & ~mask).astype(np.uint8)
    hists = []
    for sel in (m, around):
        h = cv2.calcHist([np.ascontiguousarray(image)], [0, 1, 2], sel, [BINS] * 3, [0, 256] * 3)
        hists.append(h / max(float(h.sum()), 1.0))
    return hists[0], hists[1]


def colour_llr(image: np.ndarray, model: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """log p(colour | object) - log p(colour | background), clipped to ±4."""
    idx = (image // (256 // BINS)).astype(np.intp)
    i = (idx[..., 0], idx[..., 1], idx[..., 2])
    llr = np.log(model[0][i] + 1e-4) - np.log(model[1][i] + 1e-4)
    return np.clip(llr, -4.0, 4.0).astype(np.float32)


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter of ``src`` [y, x] float32 by an RGB ``guide`` (0..255): opencv-contrib's
    ``ximgproc.guidedFilter`` when present, else the same sums here (equal to 1e-6, a few times slower), so a
    plain opencv-python installed over opencv-contrib by another package changes nothing."""
    guide = np.ascontiguousarray(guide)
    ximgproc = getattr(cv2, "ximgproc", None)
    if ximgproc is not None:
        return ximgproc.guidedFilter(guide, src, radius, eps)
    image = guide.astype(np.float32)
    size = (2 * radius + 1, 2 * radius + 1)

    def box(x: np.ndarray) -> np.ndarray:  # ximgproc's mean filter and border
        return cv2.boxFilter(x, -1, size, normalize=True, borderType=cv2.BORDER_REFLECT)

    mean_i, mean_p = box(image), box(src)
    cov_ip = box(image * src[..., None]) - mean_i * mean_p[..., None]
    pairs = [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
    var = box(np.stack([image[..., i] * image[..., j] for i, j in pairs], -1))
    sigma = np.empty(src.shape + (3, 3), np.float64)
    for k, (i, j) in enumerate(pairs):
        sigma[..., i, j] = sigma[..., j, i] = var[..., k] - mean_i[..., i] * mean_i[..., j]
    sigma[..., [0, 1, 2], [0, 1, 2]] += eps
    a = np.linalg.solve(sigma, cov_ip[..., None].astype(np.float64))[..., 0].astype(np.float32)
    b = mean_p - (a * mean_i).sum(-1)
    return (box(a) * image).sum(-1) + box(b)


def _misfit(source: np.ndarray, flow: np.ndarray, target: np.ndarray, region: np.ndarray) -> float:
    """Mean absolute grey difference between ``source`` warped by ``flow`` and ``target`` over ``region``."""
    if not region.any():
        return float("inf")
    warped = warp_backward(source.astype(np.float32), flow)
    return float(np.abs(warped[region] - target[region].astype(np.float32)).mean())


def _ccorr(image: np.ndarray, templ: np.ndarray) -> np.ndarray:
    return cv2.matchTemplate(np.ascontiguousarray(image, np.float32), np.ascontiguousarray(templ, np.float32),
                             cv2.TM_CCORR)


def _parabola(c_minus: float, c0: float, c_plus: float) -> float:
    """Offset (-0.5..0.5) of the vertex of the parabola through three costs around a minimum."""
    den = c_minus - 2 * c0 + c_plus
    if not np.isfinite(den) or den <= 0:
        return 0.0
    return float(np.clip(0.5 * (c_minus - c_plus) / den, -0.5, 0.5))


def register_object(prev: np.ndarray, mask: np.ndarray, frame: np.ndarray, guess: np.ndarray,
                    search_px: int, min_visible: float = 0.5) -> np.ndarray | None:
    """Forward displacement (x, y) of the object (``prev`` inside ``mask``) into ``frame``, sub-pixel.

    Masked sum of squared colour differences over every shift within ``search_px`` of ``guess``, averaged
    over the template pixels inside the frame (an object may leave the view); a parabola through the
    minimum and its neighbours gives the fraction. Unlike optical flow it needs no texture inside the object:
    a flat-coloured disc over texture has one sharp minimum, set by its boundary. None when the mask is
    empty or no shift keeps ``min_visible`` of the object in view.
    """
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    th, tw = y1 - y0, x1 - x0
    h, w = mask.shape
    gy, gx = y0 + int(round(float(guess[1]))), x0 + int(round(float(guess[0])))  # guessed top-left
    sy, ey = max(gy - search_px, -th + 1), min(gy + search_px, h - 1)
    sx, ex = max(gx - search_px, -tw + 1), min(gx + search_px, w - 1)
    if sy > ey or sx > ex:
        return None
    pad = ((th, th), (tw, tw), (0, 0))
    img = np.pad(frame.astype(np.float32), pad)[sy + th:ey + 2 * th, sx + tw:ex + 2 * tw]
    valid = np.pad(np.ones((h, w), np.float32), pad[:2])[sy + th:ey + 2 * th, sx + tw:ex + 2 * tw]
    m = mask[y0:y1, x0:x1].astype(np.float32)
    t = prev[y0:y1, x0:x1].astype(np.float32) * m[..., None]
    visible = _ccorr(valid, m)
    sq = (_ccorr((img * img).sum(-1) * valid, m) - 2 * _ccorr(img * valid[..., None], t)
          + _ccorr(valid, (t * t).sum(-1)))
    ok = visible >= min_visible * m.sum()
    if not ok.any():
        return None
    cost = np.where(ok, np.maximum(sq, 0) / np.maximum(visible, 1.0), np.inf)
    # Among equal costs (an object as flat as its surroundings) prefer the smallest change of velocity.
    yy, xx = np.mgrid[sy:ey + 1, sx:ex + 1]
    cost = cost + 1e-6 * ((yy - gy) ** 2 + (xx - gx) ** 2)
    iy, ix = np.unravel_index(int(np.argmin(cost)), cost.shape)
    fy = _parabola(cost[iy - 1, ix], cost[iy, ix], cost[iy + 1, ix]) if 0 < iy < cost.shape[0] - 1 else 0.0
    fx = _parabola(cost[iy, ix - 1], cost[iy, ix], cost[iy, ix + 1]) if 0 < ix < cost.shape[1] - 1 else 0.0
    return np.array([sx + ix + fx - x0, sy + iy + fy - y0], np.float64)


def _best_motion(colour: list[np.ndarray], masks: np.ndarray, s: int, t: int, flow: np.ndarray,
                 guess: np.ndarray, search_px: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Mask s carried onto frame t: by ``flow`` (backward, t -> s) or rigidly by the object's registered
    displacement, whichever explains frame t better around the object. Returns the warped mask (float),
    the flow that carried it and the registered displacement (None if registration found nothing)."""
    by_flow = warp_backward(masks[s], flow)
    d = register_object(colour[s], masks[s], colour[t], guess, search_px)
    if d is None:
        return by_flow, flow, None
    h, w = masks.shape[1:]
    rigid = warp_backward(masks[s], np.broadcast_to(-d.astype(np.float32), (h, w, 2)), cv2.BORDER_CONSTANT)
    region = cv2.dilate(((rigid > 0.5) | (by_flow > 0.5)).astype(np.uint8), _disk(3)) > 0
    rigid_flow = flow.copy()
    rigid_flow[cv2.dilate((rigid > 0.5).astype(np.uint8), _disk(2)) > 0] = -d
    if _misfit(colour[s], rigid_flow, colour[t], region) < _misfit(colour[s], flow, colour[t], region):
        return rigid, rigid_flow, d
    return by_flow, flow, d


def track_masks(frames: np.ndarray, mask0: np.ndarray, flows: np.ndarray,
                params: SourceMaskParams | None = None) -> np.ndarray:
    """Carry ``mask0`` through the clip with ``flows`` and re-fit it to every frame.

    Plain chained warping drifts (disoccluded background behind a moving object inherits its label; the
    gaps between moving legs fill up), so each frame t combines three cues in one score:

    1. shape prior: the mean of two warps, the chained one (mask t-1 along ``flows[t-1]``) and a direct
       one from an anchor frame ``a = max(0, t - anchor_gap)`` (mask a along a DIS flow t -> a computed
       here; for t <= gap the anchor is the given frame-0 mask itself, so errors do not accumulate).
       A flow over several frames fails on small fast objects (the demo ball, 15 px per frame on the 512²
       canvas, is 60-120 px from its anchor): when the two warps overlap by less than ``anchor_agree``
       (IoU), only the one whose warped frame matches frame t better inside its mask is kept.
       The prior's signed distance / ``prior_sigma`` is clipped to ±6: deep inside/outside it is certain;
    2. colour: log-likelihood ratio of object vs nearby background, learnt once on frame 0 (where the
       mask is given, so the model never learns from its own mistakes), weighted by ``colour_weight``;
       as it is clipped to ±4 it can only move the boundary by ``4 * colour_weight * prior_sigma`` px
       (7 px by default): colour corrects the warp locally, it never invents a far-away region;
    3. edge-aware smoothing of the score (guided filter on the frame) so the boundary snaps to edges.

    mask_t = score > 0. Deterministic; ~0.1-0.2 s per 512² frame.
    """
    p = params or SourceMaskParams()
    n = frames.shape[0]
    masks = np.zeros(frames.shape[:3], dtype=bool)
    masks[0] = mask0
    if not mask0.any() or n == 1:
        return masks  # nothing to track: empty masks all along
    colours = colour_model(frames[0], mask0, p.track_colour_ring)
    dis = dis_engine("medium")
    grey = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames]
    colour = [f.astype(np.float32) for f in frames] if p.track_register else []
    # Registered displacement of the object from frame t-1 to t, summed from frame 0 (x, y).
    path = np.zeros((n, 2), np.float64)
    velocity = np.zeros(2, np.float64)
    for t in range(1, n):
        prior, prior_flow = warp_backward(masks[t - 1], flows[t - 1]), flows[t - 1]
        if p.track_register:
            prior, prior_flow, d = _best_motion(colour, masks, t - 1, t, flows[t - 1], velocity,
                                                p.track_search_px)
            velocity = velocity if d is None else d
        path[t] = path[t - 1] + velocity
        a = max(0, t - p.track_anchor_gap)
        if a < t - 1 and masks[a].any():
            direct_flow = dis.calc(grey[t], grey[a], None)
            direct = warp_backward(masks[a], direct_flow)
            if p.track_register:
                direct, direct_flow, _ = _best_motion(colour, masks, a, t, direct_flow, path[t] - path[a],
                                                      p.track_search_px)
            if iou(prior > 0.5, direct > 0.5) >= p.track_anchor_agree:
                prior = 0.5 * prior + 0.5 * direct
            elif (_misfit(grey[a], direct_flow, grey[t], direct > 0.5)
                  < _misfit(grey[t - 1], prior_flow, grey[t], prior > 0.5)):
                prior = direct
        prior_mask = prior > 0.5
        if not prior_mask.any():
            continue  # the object left the frame: it stays empty
        score = np.clip(_signed_distance(prior_mask) / p.track_prior_sigma, -6.0, 6.0)
        score += p.track_colour_weight * colour_llr(frames[t], colours)
        if p.track_smooth_radius:
            score = guided_filter(frames[t], score.astype(np.float32), p.track_smooth_radius, 1e-2 * 255.0**2)
        masks[t] = score > 0
    return masks


def track(*, model: None, params: SourceMaskParams, frames: np.ndarray, provided_masks: np.ndarray,
          flows: np.ndarray) -> dict[str, np.ndarray]:
    frames = _check_frames(frames)
    masks = _check_provided(provided_masks, frames)
    n, h, w = frames.shape[:3]
    if flows.shape != (n - 1, h, w, 2):
        raise StageInputError(f"source_masks (track): flows are {flows.shape}, expected {(n - 1, h, w, 2)} "
                              "for these frames")
    # Only frame 0 is used even when more masks are given (use 'provided' to keep them all).
    return {"object_masks": track_masks(frames, masks[0], flows, params)}


# ---- saliency models --------------------------------------------------------------------------------

def _load_isnet(weights: str | None, device: str) -> Any:
    from stages.nets.isnet import load_isnet

    return load_isnet(weights, device)


def _load_u2net(weights: str | None, device: str) -> Any:
    from stages.nets.u2net import load_u2net

    return load_u2net(weights, device)


def isnet_probability(model: Any, images: np.ndarray) -> np.ndarray:
    from stages.nets.isnet import isnet_probability as run

    return run(model, images)


def u2net_probability(model: Any, images: np.ndarray) -> np.ndarray:
    from stages.nets.u2net import u2net_saliency

    return u2net_saliency(model, np.ascontiguousarray(images))  # min-max normalised, as the reference


def isnet(*, model: Any, params: SourceMaskParams, frames: np.ndarray) -> dict[str, np.ndarray]:
    return {"object_masks": isnet_probability(model, _check_frames(frames)) > params.threshold}


def u2net(*, model: Any, params: SourceMaskParams, frames: np.ndarray) -> dict[str, np.ndarray]:
    return {"object_masks": u2net_probability(model, _check_frames(frames)) > params.threshold}


STAGE = Stage(
    name="source_masks",
    version="2",  # 2: track drops a direct (anchor) warp that disagrees with the chained one and fits worse
    inputs=("frames", "provided_masks", "flows"),
    outputs={"object_masks": ArraySpec(("frame", "y", "x"), "bool")},
    params=SourceMaskParams,
    backends={
        "track": Backend("track", track, uses=("frames", "provided_masks", "flows")),
        "provided": Backend("provided", provided, uses=("frames", "provided_masks")),
        "isnet": Backend("isnet", isnet, uses=("frames",), load=_load_isnet, needs_weights=True),
        "u2net": Backend("u2net", u2net, uses=("frames",), load=_load_u2net, needs_weights=True, gpu=True),
    },
    default_backend="track",
    doc="Source object masks O_t: provided, tracked from the frame-0 mask, or from a saliency model.",
)
