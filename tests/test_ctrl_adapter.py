"""Ctrl-Adapter: state-dict compatibility with the published ``i2vgenxl_depth`` checkpoint and numeric parity.

Fixtures: ``tests/data/parity/ctrl_adapter.{keys.json,npz}`` and ``fill_checks.json`` (README sections A, B5).
The parity test builds the full-size adapter (587M values) with the deterministic fill; on this machine that
takes about 1-2 minutes, almost all of it spent drawing the float64 random numbers the fill rule defines.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.nets.ctrl_adapter import (
    CtrlAdapter,
    CtrlAdapterConfig,
    build_ctrl_adapter,
    load_ctrl_adapter,
    save_ctrl_adapter,
)
from stages.nets.fill import fill_value, read_keys

PARITY = Path(__file__).parent / "data" / "parity"

# README B5: the published configuration (diffusers config.json style, private keys ignored).
PUBLISHED_CONFIG = {
    "_class_name": "ControlNetAdapter", "_diffusers_version": "0.27.2", "backbone_model_name": "i2vgenxl",
    "num_blocks": 1, "num_frames": 16, "num_adapters_per_location": 3, "cross_attention_dim": 1024,
    "add_spatial_resnet": True, "add_temporal_resnet": True, "add_spatial_transformer": True,
    "add_temporal_transformer": True, "add_adapter_location_A": True, "add_adapter_location_B": True,
    "add_adapter_location_C": True, "add_adapter_location_D": True, "add_adapter_location_M": True,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_state_dict_matches_the_published_signature():
    entries = read_keys(PARITY / "ctrl_adapter.keys.json")
    with torch.device("meta"):
        model = CtrlAdapter(CtrlAdapterConfig.from_dict(PUBLISHED_CONFIG))
    ours = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    assert ours == [tuple(e) for e in entries]  # same keys, shapes, dtypes and registration order
    assert len(ours) == 1092
    assert sum(math.prod(s) for _, s, _ in ours) == 587_346_458


def _tiny_config(**overrides) -> CtrlAdapterConfig:
    base = dict(PUBLISHED_CONFIG, cross_attention_dim=16, down_channels=[32] * 7 + [64] * 5, mid_channels=64,
                attention_head_dim=16, inner_heads=2)
    return CtrlAdapterConfig.from_dict({**base, **overrides})


def _tiny_inputs(frames: int = 3, clips: int = 2):
    g = torch.Generator().manual_seed(3)
    sizes = [8] * 4 + [4] * 3 + [2] * 3 + [1] * 2
    chans = [32] * 7 + [64] * 5
    down = [torch.randn(clips * frames, c, s, s, generator=g) for c, s in zip(chans, sizes, strict=True)]
    mid = torch.randn(clips * frames, 64, 1, 1, generator=g)
    return down, mid, dict(num_frames=frames, timestep=torch.tensor(321),
                           encoder_hidden_states=torch.randn(1, 1, 16, generator=g))


def test_loader_round_trip_and_strictness(tmp_path):
    torch.manual_seed(0)
    model = build_ctrl_adapter(_tiny_config())
    save_ctrl_adapter(model, str(tmp_path / "st"))
    loaded = load_ctrl_adapter(str(tmp_path / "st"))
    # The same weights as a torch pickle (.bin), as older diffusers folders ship them.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "bin" / "diffusion_pytorch_model.bin")
    from_bin = load_ctrl_adapter(str(tmp_path / "bin"))
    for other in (loaded, from_bin):
        theirs = other.state_dict()
        assert list(theirs) == list(model.state_dict())
        assert all(torch.equal(theirs[k], v) for k, v in model.state_dict().items())
    down, mid, kw = _tiny_inputs()
    with torch.no_grad():
        ref_down, ref_mid = model(down, mid, **kw)
        for other in (loaded, from_bin):  # same weights; kernels may round differently by memory layout
            got_down, got_mid = other(down, mid, **kw)
            for a, b in zip(got_down, ref_down, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
            torch.testing.assert_close(got_mid, ref_mid, rtol=0, atol=1e-5)
    # Every residual is really changed by its adapter.
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(ref_down, down, strict=True))
    # A checkpoint with a missing or mis-shaped tensor is refused.
    sd = dict(model.state_dict())
    sd.pop("mid_block_adapter.proj_in.bias")
    with pytest.raises(RuntimeError, match="Missing key"):
        build_ctrl_adapter(_tiny_config(), sd)


def test_locations_select_residuals_and_clips_are_independent():
    torch.manual_seed(1)
    model = build_ctrl_adapter(_tiny_config(num_adapters_per_location=1, add_adapter_location_B=False,
                                            add_adapter_location_M=False))
    assert model.slots == [2, 8, 11]
    down, mid, kw = _tiny_inputs()
    with torch.no_grad():
        out, out_mid = model(down, mid, **kw)
        half, _ = model([d[:3] for d in down], None, **kw)
    assert out_mid is None
    for i, r in enumerate(out):
        assert (r.abs().max() > 0) == (i in (2, 8, 11))
    for a, b in zip(half, out, strict=True):  # the CFG halves can be adapted one at a time
        torch.testing.assert_close(a, b[:3], rtol=1e-5, atol=1e-5)


def test_parity_with_the_reference_adapter():
    entries = read_keys(PARITY / "ctrl_adapter.keys.json")
    checks = json.loads((PARITY / "fill_checks.json").read_text())["ctrl_adapter"]
    state: dict[str, torch.Tensor] = {}
    for key, shape, dtype in entries:  # float64 draw -> float32 per key; only float32 copies are kept
        state[key] = fill_value(key, shape, dtype)
        total, total_abs, first = checks[key]
        assert state[key].reshape(-1)[0].item() == first, key
        assert math.isclose(state[key].double().sum().item(), total, rel_tol=1e-9, abs_tol=1e-6), key
    model = build_ctrl_adapter(CtrlAdapterConfig.from_dict(PUBLISHED_CONFIG), state)  # strict load
    del state
    z = np.load(PARITY / "ctrl_adapter.npz")
    down = [torch.from_numpy(z[f"down_in_{i:02d}"]) for i in range(12)]
    with torch.no_grad():
        out, mid = model(down_block_res_samples=down, mid_block_res_sample=torch.from_numpy(z["mid_in"]),
                         sparsity_masking=None, num_frames=3, timestep=torch.from_numpy(z["timestep"]),
                         encoder_hidden_states=torch.from_numpy(z["encoder_hidden_states"]))
    errors = [np.abs(out[i].numpy() - z[f"down_out_{i:02d}_f64"]).max() for i in range(12)]
    errors.append(np.abs(mid.numpy() - z["mid_out_f64"]).max())
    assert max(errors) <= 5e-5, errors
    # The adapter path is really exercised (outputs move far from the inputs).
    assert np.abs(out[0].numpy() - z["down_in_00"]).max() > 1.0
