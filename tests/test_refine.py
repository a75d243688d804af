"""Refine stage: hole masks as the reference, flow-fill recovers hidden background, rfc-net = the net."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stages.base import StageInputError
from stages.nets.depthnet import load_depthnet
from stages.nets.fill import fill_from_keys
from stages.refine import STAGE, hole_masks, rfc_predict

PARITY = Path(__file__).parent / "data" / "parity"


def synthetic_clip(t: int = 10, h: int = 64, w: int = 96, speed: float = 5.0, pan: float = 1.0,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """Panning textured background, an ellipse moving right, replaced by a smaller disc on its centre.

    Returns the stage inputs plus ``background`` (the true depth behind the object).
    """
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    frames = np.arange(t)[:, None, None]
    bx = xs[None] + pan * frames  # the camera pans: frame t shows background x + pan * t
    background = 0.2 + 0.3 * ys[None] / h + 0.08 * np.sin(bx / 6.0) + 0.04 * np.cos(ys[None] / 5.0)
    cx = 24.0 + speed * frames
    cy = h / 2
    obj = ((xs[None] - cx) / 13.0) ** 2 + ((ys[None] - cy) / 9.0) ** 2 <= 1.0
    shape = (xs[None] - cx) ** 2 + (ys[None] - cy) ** 2 <= 6.0 ** 2
    obj_depth = 0.85 + 0.002 * (xs[None] - cx)
    source = np.where(obj, obj_depth, background)
    simulated = source.copy()
    for i in range(t):  # depth simulation: the new shape at the old object's mean depth
        simulated[i][shape[i]] = source[i][obj[i]].mean()
    # Backward flows: pair i lives on frame i+1 and points into frame i.
    rng = np.random.default_rng(seed)
    flows = np.zeros((t - 1, h, w, 2), np.float32)
    flows[..., 0] = pan
    flows[..., 0][obj[1:]] = -speed
    flows += rng.normal(0, 0.05, flows.shape).astype(np.float32)
    return {"simulated_depth": simulated.astype(np.float16), "object_masks": obj, "shape_masks": shape,
            "edited_shape": shape[0].copy(), "flows": flows, "background": background.astype(np.float32)}


def test_hole_masks_match_reference_runner() -> None:
    isa = np.load(PARITY / "isa.npz")
    obj = isa["object_masks_png"] > 127
    for tag in ("k9_d1", "k11_d9", "k11_d3"):
        holes = hole_masks(obj, isa[f"{tag}_shape_masks_png"] > 127)
        assert np.array_equal(holes, isa[f"{tag}_refine_hole_masks"] == 1), tag


def test_flow_fill_recovers_background() -> None:
    clip = synthetic_clip()
    truth = clip.pop("background")
    out = STAGE.run(clip)  # default backend: flow-fill
    holes = out["hole_masks"]
    assert np.array_equal(holes, hole_masks(clip["object_masks"], clip["shape_masks"]))
    assert holes.sum() > 1000 and not (holes & clip["shape_masks"]).any()
    refined = out["refined_depth"].astype(np.float32)
    stale_err = np.abs(clip["simulated_depth"].astype(np.float32) - truth)[holes].mean()
    fill_err = np.abs(refined - truth)[holes].mean()
    assert stale_err > 0.2
    assert fill_err < 0.005 and fill_err < 0.02 * stale_err, (fill_err, stale_err)
    # Outside the holes nothing changes (the pasted shape included).
    assert np.array_equal(out["refined_depth"][~holes], clip["simulated_depth"][~holes])


def test_flow_fill_static_object_falls_back_to_inpainting() -> None:
    clip = synthetic_clip(t=4, speed=0.0, pan=0.0)  # the background behind the object is never seen
    truth = clip.pop("background")
    out = STAGE.run(clip, {"inpaint_radius": 3})
    holes = out["hole_masks"]
    refined = out["refined_depth"].astype(np.float32)
    assert np.isfinite(refined).all()
    stale_err = np.abs(clip["simulated_depth"].astype(np.float32) - truth)[holes].mean()
    assert np.abs(refined - truth)[holes].mean() < 0.15 * stale_err


@pytest.mark.parametrize("backend", ["flow-fill", "rfc-net"])
def test_empty_masks_pass_through(backend: str, tmp_path: Path) -> None:
    clip = synthetic_clip(t=3, h=32, w=48)
    clip.pop("background")
    clip["object_masks"][:] = False
    weights = None
    if backend == "rfc-net":
        weights = str(tmp_path / "50000.ckpt")
        torch.save(fill_from_keys(PARITY / "depthnet.keys.json"), weights)
    out = STAGE.run(clip, backend=backend, weights=weights)
    assert not out["hole_masks"].any()
    assert np.array_equal(out["refined_depth"], clip["simulated_depth"])


@pytest.fixture(scope="module")
def depthnet_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("w") / "50000.ckpt"
    torch.save(fill_from_keys(PARITY / "depthnet.keys.json"), path)
    return str(path)


def test_rfc_net_stage_matches_direct_call(depthnet_ckpt: str, test_device: str) -> None:
    clip = synthetic_clip(t=4, h=32, w=48, speed=3.0)
    clip.pop("background")
    out = STAGE.run(clip, backend="rfc-net", weights=depthnet_ckpt)
    holes = out["hole_masks"]
    assert holes.any()
    net = load_depthnet(depthnet_ckpt, test_device)
    depth = torch.from_numpy(clip["simulated_depth"].astype(np.float32))[None, :, None].repeat(1, 1, 3, 1, 1)
    hole_t = torch.from_numpy(holes.astype(np.float32))[None, :, None]
    shape_t = torch.from_numpy(clip["edited_shape"].astype(np.float32)).expand(1, 4, 1, 32, 48)
    depth, hole_t, shape_t = (x.to(test_device) for x in (depth, hole_t, shape_t))
    with torch.no_grad():
        pred, _ = net(depth, hole_t, shape_t)
    expected = ((1 - hole_t) * depth + hole_t * pred)[0].mean(1).cpu().numpy()
    got = out["refined_depth"].astype(np.float32)
    assert np.abs(got - expected).max() <= 2e-3  # float16 storage
    assert np.abs(got - clip["simulated_depth"].astype(np.float32))[holes].max() > 1e-2  # the net did act
    with pytest.raises(StageInputError, match="divisible by 8"):
        STAGE.run({k: v[:, :30] if v.ndim == 3 else v[:30] for k, v in clip.items()}, backend="rfc-net",
                  weights=depthnet_ckpt)


def test_rfc_net_temporal_windows(depthnet_ckpt: str, test_device: str) -> None:
    clip = synthetic_clip(t=6, h=32, w=48, speed=3.0)
    net = load_depthnet(depthnet_ckpt, test_device)
    holes = hole_masks(clip["object_masks"], clip["shape_masks"])
    depth, shape = clip["simulated_depth"], clip["edited_shape"]
    whole = rfc_predict(net, depth, holes, shape, window=6, overlap=2)
    windowed = rfc_predict(net, depth, holes, shape, window=4, overlap=2)  # windows 0..3 and 2..5
    first = rfc_predict(net, depth[:4], holes[:4], shape, window=4)
    second = rfc_predict(net, depth[2:], holes[2:], shape, window=4)
    assert np.abs(windowed[:2] - first[:2]).max() <= 1e-6
    assert np.abs(windowed[4:] - second[2:]).max() <= 1e-6
    lo, hi = np.minimum(first[2:], second[:2]), np.maximum(first[2:], second[:2])
    assert ((windowed[2:4] >= lo - 1e-6) & (windowed[2:4] <= hi + 1e-6)).all()  # blended in the overlap
    assert np.abs(whole - windowed).max() > 1e-4  # the whole clip is one pass, not windows


def test_bad_inputs_are_reported() -> None:
    clip = synthetic_clip(t=3, h=32, w=48)
    clip.pop("background")
    with pytest.raises(StageInputError, match="flows"):
        STAGE.run({**clip, "flows": clip["flows"][:1]})
    with pytest.raises(StageInputError, match="object_masks"):
        STAGE.run({**clip, "object_masks": clip["object_masks"][:2]})
    with pytest.raises(StageInputError, match="window_overlap"):
        STAGE.resolve_params({"window": 4, "window_overlap": 4})
