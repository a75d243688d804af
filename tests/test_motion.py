"""Motion simulation: exact parity with the reference (isa.npz), the corrections, synthetic clips."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synthetic import make_clip, new_shape_masks

from stages.base import StageInputError
from stages.flow import STAGE as FLOW
from stages.metrics import iou
from stages.motion import STAGE, MotionParams, backward_warp, paste_region, simulate_motion

ISA = Path(__file__).parent / "data" / "parity" / "isa.npz"
SETTINGS = {"k9_d1": (9, 1), "k11_d9": (11, 9), "k11_d3": (11, 3)}


@pytest.fixture(scope="module")
def isa() -> dict[str, np.ndarray]:
    with np.load(ISA) as z:
        return {k: z[k] for k in z.files}


def isa_inputs(isa: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Files are read as grey / 255 and binarised > 0.5; flows [pair, 2, y, x] -> [pair, y, x, component].
    return {"object_masks": isa["object_masks_png"] / 255.0 > 0.5,
            "flows": np.ascontiguousarray(isa["flows"].transpose(0, 2, 3, 1)),
            "edited_shape": isa["edited_shape_png"] / 255.0 > 0.5}


def centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def translated_clip(v: tuple[float, float], n: int = 16, h: int = 160, w: int = 192, noise: float = 0.3,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An ellipse moving by ``v`` px/frame on a static background; the edited shape is a different,
    larger shape (box + disk) around the object in frame 0."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    c0 = np.array([w / 2, h / 2]) - (n - 1) / 2 * np.asarray(v)  # trajectory centred in the frame
    obj = np.stack([((xx - c0[0] - t * v[0]) / 18) ** 2 + ((yy - c0[1] - t * v[1]) / 12) ** 2 <= 1
                    for t in range(n)])
    flows = np.zeros((n - 1, h, w, 2), np.float32)
    for t in range(n - 1):  # backward flow: on frame t+1's grid, pointing into frame t
        flows[t][cv2.dilate(obj[t + 1].astype(np.uint8), np.ones((3, 3), np.uint8)) > 0] = (-v[0], -v[1])
    flows += rng.normal(0, noise, flows.shape).astype(np.float32)
    shape = np.zeros((h, w), np.uint8)
    x, y = int(round(c0[0])), int(round(c0[1]))
    shape[y - 12:y + 16, x - 24:x + 28] = 1
    cv2.circle(shape, (x + 26, y - 14), 10, 1, -1)
    return obj, flows, shape.astype(bool)


# ---- reference parity -------------------------------------------------------------------------------

@pytest.mark.parametrize("tag", sorted(SETTINGS))
def test_reference_parity_exact(isa: dict[str, np.ndarray], tag: str) -> None:
    arrays = isa_inputs(isa)
    res = simulate_motion(**arrays, params=MotionParams.reference(SETTINGS[tag]))
    assert np.array_equal(res.shape_masks, isa[f"{tag}_shape_masks_png"] > 127)
    assert np.array_equal(res.paste_masks, isa[f"{tag}_paste_masks_png"] > 127)
    ref_flows = isa[f"{tag}_averaged_flows"].transpose(0, 2, 3, 1)
    assert np.abs(res.simulated_flows - ref_flows).max() <= 1e-6
    assert np.abs(res.mean_flows - isa[f"{tag}_mean_flows"]).max() <= 1e-6
    # Pre-threshold values: float64 here vs float32 grid_sample there.
    assert np.abs(res.warped_paste_raw - isa[f"{tag}_warped_paste_raw"]).max() <= 1e-4
    assert np.abs(res.warped_shape_raw - isa[f"{tag}_warped_shape_raw"]).max() <= 1e-4
    # Same through the stage declaration, parameters given as plain JSON-able values.
    params = MotionParams.reference(SETTINGS[tag]).model_dump(mode="json")
    out = STAGE.run(arrays, params)
    assert np.array_equal(out["shape_masks"], res.shape_masks)
    assert np.array_equal(out["paste_masks"], res.paste_masks)
    assert np.array_equal(out["simulated_flows"], res.simulated_flows)


def test_each_reference_switch_matters(isa: dict[str, np.ndarray]) -> None:
    """Switching any one correction on alone departs from the fixture (k11_d9)."""
    arrays = isa_inputs(isa)
    ref = MotionParams.reference((11, 9))
    want = isa["k11_d9_shape_masks_png"] > 127
    for change in ({"grid": "correct"}, {"shrink_only": False}, {"pairing": "grid"},
                   {"accumulate": "compose"}):
        res = simulate_motion(**arrays, params=ref.model_copy(update=change))
        raw_change = np.abs(res.warped_shape_raw - isa["k11_d9_warped_shape_raw"]).max()
        assert raw_change > 1e-3, change
        if "shrink_only" in change:  # S may now grow where the shape moves to
            assert (res.shape_masks[1:] & ~want[:-1]).sum() > 100


# ---- the corrections --------------------------------------------------------------------------------

def test_zero_flow_is_identity_only_on_the_correct_grid(isa: dict[str, np.ndarray]) -> None:
    s0 = isa_inputs(isa)["edited_shape"]
    zero = np.zeros(s0.shape + (2,), np.float32)
    assert np.array_equal(backward_warp(s0[None].astype(float), zero, "correct")[0], s0)
    warped = backward_warp(s0[None].astype(float), zero, "reference")[0]
    assert np.abs(warped - s0).max() > 0.1  # the reference contracts content toward the centre
    # One full motion step with zero flow: the corrected default keeps S exactly.
    masks = np.repeat(s0[None], 2, axis=0)
    out = STAGE.run({"object_masks": masks, "flows": zero[None], "edited_shape": s0})
    assert np.array_equal(out["shape_masks"][1], s0)


def test_default_masks_keep_their_size_and_move(isa: dict[str, np.ndarray]) -> None:
    arrays = isa_inputs(isa)
    res = simulate_motion(**arrays)
    ref = isa["k11_d9_shape_masks_png"] > 127
    areas = res.shape_masks.sum(axis=(1, 2))
    assert np.all(np.abs(areas / areas[0] - 1) < 0.02), areas  # moves, keeps its area
    assert ref.sum(axis=(1, 2))[-1] < 0.7 * areas[0]  # the reference shrinks it by a third
    # Not contained in the previous mask: the shape travels (object moves by (+4, +2) px/frame).
    assert (res.shape_masks[1] & ~res.shape_masks[0]).sum() > 100
    shift = centroid(res.shape_masks[-1]) - centroid(res.shape_masks[0])
    assert np.allclose(shift, (4 * 4, 2 * 4), atol=1.0), shift
    # The mean motion is taken over O_{t+1}, which lives on F_t's grid: the true (-4, -2) up to noise.
    assert np.allclose(res.mean_flows, (-4, -2), atol=0.05)
    assert np.abs(isa["k11_d9_mean_flows"][0] - (-4, -2)).max() > 0.1


def test_paste_margin_is_euclidean_and_signed(isa: dict[str, np.ndarray]) -> None:
    s0 = isa_inputs(isa)["edited_shape"]
    dist_out = cv2.distanceTransform((~s0).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    grown = paste_region(s0, MotionParams(paste_closing_px=0))  # pure +15 px margin
    assert np.array_equal(grown, dist_out <= 15)
    p0 = paste_region(s0, MotionParams())  # +15 px after a 30 px closing: also fills concavities
    assert p0[dist_out <= 15].all() and not p0[dist_out > 45].any()
    assert (p0 & ~grown).sum() > 50
    # Same net +15 as the authors' K=11, 9 iterations, but disks instead of squares.
    square = paste_region(s0, MotionParams.reference((11, 9)))
    assert square[grown].all() and not np.array_equal(square, p0)
    # Negative margin: an erosion of the (closed) shape, 10 px in from every non-image edge.
    inner = paste_region(s0, MotionParams(paste_margin_px=-10, paste_closing_px=0))
    dist_in = cv2.distanceTransform(s0.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    assert np.array_equal(inner, dist_in > 10)


# ---- synthetic clips -------------------------------------------------------------------------------

def test_translated_object_is_followed_within_a_pixel() -> None:
    v = (2.5, 1.5)
    obj, flows, shape = translated_clip(v)
    out = STAGE.run({"object_masks": obj, "flows": flows, "edited_shape": shape})
    s = out["shape_masks"]
    errors = [np.linalg.norm(centroid(s[t]) - centroid(shape) - np.multiply(t, v)) for t in range(16)]
    assert max(errors) <= 1.0, errors
    assert np.all(np.abs(s.sum(axis=(1, 2)) / shape.sum() - 1) < 0.02)
    # The whole shape moves with the mean motion: simulated flow is uniform over every S_t.
    for t in range(15):
        assert np.ptp(out["simulated_flows"][t][s[t + 1]], axis=0).max() < 1e-6
    # The reference recipe on the same clip does not follow the object (the shape can only shrink).
    ref = simulate_motion(obj, flows, shape, MotionParams.reference((9, 1))).shape_masks[-1]
    assert ref.sum() < 0.8 * shape.sum()
    assert np.linalg.norm(centroid(ref) - centroid(shape) - np.multiply(15, v)) > 5


@pytest.mark.parametrize("v", [(6.3, -0.7), (2.5, 1.5), (-4.0, 0.4)])
@pytest.mark.parametrize("bad_flow_around", [False, True], ids=["clean", "bad-flow-around"])
def test_paste_region_moves_rigidly_without_streaks(v: tuple[float, float], bad_flow_around: bool) -> None:
    """The paste region leaves nothing behind: every P_t is P_0 moved by the summed motion. Composing the
    per-step fields pixel by pixel left thin slivers along the trailing edges, and source flow just outside
    the region (unreliable behind a fast object: DIS smears it there) dragged more of them along."""
    obj, flows, shape = translated_clip(v, noise=0.0)
    p0 = paste_region(shape, MotionParams()).astype(np.uint8)
    h, w = p0.shape
    if bad_flow_around:  # a ring outside P_{t+1} whose flow points the wrong way, into P_t
        for t in range(len(flows)):
            moved = cv2.warpAffine(p0, np.float32([[1, 0, (t + 1) * v[0]], [0, 1, (t + 1) * v[1]]]), (w, h))
            ring = (cv2.dilate(moved, np.ones((15, 15), np.uint8)) > 0) & (moved == 0)
            flows[t][ring] = v
    res = simulate_motion(obj, flows, shape)
    assert np.array_equal(res.paste_masks[0], p0.astype(bool))
    for t in range(1, len(obj)):
        shift = np.float32([[1, 0, t * v[0]], [0, 1, t * v[1]]])
        want = cv2.warpAffine(p0, shift, (w, h), flags=cv2.INTER_LINEAR) > 0
        near = cv2.dilate(want.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        assert not (res.paste_masks[t] & ~near).any(), (t, int((res.paste_masks[t] & ~near).sum()))
        assert (res.paste_masks[t] ^ want).sum() <= 0.02 * want.sum(), t
    # The shape itself, too (1 px of the ideal at most, same area).
    s0 = shape.astype(np.uint8)
    shift = np.float32([[1, 0, 15 * v[0]], [0, 1, 15 * v[1]]])
    want = cv2.warpAffine(s0, shift, (w, h), flags=cv2.INTER_LINEAR) > 0
    assert not (res.shape_masks[-1] & ~(cv2.dilate(want.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0)).any()


@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(vx=st.floats(-3, 3), vy=st.floats(-2, 2))
def test_translation_property(vx: float, vy: float) -> None:
    obj, flows, shape = translated_clip((vx, vy), noise=0.2, seed=1)
    s = simulate_motion(obj, flows, shape).shape_masks
    err = centroid(s[-1]) - centroid(shape) - 15 * np.array([vx, vy])
    assert np.linalg.norm(err) <= 1.0


@pytest.mark.parametrize("params", [MotionParams(), MotionParams.reference((11, 9))],
                         ids=["default", "reference"])
def test_empty_source_mask_gives_zero_motion(params: MotionParams) -> None:
    obj, flows, shape = translated_clip((2.0, 1.0))
    obj[:] = False  # no object anywhere: every mean flow is zero, never NaN
    res = simulate_motion(obj, flows, shape, params)
    assert np.array_equal(res.mean_flows, np.zeros_like(res.mean_flows))
    assert np.isfinite(res.simulated_flows).all()
    assert res.shape_masks[-1].any()
    # One empty frame in the middle: only that step has zero motion.
    obj2, flows2, _ = translated_clip((2.0, 1.0))
    obj2[6] = False
    res2 = simulate_motion(obj2, flows2, shape)
    assert np.array_equal(res2.mean_flows[5], [0, 0]) and np.abs(res2.mean_flows[4]).min() > 0.5
    assert np.array_equal(res2.shape_masks[6], res2.shape_masks[5])


@pytest.mark.parametrize("params", [MotionParams(), MotionParams.reference((9, 1))],
                         ids=["default", "reference"])
def test_empty_edited_shape(params: MotionParams) -> None:
    obj, flows, shape = translated_clip((2.0, 1.0))
    out = STAGE.run({"object_masks": obj, "flows": flows, "edited_shape": np.zeros_like(shape)}, params)
    assert not out["shape_masks"].any() and not out["paste_masks"].any()
    assert np.array_equal(out["simulated_flows"], flows)  # nothing pasted


def test_bad_inputs_are_rejected() -> None:
    obj, flows, shape = translated_clip((1.0, 0.0), n=4)
    good = {"object_masks": obj, "flows": flows, "edited_shape": shape}
    bad = [
        {**good, "flows": flows[:2]},  # N frames need N-1 pairs
        {**good, "edited_shape": shape[:, :-8]},
        {**good, "flows": flows[:, :, :-8]},
        {**good, "flows": np.where(obj[1:, ..., None], np.nan, flows)},
        {**good, "flows": flows[..., :1]},
    ]
    for arrays in bad:
        with pytest.raises(StageInputError):
            STAGE.run(arrays)
    with pytest.raises(StageInputError):
        STAGE.run(good, {"reference_kernel": (0, 1)})
    with pytest.raises(StageInputError):
        STAGE.run(good, {"grid": "sideways"})


# ---- objects without texture (tests/synthetic.py: exact truth) --------------------------------------

@pytest.mark.parametrize("kw", [{"shape": "disc"}, {"shape": "star", "textured_object": True},
                                {"shape": "disc", "growth": 1.03, "speed": 4.0}],
                         ids=["flat-disc", "textured-star", "growing-disc"])
def test_new_shape_follows_an_object_flow_cannot_see(kw: dict[str, object]) -> None:
    """DIS flow inside a flat-coloured disc sliding 10 px per frame averages ~2 px: the mean flow leaves the
    new shape behind (IoU ~0 with where it should be by the last frame); registering the source masks
    moves it the whole way. Real DIS flows, true source masks, true new shape."""
    clip = make_clip(n=12, size=(96, 192), radius=14.0, **{"speed": 10.0, **kw})  # type: ignore[arg-type]
    truth = new_shape_masks(clip)
    flows = FLOW.run({"frames": clip.frames})["flows"]
    arrays = {"object_masks": clip.masks, "flows": flows, "edited_shape": truth[0]}
    shapes = STAGE.run(arrays)["shape_masks"]
    ious = [iou(s, t) for s, t in zip(shapes, truth, strict=True)]
    assert min(ious) >= 0.9, np.round(ious, 2)
    flow_mean = STAGE.run(arrays, {"estimate": "flow-mean"})["shape_masks"]
    assert iou(flow_mean[-1], truth[-1]) < 0.5


def test_registered_motion_is_anchored_and_exact_on_clean_translations() -> None:
    """Exact flows and translated masks: the flow's mean is kept (within a rasterised mask's precision of
    the registration); a flow that is wrong by 3 px per frame is overruled by the masks, without drift."""
    v = (3.3, -1.2)
    obj, flows, shape = translated_clip(v, noise=0.0)
    res = simulate_motion(obj, flows, shape)
    assert np.abs(res.mean_flows + np.array(v)).max() < 1e-5
    wrong = flows + np.float32([3.0, 0.0])
    total = simulate_motion(obj, wrong, shape).mean_flows.sum(axis=0)
    assert np.abs(total + 15 * np.array(v)).max() < 0.3, total
