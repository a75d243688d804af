"""Depth refinement (spec section 3.6): replace the stale depth where the old object was and the new shape
is not.

Hole mask (reference semantics): H_t = binarise(dilate(O_t, 5x5 ones, 1 iteration)) * (1 - S_t). Inside H_t
the simulated depth still holds the *old object's* depth; the output is ``(1 - H) * depth + H * prediction``,
so everything outside the holes (including the pasted new shape) passes through unchanged.

Backends:

* ``rfc-net`` (real): StableV2V's shape-guided recurrent depth-completion net with ``50000.ckpt``. Inputs as
  the reference runner builds them: depth grey replicated to 3 channels, H_t, and the edited shape S_0
  repeated over time. The whole clip goes through at once, or, past ``window`` frames, in overlapping
  temporal windows blended linearly in the overlaps. H and W must be multiples of 8. The 3 output channels
  (trained on grey replicated to 3) are averaged.
* ``flow-fill`` (offline default, no weights): the background behind the old object is fetched from other
  frames along the flows. Inside the object the flow describes the object's own motion, so the flows are
  first completed there from the surrounding background (Telea inpainting of each component); then for
  every hole pixel the flows are chained frame by frame backwards and forwards in time, and the nearest
  frame where that point is reliable background (not in its hole, not in its pasted shape) gives the depth
  (both directions at the same distance: averaged). What no frame sees is inpainted (Telea) from the
  surrounding background.

Empty object masks give empty holes and the depth passes through untouched.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from pydantic import Field, model_validator

from stages.base import ArraySpec, Backend, Params, Stage, StageInputError


class RefineParams(Params):
    hole_kernel: int = Field(5, ge=1, le=63, description="square dilation of O_t for the holes (reference 5)")
    window: int = Field(32, ge=2, description="rfc-net: max frames per forward pass (longer clips: windows)")
    window_overlap: int = Field(8, ge=0, description="rfc-net: frames shared by consecutive windows")
    max_hops: int = Field(16, ge=0, description="flow-fill: frames to follow the flows in each direction")
    flow_margin: int = Field(4, ge=0, le=64, description="flow-fill: px around O_t whose flow is redone")
    inpaint_radius: int = Field(5, ge=1, le=64, description="flow-fill: Telea radius for the leftovers")

    @model_validator(mode="after")
    def _overlap_below_window(self) -> RefineParams:
        if self.window_overlap >= self.window:
            raise ValueError(f"window_overlap ({self.window_overlap}) must be smaller than "
                             f"window ({self.window})")
        return self


# ---- shared ---------------------------------------------------------------------------------------------

def _check(simulated_depth: np.ndarray, object_masks: np.ndarray, shape_masks: np.ndarray,
           edited_shape: np.ndarray | None = None, flows: np.ndarray | None = None) -> None:
    d = simulated_depth
    if d.ndim != 3 or d.dtype.kind != "f" or d.shape[0] == 0:
        raise StageInputError(f"refine: simulated_depth must be float [frame, y, x], got {d.dtype} {d.shape}")
    if not np.isfinite(d).all():
        raise StageInputError("refine: simulated_depth contains NaN or infinite values")
    for name, m in (("object_masks", object_masks), ("shape_masks", shape_masks)):
        if m.dtype != bool:
            raise StageInputError(f"refine: {name} must be bool, got {m.dtype}")
        if m.shape != d.shape:
            raise StageInputError(f"refine: {name} is {m.shape} but simulated_depth is {d.shape} "
                                  "(same frames and canvas needed)")
    if edited_shape is not None and (edited_shape.dtype != bool or edited_shape.shape != d.shape[1:]):
        raise StageInputError(f"refine: edited_shape must be bool {d.shape[1:]}, got "
                              f"{edited_shape.dtype} {edited_shape.shape}")
    if flows is not None:
        want = (d.shape[0] - 1, *d.shape[1:], 2)
        if flows.shape != want:
            raise StageInputError(f"refine: flows must be [pair, y, x, 2] = {want} (one per consecutive "
                                  f"frame pair, on the depth canvas), got {flows.shape}")
        if not np.isfinite(flows).all():
            raise StageInputError("refine: flows contain NaN or infinite values")


def hole_masks(object_masks: np.ndarray, shape_masks: np.ndarray, kernel: int = 5) -> np.ndarray:
    """H_t = dilate(O_t, kernel x kernel ones, once) and not S_t (0/255 masks: binarising is exact)."""
    k = np.ones((kernel, kernel), np.uint8)
    dilated = np.stack([cv2.dilate(o.astype(np.uint8), k, iterations=1) for o in object_masks]) > 0
    return dilated & ~shape_masks


def _composite(depth: np.ndarray, holes: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    out = depth.astype(np.float32).copy()
    out[holes] = prediction[holes]
    return out.astype(np.float16)


# ---- rfc-net -----------------------------------------------------------------------------------------------

def _load_rfc(weights: str | None, device: str) -> Any:
    from stages.nets.depthnet import load_depthnet

    return load_depthnet(weights, device)


def _windows(n: int, window: int, overlap: int) -> list[tuple[int, int]]:
    if n <= window:
        return [(0, n)]
    step = window - overlap
    starts = list(range(0, n - window, step)) + [n - window]
    return [(s, s + window) for s in starts]


def rfc_predict(model: Any, depth: np.ndarray, holes: np.ndarray, shape: np.ndarray,
                window: int = 32, overlap: int = 8) -> np.ndarray:
    """Raw net prediction, float32 [frame, y, x] (channel mean), windowed over time when the clip is long."""
    import torch

    t, h, w = depth.shape
    dev = next(model.parameters()).device
    pred = np.zeros((t, h, w), np.float64)
    weight = np.zeros(t, np.float64)
    shape_t = torch.from_numpy(np.ascontiguousarray(shape, dtype=np.float32)).to(dev)
    for start, stop in _windows(t, window, overlap):
        n = stop - start
        d = torch.from_numpy(depth[start:stop].astype(np.float32)).to(dev)
        hm = torch.from_numpy(holes[start:stop].astype(np.float32)).to(dev)
        with torch.no_grad():
            out, _ = model(d[None, :, None].expand(1, n, 3, h, w), hm[None, :, None],
                           shape_t[None, None, None].expand(1, n, 1, h, w))
        # Linear ramps inside the overlaps (weights never reach 0: ends of the clip keep full weight).
        ramp = np.ones(n)
        if start > 0:
            ramp[:overlap] = np.arange(1, overlap + 1) / (overlap + 1)
        if stop < t:
            ramp[n - overlap:] = np.minimum(ramp[n - overlap:], np.arange(overlap, 0, -1) / (overlap + 1))
        pred[start:stop] += ramp[:, None, None] * out[0].mean(1).double().cpu().numpy()
        weight[start:stop] += ramp
    return (pred / weight[:, None, None]).astype(np.float32)


def rfc_net(*, model: Any, params: RefineParams, simulated_depth: np.ndarray, object_masks: np.ndarray,
            shape_masks: np.ndarray, edited_shape: np.ndarray) -> dict[str, np.ndarray]:
    _check(simulated_depth, object_masks, shape_masks, edited_shape)
    h, w = simulated_depth.shape[1:]
    if h % 8 or w % 8:
        raise StageInputError(f"refine (rfc-net): the net needs H and W divisible by 8, got {w}x{h}")
    holes = hole_masks(object_masks, shape_masks, params.hole_kernel)
    if not holes.any():
        return {"hole_masks": holes, "refined_depth": simulated_depth.astype(np.float16)}
    pred = rfc_predict(model, simulated_depth, holes, edited_shape, params.window, params.window_overlap)
    return {"hole_masks": holes, "refined_depth": _composite(simulated_depth, holes, pred)}


# ---- flow-fill ---------------------------------------------------------------------------------------------

def telea(values: np.ndarray, mask: np.ndarray, radius: int) -> np.ndarray:
    """cv2.inpaint (Telea) of a float map where ``mask`` is set.

    OpenCV's float32 Telea is off by about one unit of the value scale, so the known range is mapped
    onto uint16 (error ~1e-5 of the range) and back.
    """
    known = values[mask == 0]
    lo, hi = float(known.min()), float(known.max())
    span = hi - lo if hi > lo else 1.0
    scaled = np.rint((np.clip(values, lo, hi) - lo) / span * 65535).astype(np.uint16)
    filled = cv2.inpaint(scaled, mask.astype(np.uint8), radius, cv2.INPAINT_TELEA)
    return (filled.astype(np.float32) / 65535 * span + lo).astype(np.float32)


def background_flows(flows: np.ndarray, object_masks: np.ndarray, margin: int) -> np.ndarray:
    """Flows with the object's own motion replaced by the surrounding background's (Telea per component).

    Pair t lives on frame t+1's grid, so O_{t+1} (dilated by ``margin``) marks where it is object motion.
    """
    out = flows.astype(np.float32).copy()
    k = np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)
    for t in range(len(flows)):
        region = cv2.dilate(object_masks[t + 1].astype(np.uint8), k)
        if not region.any():
            continue
        if region.all():  # no background to learn from: assume a static background
            out[t] = 0.0
            continue
        for c in range(2):
            out[t, :, :, c] = telea(out[t, :, :, c], region, 5)
    return out


def _sample(image: np.ndarray, x: np.ndarray, y: np.ndarray, border: float = 0.0) -> np.ndarray:
    """Bilinear sample at float positions (pixel centres at integers); outside: ``border``."""
    return cv2.remap(image, x, y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=border)


def _sample_flow(flow: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = cv2.remap(flow, x, y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return f[..., 0], f[..., 1]


def flow_fill_frame(t: int, depth: np.ndarray, holes: np.ndarray, reliable: np.ndarray, bg_flows: np.ndarray,
                    max_hops: int) -> tuple[np.ndarray, np.ndarray]:
    """Depth for frame t's holes from the nearest frame that sees that background; and where it was found.

    Only hole pixels are tracked: their positions are laid out as a [rows, 1024] map for cv2.remap.
    """
    n, h, w = depth.shape
    yy, xx = np.nonzero(holes[t])
    count = len(yy)
    cols = 1024
    rows = -(-count // cols)
    pos = np.zeros((2, rows * cols), np.float32)
    pos[0, :count], pos[1, :count] = xx, yy
    px, py = pos.reshape(2, rows, cols)
    todo = np.zeros(rows * cols, bool)
    todo[:count] = True
    todo = todo.reshape(rows, cols)
    value = np.zeros((rows, cols), np.float32)
    back = (px.copy(), py.copy())  # positions in frame t - k
    fwd = (px.copy(), py.copy())  # positions in frame t + k
    for k in range(1, max_hops + 1):
        if not todo.any() or (t - k < 0 and t + k >= n):
            break
        acc = np.zeros((rows, cols), np.float32)
        cnt = np.zeros((rows, cols), np.float32)
        if t - k >= 0:
            s = t - k  # pair s lives on frame s+1 and points into frame s
            fx, fy = _sample_flow(bg_flows[s], *back)
            back = (back[0] + fx, back[1] + fy)
            ok = todo & (_sample(reliable[s], *back) > 0.999)
            acc[ok] += _sample(depth[s], *back)[ok]
            cnt[ok] += 1
        if t + k < n:
            s = t + k  # invert pair s-1 (frame s -> s-1): q + F(q) = p, solved by fixed-point iteration
            qx, qy = fwd
            for _ in range(4):
                fx, fy = _sample_flow(bg_flows[s - 1], qx, qy)
                qx, qy = fwd[0] - fx, fwd[1] - fy
            fwd = (qx, qy)
            ok = todo & (_sample(reliable[s], *fwd) > 0.999)
            acc[ok] += _sample(depth[s], *fwd)[ok]
            cnt[ok] += 1
        found = cnt > 0
        value[found] = acc[found] / cnt[found]
        todo &= ~found
    out = np.zeros((h, w), np.float32)
    out[yy, xx] = value.reshape(-1)[:count]
    found_mask = np.zeros((h, w), bool)
    found_mask[yy, xx] = ~todo.reshape(-1)[:count]
    return out, found_mask


def flow_fill_predict(depth: np.ndarray, object_masks: np.ndarray, shape_masks: np.ndarray, holes: np.ndarray,
                      flows: np.ndarray, params: RefineParams) -> np.ndarray:
    """Background depth for every hole pixel, float32 [frame, y, x] (only hole pixels are meaningful)."""
    d = depth.astype(np.float32)
    # Reliable background: the simulated depth equals the source depth and is not the old object's.
    reliable = (~(holes | shape_masks)).astype(np.float32)
    bg = background_flows(flows, object_masks, params.flow_margin) if len(flows) else flows
    pred = d.copy()
    for t in np.flatnonzero(holes.any(axis=(1, 2))):
        value, found = flow_fill_frame(int(t), d, holes, reliable, bg, params.max_hops)
        pred[t][found] = value[found]
        left = holes[t] & ~found
        if left.any():
            # Inpaint from background only: the pasted shape is masked too, then only leftovers are taken.
            mask = (left | shape_masks[t]).astype(np.uint8)
            if mask.all():
                pred[t][left] = np.median(d[t])
            else:
                pred[t][left] = telea(pred[t], mask, params.inpaint_radius)[left]
    return pred


def flow_fill(*, model: None, params: RefineParams, simulated_depth: np.ndarray, object_masks: np.ndarray,
              shape_masks: np.ndarray, flows: np.ndarray) -> dict[str, np.ndarray]:
    _check(simulated_depth, object_masks, shape_masks, flows=flows)
    holes = hole_masks(object_masks, shape_masks, params.hole_kernel)
    if not holes.any():
        return {"hole_masks": holes, "refined_depth": simulated_depth.astype(np.float16)}
    pred = flow_fill_predict(simulated_depth, object_masks, shape_masks, holes, flows, params)
    return {"hole_masks": holes, "refined_depth": _composite(simulated_depth, holes, pred)}


STAGE = Stage(
    name="refine",
    version="1",
    inputs=("simulated_depth", "object_masks", "shape_masks", "edited_shape", "flows"),
    outputs={
        "hole_masks": ArraySpec(("frame", "y", "x"), "bool"),
        "refined_depth": ArraySpec(("frame", "y", "x"), "float16"),
    },
    params=RefineParams,
    backends={
        "flow-fill": Backend("flow-fill", flow_fill,
                             uses=("simulated_depth", "object_masks", "shape_masks", "flows"),
                             reads=("hole_kernel", "flow_margin", "max_hops", "inpaint_radius")),
        "rfc-net": Backend("rfc-net", rfc_net,
                           uses=("simulated_depth", "object_masks", "shape_masks", "edited_shape"),
                           reads=("hole_kernel", "window", "window_overlap"),
                           load=_load_rfc, needs_weights=True, gpu=True),
    },
    default_backend="flow-fill",
    doc="Stale old-object depth outside the new shape replaced: by the background seen along the flows "
        "(flow-fill) or by StableV2V's shape-guided recurrent completion net (rfc-net).",
)
