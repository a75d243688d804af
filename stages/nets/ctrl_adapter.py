"""Ctrl-Adapter (Lin et al. 2024) for I2VGen-XL, rebuilt from diffusers building blocks.

Ctrl-Adapter is not part of diffusers. This module rebuilds it so that the published ``i2vgenxl_depth``
checkpoint (1092 tensors, 587M values) loads with ``strict=True``: every sub-module is the diffusers block
whose parameter names the checkpoint uses (``ResnetBlock2D``, ``TemporalResnetBlock``,
``BasicTransformerBlock``, ``TemporalBasicTransformerBlock``, ``AlphaBlender``, ``TimestepEmbedding``); their
key names are the same in diffusers 0.27.2 (what the checkpoint was saved with) and 0.42, so no key mapping is
needed. The forward pass is checked against ``tests/data/parity/ctrl_adapter.npz`` (README section B5).

Layout: one adapter per ControlNet residual (12 down + 1 mid). Each adapter = spatial ResNet -> temporal
ResNet (blended by a learned alpha) -> GroupNorm + linear ``proj_in`` to a fixed width (8 heads x 64 = 512) ->
spatial transformer (self-attn + cross-attn on the CLIP image embedding) -> temporal transformer (attention
over frames, frame-index embedding added first; blended by a learned alpha) -> ``proj_out`` + residual.

:func:`inject_residuals` adds the adapted residuals to an ``I2VGenXLUNet`` through forward hooks on its
up blocks (skip connections) and mid block, so the UNet itself is the unmodified diffusers class.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import AlphaBlender, ResnetBlock2D, TemporalResnetBlock
from diffusers.models.transformers.transformer_temporal import TemporalBasicTransformerBlock
from torch import nn

# Channels of the 12 SD-1.5 ControlNet down residuals, grouped by adapter location A-D (3 per location).
_SD15_DOWN_CHANNELS = (320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280)
# Which residual indices a location adapts, by adapters per location (the reference's selection map).
_LOCATION_SLOTS = {3: (0, 1, 2), 2: (0, 2), 1: (2,)}


@dataclass(frozen=True)
class CtrlAdapterConfig:
    """The published ``config.json`` fields plus three extensions (None = reference behaviour).

    ``down_channels``/``mid_channels`` override the SD-1.5 channel widths (tiny test models);
    ``attention_head_dim``/``inner_heads`` set the transformer width (reference: 64 and 8 -> 512).
    """

    backbone_model_name: str = "i2vgenxl"
    num_blocks: int = 2
    num_frames: int = 8  # training clip length; informational only (any length runs)
    num_adapters_per_location: int = 3
    cross_attention_dim: int | None = None
    adapter_type: str = "spatial_temporal_resnet_transformer"
    add_spatial_resnet: bool = True
    add_temporal_resnet: bool = False
    add_spatial_transformer: bool = True
    add_temporal_transformer: bool = False
    add_adapter_location_A: bool = False
    add_adapter_location_B: bool = False
    add_adapter_location_C: bool = False
    add_adapter_location_D: bool = False
    add_adapter_location_M: bool = False
    num_repeats: int = 1
    out_channels: int | None = None
    down_channels: tuple[int, ...] | None = None
    mid_channels: int | None = None
    attention_head_dim: int = 64
    inner_heads: int = 8
    extra: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, raw: dict) -> CtrlAdapterConfig:
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in raw.items() if k in known}
        if kwargs.get("down_channels") is not None:
            kwargs["down_channels"] = tuple(int(c) for c in kwargs["down_channels"])
        return cls(**kwargs, extra={k: v for k, v in raw.items() if k not in known})

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out["down_channels"] = list(self.down_channels) if self.down_channels else None
        return {"_class_name": "ControlNetAdapter", **out}

    def down_slots(self) -> list[int]:
        """Indices (0..11) of the down residuals that get an adapter, in order."""
        slots: list[int] = []
        chosen = _LOCATION_SLOTS.get(self.num_adapters_per_location, ())
        flags = (self.add_adapter_location_A, self.add_adapter_location_B,
                 self.add_adapter_location_C, self.add_adapter_location_D)
        for loc, on in enumerate(flags):
            if on:
                slots += [3 * loc + s for s in chosen]
        return slots


class AdapterBlock(nn.Module):
    """One adapter (the reference's ``AdapterSpatioTemporal`` with ``up_sampling_scale=1``)."""

    def __init__(self, channels: int, cfg: CtrlAdapterConfig) -> None:
        super().__init__()
        self.num_layers = cfg.num_blocks
        self.spatial_res, self.temporal_res = cfg.add_spatial_resnet, cfg.add_temporal_resnet
        self.spatial_tf, self.temporal_tf = cfg.add_spatial_transformer, cfg.add_temporal_transformer
        heads = channels // cfg.attention_head_dim  # attention width = channels, not inner_dim (quirk)
        inner = cfg.inner_heads * cfg.attention_head_dim
        n = range(self.num_layers)
        if self.spatial_res or self.temporal_res:
            self.resnet_time_proj = Timesteps(channels, True, downscale_freq_shift=0)
            self.resnet_time_embedding = TimestepEmbedding(channels, channels)
        if self.spatial_tf or self.temporal_tf:
            self.norm = nn.GroupNorm(32, channels, eps=1e-6)
            if self.temporal_tf:
                self.transformer_time_embedding = TimestepEmbedding(channels, inner)
                self.transformer_time_proj = Timesteps(channels, True, 0)
            self.proj_in = nn.Linear(channels, inner)
            self.proj_out = nn.Linear(inner, channels)
        # Registration order follows the checkpoint's key order.
        if self.spatial_res:
            self.spatial_resnets = nn.ModuleList(
                ResnetBlock2D(in_channels=channels, out_channels=channels, temb_channels=channels,
                              eps=1e-6, use_in_shortcut=True) for _ in n)
        if self.temporal_res:
            self.temporal_resnets = nn.ModuleList(
                TemporalResnetBlock(channels, channels, channels, eps=1e-6) for _ in n)
        if self.spatial_tf:
            self.spatial_attentions = nn.ModuleList(
                BasicTransformerBlock(inner, heads, cfg.attention_head_dim,
                                      cross_attention_dim=cfg.cross_attention_dim) for _ in n)
        if self.temporal_tf:
            self.temporal_attentions = nn.ModuleList(
                TemporalBasicTransformerBlock(inner, inner, heads, cfg.attention_head_dim,
                                              cross_attention_dim=cfg.cross_attention_dim) for _ in n)
        if self.spatial_res and self.temporal_res:
            self.resnets_time_mixer = nn.ModuleList(AlphaBlender(0.5, "learned_with_images") for _ in n)
        if self.spatial_tf and self.temporal_tf:
            self.transformers_time_mixer = nn.ModuleList(AlphaBlender(0.5, "learned_with_images") for _ in n)

    def forward(self, x: torch.Tensor, num_frames: int, timesteps: torch.Tensor,
                context: torch.Tensor) -> torch.Tensor:
        """``x`` [B*F, C, h, w] (frames batch-major), ``timesteps`` float [B*F], ``context`` [B*F, L, D]."""
        bf, c, _, _ = x.shape
        b, f = bf // num_frames, num_frames
        # Zero indicator: every AlphaBlender weight is sigmoid(mix_factor).
        indicator = x.new_zeros(b, f)
        for i in range(self.num_layers):
            if self.spatial_res or self.temporal_res:
                # Sinusoids are computed in float32 whatever the model dtype (as diffusers' Timesteps does).
                temb = self.resnet_time_embedding(self.resnet_time_proj(timesteps).to(x.dtype))
            if self.spatial_res:
                x = self.spatial_resnets[i](x, temb)
            h, w = x.shape[-2:]
            if self.temporal_res:
                x5 = x.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)
                y5 = self.temporal_resnets[i](x5, temb.reshape(b, f, -1))
                if self.spatial_res:
                    y5 = self.resnets_time_mixer[i](x_spatial=x5, x_temporal=y5,
                                                    image_only_indicator=indicator)
                x = y5.permute(0, 2, 1, 3, 4).reshape(bf, c, h, w)
            if not (self.spatial_tf or self.temporal_tf):
                continue
            residual = x
            y = self.norm(x).permute(0, 2, 3, 1).reshape(bf, h * w, c)
            y = self.proj_in(y)
            if self.spatial_tf:
                y = self.spatial_attentions[i](y, encoder_hidden_states=context)
            if self.temporal_tf:
                y_spatial = y
                frame_ids = torch.arange(f, device=x.device).repeat(b)
                frame_emb = self.transformer_time_embedding(self.transformer_time_proj(frame_ids).to(y.dtype))
                # Temporal cross-attention sees each clip's first-frame context, laid out pixel-major
                # ((h*w) x B rows) exactly as the reference builds it.
                first = context.reshape(b, f, *context.shape[1:])[:, 0]
                time_context = first[None].expand(h * w, *first.shape).reshape(h * w * b, *first.shape[1:])
                y = self.temporal_attentions[i](y + frame_emb[:, None, :], num_frames=f,
                                                encoder_hidden_states=time_context)
                if self.spatial_tf:
                    y = self.transformers_time_mixer[i](x_spatial=y_spatial, x_temporal=y,
                                                        image_only_indicator=indicator)
            y = self.proj_out(y).reshape(bf, h, w, c).permute(0, 3, 1, 2)
            x = y + residual
        return x


