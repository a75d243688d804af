"""RAFT (standard, ``raft-things.pth``) on top of torchvision's ``raft_large``.

The original checkpoint was saved from ``DataParallel(RAFT())``; its keys map one-to-one onto torchvision's
``raft_large`` (tests/data/parity/README.md, B3) and the outputs are then bit-identical, so we reuse the
torchvision implementation and only convert the state dict.

``raft_flows`` computes the pipeline's flows: pair t = RAFT(image1 = frame t+1, image2 = frame t), a field on
frame t+1's grid pointing into frame t, channel-last (x, y) in pixels.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# (pattern, replacement) applied in order to each key after stripping ``module.``.
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^fnet\.", "feature_encoder."),
    (r"^cnet\.", "context_encoder."),
    (r"^(feature_encoder|context_encoder)\.conv1\.", r"\1.convnormrelu.0."),
    (r"^(feature_encoder|context_encoder)\.norm1\.", r"\1.convnormrelu.1."),
    (r"^(feature_encoder|context_encoder)\.conv2\.", r"\1.conv."),
    (r"^(.*\.layer\d\.\d)\.conv([12])\.", r"\1.convnormrelu\2.0."),
    (r"^(.*\.layer\d\.\d)\.norm([12])\.", r"\1.convnormrelu\2.1."),
    (r"^update_block\.encoder\.convc([12])\.", r"update_block.motion_encoder.convcorr\1.0."),
    (r"^update_block\.encoder\.convf([12])\.", r"update_block.motion_encoder.convflow\1.0."),
    (r"^update_block\.encoder\.conv\.", "update_block.motion_encoder.conv.0."),
    (r"^update_block\.gru\.conv([zrq])([12])\.", r"update_block.recurrent_block.convgru\2.conv\1."),
    (r"^update_block\.mask\.0\.", "mask_predictor.convrelu.0."),
    (r"^update_block\.mask\.2\.", "mask_predictor.conv."),
)


def convert_raft_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original RAFT keys (with or without ``module.``) -> torchvision ``raft_large`` keys.

    ``layerL.0.norm3`` is the same BatchNorm as ``layerL.0.downsample.1`` in the original code (registered
    twice), so it is dropped.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if re.search(r"\.layer\d\.\d\.norm3\.", key):
            continue
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        if key in out:
            raise ValueError(f"RAFT checkpoint: two keys map to {key!r}")
        out[key] = value
    return out


def load_raft_things(path: str, device: str = "cpu") -> nn.Module:
    """torchvision ``raft_large`` with the original ``raft-things.pth`` weights (strict), eval mode."""
    from torchvision.models.optical_flow import raft_large

    model = raft_large(weights=None, progress=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and not any(".weight" in k for k in state):
        state = state["state_dict"]
    model.load_state_dict(convert_raft_state_dict(state), strict=True)
    return model.to(device).eval()


def _pad_amounts(h: int, w: int) -> tuple[int, int, int, int]:
    """RAFT's ``InputPadder`` (sintel mode): replicate-pad to a multiple of 8, split evenly."""
    ph, pw = (-h) % 8, (-w) % 8
    return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2


@torch.no_grad()
def raft_flows(model: nn.Module, frames_uint8: np.ndarray, iters: int = 20, normalise: bool = True,
               batch: int = 8) -> np.ndarray:
    """Flows of all consecutive pairs, float32 [N-1, H, W, 2] (x, y).

    Pairs go through RAFT ``batch`` at a time. ``normalise`` feeds ``2 * x / 255 - 1`` (what RAFT was
    trained with); ``normalise=False`` feeds 0..255 like StableV2V's copy (its normalisation is commented
    out).
    """
    if frames_uint8.ndim != 4 or frames_uint8.shape[-1] != 3:
        raise ValueError(f"frames must be [N, H, W, 3] uint8, got {frames_uint8.shape}")
    n, h, w, _ = frames_uint8.shape
    if n < 2:
        return np.zeros((0, h, w, 2), dtype=np.float32)
    device = next(model.parameters()).device
    left, right, top, bottom = _pad_amounts(h, w)
    if h + top + bottom < 128 or w + left + right < 128:
        raise ValueError(f"RAFT needs frames of at least 128x128 (got {w}x{h})")
    out = np.empty((n - 1, h, w, 2), dtype=np.float32)
    for start in range(0, n - 1, batch):
        stop = min(start + batch, n - 1)
        # Frames start..stop are needed: image2 = frames[start:stop], image1 = frames[start+1:stop+1].
        chunk = torch.from_numpy(np.ascontiguousarray(frames_uint8[start:stop + 1])).to(device)
        x = chunk.permute(0, 3, 1, 2).float()
        if normalise:
            x = 2 * (x / 255.0) - 1
        if left or right or top or bottom:
            x = F.pad(x, (left, right, top, bottom), mode="replicate")
        flow = model(x[1:], x[:-1], num_flow_updates=iters)[-1]
        flow = flow[:, :, top:top + h, left:left + w]
        out[start:stop] = flow.permute(0, 2, 3, 1).float().cpu().numpy()
    return out
