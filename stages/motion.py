"""Motion simulation (ISA "iterative warping" / motion pasting, spec §3.4).

The edited first-frame shape S_0 is carried through the clip with the source object's *mean* motion:
for every flow pair t, the flow inside the paste region P_t is replaced by the mean flow of the source
object (``simulated_flows`` F'_t), and S_t, P_t are backward-warped with it.

Defaults fix the reference's quirks; each fix has a switch (``MotionParams.reference(kernel)`` turns all
of them back), so ``isa.npz`` is reproduced exactly:

* paste region P_0 -- default: Euclidean closing of S_0 by ``paste_closing_px``, then a signed net growth
  ``paste_margin_px`` (+15 = the authors' original intent); reference: ``reference_kernel=(K, it_d)``,
  dilate K×K ``it_d`` times then erode K×K 6 times (OpenCV border rules).
* ``shrink_only`` -- default False (masks move freely); reference True (intersect with the previous mask).
* ``grid`` -- default "correct": W(X)(p) = X(p + F(p)); "reference": the (W-1)-normalised grid fed to
  ``grid_sample(align_corners=False)`` (zero flow is not the identity; content drifts to the centre).
* ``pairing`` -- F_t lives on frame t+1's grid. Default "grid": m_t = mean of F_t over O_{t+1}, pasted over
  P_t and over P_t moved by m_t (where the shape lands); "reference": mean over O_t, pasted over P_t only,
  so the paste margin is eaten at |m_t| px per frame on the leading side.
* ``estimate`` -- default "register": m_t is the mean flow unless that leaves O_t clearly misaligned with
  O_{t+1} while a shift lines them up; then the source mask registered onto O_{t+1} (signed distances,
  against frame 0's mask). Optical flow collapses inside objects without texture (a flat disc moving 10 px
  per frame over texture: DIS averages ~2 px inside it) while the masks still move the whole way; a
  deforming animal keeps its flow. "flow-mean" (reference): the mean flow only.
* ``accumulate`` -- default "compose": S_t and P_t are S_0 and P_0 moved by the summed mean motion,
  resampled once per frame (motion pasting moves the whole new shape with the mean motion); "iterate"
  (reference): warp the previous binary masks with F'_t and re-threshold every step. Iterating drifts by
  up to half a pixel per step (on a 2.5 px/frame translation: 2.3 px after 15 frames), and outside the
  pasted region it lets the source flow drag mask pixels along: behind a fast object the flow of the
  uncovered background is unreliable, and each step left a sliver of the paste region behind.

Pure numpy/OpenCV; the bilinear warp is written out (cv2.remap quantises weights to 1/32 px, which would
break exact parity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from pydantic import Field, field_validator

from stages.base import ArraySpec, Backend, Params, Stage, StageInputError

REFERENCE_ERODE_ITERATIONS = 6  # hard-coded in the reference runner


class MotionParams(Params):
    paste_margin_px: int = Field(
        15, ge=-256, le=256,
        description="net growth of the paste region P_0 over the new shape S_0 (px, signed); +15 = the "
                    "authors' original constants, so the whole new shape moves with the mean motion")
    paste_closing_px: int = Field(
        30, ge=0, le=256,
        description="closing radius applied before the margin: gaps narrower than ~2x this between parts "
                    "of the shape are pasted too (30 = the authors' original 6 erosions of an 11x11 kernel)")
    shrink_only: bool = Field(False, description="reference: intersect S_t, P_t with the previous mask")
    grid: Literal["correct", "reference"] = Field(
        "correct", description="'reference' reproduces the (W-1) grid / align_corners=False mismatch")
    pairing: Literal["grid", "reference"] = Field(
        "grid", description="F_t lives on frame t+1's grid: 'grid' averages it over O_{t+1} and pastes the "
                            "mean over P_t plus P_t moved by it; 'reference' uses O_t and P_t as they are")
    estimate: Literal["register", "flow-mean"] = Field(
        "register", description="m_t: 'register' = the mean flow, or the source masks registered where the "
                                "flow leaves them misaligned (it collapses inside objects without texture); "
                                "'flow-mean' (reference) = the mean flow only")
    accumulate: Literal["compose", "iterate"] = Field(
        "compose", description="'compose': chain the flows and resample S_0/P_0 once per frame; 'iterate' "
                               "(reference): resample and re-threshold the previous mask every step")
    reference_kernel: tuple[int, int] | None = Field(
        None, description="(K, dilation iterations): the reference CLI's --kernel-size/--dilation-iteration;"
                          " overrides paste_margin_px/paste_closing_px with its exact square morphology")

    @field_validator("reference_kernel")
    @classmethod
    def _kernel_ok(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and (v[0] < 1 or v[1] < 0):
            raise ValueError(f"reference_kernel needs K >= 1 and iterations >= 0, got {v}")
        return v

    @classmethod
    def reference(cls, kernel: tuple[int, int] = (9, 1)) -> MotionParams:
        """Every switch at the reference's behaviour; ``kernel`` = (--kernel-size, --dilation-iteration)."""
        return cls(shrink_only=True, grid="reference", pairing="reference", accumulate="iterate",
                   estimate="flow-mean", reference_kernel=kernel)


