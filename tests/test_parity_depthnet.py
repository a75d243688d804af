"""Depth refinement net parity: the filled ``50000.ckpt`` loads strictly into our RecurrentDepthCompleteNet
and reproduces the reference prediction (tests/data/parity/README.md, B1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.nets.depthnet import RecurrentDepthCompleteNet, load_depthnet
from stages.nets.fill import checksum_mismatches, fill_from_keys, read_keys

PARITY = Path(__file__).parent / "data" / "parity"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = fill_from_keys(PARITY / "depthnet.keys.json")
    checks = json.loads((PARITY / "fill_checks.json").read_text())["depthnet"]
    assert checksum_mismatches(state, checks) == []
    path = tmp_path_factory.mktemp("w") / "50000.ckpt"
    torch.save(state, path)
    return path


def test_state_dict_signature() -> None:
    got = [(k, list(v.shape), str(v.dtype).removeprefix("torch."))
           for k, v in RecurrentDepthCompleteNet(5, 3).state_dict().items()]
    assert got == read_keys(PARITY / "depthnet.keys.json")


def test_prediction_matches_reference(ckpt: Path) -> None:
    ref = np.load(PARITY / "depthnet.npz")
    net = load_depthnet(str(ckpt), "cpu")
    depth, hole, shape = (torch.from_numpy(ref[k]) for k in ("depth", "hole_mask", "shape"))
    with torch.no_grad():
        pred, edge = net(depth, hole, shape)
    assert edge is None  # eval mode: the edge head is not run
    err = np.abs(pred.numpy().astype(np.float64) - ref["pred_f64"]).max()
    assert err <= 1e-5, f"pred: max abs {err:.2e}"
    composited = (1 - hole) * depth + hole * pred
    assert np.abs(composited.numpy() - ref["composited_f64"]).max() <= 1e-5
    # Time matters: the recurrent propagation is not symmetric, reversed frames give a different result.
    with torch.no_grad():
        rev, _ = net(depth.flip(1), hole.flip(1), shape.flip(1))
    assert np.abs(rev.flip(1).numpy() - ref["pred_f64"]).max() > 1e-3


def test_rejects_sizes_not_multiple_of_8(ckpt: Path) -> None:
    net = load_depthnet(str(ckpt), "cpu")
    with pytest.raises(ValueError, match="divisible by 8"):
        net(torch.zeros(1, 2, 3, 60, 64), torch.zeros(1, 2, 1, 60, 64), torch.zeros(1, 2, 1, 60, 64))
