"""Depth (spec §3.2): relative inverse depth per frame, near = large, float16 in [0, 1].

Backends:

* ``ground-prior`` (offline default, no weights) -- a *geometric stand-in*, not an estimate from the
  pixels: a flat ground plane seen from above has inverse depth proportional to the image row below the
  horizon, so the prior is a vertical ramp (0 = far at the horizon row ``horizon`` and above, 1 = near at
  the bottom row). The object (``object_masks``) stands on that ground: the whole object gets the prior's
  value at its ground-contact row (its lowest row), so it reads as one upright surface instead of
  continuing the ramp. The contact row is median-filtered over ``contact_window`` frames (the lowest mask
  row jitters with the segmentation) and the object's edge is feathered over ``edge_sigma_px``.
* ``dpt`` -- a transformers depth model (``DPTForDepthEstimation`` such as MiDaS-DPT, or Depth-Anything
  via ``AutoModelForDepthEstimation``) loaded once per worker from a local folder (``local_files_only``).
  Frames are squashed to the model's input size, run in batches, and the prediction (relative inverse
  depth; metric models are inverted) is resized back to the canvas with bicubic interpolation.

  Given a ``.pt`` *file* instead, the backend loads the reference's own MiDaS v3.1 ``dpt_swin2_large_384.pt``
  into transformers' DPT-Swinv2 (``stages.nets.midas``: strict signature check, key mapping) and feeds it the
  reference's preprocessing (float64 cv2 bicubic to 384², mean = std = 0.5). Same network family, same
  transformers class and the same ``weights.dpt`` setting, hence the same backend rather than a new one.

Output, v2v's default vs the reference (``normalise="frame", levels="uint8"``):

* ``normalise="clip"`` (default) maps the whole clip with one min/max (no scale flicker between frames);
  ``"frame"`` is the reference's per-frame min/max.
* ``levels="float16"`` (default) keeps the full precision; ``"uint8"`` gives the reference runner's 8-bit map
  (``255 * (d - min) / (max - min)``, ``* 3``, ``/ 3``, truncated), stored as k/255 in float16, so
  ``round(depth * 255)`` is the reference's byte. No JPEG round trip in either mode (the reference saves its
  maps under the source's ``.jpg`` name, lossy).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import Field

from stages.base import ArraySpec, Backend, MissingWeightsError, Params, Stage, StageInputError


class DepthParams(Params):
    normalise: Literal["clip", "frame"] = Field(
        "clip", description="'clip': one min/max for the whole clip (no flicker); 'frame': per frame "
                            "(reference)")
    horizon: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="ground-prior: horizon row as a fraction of the height from the top (above: far)")
    contact_window: int = Field(
        5, ge=1, description="ground-prior: frames in the median of the contact row (1 = off)")
    edge_sigma_px: float = Field(
        2.0, ge=0.0, le=32.0, description="ground-prior: Gaussian feathering of the object edge (0 = hard)")
    levels: Literal["float16", "uint8"] = Field(
        "float16", description="dpt: 'float16': full precision; 'uint8': the reference's truncated 8-bit map "
                               "(as k/255)")
    batch_size: int = Field(4, ge=1, le=64, description="dpt: frames per forward pass")
    input_size: int | None = Field(
        None, ge=32, le=2048,
        description="dpt: square network input side; None = the model's preprocessor size, else 384 "
                    "(a MiDaS .pt file takes 384 only)")


def _check_frames(frames: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise StageInputError(
            f"depth: frames must be uint8 [frame, y, x, 3], got {frames.dtype} {frames.shape}")
    if len(frames) == 0:
        raise StageInputError("depth: no frames")


def normalise_depth(inv_depth: np.ndarray, how: str) -> np.ndarray:
    """Min-max to [0, 1] over the clip or per frame, as float16; a constant range gives zeros."""
    x = inv_depth.astype(np.float32)
    axes = None if how == "clip" else (1, 2)
    lo, hi = x.min(axis=axes, keepdims=True), x.max(axis=axes, keepdims=True)
    span = hi - lo
    out = np.where(span > 0, (x - lo) / np.where(span > 0, span, 1), 0.0)
    return np.clip(out, 0, 1).astype(np.float16)


def reference_levels(inv_depth: np.ndarray, how: str) -> np.ndarray:
    """The reference runner's 8-bit map, in its float32 operation order (the truncation depends on it)."""
    x = inv_depth.astype(np.float32)
    axes = None if how == "clip" else (1, 2)
    lo = x.min(axis=axes, keepdims=True)
    span = x.max(axis=axes, keepdims=True) - lo
    n = 255 * (x - lo) / np.where(span > 0, span, np.float32(1))
    n *= 3  # the runner scales by 3 and divides the 3-channel image by 3: not an identity in float32
    return (n / 3).astype(np.uint8)


