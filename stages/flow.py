"""Optical flow between consecutive frames (spec §3.3).

Convention (as StableV2V's ``RAFT(image1=frame[t+1], image2=frame[t])``): pair t lives on frame t+1's grid
and points into frame t, so ``frame_t(p + F_t(p)) ≈ frame_{t+1}(p)``: exactly what backward-warping frame-t
content (masks) onto frame t+1 needs. Component 0 = x (right), 1 = y (down), in pixels.

Backends: ``dis`` (OpenCV DIS, weight-free default, ~0.1 s per 512² pair), ``deepflow`` (opencv-contrib,
slower, smoother) and ``raft`` (RAFT-things, the reference's network; needs its weights).
"""

from __future__ import annotations

from typing import Any, Literal

import cv2
import numpy as np
from pydantic import Field

from stages.base import ArraySpec, Backend, Params, Stage, StageInputError

DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}


class FlowParams(Params):
    # "medium" warps the bear clip ~10% better than "fast" (photometric error) for ~3x the time, still
    # ~0.1 s per 512² pair: cheap next to everything downstream.
    dis_preset: Literal["ultrafast", "fast", "medium"] = "medium"
    raft_iters: int = Field(20, ge=1, le=64, description="RAFT refinement iterations (reference: 20)")
    raft_normalise: bool = Field(
        True, description="feed RAFT 2*x/255-1 as it was trained; False = 0..255 like the reference's copy")


def _check_frames(frames: np.ndarray) -> np.ndarray:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise StageInputError(f"flow: frames must be uint8 [frame, y, x, 3], got {frames.dtype} "
                              f"{frames.shape}")
    return frames


def _grey(frames: np.ndarray) -> list[np.ndarray]:
    return [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames]


def _pairwise(engine: Any, frames: np.ndarray) -> np.ndarray:
    """``engine.calc(prev, next)`` gives prev(p) ≈ next(p + flow(p)); prev = frame t+1, next = frame t."""
    grey = _grey(frames)
    n, h, w = frames.shape[:3]
    out = np.zeros((max(n - 1, 0), h, w, 2), dtype=np.float32)
    for t in range(n - 1):
        out[t] = engine.calc(grey[t + 1], grey[t], None)
    return out


def dis_engine(preset: str = "medium") -> Any:
    return cv2.DISOpticalFlow_create(DIS_PRESETS[preset])


def dis_flows(*, model: None, params: FlowParams, frames: np.ndarray) -> dict[str, np.ndarray]:
    return {"flows": _pairwise(dis_engine(params.dis_preset), _check_frames(frames))}


def deepflow_flows(*, model: None, params: FlowParams, frames: np.ndarray) -> dict[str, np.ndarray]:
    if not hasattr(cv2, "optflow"):  # another package's plain opencv-python shadows opencv-contrib
        raise RuntimeError("flow (deepflow): this OpenCV has no cv2.optflow; DeepFlow needs "
                           "opencv-contrib-python-headless (reinstall it), or choose the dis or raft backend")
    return {"flows": _pairwise(cv2.optflow.createOptFlow_DeepFlow(), _check_frames(frames))}


def _load_raft(weights: str | None, device: str) -> Any:
    from stages.nets.raft import load_raft_things

    return load_raft_things(weights, device)


def raft_flows(*, model: Any, params: FlowParams, frames: np.ndarray) -> dict[str, np.ndarray]:
    from stages.nets import raft

    frames = _check_frames(frames)
    if frames.shape[0] >= 2 and min(frames.shape[1:3]) < 128:
        raise StageInputError(f"flow (raft): frames must be at least 128x128, got "
                              f"{frames.shape[2]}x{frames.shape[1]}")
    flows = raft.raft_flows(model, frames, iters=params.raft_iters, normalise=params.raft_normalise)
    return {"flows": flows.astype(np.float32, copy=False)}


def warp_backward(image: np.ndarray, flow: np.ndarray, border: int = cv2.BORDER_REPLICATE) -> np.ndarray:
    """Sample ``image`` (frame t) at ``p + flow(p)``: frame-t content on frame t+1's grid (bilinear)."""
    h, w = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    src = image.astype(np.float32) if image.dtype == bool else image
    return cv2.remap(src, gx + flow[..., 0], gy + flow[..., 1], cv2.INTER_LINEAR, borderMode=border)


STAGE = Stage(
    name="flow",
    version="1",
    inputs=("frames",),
    outputs={"flows": ArraySpec(("pair", "y", "x", "component"), "float32")},
    params=FlowParams,
    backends={
        "dis": Backend("dis", dis_flows, reads=("dis_preset",)),
        "deepflow": Backend("deepflow", deepflow_flows, reads=()),
        "raft": Backend("raft", raft_flows, max_canvas=1024, reads=("raft_iters", "raft_normalise"), load=_load_raft,
                        needs_weights=True, gpu=True),
    },
    default_backend="dis",
    doc="Backward optical flow: pair t on frame t+1's grid, pointing into frame t (x, y pixels).",
)
