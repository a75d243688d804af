"""Shared fixtures: real data lives in tests/data (copied from the project's shared fixtures)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

DATA = Path(__file__).parent / "data"
BEAR = DATA / "bear"
PARITY = DATA / "parity"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default=os.environ.get("V2V_TEST_DEVICE", "cpu"),
                     help="device for the learned backends (cuda: run the model tests on a GPU)")


@pytest.fixture(scope="session")
def test_device(request: pytest.FixtureRequest) -> str:
    """Where tests run the learned models: cpu (CI), or ``--device cuda`` on a machine with a GPU (TF32 off,
    so the tests' float32 tolerances mean the same there)."""
    device = str(request.config.getoption("--device"))
    if device.startswith("cuda"):
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device


@pytest.fixture(autouse=True)
def _stages_on_test_device(test_device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``--device cuda``, every ``Stage.run`` that names no device runs there (and loads its model
    there): the model tests then check the GPU code paths (device moves, dtypes, offload) CI cannot."""
    if test_device == "cpu":
        return
    from stages.base import Stage

    real_run = Stage.run

    def run(self: Stage, arrays: object, params: object = None, backend: str | None = None,
            weights: str | None = None, device: str = "cpu") -> object:
        return real_run(self, arrays, params, backend, weights, test_device if device == "cpu" else device)

    monkeypatch.setattr(Stage, "run", run)


@pytest.fixture(scope="session")
def bear_dir() -> Path:
    return BEAR


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Weight digests and fetched models go to the user's cache; keep tests from writing there,
    # but let them see models fetched by `make test` (V2V_MODELS_DIR stays as set by the Makefile).
    monkeypatch.setenv("V2V_DIGEST_CACHE", str(tmp_path_factory.getbasetemp() / "digests"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one intra-op thread is as fast, and much faster on a shared, loaded CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def encode_mp4(frames: np.ndarray, path: Path, fps: int = 16, codec: str = "libx264") -> Path:
    """Write uint8 RGB frames to a video with PyAV (test helper)."""
    import av

    h, w = frames.shape[1:3]
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = w - w % 2, h - h % 2
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "12", "preset": "veryfast"}
        for f in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f[: h - h % 2, : w - w % 2]), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path
