"""Flow stage: backward flow (pair t on frame t+1's grid, pointing into frame t) that really warps."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from stages.base import StageInputError
from stages.flow import STAGE, warp_backward
from stages.ingest import STAGE as INGEST
from stages.ingest import IngestParams, read_source

BEAR = Path(__file__).parent / "data" / "bear"
PARITY = Path(__file__).parent / "data" / "parity"


@pytest.fixture(scope="module")
def bear_frames() -> np.ndarray:
    """The bear clip squashed to 512² exactly as ingest does."""
    params = IngestParams()
    return INGEST.run(read_source(BEAR / "frames", params).arrays(), params)["frames"]


def _texture(size: int = 160, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.random((size, size, 3)).astype(np.float32) * 255
    return np.clip(cv2.GaussianBlur(noise, (0, 0), 2.0) * 3 - 255, 0, 255).astype(np.uint8)


def _shifted_pair(dx: float, dy: float) -> np.ndarray:
    """Frame 1 = frame 0 moved by (dx, dy) px (content goes right/down for positive values)."""
    f0 = _texture()
    m = np.array([[1, 0, dx], [0, 1, dy]], dtype=np.float64)
    f1 = cv2.warpAffine(f0, m, f0.shape[1::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return np.stack([f0, f1])


def _errors(frames: np.ndarray, flows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean abs photometric error per pair: frame t warped by flow t vs frame t+1, and no warp at all."""
    warped = [np.abs(warp_backward(frames[t], flows[t]).astype(np.float32) - frames[t + 1]).mean()
              for t in range(len(flows))]
    still = [np.abs(frames[t].astype(np.float32) - frames[t + 1]).mean() for t in range(len(flows))]
    return np.array(warped), np.array(still)


def test_dis_flow_warps_bear_clip(bear_frames: np.ndarray) -> None:
    flows = STAGE.run({"frames": bear_frames})["flows"]
    assert flows.shape == (15, 512, 512, 2) and flows.dtype == np.float32
    assert np.isfinite(flows).all()
    warped, still = _errors(bear_frames, flows)
    print(f"\nDIS medium: warped error {warped.mean():.2f} vs no warp {still.mean():.2f} (mean abs, 0..255)")
    assert (warped < 0.6 * still).all(), (warped, still)
    assert warped.mean() < 0.35 * still.mean()
    # The reverse convention (flow used as if it lived on frame t) must be clearly worse.
    wrong = np.mean([np.abs(warp_backward(bear_frames[t], -flows[t]).astype(np.float32)
                            - bear_frames[t + 1]).mean() for t in range(3)])
    assert wrong > 2 * warped[:3].mean()


def test_deepflow_warps_bear_clip(bear_frames: np.ndarray) -> None:
    frames = bear_frames[:3]  # DeepFlow takes ~3 s per 512² pair on CPU: two pairs
    flows = STAGE.run({"frames": frames}, backend="deepflow")["flows"]
    assert flows.shape == (2, 512, 512, 2) and flows.dtype == np.float32
    warped, still = _errors(frames, flows)
    print(f"\nDeepFlow: warped error {warped.mean():.2f} vs no warp {still.mean():.2f}")
    assert (warped < 0.4 * still).all(), (warped, still)


@pytest.mark.parametrize("backend", ["dis", "deepflow"])
def test_flow_sign_convention(backend: str) -> None:
    # frame1(p) = frame0(p - (3, 2))  =>  frame0(p + F(p)) = frame1(p) needs F = (-3, -2).
    flows = STAGE.run({"frames": _shifted_pair(3.0, 2.0)}, backend=backend)["flows"]
    centre = flows[0, 24:-24, 24:-24].reshape(-1, 2)
    median = np.median(centre, axis=0)
    print(f"\n{backend}: median flow {median} for a (+3, +2) shift")
    assert np.allclose(median, [-3.0, -2.0], atol=0.25), median


def test_deepflow_without_opencv_contrib_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import cv2

    monkeypatch.delattr(cv2, "optflow", raising=False)
    with pytest.raises(RuntimeError, match="opencv-contrib.*dis or raft"):
        STAGE.run({"frames": np.zeros((2, 64, 64, 3), np.uint8)}, backend="deepflow")


def test_flow_edge_cases() -> None:
    one = _texture(64)[None]
    flows = STAGE.run({"frames": one})["flows"]
    assert flows.shape == (0, 64, 64, 2) and flows.dtype == np.float32
    with pytest.raises(StageInputError, match="uint8"):
        STAGE.run({"frames": one.astype(np.float32)})
    with pytest.raises(StageInputError, match="no backend"):
        STAGE.run({"frames": one}, backend="farneback")


def test_raft_backend_matches_reference(tmp_path: Path) -> None:
    """Stage feeds RAFT (frame t+1, frame t) and the chosen input range (parity fixture, filled weights)."""
    torch = pytest.importorskip("torch")
    raft = pytest.importorskip("stages.nets.raft")
    fill = pytest.importorskip("stages.nets.fill")
    weights = tmp_path / "raft-things.pth"
    torch.save(fill.fill_from_keys(PARITY / "raft.keys.json"), weights)
    assert raft.load_raft_things  # the loader the backend calls
    ref = np.load(PARITY / "raft.npz")
    to_uint8 = lambda a: a[0].transpose(1, 2, 0).astype(np.uint8)  # noqa: E731 (integer values 0..255)
    frames = np.stack([to_uint8(ref["image2_255"]), to_uint8(ref["image1_255"])])  # frame t, frame t+1
    for normalise, key, tol in [(True, "flow_up_pm1_f64", 5e-4), (False, "flow_up_255_f64", 2e-3)]:
        flows = STAGE.run({"frames": frames}, {"raft_normalise": normalise}, backend="raft",
                          weights=str(weights))["flows"]
        assert flows.shape == (1, 128, 128, 2) and flows.dtype == np.float32
        err = np.abs(flows[0].transpose(2, 0, 1) - ref[key][0]).max()
        assert err <= tol, f"{key}: {err:.2e} px"
    with pytest.raises(StageInputError, match="128"):
        STAGE.run({"frames": np.zeros((2, 64, 64, 3), np.uint8)}, backend="raft", weights=str(weights))