@dataclass
class MotionResult:
    shape_masks: np.ndarray  # [frame, y, x] bool, S_0..S_{N-1}
    paste_masks: np.ndarray  # [frame, y, x] bool, P_0..P_{N-1}
    simulated_flows: np.ndarray  # [pair, y, x, component] float32, F'_t
    mean_flows: np.ndarray  # [pair, component] float32, m_t (zero where the source mask is empty)
    warped_paste_raw: np.ndarray  # [pair, y, x] float32, pre-threshold P_{t+1} (x P_t if shrink_only)
    warped_shape_raw: np.ndarray  # [pair, y, x] float32, pre-threshold S_{t+1} (W(S_t; F'_t) if iterate)


# ---- building blocks --------------------------------------------------------------------------------

def paste_region(shape: np.ndarray, params: MotionParams) -> np.ndarray:
    """P_0 from S_0: closing plus a signed margin (Euclidean), or the reference's square morphology."""
    if not shape.any():
        return np.zeros_like(shape, dtype=bool)
    if params.reference_kernel is not None:
        k, it_d = params.reference_kernel
        kernel = np.ones((k, k), np.uint8)
        # OpenCV defaults: centre anchor, outside pixels ignored (an edge-touching region is not eroded
        # from the edge); n iterations of a K×K square = one square of side n(K-1)+1.
        grown = cv2.dilate(shape.astype(np.uint8), kernel, iterations=it_d)
        return cv2.erode(grown, kernel, iterations=REFERENCE_ERODE_ITERATIONS) > 0
    grow = params.paste_closing_px + max(params.paste_margin_px, 0)
    shrink = params.paste_closing_px + max(-params.paste_margin_px, 0)
    # Exact Euclidean disks via distance transforms: cost independent of the radius.
    grown = shape if grow == 0 else _dist(~shape) <= grow
    if shrink == 0:
        return grown.copy()
    if grown.all():
        return grown.copy()
    # Same border rule as OpenCV's erode: the image edge does not erode.
    return _dist(grown) > shrink


