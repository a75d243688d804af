"""MiDaS v3.1 ``dpt_swin2_large_384.pt`` (the reference's depth model) on transformers' DPT-Swinv2.

The checkpoint (timm 0.6.x layout, 477 tensors) maps onto ``DPTForDepthEstimation`` with a Swinv2 backbone,
the configuration transformers' own MiDaS conversion builds for ``Intel/dpt-swinv2-large-384``; the two are
the same function (1.5e-13 apart in float64, tests/data/parity/midas/README.md section 7). No MiDaS or timm
code is used: we check the file against its signature, rename keys, split the fused qkv projection and
feed the reference's own preprocessing.

Buffers: the checkpoint stores two shifted-window ``attn_mask`` buffers, which transformers rebuilds at run
time (we check the stored ones against the definition and drop them). The coordinate tables, position
indices and zero key bias are not stored; the transformers constructor computes them, and
:func:`check_computed_buffers` holds them to the reference's definition (normalised by the *pretrained*
window: getting that wrong moves the output by ~1, four orders above the parity tolerance).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from stages.base import StageInputError
from stages.nets.fill import read_keys

SIGNATURE = Path(__file__).parent / "signatures" / "midas_dpt_swin2_large_384.keys.json"
SIZE = 384  # the network only takes 384 x 384 (DPT reshapes hooked tokens on a fixed grid)
WINDOW, PRETRAINED_WINDOWS, GRIDS = 24, (12, 12, 12, 6), (96, 48, 24, 12)
MASKED = ("pretrained.model.layers.0.blocks.1.attn_mask", "pretrained.model.layers.1.blocks.1.attn_mask")
UNUSED = ("pretrained.model.head.weight", "pretrained.model.head.bias",
          "pretrained.model.norm.weight", "pretrained.model.norm.bias") + MASKED

# (pattern, replacement), applied in order (README section 7, rules 2-7); qkv is split separately.
_RENAMES: tuple[tuple[str, str | Callable[[re.Match[str]], str]], ...] = (
    (r"^pretrained\.model\.patch_embed\.proj\.", "backbone.embeddings.patch_embeddings.projection."),
    (r"^pretrained\.model\.patch_embed\.norm\.", "backbone.embeddings.norm."),
    (r"^pretrained\.model\.layers\.", "backbone.encoder.layers."),
    (r"\.attn\.q_bias$", ".attention.self.query.bias"),
    (r"\.attn\.v_bias$", ".attention.self.value.bias"),
    (r"\.attn\.logit_scale$", ".attention.self.logit_scale"),
    (r"\.attn\.cpb_mlp\.", ".attention.self.continuous_position_bias_mlp."),
    (r"\.attn\.proj\.", ".attention.output.dense."),
    (r"\.norm1\.", ".layernorm_before."),  # post-norm in both, despite transformers' names
    (r"\.norm2\.", ".layernorm_after."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
    (r"^scratch\.layer(\d)_rn\.", lambda m: f"neck.convs.{int(m[1]) - 1}."),
    (r"^scratch\.refinenet(\d)\.", lambda m: f"neck.fusion_stage.layers.{4 - int(m[1])}."),
    (r"\.out_conv\.", ".projection."),
    (r"\.resConfUnit(\d)\.", r".residual_layer\1."),
    (r"\.conv(\d)\.", r".convolution\1."),
    (r"^scratch\.output_conv\.", "head.head."),
)


def dpt_swinv2_config() -> Any:
    """The transformers configuration of ``dpt_swin2_large_384`` (Swin-V2-L/24, features 256)."""
    from transformers import DPTConfig, Swinv2Config

    backbone = Swinv2Config(image_size=SIZE, patch_size=4, embed_dim=192, depths=[2, 2, 18, 2],
                            num_heads=[6, 12, 24, 48], window_size=WINDOW,
                            pretrained_window_sizes=list(PRETRAINED_WINDOWS),
                            out_features=["stage1", "stage2", "stage3", "stage4"])
    return DPTConfig(backbone_config=backbone, neck_hidden_sizes=[192, 384, 768, 1536], fusion_hidden_size=256)


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The state dict as the reference loads it (``torch.load``; an ``optimizer`` dict's ``model`` entry)."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is the user's input: one line, no traceback
        raise StageInputError(f"depth (dpt): {path} is not a torch checkpoint ({type(exc).__name__})") from None
    if isinstance(state, Mapping) and "optimizer" in state:
        state = state["model"]
    if not isinstance(state, Mapping):
        raise StageInputError(f"depth (dpt): {path} holds a {type(state).__name__}, not a state dict")
    return dict(state)


def signature_problems(state: Mapping[str, torch.Tensor], signature: Path = SIGNATURE) -> list[str]:
    """What differs from the signature (keys, shapes, dtypes); empty when the file matches strictly."""
    want = {k: (shape, dtype) for k, shape, dtype in read_keys(signature)}
    problems = []
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    for key in sorted(set(want) & set(state)):
        shape, dtype = want[key]
        t = state[key]
        if not isinstance(t, torch.Tensor) or list(t.shape) != shape or str(t.dtype) != f"torch.{dtype}":
            got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            problems.append(f"{key} is {got}, expected {dtype} {shape}")
    return problems


def shifted_window_mask(grid: int, window: int = WINDOW, shift: int = WINDOW // 2) -> np.ndarray:
    """The Swin shifted-window attention mask [windows, window², window²]: -100 across regions, else 0."""
    labels = np.zeros((grid, grid), np.int64)
    cuts = (slice(0, grid - window), slice(grid - window, grid - shift), slice(grid - shift, grid))
    for i, rows in enumerate(cuts):
        for j, cols in enumerate(cuts):
            labels[rows, cols] = 3 * i + j
    n = grid // window
    wins = labels.reshape(n, window, n, window).transpose(0, 2, 1, 3).reshape(n * n, window * window)
    return np.where(wins[:, :, None] != wins[:, None, :], -100.0, 0.0).astype(np.float32)


@functools.lru_cache(maxsize=8)
def relative_coords_table(window: int, pretrained_window: int) -> torch.Tensor:
    """Log-spaced relative coordinates [1, 2w-1, 2w-1, 2], normalised by the pretrained window - 1."""
    r = torch.arange(-(window - 1), window, dtype=torch.float64) / (pretrained_window - 1) * 8
    t = torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=-1)[None]
    return torch.sign(t) * torch.log2(t.abs() + 1.0) / math.log2(8)


@functools.lru_cache(maxsize=8)
def relative_position_index(window: int) -> torch.Tensor:
    """Index into the (2w-1)² bias table for every pair of tokens of a window: [w², w²]."""
    yy, xx = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    y, x = yy.flatten(), xx.flatten()
    return (y[:, None] - y[None, :] + window - 1) * (2 * window - 1) + (x[:, None] - x[None, :] + window - 1)


def convert_midas_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MiDaS ``dpt_swin2_large_384`` keys -> ``DPTForDepthEstimation`` (Swinv2) keys (477 -> 519 tensors)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in UNUSED:
            continue
        if key.endswith(".attn.qkv.weight"):
            base = re.sub(r"^pretrained\.model\.layers\.", "backbone.encoder.layers.", key[: -len(".attn.qkv.weight")])
            for part, name in zip(value.chunk(3, dim=0), ("query", "key", "value"), strict=True):
                out[f"{base}.attention.self.{name}.weight"] = part
            continue
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        if key in out:
            raise ValueError(f"MiDaS checkpoint: two keys map to {key!r}")
        out[key] = value
    return out


def check_computed_buffers(model: torch.nn.Module) -> None:
    """Hold what transformers computes (tables, indices, windows, no key bias) to the reference's definition."""
    for i, layer in enumerate(model.backbone.encoder.layers):
        window = min(WINDOW, GRIDS[i])  # timm and transformers clamp the window to the token grid
        for j, block in enumerate(layer.blocks):
            shift = window // 2 if j % 2 and GRIDS[i] > window else 0
            att = block.attention.self
            where = f"transformers Swinv2 stage {i} block {j}"
            if (block.window_size, block.shift_size) != (window, shift) or att.key.bias is not None:
                raise RuntimeError(f"{where}: window/shift {block.window_size}/{block.shift_size}, expected "
                                   f"{window}/{shift}, key bias {att.key.bias is not None}: unsupported version")
            table = relative_coords_table(window, PRETRAINED_WINDOWS[i])
            if not torch.allclose(att.relative_coords_table.double(), table, atol=1e-6) or not torch.equal(
                    att.relative_position_index.long(), relative_position_index(window)):
                raise RuntimeError(f"{where}: relative coordinate table/index differ from MiDaS' definition")