def finish_depth(inv_depth: np.ndarray, how: str, levels: str) -> np.ndarray:
    """Normalised float16 depth; ``levels="uint8"``: the reference's bytes k as k/255 (round(x*255) = k)."""
    if levels == "uint8":
        return (reference_levels(inv_depth, how).astype(np.float32) / 255).astype(np.float16)
    return normalise_depth(inv_depth, how)


# ---- ground-prior -----------------------------------------------------------------------------------

def ground_ramp(height: int, horizon: float) -> np.ndarray:
    """Inverse depth of a flat ground per row: 0 at and above the horizon row, 1 at the bottom row."""
    rows = np.arange(height, dtype=np.float64)
    top = horizon * (height - 1)
    return np.clip((rows - top) / max(height - 1 - top, 1e-9), 0.0, 1.0)


def contact_rows(object_masks: np.ndarray, window: int) -> np.ndarray:
    """Lowest object row per frame (-1 without object), median-filtered over ``window`` frames."""
    has = object_masks.any(axis=2)  # [frame, y]
    raw = np.where(has.any(axis=1), object_masks.shape[1] - 1 - np.argmax(has[:, ::-1], axis=1), -1)
    valid = np.flatnonzero(raw >= 0)
    out = raw.astype(np.float64)
    half = window // 2
    for i, t in enumerate(valid):  # window over the frames that have an object
        out[t] = np.median(raw[valid[max(0, i - half): i + half + 1]])
    return out


def ground_prior(*, model: None, params: DepthParams, frames: np.ndarray,
                 object_masks: np.ndarray) -> dict[str, np.ndarray]:
    _check_frames(frames)
    n, h, w = frames.shape[:3]
    if object_masks.shape != (n, h, w) or object_masks.dtype != bool:
        raise StageInputError(f"depth: object_masks must be bool {(n, h, w)} like the frames, got "
                              f"{object_masks.dtype} {object_masks.shape}")
    ramp = ground_ramp(h, params.horizon)
    depth = np.broadcast_to(ramp[None, :, None], (n, h, w)).astype(np.float32)
    rows = contact_rows(object_masks, params.contact_window)
    for t in range(n):
        if rows[t] < 0:
            continue
        # Interpolate the ramp at a (possibly half-integer, after the median) contact row.
        lifted = np.float32(np.interp(rows[t], np.arange(h), ramp))
        alpha = object_masks[t].astype(np.float32)
        if params.edge_sigma_px > 0:
            alpha = cv2.GaussianBlur(alpha, (0, 0), params.edge_sigma_px, borderType=cv2.BORDER_REPLICATE)
        depth[t] = alpha * lifted + (1 - alpha) * depth[t]
    return {"depth": normalise_depth(depth, params.normalise)}


# ---- dpt (transformers) -----------------------------------------------------------------------------

@dataclass
class DepthNet:
    model: Any
    device: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: int  # square input side, a multiple of ``multiple``
    multiple: int
    metric: bool  # metric depth (near = small): inverted before normalising
    reference_input: bool = False  # MiDaS .pt: the reference's own preprocessing at a fixed 384²


