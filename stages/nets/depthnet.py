"""Shape-guided depth refinement net of StableV2V (``RecurrentDepthCompleteNet(5, 3)``, ``50000.ckpt``).

An adaptation of ProPainter's recurrent flow-completion net (spec section 3.6): a pseudo-3D conv encoder
to 1/8 resolution, dilated context convs, bidirectional recurrent propagation whose alignment is a
second-order modulated deformable conv (no optical flow), and a 2D decoder with an encoder skip. Module names
and registration order follow ``tests/data/parity/depthnet.keys.json`` so the published checkpoint loads
strictly; the training-only edge head is kept for that reason and is unused in eval mode.

Feature maps are ``[b, c, t, h, w]`` in the 3D part and ``[b, t, c, h, w]`` in the propagation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d


def _lrelu(slope: float = 0.2) -> nn.LeakyReLU:
    return nn.LeakyReLU(slope, inplace=True)


class P3DBlock(nn.Module):
    """Pseudo-3D conv: spatial (1, k, k) conv + LeakyReLU, then temporal (3, 1, 1) conv, dilation 2."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv3d(in_ch, out_ch, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1)), _lrelu())
        self.conv2 = nn.Sequential(
            nn.Conv3d(out_ch, out_ch, (3, 1, 1), padding=(2, 0, 0), dilation=(2, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class UpConv(nn.Module):
    """Bilinear x2 upsampling (``align_corners=True``, as the reference) followed by a 3x3 conv."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))


class SecondOrderDeformableAlignment(nn.Module):
    """Modulated deformable 3x3 conv over [prop_{-1}, prop_{-2}] with offsets/masks predicted from a
    condition [prop_{-1}, current, prop_{-2}]; offsets bounded by ``max_residue * tanh``."""

    def __init__(self, in_ch: int, out_ch: int, deform_groups: int = 16, max_residue: float = 5.0) -> None:
        super().__init__()
        self.max_residue = max_residue
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.conv_offset = nn.Sequential(
            nn.Conv2d(3 * out_ch, out_ch, 3, padding=1), _lrelu(0.1),
            nn.Conv2d(out_ch, out_ch, 3, padding=1), _lrelu(0.1),
            nn.Conv2d(out_ch, out_ch, 3, padding=1), _lrelu(0.1),
            nn.Conv2d(out_ch, 27 * deform_groups, 3, padding=1),
        )
        # Zero offsets/masks at initialisation (training starts from a plain conv).
        nn.init.zeros_(self.conv_offset[-1].weight)
        nn.init.zeros_(self.conv_offset[-1].bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        out = self.conv_offset(cond)
        n = out.shape[1] // 3
        # First two thirds: (dy, dx) pairs per kernel tap and group; last third: modulation masks.
        offset = self.max_residue * torch.tanh(out[:, : 2 * n])
        mask = torch.sigmoid(out[:, 2 * n:])
        return deform_conv2d(x, offset, self.weight, self.bias, padding=(1, 1), mask=mask)


class BidirectionalPropagation(nn.Module):
    """Backward then forward recurrent pass over time; outputs fused by a 1x1 conv plus identity."""

    DIRECTIONS = ("backward_", "forward_")

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.deform_align = nn.ModuleDict()
        self.backbone = nn.ModuleDict()
        for i, name in enumerate(self.DIRECTIONS):
            self.deform_align[name] = SecondOrderDeformableAlignment(2 * channels, channels)
            # The forward pass also sees the backward pass's feature: (2 + i) inputs.
            self.backbone[name] = nn.Sequential(
                nn.Conv2d((2 + i) * channels, channels, 3, padding=1), _lrelu(0.1),
                nn.Conv2d(channels, channels, 3, padding=1))
        self.fusion = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = x.shape
        frames = [x[:, i] for i in range(t)]
        done: dict[str, list[torch.Tensor]] = {}  # per direction, indexed by frame
        for name in self.DIRECTIONS:
            order = range(t - 1, -1, -1) if name == "backward_" else range(t)
            history: list[torch.Tensor] = []  # propagated features in processing order
            prop = x.new_zeros(b, self.channels, h, w)
            for step, idx in enumerate(order):
                current = frames[idx]
                if step > 0:
                    prev2 = history[-2] if step > 1 else torch.zeros_like(prop)
                    cond = torch.cat([prop, current, prev2], 1)
                    prop = self.deform_align[name](torch.cat([prop, prev2], 1), cond)
                others = [done[k][idx] for k in self.DIRECTIONS if k in done]
                prop = prop + self.backbone[name](torch.cat([current, *others, prop], 1))
                history.append(prop)
            done[name] = history[::-1] if name == "backward_" else history
        fused = [self.fusion(torch.cat([done[k][i] for k in self.DIRECTIONS], 1)) for i in range(t)]
        return torch.stack(fused, 1) + x


class EdgeDetection(nn.Module):
    """Training-only edge head (kept so the checkpoint loads strictly)."""

    def __init__(self, in_ch: int = 3, out_ch: int = 1, mid_ch: int = 16) -> None:
        super().__init__()
        self.projection = nn.Sequential(nn.Conv2d(in_ch, mid_ch, 3, padding=1), _lrelu())
        self.mid_layer_1 = nn.Sequential(nn.Conv2d(mid_ch, mid_ch, 3, padding=1), _lrelu())
        self.mid_layer_2 = nn.Sequential(nn.Conv2d(mid_ch, mid_ch, 3, padding=1))
        self.out_layer = nn.Conv2d(mid_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.projection(x)
        edge = self.mid_layer_2(self.mid_layer_1(feat))
        return torch.sigmoid(self.out_layer(F.leaky_relu(feat + edge, 0.01)))


class RecurrentDepthCompleteNet(nn.Module):
    def __init__(self, in_channels: int = 5, out_channels: int = 3) -> None:
        super().__init__()
        self.downsample = nn.Sequential(
            nn.Conv3d(in_channels, 32, (1, 5, 5), stride=(1, 2, 2), padding=(0, 2, 2),
                      padding_mode="replicate"),
            _lrelu())
        self.encoder1 = nn.Sequential(P3DBlock(32, 32, 1), _lrelu(), P3DBlock(32, 64, 2), _lrelu())
        self.encoder2 = nn.Sequential(P3DBlock(64, 64, 1), _lrelu(), P3DBlock(64, 128, 2), _lrelu())
        self.mid_dilation = nn.Sequential(*[
            layer for d in (3, 2, 1)
            for layer in (nn.Conv3d(128, 128, (1, 3, 3), padding=(0, d, d), dilation=(1, d, d)), _lrelu())])
        self.feat_prop_module = BidirectionalPropagation(128)
        self.decoder2 = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), _lrelu(), UpConv(128, 64), _lrelu())
        self.decoder1 = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), _lrelu(), UpConv(64, 32), _lrelu())
        self.upsample = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), _lrelu(), UpConv(32, out_channels))
        self.edgeDetector = EdgeDetection(out_channels, 1, 16)

    def forward(self, depth: torch.Tensor, hole_mask: torch.Tensor,
                shape: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``depth`` [b, t, 3, h, w] in 0..1, ``hole_mask`` and ``shape`` [b, t, 1, h, w] in {0, 1}.

        Returns the raw prediction [b, t, 3, h, w] (composite it into the holes yourself) and, in training
        mode only, edge maps [b, t, 1, h, w].
        """
        b, t, _, h, w = depth.shape
        if h % 8 or w % 8:
            raise ValueError(f"depth refinement needs H and W divisible by 8, got {h}x{w}")
        inputs = torch.cat([depth * (1 - hole_mask), hole_mask, shape], 2).permute(0, 2, 1, 3, 4)
        x = self.downsample(inputs)  # 1/2
        feat_e1 = self.encoder1(x)  # 1/4
        feat_mid = self.mid_dilation(self.encoder2(feat_e1))  # 1/8
        feat = self.feat_prop_module(feat_mid.permute(0, 2, 1, 3, 4))
        feat = feat.reshape(b * t, 128, h // 8, w // 8)
        skip = feat_e1.permute(0, 2, 1, 3, 4).reshape(b * t, 64, h // 4, w // 4)
        pred = self.upsample(self.decoder1(self.decoder2(feat) + skip))
        edge = self.edgeDetector(pred).view(b, t, 1, h, w) if self.training else None
        return pred.view(b, t, -1, h, w), edge


def load_depthnet(path: str | None, device: str = "cpu") -> RecurrentDepthCompleteNet:
    """``RecurrentDepthCompleteNet(5, 3)`` with ``50000.ckpt`` (plain state dict) loaded strictly, eval."""
    model = RecurrentDepthCompleteNet(5, 3)
    if path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model.to(device).eval()
