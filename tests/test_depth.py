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


# ---- reference levels, MiDaS .pt handling (the real-size parity is tests/test_parity_midas.py) ---------

def test_uint8_levels_round_trip_and_reference_order() -> None:
    from stages.depth import finish_depth, reference_levels

    k = np.arange(256, dtype=np.float32)
    back = finish_depth(k[None, None, :], "frame", "uint8")  # a 0..255 ramp maps to its own bytes
    assert back.dtype == np.float16 and np.array_equal(np.round(back[0, 0].astype(np.float32) * 255), k)
    rng = np.random.default_rng(1)
    inv = rng.random((3, 24, 24)).astype(np.float32) * np.array([1, 2, 4], np.float32)[:, None, None]
    frame, clip = reference_levels(inv, "frame"), reference_levels(inv, "clip")
    assert (frame.max(axis=(1, 2)) == 255).all() and (frame.min(axis=(1, 2)) == 0).all()
    assert clip[0].max() < 80 and clip.max() == 255  # one scale for the clip
    # Truncation, not rounding: within one level below the exact value.
    exact = 255 * (inv - inv.min(axis=(1, 2), keepdims=True)) / np.ptp(inv, axis=(1, 2), keepdims=True)
    assert np.all((exact - frame >= -1e-3) & (exact - frame < 1 + 1e-3)) and (exact - frame > 0.5).any()
    assert not finish_depth(np.full((2, 4, 4), 3.0), "frame", "uint8").any()


def test_dpt_uint8_levels(tiny_dpt: str, bear: dict[str, np.ndarray]) -> None:
    frames = np.stack([cv2.resize(f, (64, 64), interpolation=cv2.INTER_AREA) for f in bear["frames"][:3]])
    params = {"input_size": 64, "normalise": "frame"}
    full = STAGE.run({"frames": frames}, params, backend="dpt", weights=tiny_dpt)["depth"].astype(np.float32)
    u8 = STAGE.run({"frames": frames}, {**params, "levels": "uint8"}, backend="dpt",
                   weights=tiny_dpt)["depth"].astype(np.float32)
    levels = u8 * 255
    assert np.abs(levels - np.round(levels)).max() <= 0.0625  # bytes k as k/255 (float16: half a step near 1)
    below = full * 255 - np.round(levels)  # truncation: the byte is at most one level below (+ float16 steps)
    assert below.min() >= -0.07 and below.max() < 1.07 and below.mean() > 0.3
    assert len(np.unique(np.round(levels))) > 64


def test_backend_reads_enter_the_key() -> None:
    assert set(STAGE.key_params("dpt", {})) == {"normalise", "levels", "batch_size", "input_size"}
    assert set(STAGE.key_params("ground-prior", {})) == {"normalise", "horizon", "contact_window",
                                                          "edge_sigma_px"}
    assert STAGE.key_params("ground-prior", {"levels": "uint8"}) == STAGE.key_params("ground-prior", {})


def test_midas_conversion_covers_every_key() -> None:
    import torch
    from transformers import DPTForDepthEstimation

    from stages.nets.fill import read_keys
    from stages.nets.midas import SIGNATURE, UNUSED, convert_midas_state_dict, dpt_swinv2_config, signature_problems

    entries = read_keys(SIGNATURE)
    assert len(entries) == 477
    state = {k: torch.empty(s, device="meta") for k, s, _ in entries}
    assert signature_problems(state) == []
    with torch.device("meta"):
        target = {k: list(v.shape) for k, v in DPTForDepthEstimation(dpt_swinv2_config()).state_dict().items()}
    converted = convert_midas_state_dict(state)
    assert {k: list(v.shape) for k, v in converted.items()} == target and len(target) == 519
    assert not set(UNUSED) & set(converted) and len(state) - len(UNUSED) + 2 * 24 == len(target)
    # The fused qkv projection splits in the order query, key, value.
    qkv = torch.arange(12.0).reshape(6, 2)
    got = convert_midas_state_dict({"pretrained.model.layers.1.blocks.0.attn.qkv.weight": qkv})
    base_key = "backbone.encoder.layers.1.blocks.0.attention.self"
    assert [got[f"{base_key}.{n}.weight"][0, 0].item() for n in ("query", "key", "value")] == [0.0, 4.0, 8.0]
    bad = dict(state)
    bad.pop("scratch.layer1_rn.weight")
    bad["pretrained.model.norm.weight"] = torch.empty(7, device="meta")
    problems = signature_problems(bad)
    assert any("1 missing keys" in p for p in problems) and any("norm.weight" in p for p in problems)


def test_shifted_window_mask() -> None:
    from stages.nets.midas import shifted_window_mask

    mask = shifted_window_mask(48)  # stage 1: 2 x 2 windows of 24², shifted by 12
    assert mask.shape == (4, 576, 576) and set(np.unique(mask)) == {-100.0, 0.0}
    assert not mask[0].any()  # the top-left window holds one region
    assert np.array_equal(mask[3], mask[3].T) and not np.diag(mask[3]).any()
    assert (mask[3] == 0).sum() == 4 * 144**2  # bottom-right: four 12 x 12 regions


def test_midas_file_is_checked(tmp_path: Path) -> None:
    import torch

    from stages.depth import DepthNet, predict_raw
    from stages.nets.midas import read_checkpoint

    wrong = tmp_path / "raft-things.pt"
    torch.save({"module.fnet.conv1.weight": torch.zeros(64, 3, 7, 7)}, wrong)
    with pytest.raises(StageInputError, match="not MiDaS dpt_swin2_large_384.*477 missing keys"):
        STAGE.run({"frames": np.zeros((1, 32, 32, 3), np.uint8)}, backend="dpt", weights=str(wrong))
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(StageInputError, match="not a torch checkpoint"):
        read_checkpoint(str(text))
    wrapped = tmp_path / "with-optimizer.pt"
    torch.save({"optimizer": {"lr": 0.1}, "model": {"a": torch.ones(2)}}, wrapped)
    assert list(read_checkpoint(str(wrapped))) == ["a"]  # as MiDaS' loader unwraps training checkpoints
    net = DepthNet(None, "cpu", (0.5,) * 3, (0.5,) * 3, 384, 32, False, True)
    with pytest.raises(StageInputError, match="384x384 input only"):
        predict_raw(net, np.zeros((1, 64, 64, 3), np.uint8), 256)