def _dist(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of each True pixel to the nearest False pixel (0 on False pixels)."""
    return cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def mean_flow(flow: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of ``flow`` [y, x, 2] over ``mask``; zero motion (not NaN) for an empty mask."""
    area = int(mask.sum())
    if area == 0:
        return np.zeros(2, np.float32)
    return (flow[mask].astype(np.float64).sum(axis=0) / area).astype(np.float32)


# The mean flow is kept while the RMS misalignment of O_t moved by it onto O_{t+1} stays within this factor
# (plus px) of the best shift's: a rigid object's rasterised masks line up to ~0.3 px, so a flow off by half a
# pixel a step is overruled; a deforming animal's line up to ~1.5 px with any shift, and its flow, 0.1-0.25 px
# worse, follows the body where the best shift does not (the bear: 1 px a step apart).
FLOW_TRUST_RATIO, FLOW_TRUST_PX = 1.25, 0.05
ANCHOR_AGREE_PX = 1.0  # the frame-0 registration replaces the chained steps only within this of them
SDF_CLIP_PX = 6.0  # the masks' signed distances are compared within this band around their boundaries


def _clipped_sdf(mask: np.ndarray, clip: float) -> tuple[np.ndarray, int, int]:
    """Signed distance to the boundary (inside > 0), clipped to ±clip, float64, on the mask's bounding box
    grown by the clip (beyond it the value is -clip anyway); returns it and the box's top-left (x, y)."""
    ys, xs = np.nonzero(mask)
    pad = int(np.ceil(clip)) + 2
    y0, x0 = max(int(ys.min()) - pad, 0), max(int(xs.min()) - pad, 0)
    crop = mask[y0:int(ys.max()) + pad + 1, x0:int(xs.max()) + pad + 1]
    sdf = _dist(crop).astype(np.float64) - _dist(~crop).astype(np.float64)
    return np.clip(sdf, -clip, clip), x0, y0


def centroid_shift(prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """Backward shift between the masks' centroids (both non-empty)."""
    py, px = np.nonzero(prev)
    ny, nx = np.nonzero(nxt)
    return np.array([px.mean() - nx.mean(), py.mean() - ny.mean()])


def register_masks(prev: np.ndarray, nxt: np.ndarray, starts: list[np.ndarray], iterations: int = 8
                   ) -> tuple[np.ndarray, float, list[float]]:
    """The backward shift m that lines ``prev`` up with ``nxt`` best: ``prev(p + m) ~ nxt(p)``.

    Cost: the variance, over the band around ``nxt``'s boundary, of the difference of the two masks'
    signed distances with ``prev``'s shifted by m (a variance, not a mean square: an object that grew or
    shrank differs by about a constant there, and it is matched all around, i.e. at its centre). Of the
    ``starts`` the cheapest is refined by Gauss-Newton (Lucas-Kanade on the signed distances), each step
    kept only if it lowers the cost. Sub-pixel on a translated mask whatever its texture. Both masks
    non-empty. Returns the shift, its cost and the starts' costs (px², the squared RMS misfit).
    """
    # The band must be wider than the change of size, or a grown object's boundaries never meet its old ones.
    clip = SDF_CLIP_PX + 2 * abs(np.sqrt(prev.sum() / np.pi) - np.sqrt(nxt.sum() / np.pi))
    (dp, px0, py0), (dn, nx0, ny0) = _clipped_sdf(prev, clip), _clipped_sdf(nxt, clip)
    h, w = dp.shape
    gy, gx = np.gradient(dp)
    stack = np.stack([dp, gx, gy])
    band_y, band_x = np.nonzero(np.abs(dn) < clip)  # fixed pixels: the costs of all shifts compare
    target = dn[band_y, band_x]
    # Positions in prev's box of the band's pixels (shifted by m below).
    gridx, gridy = (band_x + nx0 - px0).astype(np.float64), (band_y + ny0 - py0).astype(np.float64)

    def residual(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        # Bilinear; beyond the box its edge's values (-clip, or the image edge's: zero padding there would
        # be a false boundary).
        x, y = np.clip(gridx + m[0], 0, w - 1), np.clip(gridy + m[1], 0, h - 1)
        x0, y0 = np.minimum(x.astype(np.intp), w - 2), np.minimum(y.astype(np.intp), h - 2)
        fx, fy = x - x0, y - y0
        s = (stack[:, y0, x0] * ((1 - fx) * (1 - fy)) + stack[:, y0, x0 + 1] * (fx * (1 - fy))
             + stack[:, y0 + 1, x0] * ((1 - fx) * fy) + stack[:, y0 + 1, x0 + 1] * (fx * fy))
        r = s[0] - target
        r = r - r.mean()  # the free constant offset
        return r, s[1] - s[1].mean(), s[2] - s[2].mean(), float((r**2).mean())

    starts = [np.asarray(m, np.float64) for m in starts]
    costs = [residual(m)[3] for m in starts]
    start_costs = list(costs)
    m = starts[int(np.argmin(costs))].copy()
    best, best_cost = m.copy(), min(costs)
    for _ in range(iterations):
        r, jx, jy, _ = residual(m)
        a = np.array([[jx @ jx, jx @ jy], [jx @ jy, jy @ jy]])
        if abs(np.linalg.det(a)) < 1e-9:
            break
        step = -np.linalg.solve(a, np.array([jx @ r, jy @ r]))
        m = m + np.clip(step, -2.0, 2.0)  # the band is a few px wide: no wild jumps
        cost = residual(m)[3]
        if cost < best_cost:
            best, best_cost = m.copy(), cost
        if np.abs(step).max() < 1e-3:
            break
    return best, best_cost, start_costs


def _registered_step(masks: np.ndarray, t: int, flow_mean: np.ndarray, shift0: np.ndarray) -> np.ndarray:
    """m_t for ``estimate="register"`` (masks t and t+1 non-empty, ``shift0``: the motion summed so far).

    The mean flow, unless it leaves O_t clearly worse aligned with O_{t+1} than the best shift does (see
    ``FLOW_TRUST_RATIO``): flow collapses inside objects without texture, while a deforming animal's mask
    lines up hardly better with any one shift than with its flow, and its flow follows the body. When the
    flow is overruled: the best shift, or, within ``ANCHOR_AGREE_PX`` of the steps chained so far, the
    shift registered against frame 0's mask (the one S_0 is placed by: no error adds up over the clip).
    """
    starts = [flow_mean, centroid_shift(masks[t], masks[t + 1])]
    local, cost, (flow_cost, _) = register_masks(masks[t], masks[t + 1], starts)
    if np.sqrt(flow_cost) <= FLOW_TRUST_RATIO * np.sqrt(cost) + FLOW_TRUST_PX:
        return flow_mean
    chained = shift0 + local
    if masks[0].any():
        total, _, _ = register_masks(masks[0], masks[t + 1], [chained, centroid_shift(masks[0], masks[t + 1])])
        if np.abs(total - chained).max() <= ANCHOR_AGREE_PX:
            chained = total
    return (chained - shift0).astype(np.float32)


def sample_bilinear(images: np.ndarray, ix: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """Bilinear sample of a stack ``images`` [c, y, x] at pixel positions (ix, iy) (centres at integers);
    out-of-image corners contribute 0 (grid_sample ``padding_mode="zeros"``)."""
    _, h, w = images.shape
    x0f, y0f = np.floor(ix), np.floor(iy)
    fx, fy = ix - x0f, iy - y0f
    # Clip corner indices into [-1, size] and read from a zero-padded copy: out-of-image corners give 0.
    x0 = np.clip(x0f, -1, w).astype(np.intp) + 1
    y0 = np.clip(y0f, -1, h).astype(np.intp) + 1
    x1 = np.clip(x0f + 1, -1, w).astype(np.intp) + 1
    y1 = np.clip(y0f + 1, -1, h).astype(np.intp) + 1
    padded = np.pad(images.astype(np.float64, copy=False), ((0, 0), (1, 1), (1, 1)))
    return (padded[:, y0, x0] * ((1 - fx) * (1 - fy)) + padded[:, y0, x1] * (fx * (1 - fy))
            + padded[:, y1, x0] * ((1 - fx) * fy) + padded[:, y1, x1] * (fx * fy))


def sample_positions(flow: np.ndarray, grid: str = "correct") -> tuple[np.ndarray, np.ndarray]:
    """Where W(X; F) samples X, in pixel coordinates: p + F(p), or the reference's distorted version.

    ``grid="reference"`` gives ``(p + F)·W/(W-1) - 0.5`` per axis: what ``grid_sample(align_corners=False)``
    does on the reference's (W-1)-normalised grid (a zero flow is then not the identity).
    """
    h, w = flow.shape[:2]
    ix = np.arange(w, dtype=np.float64)[None, :] + flow[..., 0].astype(np.float64)
    iy = np.arange(h, dtype=np.float64)[:, None] + flow[..., 1].astype(np.float64)
    if grid == "reference":
        ix = ix * (w / (w - 1)) - 0.5 if w > 1 else ix
        iy = iy * (h / (h - 1)) - 0.5 if h > 1 else iy
    return ix, iy


def backward_warp(images: np.ndarray, flow: np.ndarray, grid: str = "correct") -> np.ndarray:
    """W(X; F)(p) = X(p + F(p)), bilinear, zero outside the image, for a stack ``images`` [c, y, x]."""
    return sample_bilinear(images, *sample_positions(flow, grid))


def _check_inputs(object_masks: np.ndarray, flows: np.ndarray, edited_shape: np.ndarray) -> None:
    if object_masks.ndim != 3:
        raise StageInputError(f"motion: object_masks must be [frame, y, x], got shape {object_masks.shape}")
    n, h, w = object_masks.shape
    if n < 1:
        raise StageInputError("motion: object_masks has no frames")
    if flows.ndim != 4 or flows.shape[-1] != 2:
        raise StageInputError(f"motion: flows must be [pair, y, x, 2], got shape {flows.shape}")
    if flows.shape[0] != n - 1:
        raise StageInputError(f"motion: {n} object masks need {n - 1} flow pairs, got {flows.shape[0]}")
    if flows.shape[1:3] != (h, w):
        raise StageInputError(f"motion: flows are {flows.shape[2]}x{flows.shape[1]}, masks are {w}x{h}")
    if edited_shape.shape != (h, w):
        raise StageInputError(f"motion: edited_shape is {edited_shape.shape}, masks are {(h, w)} "
                              "(it must be on the flow/mask canvas)")
    if not np.isfinite(flows).all():
        raise StageInputError("motion: flows contain NaN or infinite values")


def _as_bool(name: str, a: np.ndarray) -> np.ndarray:
    if a.dtype == bool:
        return a
    if a.dtype.kind in "uif":  # tolerate 0/1 numeric masks; binarise like the reference (> 0.5)
        return a > 0.5
    raise StageInputError(f"motion: {name} must be a boolean mask, got dtype {a.dtype}")


# ---- the simulation ---------------------------------------------------------------------------------

def simulate_motion(object_masks: np.ndarray, flows: np.ndarray, edited_shape: np.ndarray,
                    params: MotionParams | None = None) -> MotionResult:
    """Run the motion-pasting loop; returns the masks, the pasted flows and the intermediates."""
    params = params or MotionParams()
    object_masks = _as_bool("object_masks", np.asarray(object_masks))
    edited_shape = _as_bool("edited_shape", np.asarray(edited_shape))
    flows = np.asarray(flows)
    _check_inputs(object_masks, flows, edited_shape)
    n, h, w = object_masks.shape
    shapes = np.zeros((n, h, w), bool)
    pastes = np.zeros((n, h, w), bool)
    sim_flows = flows.astype(np.float32, copy=True)
    means = np.zeros((n - 1, 2), np.float32)
    raw_p = np.zeros((n - 1, h, w), np.float32)
    raw_s = np.zeros((n - 1, h, w), np.float32)
    shapes[0] = edited_shape
    pastes[0] = paste_region(edited_shape, params)
    first = np.stack([pastes[0], shapes[0]]).astype(np.float64)
    total = np.zeros(2, np.float64)  # "compose": summed mean motion, from frame t+1's grid back to frame 0
    shift0 = np.zeros(2, np.float64)  # the same, kept for "register" whatever the accumulation
    for t in range(n - 1):
        means[t] = mean_flow(flows[t], object_masks[t if params.pairing == "reference" else t + 1])
        if params.estimate == "register" and object_masks[t].any() and object_masks[t + 1].any():
            means[t] = _registered_step(object_masks, t, means[t], shift0)
        shift0 += means[t]
        if params.pairing == "reference":
            footprint = pastes[t]
        else:
            # Where the paste region lands on frame t+1's grid (any overlap counts), plus where it was.
            const = np.broadcast_to(means[t], (h, w, 2))
            moved = backward_warp(pastes[t][None], const, params.grid)[0] > 0
            footprint = pastes[t] | moved
        sim_flows[t][footprint] = means[t]
        lost = not (shapes[t].any() or pastes[t].any())
        if lost and (params.shrink_only or params.accumulate == "iterate"):
            continue  # nothing left to carry: the masks stay empty
        if params.accumulate == "compose":
            total += means[t]
            warped = sample_bilinear(first, *sample_positions(np.broadcast_to(total, (h, w, 2)), params.grid))
        else:
            warped = sample_bilinear(np.stack([pastes[t], shapes[t]]), *sample_positions(sim_flows[t], params.grid))
        raw_s[t] = warped[1]
        if params.shrink_only:
            raw_p[t] = warped[0] * pastes[t]
            pastes[t + 1] = raw_p[t] > 0.5
            shapes[t + 1] = (warped[1] > 0.5) & shapes[t]
        else:
            raw_p[t] = warped[0]
            pastes[t + 1] = warped[0] > 0.5
            shapes[t + 1] = warped[1] > 0.5
    return MotionResult(shapes, pastes, sim_flows, means, raw_p, raw_s)


def motion_stage(*, model: None, params: MotionParams, object_masks: np.ndarray, flows: np.ndarray,
                 edited_shape: np.ndarray) -> dict[str, np.ndarray]:
    res = simulate_motion(object_masks, flows, edited_shape, params)
    return {"shape_masks": res.shape_masks, "paste_masks": res.paste_masks,
            "simulated_flows": res.simulated_flows}


STAGE = Stage(
    name="motion",
    # 2: "compose" moves S_0/P_0 by the summed mean motion (no slivers behind the shape);
    # 3: m_t registered from the source masks where the mean flow does not line them up (flat objects)
    version="3",
    inputs=("object_masks", "flows", "edited_shape"),
    outputs={
        "shape_masks": ArraySpec(("frame", "y", "x"), "bool"),
        "paste_masks": ArraySpec(("frame", "y", "x"), "bool"),
        "simulated_flows": ArraySpec(("pair", "y", "x", "component"), "float32"),
    },
    params=MotionParams,
    # The backend's name predates ``estimate``: it is motion pasting, m_t estimated as ``estimate`` says.
    backends={"mean-flow": Backend("mean-flow", motion_stage, reads=(
        "paste_margin_px", "paste_closing_px", "shrink_only", "grid", "pairing", "estimate", "accumulate",
        "reference_kernel"))},
    default_backend="mean-flow",
    doc="Carry the edited shape through the clip with the source object's mean motion (motion pasting).",
)