def load_midas_pt(path: str, device: str = "cpu") -> torch.nn.Module:
    """``DPTForDepthEstimation`` with the weights of a ``dpt_swin2_large_384.pt`` file (strict), eval mode."""
    from transformers import DPTForDepthEstimation

    state = read_checkpoint(path)
    problems = signature_problems(state)
    if problems:
        raise StageInputError(f"depth (dpt): {Path(path).name} is not MiDaS dpt_swin2_large_384 "
                              f"(timm 0.6 layout): {'; '.join(problems[:3])}")
    for key, grid in zip(MASKED, GRIDS, strict=False):
        if not np.array_equal(state[key].numpy(), shifted_window_mask(grid)):
            raise StageInputError(f"depth (dpt): {Path(path).name}: {key} is not the shifted-window mask "
                                  "(transformers rebuilds it, so a different stored mask cannot be honoured)")
    model = DPTForDepthEstimation(dpt_swinv2_config())
    check_computed_buffers(model)
    model.load_state_dict(convert_midas_state_dict(state), strict=True)
    return model.eval().to(device)


def reference_input(frames: np.ndarray) -> np.ndarray:
    """The reference's network input from uint8 frames: /255 in float64, cv2 bicubic to 384², (x-0.5)/0.5.

    The reference first squashes the source to 512² with PIL; v2v's canvas frames take that place."""
    out = np.empty((len(frames), 3, SIZE, SIZE), np.float32)
    for i, frame in enumerate(frames):
        x = cv2.resize(frame / 255.0, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
        out[i] = ((x - 0.5) / 0.5).transpose(2, 0, 1)
    return out
