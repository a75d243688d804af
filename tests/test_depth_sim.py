"""Depth simulation: reference parity (isa.npz), plane and relief modes, empty masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stages.base import StageInputError
from stages.depth_sim import STAGE, DepthSimParams, object_depths, simulate_depth

ISA = Path(__file__).parent / "data" / "parity" / "isa.npz"
TAGS = ("k9_d1", "k11_d9", "k11_d3")


@pytest.fixture(scope="module")
def isa() -> dict[str, np.ndarray]:
    with np.load(ISA) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("tag", TAGS)
def test_reference_parity_exact(isa: dict[str, np.ndarray], tag: str) -> None:
    depth = isa["depth_png"].astype(np.float32) / 255  # as the reference reads the PNGs
    objects = isa["object_masks_png"] / 255.0 > 0.5
    shapes = isa[f"{tag}_shape_masks_png"] > 127
    sim = simulate_depth(depth, objects, shapes)
    # The reference stores (D' * 255).astype(uint8): truncation.
    assert np.array_equal((sim * 255).astype(np.uint8), isa[f"{tag}_averaged_depths_png"])
    # Through the stage, with the float16 depth the pipeline carries: pasted value = a_t to float16
    # precision, background untouched.
    out = STAGE.run({"depth": depth.astype(np.float16), "object_masks": objects, "shape_masks": shapes})
    got = out["simulated_depth"]
    assert got.dtype == np.float16
    assert np.array_equal(got[~shapes], depth.astype(np.float16)[~shapes])
    for t in range(len(depth)):
        a_t = depth[t][objects[t]].mean()
        assert np.abs(got[t][shapes[t]].astype(np.float32) - a_t).max() <= 1e-3


def _scene(n: int = 3, h: int = 96, w: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Background ramp; an object (box) whose depth tilts left to right (its own relief)."""
    yy, xx = np.mgrid[:h, :w]
    depth = np.repeat((0.2 + 0.5 * yy / h)[None], n, axis=0).astype(np.float32)
    obj = np.zeros((n, h, w), bool)
    for t in range(n):
        x0 = 20 + 4 * t
        obj[t, 30:60, x0:x0 + 40] = True
        depth[t, 30:60, x0:x0 + 40] = 0.6 + 0.2 * (xx[30:60, x0:x0 + 40] - x0) / 39
    return depth, obj


def test_plane_mode_is_flat_at_the_object_mean() -> None:
    depth, obj = _scene()
    shapes = np.zeros_like(obj)
    shapes[:, 20:70, 60:110] = True
    sim = simulate_depth(depth, obj, shapes)
    for t in range(len(depth)):
        assert np.allclose(sim[t][shapes[t]], depth[t][obj[t]].mean(), atol=1e-6)
        assert np.array_equal(sim[t][~shapes[t]], depth[t][~shapes[t]])


def test_relief_mode_keeps_the_objects_relief() -> None:
    depth, obj = _scene()
    # New shape = the old object moved right by 30 px: relief mode reproduces its depth there.
    moved = np.roll(obj, 30, axis=2)
    sim = STAGE.run({"depth": depth.astype(np.float16), "object_masks": obj, "shape_masks": moved},
                    {"mode": "relief"})["simulated_depth"].astype(np.float32)
    shifted = np.roll(depth, 30, axis=2)
    assert np.abs(sim[moved] - shifted[moved]).max() < 2e-3
    plane = simulate_depth(depth, obj, moved)
    assert np.ptp(plane[0][moved[0]]) == 0 and np.ptp(sim[0][moved[0]]) > 0.19
    # A shape twice as wide: the same left-to-right tilt, stretched (half the slope), same mean.
    wide = np.zeros_like(obj)
    wide[:, 30:60, 40:120] = True
    rel = simulate_depth(depth, obj, wide, DepthSimParams(mode="relief"))[0]
    row = rel[45, 40:120]
    assert row[-1] - row[0] == pytest.approx(0.2, abs=0.02)
    assert np.allclose(np.diff(row)[2:-2], 0.2 / 79, atol=1e-3)
    assert rel[wide[0]].mean() == pytest.approx(depth[0][obj[0]].mean(), abs=2e-3)


@pytest.mark.parametrize("mode", ["plane", "relief"])
def test_empty_masks_never_give_nan(mode: str) -> None:
    depth, obj = _scene(n=4)
    shapes = np.roll(obj, 10, axis=2)
    obj[2] = False  # object lost in frame 2: use the nearest frame's object depth
    out = STAGE.run({"depth": depth, "object_masks": obj, "shape_masks": shapes}, {"mode": mode})
    sim = out["simulated_depth"].astype(np.float32)
    assert np.isfinite(sim).all()
    means = object_depths(depth, obj)
    assert means[2] == means[1]
    if mode == "plane":
        assert np.allclose(sim[2][shapes[2]], means[1], atol=1e-3)
    # No object anywhere: the frame's median depth.
    none = np.zeros_like(obj)
    sim = simulate_depth(depth, none, shapes, DepthSimParams(mode=mode))
    assert np.isfinite(sim).all()
    assert np.allclose(sim[0][shapes[0]], np.median(depth[0]), atol=1e-6)
    # Empty shapes: the depth passes through unchanged.
    same = simulate_depth(depth, obj, np.zeros_like(obj), DepthSimParams(mode=mode))
    assert np.array_equal(same, depth)


def test_bad_inputs_are_rejected() -> None:
    depth, obj = _scene()
    good = {"depth": depth, "object_masks": obj, "shape_masks": obj}
    for arrays in ({**good, "shape_masks": obj[:2]}, {**good, "object_masks": obj.astype(np.uint8)},
                   {**good, "depth": (depth * 255).astype(np.uint8)},
                   {**good, "depth": np.where(obj, np.nan, depth)}):
        with pytest.raises(StageInputError):
            STAGE.run(arrays)
    with pytest.raises(StageInputError):
        STAGE.run(good, {"mode": "bumpy"})