def load_dpt(weights: str | None, device: str) -> DepthNet:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if weights and Path(weights).is_file():
        from stages.nets.midas import SIZE, load_midas_pt

        return DepthNet(load_midas_pt(weights, device), device, (0.5,) * 3, (0.5,) * 3, SIZE, 32, False, True)
    if not weights or not Path(weights).is_dir():
        raise MissingWeightsError(f"depth (dpt): weights {weights!r} not found (a transformers DPT / "
                                  "Depth-Anything folder with config.json, or MiDaS dpt_swin2_large_384.pt)")
    from transformers import AutoModelForDepthEstimation

    model = AutoModelForDepthEstimation.from_pretrained(weights, local_files_only=True)
    model.eval().to(device)
    cfg = model.config
    backbone = getattr(cfg, "backbone_config", None)
    patch = getattr(cfg, "patch_size", None) or getattr(backbone, "patch_size", None) or 16
    mean, std, size = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 384  # MiDaS-DPT preprocessing
    proc = Path(weights) / "preprocessor_config.json"
    if proc.is_file():
        pc = json.loads(proc.read_text())
        mean = tuple(pc.get("image_mean", mean))
        std = tuple(pc.get("image_std", std))
        s = pc.get("size", {})
        size = int(s.get("height", size)) if isinstance(s, dict) else int(s)
    metric = getattr(cfg, "depth_estimation_type", "relative") == "metric"
    return DepthNet(model, device, mean, std, size, int(patch), metric)  # type: ignore[arg-type]


def predict_raw(net: DepthNet, frames: np.ndarray, input_size: int | None = None) -> Any:
    """The network's raw prediction [b, side, side] (a torch tensor) for one batch of uint8 frames."""
    import torch
    import torch.nn.functional as F

    if net.reference_input:
        from stages.nets.midas import reference_input

        if input_size not in (None, net.size):
            raise StageInputError(f"depth (dpt): the MiDaS .pt model takes {net.size}x{net.size} input only, "
                                  f"got input_size={input_size}")
        x = torch.from_numpy(reference_input(frames)).to(net.device)
    else:
        h, w = frames.shape[1:3]
        side = input_size or net.size
        side = max(net.multiple, int(round(side / net.multiple)) * net.multiple)
        mean = torch.tensor(net.mean, device=net.device).view(1, 3, 1, 1)
        std = torch.tensor(net.std, device=net.device).view(1, 3, 1, 1)
        x = torch.from_numpy(frames).to(net.device).permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False,
                          antialias=side < max(h, w)).clamp(0, 1)
        x = (x - mean) / std
    return net.model(pixel_values=x).predicted_depth


def dpt_depth(*, model: DepthNet, params: DepthParams, frames: np.ndarray) -> dict[str, np.ndarray]:
    import torch
    import torch.nn.functional as F

    _check_frames(frames)
    n, h, w = frames.shape[:3]
    out = np.empty((n, h, w), np.float32)
    with torch.inference_mode():
        for i in range(0, n, params.batch_size):
            pred = predict_raw(model, frames[i:i + params.batch_size], params.input_size)
            # Back to the canvas as the reference does: torch bicubic, align_corners=False, float32.
            pred = F.interpolate(pred[:, None].float(), size=(h, w), mode="bicubic",
                                 align_corners=False)[:, 0]
            if model.metric:
                pred = 1.0 / pred.clamp_min(1e-6)
            out[i:i + len(pred)] = pred.cpu().numpy()
    if not np.isfinite(out).all():
        raise StageInputError("depth (dpt): the model produced NaN/inf (bad weights?)")
    return {"depth": finish_depth(out, params.normalise, params.levels)}


STAGE = Stage(
    name="depth",
    version="2",
    inputs=("frames", "object_masks"),
    outputs={"depth": ArraySpec(("frame", "y", "x"), "float16")},
    params=DepthParams,
    backends={
        "ground-prior": Backend("ground-prior", ground_prior,
                                reads=("normalise", "horizon", "contact_window", "edge_sigma_px")),
        "dpt": Backend("dpt", dpt_depth, load=load_dpt, needs_weights=True, gpu=True,
                       reads=("normalise", "levels", "batch_size", "input_size")),
    },
    default_backend="ground-prior",
    doc="Relative inverse depth per frame (near = large), float16 in [0, 1].",
)
