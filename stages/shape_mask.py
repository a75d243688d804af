"""Edited-shape mask S_0: the new object in the edited first frame (spec §3.1).

Backends:

* ``provided``: the user's mask (external ``provided_shape``, already on the canvas).
* ``isnet`` / ``u2net``: a salient-object model on the edited frame (the reference uses U2-Net).
* ``change`` (weight-free fallback): what changed between the edited frame and source frame 0, together
  with the source object mask, re-fitted to the edited frame's colours with GrabCut.

A removal edit (the object painted out, nothing new) must give an EMPTY mask. Saliency models always find
*something* (U2-Net's per-image min-max guarantees a region), so their output is vetted
(:func:`drop_spurious`): nothing is kept when the model's raw peak confidence is low, and a salient
component that lies mostly on background the edit did not touch (unchanged and outside the source
object) is dropped.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from pydantic import Field

from stages.base import ArraySpec, Backend, Params, Stage, StageInputError


class ShapeMaskParams(Params):
    threshold: float = Field(0.5, gt=0, lt=1, description="saliency: foreground if probability > this")
    min_peak: float = Field(0.5, ge=0, le=1, description="saliency: raw peak below this = nothing salient")
    max_untouched: float = Field(
        0.5, gt=0, le=1, description="drop a salient component if more than this share of it is untouched "
        "background (unchanged by the edit and outside the source object)")
    change_blur: float = Field(3.0, gt=0, description="Gaussian sigma (px) before differencing")
    change_factor: float = Field(4.0, gt=0, description="changed if Lab difference > factor x median")
    change_floor: float = Field(10.0, ge=0, description="... and > this (Lab units)")
    change_band: int = Field(10, ge=1, description="change: px around the edit region GrabCut may claim")
    grabcut_iters: int = Field(5, ge=1, le=20)


# ---- checks -----------------------------------------------------------------------------------------

def _check(edited_frame: np.ndarray, frames: np.ndarray | None = None,
           object_masks: np.ndarray | None = None) -> None:
    if edited_frame.ndim != 3 or edited_frame.shape[-1] != 3 or edited_frame.dtype != np.uint8:
        raise StageInputError(f"shape_mask: edited frame must be uint8 [y, x, 3], got {edited_frame.dtype} "
                              f"{edited_frame.shape}")
    size = edited_frame.shape[:2]
    if frames is not None and frames.shape[1:3] != size:
        raise StageInputError(f"shape_mask: edited frame is {size[1]}x{size[0]}, source frames are "
                              f"{frames.shape[2]}x{frames.shape[1]} (put the edited frame on the canvas)")
    if object_masks is not None and object_masks.shape[1:3] != size:
        raise StageInputError(f"shape_mask: object masks are "
                              f"{object_masks.shape[2]}x{object_masks.shape[1]}, "
                              f"the edited frame is {size[1]}x{size[0]}")


def _disk(r: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


# ---- what the edit changed --------------------------------------------------------------------------

def change_map(edited: np.ndarray, frame0: np.ndarray, params: ShapeMaskParams) -> np.ndarray:
    """Pixels the edit changed: blurred Lab difference above ``factor`` x its median and ``floor``.

    Diffusion editors re-render the whole frame slightly; relative to the median (most pixels are
    background), that noise stays below the threshold while painted-in content does not.
    """
    def lab(x: np.ndarray) -> np.ndarray:
        img = cv2.cvtColor(np.ascontiguousarray(x), cv2.COLOR_RGB2LAB).astype(np.float32)
        return cv2.GaussianBlur(img, (0, 0), params.change_blur)

    diff = np.linalg.norm(lab(edited) - lab(frame0), axis=-1)
    return diff > max(params.change_factor * float(np.median(diff)), params.change_floor)


def drop_spurious(salient: np.ndarray, peak: float, changed: np.ndarray, object_mask: np.ndarray,
                  params: ShapeMaskParams) -> np.ndarray:
    """Vet a saliency mask against the edit: see the module docstring. Returns a new bool mask."""
    if peak < params.min_peak or not salient.any():
        return np.zeros_like(salient, dtype=bool)
    # Source-object pixels count as touched: an edit may keep the object (or parts of it) as it was.
    untouched = ~changed & ~(cv2.dilate(object_mask.astype(np.uint8), _disk(3)) > 0)
    count, labels = cv2.connectedComponents(salient.astype(np.uint8), connectivity=8)
    keep = np.zeros(count, dtype=bool)
    for c in range(1, count):
        comp = labels == c
        keep[c] = untouched[comp].mean() <= params.max_untouched
    return keep[labels]


# ---- backends ---------------------------------------------------------------------------------------

def provided(*, model: None, params: ShapeMaskParams, edited_frame: np.ndarray,
             provided_shape: np.ndarray) -> dict[str, np.ndarray]:
    _check(edited_frame)
    if provided_shape.shape != edited_frame.shape[:2]:
        raise StageInputError(f"shape_mask (provided): the mask is {provided_shape.shape[::-1]} (x, y), the "
                              f"edited frame is {edited_frame.shape[1::-1]}")
    return {"edited_shape": provided_shape.astype(bool, copy=True)}


def change(*, model: None, params: ShapeMaskParams, edited_frame: np.ndarray, frames: np.ndarray,
           object_masks: np.ndarray) -> dict[str, np.ndarray]:
    """Edit region = changed pixels ∪ source object; GrabCut on the edited frame sorts it out.

    Untouched background far from the edit region is sure background; the region is probable foreground
    and a band around it probable background. GrabCut then learns the new object's colours from the
    region and the scene's from the rest: repainted background (a removal's fill, the scenery a diffusion
    editor redraws around the object) matches the scene and drops out.
    """
    _check(edited_frame, frames, object_masks)
    mask0 = object_masks[0].astype(bool)
    region = change_map(edited_frame, frames[0], params)
    region |= mask0
    if not region.any():
        return {"edited_shape": np.zeros(mask0.shape, dtype=bool)}
    trimap = np.full(mask0.shape, cv2.GC_BGD, dtype=np.uint8)
    trimap[cv2.dilate(region.astype(np.uint8), _disk(params.change_band)) > 0] = cv2.GC_PR_BGD
    trimap[region] = cv2.GC_PR_FGD
    if (trimap == cv2.GC_BGD).sum() < 64:  # the edit covers the frame: nothing to contrast it with
        return {"edited_shape": region}
    bgd, fgd = np.zeros((1, 65)), np.zeros((1, 65))
    cv2.setRNGSeed(0)  # GrabCut's GMM initialisation (k-means) is seeded: deterministic output
    cv2.grabCut(cv2.cvtColor(edited_frame, cv2.COLOR_RGB2BGR), trimap, None, bgd, fgd,
                params.grabcut_iters, cv2.GC_INIT_WITH_MASK)
    return {"edited_shape": (trimap == cv2.GC_FGD) | (trimap == cv2.GC_PR_FGD)}


def _vetted(prob: np.ndarray, peak: float, params: ShapeMaskParams, edited_frame: np.ndarray,
            frames: np.ndarray, object_masks: np.ndarray) -> dict[str, np.ndarray]:
    changed = change_map(edited_frame, frames[0], params)
    shape = drop_spurious(prob > params.threshold, peak, changed, object_masks[0].astype(bool), params)
    return {"edited_shape": shape}


def _load_isnet(weights: str | None, device: str) -> Any:
    from stages.nets.isnet import load_isnet

    return load_isnet(weights, device)


def isnet(*, model: Any, params: ShapeMaskParams, edited_frame: np.ndarray, frames: np.ndarray,
          object_masks: np.ndarray) -> dict[str, np.ndarray]:
    from stages.nets.isnet import isnet_probability

    _check(edited_frame, frames, object_masks)
    prob = isnet_probability(model, edited_frame)
    return _vetted(prob, float(prob.max()), params, edited_frame, frames, object_masks)


def _load_u2net(weights: str | None, device: str) -> Any:
    from stages.nets.u2net import load_u2net

    return load_u2net(weights, device)


def u2net_d1(model: Any, image: np.ndarray) -> np.ndarray:
    """U2-Net's d1 side output (sigmoid) for one uint8 RGB image, the reference's input (/255, native size).

    Kept raw: its peak says whether anything is salient at all, which the reference's per-image min-max
    (applied next) hides.
    """
    import torch

    with torch.no_grad():
        dev = next(model.parameters()).device
        x = torch.from_numpy(np.ascontiguousarray(image)).to(dev).permute(2, 0, 1)[None].float() / 255.0
        return model(x)[1][0, 0].float().cpu().numpy()


def u2net(*, model: Any, params: ShapeMaskParams, edited_frame: np.ndarray, frames: np.ndarray,
          object_masks: np.ndarray) -> dict[str, np.ndarray]:
    _check(edited_frame, frames, object_masks)
    d1 = u2net_d1(model, edited_frame)
    lo, hi = float(d1.min()), float(d1.max())
    prob = (d1 - lo) / max(hi - lo, 1e-12)  # the reference's min-max
    return _vetted(prob, hi, params, edited_frame, frames, object_masks)


_SALIENCY_USES = ("edited_frame", "frames", "object_masks")

# What each backend reads: the change map's fields, then GrabCut's (change) or the saliency vetting's.
_CHANGE_MAP_READS = ("change_blur", "change_factor", "change_floor")
_CHANGE_READS = (*_CHANGE_MAP_READS, "change_band", "grabcut_iters")
_VETTED_READS = (*_CHANGE_MAP_READS, "threshold", "min_peak", "max_untouched")

STAGE = Stage(
    name="shape_mask",
    version="1",
    inputs=("edited_frame", "frames", "object_masks", "provided_shape"),
    outputs={"edited_shape": ArraySpec(("y", "x"), "bool")},
    params=ShapeMaskParams,
    backends={
        "change": Backend("change", change, uses=_SALIENCY_USES, reads=_CHANGE_READS),
        "provided": Backend("provided", provided, uses=("edited_frame", "provided_shape"), reads=()),
        "isnet": Backend("isnet", isnet, uses=_SALIENCY_USES, reads=_VETTED_READS, load=_load_isnet,
                         needs_weights=True),
        "u2net": Backend("u2net", u2net, uses=_SALIENCY_USES, reads=_VETTED_READS, load=_load_u2net,
                         needs_weights=True, gpu=True),
    },
    default_backend="change",
    doc="The new object's mask in the edited first frame (empty for a removal).",
)
