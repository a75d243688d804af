"""Source object masks O_t, one per frame (spec §3.1).

Backends:

* ``provided``: the user's masks, one per frame (ingest's ``provided_masks``).
* ``track`` (weight-free default): the frame-0 mask carried through the clip with the flows, or where the
  object's colours went where the flow cannot see it (objects without texture), and re-fitted to each
  frame so that it does not drift (see :func:`track_masks`).
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
from stages.register import register_object


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
    track_rigid_sigma: float = Field(1.0, gt=0, description="track_prior_sigma where the registered placement "
                                                            "carried the mask (its boundary is surer)")
    track_rigid_smooth_radius: int = Field(
        0, ge=0, description="track_smooth_radius there: snapping an exact boundary to the edges of a textured "
                             "background only moves it off (a hard-edged flat star: IoU 1.00 -> 0.88)")
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


def _best_motion(colour: list[np.ndarray], masks: np.ndarray, s: int, t: int, flow: np.ndarray,
                 guess: tuple[np.ndarray, float], search_px: int
                 ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, float] | None, bool]:
    """Mask s carried onto frame t: by ``flow`` (backward, t -> s) or by the object's registered placement
    (shift and scale), whichever explains frame t better around the object. ``guess``: the expected
    displacement of the mask's centre and scale. Returns the warped mask (float), the flow that carried
    it, the registered (displacement, scale) (None if registration found nothing), and whether the
    placement won."""
    by_flow = warp_backward(masks[s], flow)
    a = register_object(colour[s], masks[s], colour[t], guess[0], search_px, guess[1])
    if a is None:
        return by_flow, flow, None, False
    h, w = masks.shape[1:]
    ys, xs = np.nonzero(masks[s])
    centre = np.array([xs.mean(), ys.mean()])
    d = (a[:, :2] @ centre + a[:, 2] - centre, float(a[0, 0]))
    # Backward flow of the placement on frame t's grid: p -> a^-1 p.
    inv = cv2.invertAffineTransform(a)
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    placed = np.stack([inv[0, 0] * gx + inv[0, 1] * gy + inv[0, 2] - gx,
                       inv[1, 0] * gx + inv[1, 1] * gy + inv[1, 2] - gy], -1).astype(np.float32)
    rigid = warp_backward(masks[s], placed, cv2.BORDER_CONSTANT)
    region = cv2.dilate(((rigid > 0.5) | (by_flow > 0.5)).astype(np.uint8), _disk(3)) > 0
    inside = rigid > 0.5  # not beyond: the background around the object does not move with it
    rigid_flow = flow.copy()
    rigid_flow[inside] = placed[inside]
    if _misfit(colour[s], rigid_flow, colour[t], region) < _misfit(colour[s], flow, colour[t], region):
        return rigid, rigid_flow, d, True
    return by_flow, flow, d, False


def track_masks(frames: np.ndarray, mask0: np.ndarray, flows: np.ndarray,
                params: SourceMaskParams | None = None) -> np.ndarray:
    """Carry ``mask0`` through the clip with ``flows`` and re-fit it to every frame.

    Plain chained warping drifts (disoccluded background behind a moving object inherits its label; the
    gaps between moving legs fill up), so each frame t combines three cues in one score:

    1. shape prior: the mean of two warps, the chained one (mask t-1 along ``flows[t-1]``) and a direct
       one from an anchor frame ``a = max(0, t - anchor_gap)`` (mask a along a DIS flow t -> a computed
       here; for t <= gap the anchor is the given frame-0 mask itself, so errors do not accumulate).
       With ``register``, each warp may instead be the mask moved where the object's colours went
       (:func:`stages.register.register_object`: shift and scale), where that explains frame t better
       than the flow around the object: inside a flat-coloured object flow collapses (a disc sliding
       10 px per frame: ~2 px), the chained warp lags and the mask slides off the object. A registered
       prior's boundary is surer: ``rigid_sigma`` and ``rigid_smooth_radius`` replace the two below.
       A flow over several frames fails on small fast objects (the demo ball, 15 px per frame on the 512²
       canvas, is 60-120 px from its anchor): when the two warps overlap by less than ``anchor_agree``
       (IoU), only the one whose warped frame matches frame t better inside its mask is kept.
       The prior's signed distance / ``prior_sigma`` is clipped to ±6: deep inside/outside it is certain;
    2. colour: log-likelihood ratio of object vs nearby background, learnt once on frame 0 (where the
       mask is given, so the model never learns from its own mistakes), weighted by ``colour_weight``;
       as it is clipped to ±4 it can only move the boundary by ``4 * colour_weight * prior_sigma`` px
       (7 px by default): colour corrects the warp locally, it never invents a far-away region;
    3. edge-aware smoothing of the score (guided filter on the frame) so the boundary snaps to edges.

    mask_t = score > 0. Deterministic; ~0.2-0.4 s per 512² frame (registration: about half of it).
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
    # Registered motion of the object's mask from frame t-1 to t (centre displacement x, y; scale) and its
    # sum from frame 0: the guesses for the next frame and for the anchor.
    path, path_scale = np.zeros((n, 2), np.float64), np.ones(n, np.float64)
    velocity: tuple[np.ndarray, float] = (np.zeros(2, np.float64), 1.0)
    for t in range(1, n):
        prior, prior_flow, rigid = warp_backward(masks[t - 1], flows[t - 1]), flows[t - 1], False
        if p.track_register:
            prior, prior_flow, d, rigid = _best_motion(colour, masks, t - 1, t, flows[t - 1], velocity,
                                                p.track_search_px)
            velocity = velocity if d is None else d
        path[t], path_scale[t] = path[t - 1] + velocity[0], path_scale[t - 1] * velocity[1]
        a = max(0, t - p.track_anchor_gap)
        if a < t - 1 and masks[a].any():
            direct_flow = dis.calc(grey[t], grey[a], None)
            direct = warp_backward(masks[a], direct_flow)
            direct_rigid = False
            if p.track_register:
                guess = (path[t] - path[a], path_scale[t] / path_scale[a])
                direct, direct_flow, _, direct_rigid = _best_motion(colour, masks, a, t, direct_flow, guess,
                                                                    p.track_search_px)
            if iou(prior > 0.5, direct > 0.5) >= p.track_anchor_agree:
                prior, rigid = 0.5 * prior + 0.5 * direct, rigid and direct_rigid
            elif (_misfit(grey[a], direct_flow, grey[t], direct > 0.5)
                  < _misfit(grey[t - 1], prior_flow, grey[t], prior > 0.5)):
                prior, rigid = direct, direct_rigid
        prior_mask = prior > 0.5
        if not prior_mask.any():
            continue  # the object left the frame: it stays empty
        sigma = p.track_rigid_sigma if rigid else p.track_prior_sigma
        score = np.clip(_signed_distance(prior_mask) / sigma, -6.0, 6.0)
        score += p.track_colour_weight * colour_llr(frames[t], colours)
        radius = p.track_rigid_smooth_radius if rigid else p.track_smooth_radius
        if radius:
            score = guided_filter(frames[t], score.astype(np.float32), radius, 1e-2 * 255.0**2)
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


