"""Loading the conditional video generator: the four published folders into one :class:`CIG` bundle.

Kept apart from the runner (``stages.nets.cig``): what a weights folder must hold and how its parts are
put together, once per worker (``stages.base.load_model``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stages.nets.ctrl_adapter import CtrlAdapter, ResidualInjector, load_ctrl_adapter

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Spec section 4: the I2VGen-XL hub scheduler settings, enforced whatever the folder's config says.
SCHEDULER_SETTINGS = {
    "prediction_type": "v_prediction", "beta_schedule": "squaredcos_cap_v2", "rescale_betas_zero_snr": True,
    "timestep_spacing": "leading", "steps_offset": 1, "clip_sample": False,
}
SUBFOLDERS = ("i2vgenxl", "controlnet-depth", "ctrl-adapter-i2vgenxl-depth", "stable-diffusion-v1.5")


@dataclass
class CIG:
    """All CIG networks (loaded once per worker) plus the hooks that feed adapter residuals to the UNet."""

    unet: nn.Module
    controlnet: nn.Module
    adapter: CtrlAdapter
    vae: Any
    text_encoder: Any
    tokenizer: Any
    image_encoder: Any
    feature_extractor: Any
    cn_text_encoder: Any
    cn_tokenizer: Any
    scheduler_config: dict
    device: torch.device
    injector: ResidualInjector | None = None

    def __post_init__(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        for net in (self.unet, self.controlnet):  # SDPA everywhere (the reference materialised attention)
            net.set_attn_processor(AttnProcessor2_0())
        if self.injector is None:
            self.injector = ResidualInjector(self.unet)

    def denoisers(self) -> tuple[nn.Module, ...]:
        return (self.unet, self.controlnet, self.adapter)


def load_cig(weights_dir: str, device: str, dtype: str | None = None) -> CIG:
    """Load the StableV2V mirror layout under ``weights_dir`` (local files only, no hub access).

    Weights stay on the CPU until the first call moves them (so ``cpu_offload`` can be chosen per call);
    ``dtype`` is the storage dtype (default bf16 on GPU, fp32 on CPU); calls may cast to another.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, I2VGenXLUNet
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    missing = [s for s in SUBFOLDERS if not os.path.isdir(os.path.join(weights_dir, s))]
    if missing:
        raise FileNotFoundError(f"CIG weights folder {weights_dir!r} lacks {missing} (StableV2V layout)")
    dev = torch.device(device)
    wdt = DTYPES[dtype or ("bf16" if dev.type == "cuda" else "fp32")]
    base, sd15 = (os.path.join(weights_dir, s) for s in ("i2vgenxl", "stable-diffusion-v1.5"))
    local = {"local_files_only": True}
    dlocal = {**local, "low_cpu_mem_usage": False}  # diffusers: no accelerate needed
    eval_ = lambda m: m.eval().requires_grad_(False)  # noqa: E731
    return CIG(
        unet=eval_(I2VGenXLUNet.from_pretrained(base, subfolder="unet", torch_dtype=wdt, **dlocal)),
        controlnet=eval_(ControlNetModel.from_pretrained(os.path.join(weights_dir, "controlnet-depth"),
                                                         torch_dtype=wdt, **dlocal)),
        adapter=load_ctrl_adapter(os.path.join(weights_dir, "ctrl-adapter-i2vgenxl-depth"), dtype=wdt),
        # The VAE always runs in float32: it is small, runs on few frames at a time and fp16 can overflow.
        vae=eval_(AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=torch.float32, **dlocal)),
        text_encoder=eval_(CLIPTextModel.from_pretrained(base, subfolder="text_encoder", dtype=wdt, **local)),
        tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", **local),
        image_encoder=eval_(CLIPVisionModelWithProjection.from_pretrained(base, subfolder="image_encoder",
                                                                          dtype=wdt, **local)),
        feature_extractor=CLIPImageProcessor.from_pretrained(base, subfolder="feature_extractor", **local),
        cn_text_encoder=eval_(CLIPTextModel.from_pretrained(sd15, subfolder="text_encoder", dtype=wdt,
                                                            **local)),
        cn_tokenizer=CLIPTokenizer.from_pretrained(sd15, subfolder="tokenizer", **local),
        scheduler_config={**DDIMScheduler.load_config(base, subfolder="scheduler", **local),
                          **SCHEDULER_SETTINGS},
        device=dev,
    )


# ---- per-call options -------------------------------------------------------------------------------------