class CtrlAdapter(nn.Module):
    """The reference's ``ControlNetAdapter`` (keys ``down_blocks_adapter.*``, ``mid_block_adapter.*``)."""

    def __init__(self, cfg: CtrlAdapterConfig) -> None:
        super().__init__()
        if cfg.backbone_model_name != "i2vgenxl" or cfg.num_repeats != 1:
            raise ValueError("only the I2VGen-XL Ctrl-Adapter layout (num_repeats=1) is supported")
        if cfg.adapter_type != "spatial_temporal_resnet_transformer":
            raise ValueError(f"unsupported adapter_type {cfg.adapter_type!r}")
        self.config = cfg
        all_channels = cfg.down_channels or _SD15_DOWN_CHANNELS
        self.slots = cfg.down_slots()
        self.down_blocks_adapter = nn.ModuleList(AdapterBlock(all_channels[s], cfg) for s in self.slots)
        self.mid_block_adapter = (AdapterBlock(cfg.mid_channels or 1280, cfg)
                                  if cfg.add_adapter_location_M else None)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(
        self,
        down_block_res_samples: Sequence[torch.Tensor],
        mid_block_res_sample: torch.Tensor | None = None,
        sparsity_masking: object = None,
        num_frames: int | None = None,
        timestep: torch.Tensor | int | float | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Adapt ControlNet residuals ``[B*F, C, h, w]``; un-adapted slots come back as zeros."""
        if sparsity_masking is not None:
            raise NotImplementedError("sparse-frame control is not supported")
        if num_frames is None or timestep is None or encoder_hidden_states is None:
            raise ValueError("num_frames, timestep and encoder_hidden_states are required")
        ref = down_block_res_samples[0]
        bf = ref.shape[0]
        if bf % num_frames:
            raise ValueError(f"batch*frames {bf} is not a multiple of num_frames {num_frames}")
        timesteps = torch.as_tensor(timestep, device=ref.device).reshape(-1).to(ref.dtype)
        timesteps = timesteps.expand(bf) if timesteps.numel() == 1 else timesteps
        context = encoder_hidden_states.to(ref.dtype)
        context = context[:, None] if context.dim() == 2 else context
        if context.shape[0] == 1:
            context = context.expand(bf, *context.shape[1:])
        blocks = dict(zip(self.slots, self.down_blocks_adapter, strict=True))
        down_out = [
            blocks[i](r, num_frames, timesteps, context) if i in blocks else torch.zeros_like(r)
            for i, r in enumerate(down_block_res_samples)
        ]
        mid_out = None
        if mid_block_res_sample is not None and self.mid_block_adapter is not None:
            mid_out = self.mid_block_adapter(mid_block_res_sample, num_frames, timesteps, context)
        return down_out, mid_out

    def mid_for_zero_input(self, num_frames: int, size: tuple[int, int], timestep: torch.Tensor,
                           encoder_hidden_states: torch.Tensor) -> torch.Tensor | None:
        """The mid adapter's output ``[F, C, h, w]`` for one clip whose mid residual is all zeros: what the
        reference adds at ControlNet scale 0 (its residuals are then zeros; the down outputs it drops)."""
        if self.mid_block_adapter is None:
            return None
        zeros = torch.zeros(num_frames, self.config.mid_channels or 1280, *size, device=timestep.device,
                            dtype=self.dtype)
        timesteps = timestep.reshape(-1).to(self.dtype).expand(num_frames)
        context = encoder_hidden_states.reshape(1, 1, -1).to(self.dtype).expand(num_frames, 1, -1)
        return self.mid_block_adapter(zeros, num_frames, timesteps, context)


# ---- loading -----------------------------------------------------------------------------------------------


def _read_weights(folder: str) -> dict[str, torch.Tensor]:
    """All tensors of a diffusers-style folder (``*.safetensors`` preferred, else ``*.bin``/``*.pt``)."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if files:
        from safetensors.torch import load_file

        out: dict[str, torch.Tensor] = {}
        for path in files:
            out.update(load_file(path))
        return out
    files = sorted(glob.glob(os.path.join(folder, "*.bin")) + glob.glob(os.path.join(folder, "*.pt*")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors / *.bin weights in {folder}")
    out = {}
    for path in files:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        out.update(obj.get("state_dict", obj) if isinstance(obj, dict) else obj)
    return out


def build_ctrl_adapter(cfg: CtrlAdapterConfig, state_dict: dict[str, torch.Tensor] | None = None,
                       dtype: torch.dtype | None = None) -> CtrlAdapter:
    """Build the adapter; with ``state_dict`` it is constructed on the meta device and the tensors are
    assigned (no 2.35 GB random init, no second copy). Loading is strict: keys and shapes must match."""
    if state_dict is None:
        model = CtrlAdapter(cfg)
    else:
        with torch.device("meta"):
            model = CtrlAdapter(cfg)
        if dtype is not None:
            state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        model.load_state_dict(state_dict, strict=True, assign=True)
    if dtype is not None:
        model.to(dtype)
    return model.eval().requires_grad_(False)


def load_ctrl_adapter(path: str, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None) -> CtrlAdapter:
    """Load a Ctrl-Adapter folder (``config.json`` + weights), e.g. ``ctrl-adapter-i2vgenxl-depth``."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
        cfg = CtrlAdapterConfig.from_dict(json.load(fh))
    return build_ctrl_adapter(cfg, _read_weights(path), dtype).to(device)


def save_ctrl_adapter(model: CtrlAdapter, path: str) -> None:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors``, the layout the loader reads."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(model.config.to_dict(), fh, indent=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(path, "diffusion_pytorch_model.safetensors"))


# ---- residual injection into the (unmodified) diffusers I2VGenXLUNet ---------------------------------------


class ResidualInjector:
    """Adds per-step residuals to an ``I2VGenXLUNet`` via hooks, without forking its forward.

    The UNet collects 12 skip tensors (``down_block_res_samples``) and hands them, last first, to its up
    blocks; the reference adds ControlNet residuals to those skips right after the down pass and the mid
    residual to the mid-block output. A pre-hook on each up block adds the matching residuals to the skips it
    receives (same sums, applied at the point of use) and a hook on the mid block adds the mid residual.
    """

    def __init__(self, unet: nn.Module) -> None:
        self.down: Sequence[torch.Tensor] | None = None
        self.mid: torch.Tensor | None = None
        sizes = [len(block.resnets) for block in unet.up_blocks]
        end = sum(sizes)
        self._slices: list[slice] = []
        for n in sizes:  # up block 0 consumes the last skips
            self._slices.append(slice(end - n, end))
            end -= n
        self._handles = [
            block.register_forward_pre_hook(self._make_up_hook(k), with_kwargs=True)
            for k, block in enumerate(unet.up_blocks)
        ]
        self._handles.append(unet.mid_block.register_forward_hook(self._mid_hook))
        self.num_skips = sum(sizes)

    def _make_up_hook(self, k: int):
        def hook(_module, args, kwargs):
            if self.down is None:
                return None
            skips = kwargs["res_hidden_states_tuple"]
            extra = self.down[self._slices[k]]
            kwargs["res_hidden_states_tuple"] = tuple(s + r.to(s.dtype)
                                                      for s, r in zip(skips, extra, strict=True))
            return args, kwargs

        return hook

    def _mid_hook(self, _module, _args, output):
        return output if self.mid is None else output + self.mid.to(output.dtype)

    @contextlib.contextmanager
    def active(self, down: Sequence[torch.Tensor] | None, mid: torch.Tensor | None) -> Iterator[None]:
        """Residuals ``[B*F, C, h, w]`` (frames batch-major, as the UNet holds them) for one UNet call."""
        if down is not None and len(down) != self.num_skips:
            raise ValueError(f"expected {self.num_skips} down residuals, got {len(down)}")
        self.down, self.mid = down, mid
        try:
            yield
        finally:
            self.down, self.mid = None, None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
