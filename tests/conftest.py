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
