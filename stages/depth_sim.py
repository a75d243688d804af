"""Depth simulation (spec §3.5): give the new shape S_t a depth taken from the old object O_t.

* ``mode="plane"`` (default, reference semantics): inside S_t the depth becomes a_t, the mean depth of
  the source object O_t in frame t; elsewhere the source depth is kept. The new object is a flat plane
  at the old object's mean depth (the refinement stage later fills where the old object was).
* ``mode="relief"``: the plane plus the source object's own relief (depth - a_t over O_t). The relief
  is cut out of O_t's bounding box and stretched onto S_t's bounding box (an anisotropic resize, i.e.
  "same relative position in the box"); it is averaged over object pixels only (normalised resampling),
  so background never leaks in, and S_t pixels that land on no object pixel get the plane. Relief values
  are not rescaled; the result is clipped to [0, 1].

An empty O_t has no mean depth: the object depth of the nearest frame (in time) with a non-empty mask is
used, and if no frame has one, the frame's median depth. Never NaN.

Frame t pairs depth t, O_t and S_t (the reference pairs them off by one when its frame-0 files are
missing, §3.4 [BUG]; that is not reproduced).
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from pydantic import Field

from stages.base import ArraySpec, Backend, Params, Stage, StageInputError


class DepthSimParams(Params):
    mode: Literal["plane", "relief"] = Field(
        "plane", description="'plane': new object at the old object's mean depth (reference); 'relief': "
                             "plus the old object's relief stretched onto the new shape's box")


def _check(depth: np.ndarray, object_masks: np.ndarray, shape_masks: np.ndarray) -> None:
    if depth.ndim != 3 or depth.dtype.kind != "f":
        raise StageInputError(
            f"depth_sim: depth must be float [frame, y, x], got {depth.dtype} {depth.shape}")
    for name, m in (("object_masks", object_masks), ("shape_masks", shape_masks)):
        if m.dtype != bool:
            raise StageInputError(f"depth_sim: {name} must be bool, got {m.dtype}")
        if m.shape != depth.shape:
            raise StageInputError(f"depth_sim: {name} is {m.shape} but depth is {depth.shape} "
                                  "(same frames and canvas needed)")
    if not np.isfinite(depth).all():
        raise StageInputError("depth_sim: depth contains NaN or infinite values")


def object_depths(depth: np.ndarray, object_masks: np.ndarray) -> np.ndarray:
    """a_t = mean depth over O_t (float64); empty O_t: nearest frame's value, else the frame median."""
    areas = object_masks.sum(axis=(1, 2))
    sums = (depth.astype(np.float64) * object_masks).sum(axis=(1, 2))
    valid = np.flatnonzero(areas)
    if valid.size == 0:
        return np.median(depth.reshape(len(depth), -1).astype(np.float64), axis=1)
    means = np.zeros(len(depth))
    means[valid] = sums[valid] / areas[valid]
    for t in np.flatnonzero(areas == 0):
        means[t] = means[valid[np.argmin(np.abs(valid - t))]]  # ties: the earlier frame
    return means


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def relief_on_shape(depth: np.ndarray, obj: np.ndarray, shape: np.ndarray, mean: float) -> np.ndarray:
    """The source object's relief (depth - mean over ``obj``) mapped box-to-box onto ``shape``'s box."""
    out = np.zeros(depth.shape, np.float32)
    if not obj.any() or not shape.any():
        return out
    oy0, oy1, ox0, ox1 = _bbox(obj)
    sy0, sy1, sx0, sx1 = _bbox(shape)
    weight = obj[oy0:oy1, ox0:ox1].astype(np.float32)
    relief = (depth[oy0:oy1, ox0:ox1].astype(np.float32) - np.float32(mean)) * weight
    size = (sx1 - sx0, sy1 - sy0)
    interp = cv2.INTER_AREA if size[0] * size[1] < weight.size else cv2.INTER_LINEAR
    r = cv2.resize(relief, size, interpolation=interp).reshape(size[1], size[0])
    w = cv2.resize(weight, size, interpolation=interp).reshape(size[1], size[0])
    # Normalised resampling: average of object pixels only; no object underneath -> 0 (the plane).
    out[sy0:sy1, sx0:sx1] = np.where(w > 0.05, r / np.maximum(w, 1e-6), 0.0)
    return out


def simulate_depth(depth: np.ndarray, object_masks: np.ndarray, shape_masks: np.ndarray,
                   params: DepthSimParams | None = None) -> np.ndarray:
    """D'_t as float32 (the stage stores float16). Plane mode is exactly the reference's D'_t."""
    params = params or DepthSimParams()
    _check(depth, object_masks, shape_masks)
    d = depth.astype(np.float32)
    means = object_depths(d, object_masks).astype(np.float32)
    out = d.copy()
    for t in range(len(d)):
        s = shape_masks[t]
        if not s.any():
            continue
        if params.mode == "plane":
            out[t][s] = means[t]
        else:
            rel = relief_on_shape(d[t], object_masks[t], s, float(means[t]))
            out[t][s] = np.clip(means[t] + rel[s], 0.0, 1.0)
    return out


def depth_sim_stage(*, model: None, params: DepthSimParams, depth: np.ndarray, object_masks: np.ndarray,
                    shape_masks: np.ndarray) -> dict[str, np.ndarray]:
    return {"simulated_depth": simulate_depth(depth, object_masks, shape_masks, params).astype(np.float16)}


STAGE = Stage(
    name="depth_sim",
    version="1",
    inputs=("depth", "object_masks", "shape_masks"),
    outputs={"simulated_depth": ArraySpec(("frame", "y", "x"), "float16")},
    params=DepthSimParams,
    backends={"paste": Backend("paste", depth_sim_stage, reads=("mode",))},
    default_backend="paste",
    doc="Depth with the new shape pasted in at the old object's depth (flat plane or with its relief).",
)
