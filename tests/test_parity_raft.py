"""RAFT parity: the filled ``raft-things.pth`` (DataParallel keys), converted onto torchvision's raft_large,
reproduces the reference flow for both input ranges (tests/data/parity/README.md, B3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.nets.fill import checksum_mismatches, fill_from_keys, read_keys
from stages.nets.raft import convert_raft_state_dict, load_raft_things, raft_flows

PARITY = Path(__file__).parent / "data" / "parity"
TOLERANCE = {"255": 2e-3, "pm1": 5e-4}  # px, README's recommendation for float32 vs the float64 reference


@pytest.fixture(scope="module")
def raft_model(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    state = fill_from_keys(PARITY / "raft.keys.json")
    checks = json.loads((PARITY / "fill_checks.json").read_text())["raft"]
    assert checksum_mismatches(state, checks) == []
    # The alias rule: norm3 and downsample.1 hold the same values, as in the published file.
    layer = "module.cnet.layer2.0"
    assert torch.equal(state[f"{layer}.norm3.weight"], state[f"{layer}.downsample.1.weight"])
    path = tmp_path_factory.mktemp("w") / "raft-things.pth"
    torch.save(state, path)
    return load_raft_things(str(path), "cpu")


def test_conversion_covers_every_key() -> None:
    from torchvision.models.optical_flow import raft_large

    entries = read_keys(PARITY / "raft.keys.json")
    converted = convert_raft_state_dict({k: torch.zeros(s) for k, s, _ in entries})
    assert len(converted) == len(entries) - 10  # the 10 norm3 aliases are dropped
    target = {k: list(v.shape) for k, v in raft_large(weights=None).state_dict().items()}
    assert {k: list(v.shape) for k, v in converted.items()} == target


def test_raft_flows_matches_reference(raft_model: torch.nn.Module) -> None:
    ref = np.load(PARITY / "raft.npz")
    to_uint8 = lambda a: a[0].transpose(1, 2, 0).astype(np.uint8)  # noqa: E731 (integer values 0..255)
    frame_t, frame_t1 = to_uint8(ref["image2_255"]), to_uint8(ref["image1_255"])
    pm1 = ref["image1_pm1"][0].transpose(1, 2, 0)
    assert np.array_equal(2 * (frame_t1.astype(np.float32) / 255) - 1, pm1)
    # Pair 0 = RAFT(image1 = frame 1, image2 = frame 0): exactly the fixture's call (StableV2V's 0..255 quirk)
    quirk = raft_flows(raft_model, np.stack([frame_t, frame_t1]), normalise=False)
    assert quirk.shape == (1, 128, 128, 2) and quirk.dtype == np.float32
    err = np.abs(quirk[0].transpose(2, 0, 1) - ref["flow_up_255_f64"][0]).max()
    assert err <= TOLERANCE["255"], f"raft_flows 0..255: {err:.2e} px"
    flows = raft_flows(raft_model, np.stack([frame_t, frame_t1]))  # default: +-1 input
    err = np.abs(flows[0].transpose(2, 0, 1) - ref["flow_up_pm1_f64"][0]).max()
    assert err <= TOLERANCE["pm1"], f"raft_flows +-1: {err:.2e} px"


def test_raft_flows_batches_pairs(raft_model: torch.nn.Module) -> None:
    ref = np.load(PARITY / "raft.npz")
    frame_t, frame_t1 = (ref[k][0].transpose(1, 2, 0).astype(np.uint8) for k in ("image2_255", "image1_255"))
    # Few GRU iterations keep this cheap; pair 2 repeats pair 0 in the next batch, pair 1 swaps the images.
    flows = raft_flows(raft_model, np.stack([frame_t, frame_t1, frame_t, frame_t1]), iters=3, batch=2)
    assert flows.shape == (3, 128, 128, 2)
    assert np.abs(flows[2] - flows[0]).max() <= 1e-4
    assert np.abs(flows[1] - flows[0]).max() > 1.0


def test_raft_flows_pads_and_crops(raft_model: torch.nn.Module) -> None:
    ref = np.load(PARITY / "raft.npz")
    frames = np.stack([ref["image2_255"][0], ref["image1_255"][0]]).transpose(0, 2, 3, 1).astype(np.uint8)
    cropped = frames[:, 3:, :-5]  # 125 x 123: padded to 128 x 128 inside, cropped back
    flows = raft_flows(raft_model, cropped, iters=3)
    assert flows.shape == (1, 125, 123, 2) and np.isfinite(flows).all()
    with pytest.raises(ValueError, match="at least 128"):
        raft_flows(raft_model, frames[:, :64, :64])
