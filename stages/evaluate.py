"""Evaluate: the paper's metrics for one edited video (spec §6), cached like every other stage.

Always computed (no weights):

* ``warping_error`` (pair): frame t warped onto frame t+1 with the *output's* own flow (the flow stage's
  backends, DIS by default), squared RGB error in [0, 1] over the pixels that pass a forward-backward
  occlusion check (Lai et al. 2018); ``occluded_fraction`` (pair) says how many were left out.
* ``shape_iou`` (frame): the edited object found in each output frame against the simulated shape S_t.
  Default: the edited frame's object (inside S_0) located by masked template matching, keeping the pixels
  that still look like it (``metrics.track_by_appearance``); or S_0 carried by the output's flow and
  re-fitted per frame (``stages.source_masks.track_masks``).
* ``first_frame_psnr`` / ``first_frame_ssim`` (scalars): output frame 0 against the edited first frame.
* ``background_psnr`` (frame): output against source outside the dilated paste masks (and the dilated
  source object, which the edit removes); ``background_fraction`` (frame) = share of pixels measured.

With weights (backends ``clip`` and ``learned``; models in ``stages.nets.eval_models``): ``clip_score``
(frame, 100 * max(cos(text, frame), 0)), ``clip_temporal`` (pair, cosine of consecutive frames' image
embeddings), DOVER (``dover_*`` scalars) and the I3D features FVD needs (``fvd_features`` for the output,
``fvd_source_features`` for the source: FVD is a distance between *sets* of videos, so the report computes
it per configuration). Metrics without weights are left out (optional outputs), with a logged message.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
from pydantic import Field

from stages import metrics
from stages.base import ArraySpec, Backend, Params, Stage, StageInputError

log = logging.getLogger("v2v.evaluate")


class EvaluateParams(Params):
    prompt: str = Field("", description="text for the CLIP score (the job's generation prompt)")
    flow_backend: str = Field("dis", description="weight-free backend of the flow stage used on the output")
    occlusion_check: bool = Field(True, description="leave occluded pixels out of the warping error")
    shape_tracker: Literal["appearance", "flow"] = Field(
        "appearance", description="how the edited object is found in the output: 'appearance' = the edited "
                                  "frame's object located by template matching, keeping the pixels that look "
                                  "like it; 'flow' = S_0 carried by the output's flow, re-fitted per frame")
    search_px: int = Field(48, ge=1, le=1024, description="appearance: largest move between frames (px)")
    appearance_tolerance: float = Field(40.0, gt=0, description="appearance: RGB distance still 'the object'")
    background_margin_px: int = Field(8, ge=0, le=128,
                                      description="dilation of paste masks / source object before "
                                                  "measuring the background")
    exclude_source_object: bool = Field(True, description="leave the (removed) source object out of the "
                                                          "background too")
    dover_seed: int = Field(0, ge=0, description="seed of DOVER's fragment offsets (random upstream)")
    batch: int = Field(8, ge=1, le=256, description="frames per forward pass of the learned models")


INPUTS = ("video", "frames", "edited_frame", "shape_masks", "paste_masks", "object_masks")
SCALAR = ArraySpec((), "float32")
OUTPUTS = {
    "warping_error": ArraySpec(("pair",), "float32"),
    "occluded_fraction": ArraySpec(("pair",), "float32"),
    "shape_iou": ArraySpec(("frame",), "float32"),
    "first_frame_psnr": SCALAR,
    "first_frame_ssim": SCALAR,
    "background_psnr": ArraySpec(("frame",), "float32"),
    "background_fraction": ArraySpec(("frame",), "float32"),
    "clip_score": ArraySpec(("frame",), "float32"),
    "clip_temporal": ArraySpec(("pair",), "float32"),
    "dover_overall": SCALAR,
    "dover_technical": SCALAR,
    "dover_aesthetic": SCALAR,
    "fvd_features": ArraySpec(("feature",), "float32"),
    "fvd_source_features": ArraySpec(("feature",), "float32"),
}
LEARNED = ("clip_score", "clip_temporal", "dover_overall", "dover_technical", "dover_aesthetic",
           "fvd_features", "fvd_source_features")


# ---- checks -----------------------------------------------------------------------------------------

def _check(video: np.ndarray, frames: np.ndarray, edited_frame: np.ndarray, shape_masks: np.ndarray,
           paste_masks: np.ndarray, object_masks: np.ndarray) -> None:
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise StageInputError(f"evaluate: video must be uint8 [frame, y, x, 3], got {video.dtype} "
                              f"{video.shape}")
    n, h, w = video.shape[:3]
    if n < 1:
        raise StageInputError("evaluate: the video has no frames")
    if frames.shape != video.shape:
        raise StageInputError(f"evaluate: source frames are {frames.shape}, the video is {video.shape} "
                              "(the output must be on the source canvas, one frame per source frame)")
    if edited_frame.shape != (h, w, 3):
        raise StageInputError(f"evaluate: edited_frame is {edited_frame.shape}, frames are {(h, w, 3)}")
    masks = {"shape_masks": shape_masks, "paste_masks": paste_masks, "object_masks": object_masks}
    for name, m in masks.items():
        if m.shape != (n, h, w):
            raise StageInputError(f"evaluate: {name} is {m.shape}, expected {(n, h, w)}")


# ---- the weight-free metrics ------------------------------------------------------------------------

def video_flows(video: np.ndarray, backend: str) -> tuple[np.ndarray, np.ndarray]:
    """Backward flows (pair t: t+1 -> t, on frame t+1) and forward flows (pair t: t -> t+1, on frame t)."""
    from stages import get_stage

    flow = get_stage("flow")
    if flow.backend(backend).needs_weights:
        raise StageInputError(f"evaluate: flow backend {backend!r} needs weights; choose a weight-free one")
    backward = flow.run({"frames": video}, backend=backend)["flows"]
    # The flow of the reversed clip: its pair k lives on frame n-2-k and points into frame n-1-k.
    forward = flow.run({"frames": np.ascontiguousarray(video[::-1])}, backend=backend)["flows"][::-1]
    return backward, np.ascontiguousarray(forward)


def warping_errors(video: np.ndarray, backward: np.ndarray, forward: np.ndarray,
                   occlusion_check: bool = True) -> tuple[np.ndarray, np.ndarray]:
    n = video.shape[0]
    err = np.zeros(max(n - 1, 0), np.float32)
    occ = np.zeros(max(n - 1, 0), np.float32)
    for t in range(n - 1):
        if occlusion_check:
            err[t], occ[t] = metrics.warping_error(video[t], video[t + 1], backward[t], forward[t])
        else:
            warped, _ = metrics.sample(video[t], backward[t])
            d = (warped - video[t + 1].astype(np.float32)) / 255.0
            err[t] = float(np.mean(np.sum(d.astype(np.float64) ** 2, axis=-1)))
    return err, occ


def output_object_masks(params: EvaluateParams, video: np.ndarray, edited_frame: np.ndarray,
                        first_shape: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """The edited object in every output frame (see ``EvaluateParams.shape_tracker``)."""
    if params.shape_tracker == "appearance":
        return metrics.track_by_appearance(video, edited_frame, first_shape, params.search_px,
                                           params.appearance_tolerance)
    if not first_shape.any():
        return np.zeros(video.shape[:3], dtype=bool)
    from stages.source_masks import track_masks

    return track_masks(video, first_shape, backward)


def background_psnrs(video: np.ndarray, frames: np.ndarray, paste_masks: np.ndarray,
                     object_masks: np.ndarray | None, margin: int) -> tuple[np.ndarray, np.ndarray]:
    n = video.shape[0]
    values = np.zeros(n, np.float32)
    fraction = np.zeros(n, np.float32)
    for t in range(n):
        edited = paste_masks[t] if object_masks is None else paste_masks[t] | object_masks[t]
        keep = ~metrics.dilate(edited, margin)
        fraction[t] = float(keep.mean())
        values[t] = metrics.psnr(video[t], frames[t], keep)
    return values, fraction


def basic_metrics(params: EvaluateParams, video: np.ndarray, frames: np.ndarray, edited_frame: np.ndarray,
                  shape_masks: np.ndarray, paste_masks: np.ndarray, object_masks: np.ndarray
                  ) -> dict[str, np.ndarray]:
    shape_masks = shape_masks.astype(bool, copy=False)
    paste_masks = paste_masks.astype(bool, copy=False)
    object_masks = object_masks.astype(bool, copy=False)
    _check(video, frames, edited_frame, shape_masks, paste_masks, object_masks)
    backward, forward = video_flows(video, params.flow_backend)
    err, occ = warping_errors(video, backward, forward, params.occlusion_check)
    tracked = output_object_masks(params, video, edited_frame, shape_masks[0], backward)
    ious = np.array([metrics.iou(tracked[t], shape_masks[t]) for t in range(video.shape[0])], np.float32)
    bg, frac = background_psnrs(video, frames, paste_masks, object_masks if params.exclude_source_object
                                else None, params.background_margin_px)
    return {
        "warping_error": err,
        "occluded_fraction": occ,
        "shape_iou": ious,
        "first_frame_psnr": np.array(metrics.psnr(video[0], edited_frame), np.float32),
        "first_frame_ssim": np.array(metrics.ssim(video[0], edited_frame), np.float32),
        "background_psnr": bg,
        "background_fraction": frac,
    }


def _metrics_backend(*, model: None, params: EvaluateParams, **arrays: np.ndarray) -> dict[str, np.ndarray]:
    log.info("evaluate: CLIP, DOVER and FVD skipped: no weights configured (backend 'metrics'; use "
             "'clip' or 'learned' with weights)")
    return basic_metrics(params, **arrays)


# ---- learned metrics ------------------------------------------------------------------------------

def _learned_backend(*, model: dict[str, Any], params: EvaluateParams, **arrays: np.ndarray
                     ) -> dict[str, np.ndarray]:
    from stages.nets import eval_models as lm

    out = basic_metrics(params, **arrays)
    video, frames = arrays["video"], arrays["frames"]
    if model.get("clip") is not None:
        if params.prompt:
            out["clip_score"] = lm.clip_scores(model["clip"], video, params.prompt, params.batch)
        else:
            log.warning("evaluate: CLIP score skipped: no prompt (set evaluate params.prompt)")
        out["clip_temporal"] = lm.clip_temporal(model["clip"], video, params.batch)
    if model.get("dover") is not None:
        scores = lm.dover_scores(model["dover"], video, params.dover_seed)
        for k in ("overall", "technical", "aesthetic"):
            out[f"dover_{k}"] = np.array(scores[k], np.float32)
    if model.get("fvd") is not None:
        out["fvd_features"] = lm.i3d_features(model["fvd"], video)
        out["fvd_source_features"] = lm.i3d_features(model["fvd"], frames)
    for name, why in model.get("skipped", {}).items():
        log.warning("evaluate: %s skipped: %s", name, why)
    return out


def _load_clip(weights: str | None, device: str) -> dict[str, Any]:
    from stages.nets import eval_models as lm

    assert weights is not None
    only = "backend 'clip' computes CLIP only (use 'learned' for all)"
    return {"clip": lm.load_clip(weights, device), "skipped": {"DOVER": only, "FVD": only}}


def _load_bundle(weights: str | None, device: str) -> dict[str, Any]:
    from stages.nets import eval_models as lm

    assert weights is not None
    return lm.load_bundle(weights, device)


# The warping-error, shape and background metrics' fields (every backend computes those).
METRICS_READS = ("flow_backend", "occlusion_check", "shape_tracker", "search_px", "appearance_tolerance",
                 "background_margin_px", "exclude_source_object")

STAGE = Stage(
    name="evaluate",
    version="1",
    inputs=INPUTS,
    outputs=OUTPUTS,
    optional_outputs=LEARNED,
    params=EvaluateParams,
    backends={
        "metrics": Backend("metrics", _metrics_backend, reads=METRICS_READS),
        "clip": Backend("clip", _learned_backend, reads=(*METRICS_READS, "prompt", "batch"), load=_load_clip,
                        needs_weights=True),
        "learned": Backend("learned", _learned_backend, reads=(*METRICS_READS, "prompt", "batch", "dover_seed"),
                           load=_load_bundle, needs_weights=True),
    },
    default_backend="metrics",
    doc="Metrics of the edited video: warping error, shape IoU, first-frame and background fidelity "
        "(+ CLIP, DOVER, FVD features with weights).",
)
