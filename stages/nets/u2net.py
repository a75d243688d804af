"""U2-Net (full, ``U2NET(3, 1)``): the saliency segmenter StableV2V uses for O_t and the edited shape S_0.

Written from the U2-Net paper's description (nested RSU blocks); the module names and registration order
match the published ``u2net.pth`` state dict exactly (``tests/data/parity/u2net.keys.json``), so that file
loads with ``strict=True``. Every max-pool is 2x2/2 with ``ceil_mode=True`` and every upsampling is bilinear
to the exact target size with ``align_corners=False`` (odd frame sizes depend on both).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _up_to(src: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(src, size=like.shape[2:], mode="bilinear", align_corners=False)


class REBNCONV(nn.Module):
    """3x3 conv (dilated) + BatchNorm + ReLU; attribute names are those of the checkpoint."""

    def __init__(self, in_ch: int, out_ch: int, dirate: int = 1) -> None:
        super().__init__()
        self.conv_s1 = nn.Conv2d(in_ch, out_ch, 3, padding=dirate, dilation=dirate)
        self.bn_s1 = nn.BatchNorm2d(out_ch)
        self.relu_s1 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu_s1(self.bn_s1(self.conv_s1(x)))


class RSU(nn.Module):
    """Residual U-block of height ``depth`` (RSU-7 ... RSU-4).

    Encoder: ``rebnconvin`` then ``rebnconv1..depth-1`` with a pool before each of 2..depth-1, and a
    dilation-2 bottom conv ``rebnconv<depth>``; decoder ``rebnconv<depth-1>d .. 1d`` on concatenations,
    upsampling to each skip's size; output = decoder + ``rebnconvin`` (residual).
    """

    def __init__(self, depth: int, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__()
        self.depth = depth
        self.rebnconvin = REBNCONV(in_ch, out_ch)
        # Registration order matters for state_dict order: encoder convs, then decoder convs top-down.
        for i in range(1, depth + 1):
            cin = out_ch if i == 1 else mid_ch
            setattr(self, f"rebnconv{i}", REBNCONV(cin, mid_ch, dirate=2 if i == depth else 1))
            if 1 <= i < depth - 1:
                setattr(self, f"pool{i}", nn.MaxPool2d(2, stride=2, ceil_mode=True))
        for i in range(depth - 1, 0, -1):
            setattr(self, f"rebnconv{i}d", REBNCONV(2 * mid_ch, out_ch if i == 1 else mid_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin = self.rebnconvin(x)
        skips = []
        hx = hxin
        for i in range(1, self.depth):
            if i > 1:
                hx = getattr(self, f"pool{i - 1}")(hx)
            hx = getattr(self, f"rebnconv{i}")(hx)
            skips.append(hx)
        hx = getattr(self, f"rebnconv{self.depth}")(hx)  # bottom, no pooling before it
        for i in range(self.depth - 1, 0, -1):
            skip = skips[i - 1]
            if hx.shape[2:] != skip.shape[2:]:
                hx = _up_to(hx, skip)
            hx = getattr(self, f"rebnconv{i}d")(torch.cat((hx, skip), 1))
        return hx + hxin


class RSU4F(nn.Module):
    """RSU-4 with dilations (1, 2, 4, 8) instead of pooling: resolution never changes."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__()
        self.rebnconvin = REBNCONV(in_ch, out_ch)
        self.rebnconv1 = REBNCONV(out_ch, mid_ch, 1)
        self.rebnconv2 = REBNCONV(mid_ch, mid_ch, 2)
        self.rebnconv3 = REBNCONV(mid_ch, mid_ch, 4)
        self.rebnconv4 = REBNCONV(mid_ch, mid_ch, 8)
        self.rebnconv3d = REBNCONV(2 * mid_ch, mid_ch, 4)
        self.rebnconv2d = REBNCONV(2 * mid_ch, mid_ch, 2)
        self.rebnconv1d = REBNCONV(2 * mid_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin = self.rebnconvin(x)
        hx1 = self.rebnconv1(hxin)
        hx2 = self.rebnconv2(hx1)
        hx3 = self.rebnconv3(hx2)
        hx4 = self.rebnconv4(hx3)
        hx3d = self.rebnconv3d(torch.cat((hx4, hx3), 1))
        hx2d = self.rebnconv2d(torch.cat((hx3d, hx2), 1))
        hx1d = self.rebnconv1d(torch.cat((hx2d, hx1), 1))
        return hx1d + hxin


class U2NET(nn.Module):
    """Six-stage encoder / five-stage decoder of RSU blocks, six side outputs and their 1x1 fusion."""

    def __init__(self, in_ch: int = 3, out_ch: int = 1) -> None:
        super().__init__()
        self.stage1 = RSU(7, in_ch, 32, 64)
        self.pool12 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.stage2 = RSU(6, 64, 32, 128)
        self.pool23 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.stage3 = RSU(5, 128, 64, 256)
        self.pool34 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.stage4 = RSU(4, 256, 128, 512)
        self.pool45 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.stage5 = RSU4F(512, 256, 512)
        self.pool56 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.stage6 = RSU4F(512, 256, 512)
        self.stage5d = RSU4F(1024, 256, 512)
        self.stage4d = RSU(4, 1024, 128, 256)
        self.stage3d = RSU(5, 512, 64, 128)
        self.stage2d = RSU(6, 256, 32, 64)
        self.stage1d = RSU(7, 128, 16, 64)
        for i, ch in enumerate((64, 64, 128, 256, 512, 512), start=1):
            setattr(self, f"side{i}", nn.Conv2d(ch, out_ch, 3, padding=1))
        self.outconv = nn.Conv2d(6 * out_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(d0, d1, ..., d6)``: sigmoid maps at input size; d0 fused, d1 finest side output."""
        hx1 = self.stage1(x)
        hx2 = self.stage2(self.pool12(hx1))
        hx3 = self.stage3(self.pool23(hx2))
        hx4 = self.stage4(self.pool34(hx3))
        hx5 = self.stage5(self.pool45(hx4))
        hx6 = self.stage6(self.pool56(hx5))
        hx5d = self.stage5d(torch.cat((_up_to(hx6, hx5), hx5), 1))
        hx4d = self.stage4d(torch.cat((_up_to(hx5d, hx4), hx4), 1))
        hx3d = self.stage3d(torch.cat((_up_to(hx4d, hx3), hx3), 1))
        hx2d = self.stage2d(torch.cat((_up_to(hx3d, hx2), hx2), 1))
        hx1d = self.stage1d(torch.cat((_up_to(hx2d, hx1), hx1), 1))
        d1 = self.side1(hx1d)
        sides = [d1] + [_up_to(getattr(self, f"side{i}")(h), d1)
                        for i, h in zip(range(2, 7), (hx2d, hx3d, hx4d, hx5d, hx6), strict=True)]
        d0 = self.outconv(torch.cat(sides, 1))
        return tuple(torch.sigmoid(d) for d in [d0, *sides])


def load_u2net(path: str | None, device: str = "cpu") -> nn.Module:
    """U2NET(3, 1) in eval mode with the published ``u2net.pth`` (plain state dict) loaded strictly."""
    model = U2NET(3, 1)
    if path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model.to(device).eval()


@torch.no_grad()
def u2net_saliency(model: nn.Module, images_uint8: np.ndarray, batch: int = 4,
                   device: str | None = None) -> np.ndarray:
    """Min-max normalised d1 saliency, float32 [N, H, W], as StableV2V computes it.

    Native resolution, ``/255`` without mean/std normalisation, first side output ``d1`` (not the fused
    d0), per-image min-max (a constant map gives zeros, never NaN). All frames share one size here, so
    they go through the net ``batch`` at a time (eval-mode BatchNorm makes batching exact).
    """
    if images_uint8.ndim != 4 or images_uint8.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3] uint8, got {images_uint8.shape}")
    dev = device or next(model.parameters()).device
    out = np.empty(images_uint8.shape[:3], dtype=np.float32)
    for start in range(0, len(images_uint8), batch):
        chunk = torch.from_numpy(np.ascontiguousarray(images_uint8[start:start + batch]))
        x = chunk.to(dev).permute(0, 3, 1, 2).float() / 255.0
        d1 = model(x)[1][:, 0]
        lo = d1.amin(dim=(1, 2), keepdim=True)
        hi = d1.amax(dim=(1, 2), keepdim=True)
        out[start:start + len(chunk)] = ((d1 - lo) / (hi - lo).clamp_min(1e-12)).float().cpu().numpy()
    return out