TRACK_READS = ("track_anchor_gap", "track_anchor_agree", "track_prior_sigma", "track_colour_weight",
               "track_colour_ring", "track_smooth_radius", "track_register", "track_rigid_sigma",
               "track_rigid_smooth_radius", "track_search_px")

STAGE = Stage(
    name="source_masks",
    # 2: track drops a direct (anchor) warp that disagrees with the chained one and fits worse;
    # 3: track also places the mask where the object's colours went (objects without texture)
    version="3",
    inputs=("frames", "provided_masks", "flows"),
    outputs={"object_masks": ArraySpec(("frame", "y", "x"), "bool")},
    params=SourceMaskParams,
    backends={
        "track": Backend("track", track, uses=("frames", "provided_masks", "flows"), reads=TRACK_READS),
        "provided": Backend("provided", provided, uses=("frames", "provided_masks"), reads=(),
                            preferred_when="per_frame_masks"),
        "isnet": Backend("isnet", isnet, uses=("frames",), load=_load_isnet, needs_weights=True,
                         reads=("threshold",)),
        "u2net": Backend("u2net", u2net, uses=("frames",), load=_load_u2net, needs_weights=True, gpu=True,
                         reads=("threshold",)),
    },
    default_backend="track",
    doc="Source object masks O_t: provided, tracked from the frame-0 mask, or from a saliency model.",
)
