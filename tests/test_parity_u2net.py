"""U2-Net parity: the deterministic fill, saved like ``u2net.pth``, through ``load_u2net``, reproduces the
reference outputs (tests/data/parity/README.md, B2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.nets.fill import checksum_mismatches, fill_from_keys, read_keys
from stages.nets.u2net import load_u2net, u2net_saliency

PARITY = Path(__file__).parent / "data" / "parity"


def check_fill(name: str, state: dict[str, torch.Tensor]) -> None:
    checks = json.loads((PARITY / "fill_checks.json").read_text())[name]
    assert checksum_mismatches(state, checks) == []


@pytest.fixture(scope="module")
def u2net_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = fill_from_keys(PARITY / "u2net.keys.json")
    check_fill("u2net", state)
    path = tmp_path_factory.mktemp("w") / "u2net.pth"
    torch.save(state, path)
    return path


def test_state_dict_signature() -> None:
    model = load_u2net(None, "cpu")
    got = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    assert got == read_keys(PARITY / "u2net.keys.json")


@pytest.mark.parametrize("size", ["64x64", "45x70"])
def test_outputs_match_reference(u2net_path: Path, size: str) -> None:
    ref = np.load(PARITY / "u2net.npz")
    model = load_u2net(str(u2net_path), "cpu")
    with torch.no_grad():
        outs = model(torch.from_numpy(ref[f"x_{size}"]))
    for i, d in enumerate(outs):
        err = np.abs(d.numpy().astype(np.float64) - ref[f"d{i}_{size}_f64"]).max()
        assert err <= 1e-5, f"d{i} {size}: max abs {err:.2e}"
    # The pipeline entry point: uint8 frames in, min-max normalised d1 out.
    image = np.rint(ref[f"x_{size}"][0].transpose(1, 2, 0) * 255).astype(np.uint8)
    assert np.array_equal(image.astype(np.float32) / 255, ref[f"x_{size}"][0].transpose(1, 2, 0))
    sal = u2net_saliency(model, np.stack([image, image[:, ::-1].copy(), image]), batch=2)
    err = np.abs(sal[0] - ref[f"d1norm_{size}_f64"][0]).max()
    assert err <= 1e-4, f"d1norm {size}: max abs {err:.2e}"
    assert np.abs(sal[0] - sal[2]).max() <= 1e-5  # batch composition does not change a frame's result
    assert sal.min() == 0.0 and sal.max() == 1.0
