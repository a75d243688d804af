"""Depth: the ground-prior stand-in on the bear clip, normalisation, and a tiny random-weight DPT."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from stages import base
from stages.base import MissingWeightsError, StageInputError
from stages.depth import STAGE, contact_rows, ground_ramp, normalise_depth

BEAR = Path(__file__).parent / "data" / "bear"
SIDE = 512


@pytest.fixture(scope="module")
def bear() -> dict[str, np.ndarray]:
    frames, masks = [], []
    for f in sorted((BEAR / "frames").glob("*.jpg")):
        img = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
        frames.append(cv2.resize(img, (SIDE, SIDE), interpolation=cv2.INTER_AREA))
        m = cv2.imread(str(BEAR / "isnet-masks" / f"{f.stem}.png"), cv2.IMREAD_GRAYSCALE)
        masks.append(cv2.resize(m, (SIDE, SIDE), interpolation=cv2.INTER_LINEAR) >= 128)
    return {"frames": np.stack(frames), "object_masks": np.stack(masks)}


# ---- ground-prior -----------------------------------------------------------------------------------

def test_ground_prior_on_bear_exact_contact_row(bear: dict[str, np.ndarray]) -> None:
    out = STAGE.run(bear, {"contact_window": 1, "edge_sigma_px": 0})["depth"]
    masks = bear["object_masks"]
    assert out.shape == masks.shape and out.dtype == np.float16
    assert np.isfinite(out).all() and out.min() == 0 and out.max() == 1
    ramp = ground_ramp(SIDE, 0.0)
    for t in range(len(out)):
        # Background follows the ground: bottom rows nearer (larger) than top rows, row by row.
        bg = np.where(masks[t], np.nan, out[t].astype(np.float32))
        rows = np.nanmean(bg, axis=1)
        assert rows[-1] > rows[0] + 0.9
        assert np.all(np.diff(rows[np.isfinite(rows)]) >= -1e-3)
        # The whole bear has the depth of its lowest row, not the ramp at its own rows.
        lowest = np.nonzero(masks[t].any(axis=1))[0].max()
        obj = out[t][masks[t]].astype(np.float32)
        assert np.ptp(obj) == 0
        assert obj[0] == pytest.approx(ramp[lowest], abs=1e-3)
        top = np.nonzero(masks[t].any(axis=1))[0].min()
        assert obj[0] - ramp[top] > 0.1  # the bear's back is lifted well above the ground behind it


def test_ground_prior_default_smoothing(bear: dict[str, np.ndarray]) -> None:
    out = STAGE.run(bear)["depth"].astype(np.float32)  # 5-frame median of the contact row, 2 px feather
    masks = bear["object_masks"]
    rows = contact_rows(masks, 5)
    raw = contact_rows(masks, 1)
    assert np.abs(rows - raw).max() > 0  # the bear's lowest row does jitter
    ramp = ground_ramp(SIDE, 0.0)
    kernel = np.ones((15, 15), np.uint8)  # 7 px > 3 sigma inside the edge: no feathering there
    for t in range(len(out)):
        inner = cv2.erode(masks[t].astype(np.uint8), kernel) > 0
        want = np.interp(rows[t], np.arange(SIDE), ramp)
        assert np.abs(out[t][inner] - want).max() <= 1e-3
        # Feathered edge: between the object's value and the ground's, never outside that range.
        edge = masks[t] & ~inner
        lo = np.minimum(want, ramp[:, None].repeat(SIDE, 1)[edge]) - 1e-3
        hi = np.maximum(want, ramp[:, None].repeat(SIDE, 1)[edge]) + 1e-3
        assert np.all((out[t][edge] >= lo) & (out[t][edge] <= hi))
    # Temporal smoothness of the object's depth: the median filter removes frame-to-frame jumps.
    obj_depth = np.array([np.interp(r, np.arange(SIDE), ramp) for r in rows])
    raw_depth = np.array([np.interp(r, np.arange(SIDE), ramp) for r in raw])
    assert np.abs(np.diff(obj_depth)).sum() <= np.abs(np.diff(raw_depth)).sum()


def test_ground_prior_horizon_and_empty_masks(bear: dict[str, np.ndarray]) -> None:
    frames = bear["frames"][:3]
    empty = np.zeros(frames.shape[:3], bool)
    out = STAGE.run({"frames": frames, "object_masks": empty}, {"horizon": 0.25})["depth"]
    assert np.isfinite(out).all()
    col = out[0, :, 100].astype(np.float32)
    top = int(0.25 * (SIDE - 1))
    assert np.all(col[:top + 1] == 0) and col[-1] == 1  # sky above the horizon is farthest
    assert np.array_equal(out[0], out[2])  # no object: the same ground every frame
    bad = {"frames": frames, "object_masks": empty[:, :-4]}
    with pytest.raises(StageInputError):
        STAGE.run(bad)
    with pytest.raises(StageInputError):
        STAGE.run({"frames": frames[..., 0], "object_masks": empty})


def test_normalise_clip_vs_frame() -> None:
    rng = np.random.default_rng(0)
    inv = rng.random((4, 16, 16)).astype(np.float32) * np.array([1, 2, 3, 4], np.float32)[:, None, None]
    clip = normalise_depth(inv, "clip").astype(np.float32)
    frame = normalise_depth(inv, "frame").astype(np.float32)
    assert clip.min() == 0 and clip.max() == 1
    assert clip[0].max() < 0.3 and clip[3].max() == 1  # relative scale between frames kept
    assert np.allclose(frame.min(axis=(1, 2)), 0) and np.allclose(frame.max(axis=(1, 2)), 1)
    flat = normalise_depth(np.full((2, 4, 4), 3.0), "clip")
    assert np.isfinite(flat).all() and not flat.any()


# ---- dpt (tiny random-weight model, offline) --------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation

    cfg = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
                    image_size=64, patch_size=8, backbone_out_indices=[0, 1, 2, 3],
                    neck_hidden_sizes=[16, 16, 32, 32], fusion_hidden_size=16, use_auxiliary_head=False,
                    initializer_range=0.2)  # large enough init for a non-trivial random output
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-dpt")
    DPTForDepthEstimation(cfg).save_pretrained(folder)
    return str(folder)


def test_dpt_backend(tiny_dpt: str, bear: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    frames = np.stack([cv2.resize(f, (80, 64), interpolation=cv2.INTER_AREA) for f in bear["frames"][:5]])
    params = {"batch_size": 2, "input_size": 64}
    out = STAGE.run({"frames": frames}, params, backend="dpt", weights=tiny_dpt)["depth"]
    assert out.shape == (5, 64, 80) and out.dtype == np.float16
    assert out.min() == 0 and out.max() == 1 and np.isfinite(out).all()
    assert np.ptp(out.astype(np.float32).reshape(5, -1), axis=1).min() > 0.05  # not a constant map
    again = STAGE.run({"frames": frames}, params, backend="dpt", weights=tiny_dpt)["depth"]
    assert np.array_equal(out, again)  # deterministic
    ours = [k for k in base.loaded_models() if k[2] == tiny_dpt]
    assert len(ours) == 1  # loaded once, reused
    # Batching does not change the result; per-frame normalisation spans [0, 1] in every frame.
    one_batch = STAGE.run({"frames": frames}, {**params, "batch_size": 5}, backend="dpt",
                          weights=tiny_dpt)["depth"]
    assert np.abs(one_batch.astype(np.float32) - out.astype(np.float32)).max() <= 2e-3
    per_frame = STAGE.run({"frames": frames}, {**params, "normalise": "frame"}, backend="dpt",
                          weights=tiny_dpt)["depth"].astype(np.float32)
    assert np.allclose(per_frame.min(axis=(1, 2)), 0) and np.allclose(per_frame.max(axis=(1, 2)), 1)
    assert len([k for k in base.loaded_models() if k[2] == tiny_dpt]) == 1


def test_dpt_needs_weights(tmp_path: Path) -> None:
    frames = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(MissingWeightsError):
        STAGE.run({"frames": frames}, backend="dpt")
    with pytest.raises(MissingWeightsError):
        STAGE.run({"frames": frames}, backend="dpt", weights=str(tmp_path / "nope"))


def test_depth_anything_with_preprocessor_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    from stages.depth import load_dpt

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=37, image_size=28, patch_size=14, out_indices=[1, 2, 3, 4],
                            reshape_hidden_states=False)
    cfg = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, patch_size=14,
                              neck_hidden_sizes=[16, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8,
                              initializer_range=0.2)
    torch.manual_seed(0)
    DepthAnythingForDepthEstimation(cfg).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 42, "width": 42}, "image_mean": [0.485, 0.456, 0.406],
         "image_std": [0.229, 0.224, 0.225]}))
    net = load_dpt(str(tmp_path), "cpu")
    assert (net.size, net.multiple, net.mean) == (42, 14, (0.485, 0.456, 0.406)) and not net.metric
    frames = (np.random.default_rng(0).random((3, 50, 60, 3)) * 255).astype(np.uint8)
    out = STAGE.run({"frames": frames}, {"input_size": 60}, backend="dpt", weights=str(tmp_path))["depth"]
    assert out.shape == (3, 50, 60) and out.dtype == np.float16 and out.min() == 0 and out.max() == 1
