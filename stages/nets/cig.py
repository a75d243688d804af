"""Conditional image-to-video generator (spec section 4): I2VGen-XL + SD-1.5 depth ControlNet + Ctrl-Adapter.

Per denoising step: the CFG pair of latents (negative prompt first) is flattened to images, the ControlNet
turns them and the depth frames into 12 + 1 residuals (in micro-batches), Ctrl-Adapter adapts them
(timestep + positive CLIP image embedding) and hooks add them to the unmodified diffusers ``I2VGenXLUNet``
(see ``ctrl_adapter.ResidualInjector``); DDIM (v-prediction, zero-terminal-SNR) steps the guided prediction.

Reference-exact on one 512x512 window (``tests/test_cig_pipeline_parity.py``: same seeded draws, steps within
1e-4, frames within 1 grey level). Beyond the reference: any canvas that is a multiple of 64 (the reference
runs only at 512x512), any clip length through overlapping windows (window k is conditioned on the output
frame where it starts; overlapping frames are cross-faded), seeded VAE noise (the reference draws it from the
unseeded global RNG), and lower memory: SDPA attention, bf16/fp16 weights, ControlNet micro-batches, the
adapter per CFG half, optional sequential CFG halves in the UNet, chunked VAE decoding, optional CPU offload.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import nn

from stages.nets.cig_load import CIG, DTYPES, SCHEDULER_SETTINGS, SUBFOLDERS, load_cig  # noqa: F401 (re-exported)

# ---- recording (tests compare the draws and every step with the reference) ---------------------------------

_RECORDER: ContextVar[dict[str, list[np.ndarray]] | None] = ContextVar("cig_recorder", default=None)


@contextlib.contextmanager
def recording() -> Iterator[dict[str, list[np.ndarray]]]:
    """Record (this thread) per window ``initial_latents``, ``vae_noise``, ``image_latents``, ``frames`` and per
    step ``v_guided``, ``latents`` (after the step), as float32 arrays in call order. Free when unused."""
    record: dict[str, list[np.ndarray]] = defaultdict(list)
    token = _RECORDER.set(record)
    try:
        yield record
    finally:
        _RECORDER.reset(token)


def _note(name: str, value: torch.Tensor | np.ndarray) -> None:
    record = _RECORDER.get()
    if record is not None:
        arr = value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else np.array(value)
        record[name].append(arr)


def vae_noise_seed(params: Any) -> int:
    """The seed of the VAE posterior noise: ``vae_noise_seed``, else ``seed + 1`` (its own stream, so the
    initial latents stay the first draw of the ``seed`` stream, as in the reference)."""
    explicit = getattr(params, "vae_noise_seed", None)
    return int(params.seed) + 1 if explicit is None else int(explicit)


@dataclass(frozen=True)
class StepOptions:
    """What one guided model evaluation needs besides tensors."""

    guidance_scale: float = 9.0
    controlnet_scale: float = 1.0
    controlnet_batch: int = 8  # ControlNet images per forward (micro-batch)
    split_cfg: bool = False  # UNet on the CFG halves one after the other (less activation memory)
    # Where the ControlNet's scale is 0: "none" = no control branch; "reference" = the adapter's mid output
    # for zero residuals is still added (StableV2V adds it, and drops only the down residuals).
    zero_control: str = "none"

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0


def _opt(params: Any, name: str, default: Any) -> Any:
    value = getattr(params, name, None)
    return default if value is None else value


def step_options(params: Any) -> StepOptions:
    return StepOptions(float(params.guidance_scale), float(params.controlnet_scale),
                       int(_opt(params, "controlnet_batch", 8)), bool(_opt(params, "split_cfg", False)),
                       str(_opt(params, "zero_control", "none")))


@dataclass
class WindowCond:
    """Conditioning tensors of one window, on the device (batch rows: negative first, then positive)."""

    prompt_embeds: torch.Tensor  # [B, L, D] I2VGen-XL text (penultimate CLIP layer)
    cn_prompt_embeds: torch.Tensor  # [B, L, D'] SD-1.5 text (last layer)
    image_latents: torch.Tensor  # [1, 4, F, h, w] first-frame latent + position frames
    image_embeds: torch.Tensor  # [1, 1, D] positive CLIP image embedding
    control: torch.Tensor  # [F, 3, 8h, 8w] depth in 0..1
    fps: int


@contextlib.contextmanager
def _placed(cig: CIG, offload: bool, *modules: nn.Module) -> Iterator[None]:
    """Modules on the device for the block; with ``offload`` they go back to the CPU afterwards."""
    for m in modules:
        m.to(cig.device)
    try:
        yield
    finally:
        if offload and cig.device.type != "cpu":
            for m in modules:
                m.to("cpu")
            torch.cuda.empty_cache()


# ---- one guided model evaluation --------------------------------------------------------------------------


def control_residuals(cig: CIG, x: torch.Tensor, t: torch.Tensor, cond: WindowCond,
                      opts: StepOptions) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """ControlNet (micro-batched over the B*F images) then Ctrl-Adapter (one clip at a time).

    Returns residuals ``[B*F, C, h, w]`` with frames batch-major, as the UNet holds its features.
    """
    b, c, f, h, w = x.shape
    images = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    control = cond.control.repeat(b, 1, 1, 1)
    text = cond.cn_prompt_embeds.repeat_interleave(f, dim=0)
    downs: list[list[torch.Tensor]] = []
    mids: list[torch.Tensor] = []
    step = max(1, opts.controlnet_batch)
    for s in range(0, b * f, step):
        d, m = cig.controlnet(images[s:s + step], t, encoder_hidden_states=text[s:s + step],
                              controlnet_cond=control[s:s + step], conditioning_scale=opts.controlnet_scale,
                              return_dict=False)
        downs.append(list(d))
        mids.append(m)
    down = [torch.cat(parts) for parts in zip(*downs, strict=True)]
    mid = torch.cat(mids)
    del downs, mids
    # Each clip is adapted on its own (the adapter never mixes clips): halves the adapter's peak memory.
    out_down: list[list[torch.Tensor]] = [[] for _ in down]
    out_mid: list[torch.Tensor] = []
    for k in range(b):
        rows = slice(k * f, (k + 1) * f)
        ad, am = cig.adapter(down_block_res_samples=[r[rows] for r in down], mid_block_res_sample=mid[rows],
                             num_frames=f, timestep=t, encoder_hidden_states=cond.image_embeds)
        for acc, r in zip(out_down, ad, strict=True):
            acc.append(r)
        if am is not None:
            out_mid.append(am)
    return [torch.cat(parts) for parts in out_down], (torch.cat(out_mid) if out_mid else None)


def zero_control_mid(cig: CIG, x: torch.Tensor, t: torch.Tensor, cond: WindowCond) -> torch.Tensor | None:
    """The reference at ControlNet scale 0: the adapter's mid output for zero residuals, ``[B*F, C, h', w']``."""
    n, _, f, h, w = x.shape
    scale = 2 ** (len(cig.unet.config.block_out_channels) - 1)  # the mid block's resolution
    mid = cig.adapter.mid_for_zero_input(f, (h // scale, w // scale), t.to(x.device), cond.image_embeds)
    return None if mid is None else mid.repeat(n, 1, 1, 1)  # the same for every CFG half


def guided_prediction(cig: CIG, latents: torch.Tensor, t: torch.Tensor, cond: WindowCond,
                      opts: StepOptions, control_on: bool) -> torch.Tensor:
    """Classifier-free-guided v-prediction for latents ``[1, 4, F, h, w]``; ``control_on`` False: the
    ControlNet's scale is 0 at this step (see ``StepOptions.zero_control``)."""
    n = 2 if opts.cfg else 1
    x = latents.repeat(n, 1, 1, 1, 1)
    f = x.shape[2]
    pos = cond.image_embeds.reshape(1, 1, -1)
    image_embeds = torch.cat([torch.zeros_like(pos), pos]) if opts.cfg else pos
    image_latents = cond.image_latents.repeat(n, 1, 1, 1, 1)
    fps = torch.full((n,), cond.fps, device=x.device, dtype=torch.long)
    down = mid = None
    if control_on:
        down, mid = control_residuals(cig, x, t, cond, opts)
    elif opts.zero_control == "reference":
        mid = zero_control_mid(cig, x, t, cond)
    groups = [slice(k, k + 1) for k in range(n)] if opts.split_cfg else [slice(0, n)]
    preds = []
    for g in groups:
        rows = slice(g.start * f, g.stop * f)
        with cig.injector.active(None if down is None else [r[rows] for r in down],
                                 None if mid is None else mid[rows]):
            preds.append(cig.unet(x[g], t, fps=fps[g], image_latents=image_latents[g],
                                  image_embeddings=image_embeds[g],
                                  encoder_hidden_states=cond.prompt_embeds[g], return_dict=False)[0])
    pred = torch.cat(preds)
    if not opts.cfg:
        return pred
    uncond, text = pred.chunk(2)
    return uncond + opts.guidance_scale * (text - uncond)


def control_keep(steps: int, start: float, end: float) -> list[bool]:
    """Steps where the ControlNet branch is on (the reference's ``controlnet_keep`` rule)."""
    return [not (i / steps < start or (i + 1) / steps > end) for i in range(steps)]


def denoise(cig: CIG, latents: torch.Tensor, cond: WindowCond, opts: StepOptions, steps: int,
            start: float = 0.0, end: float = 1.0) -> torch.Tensor:
    """DDIM (eta 0) from noise ``latents`` over ``steps`` steps; ControlNet scale 0 outside [start, end].

    By default a scale of 0 (``controlnet_scale`` 0, or a step outside the control window) switches the whole
    control branch off; ``opts.zero_control == "reference"`` adds the adapter's mid output as StableV2V does.
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(cig.scheduler_config)
    scheduler.set_timesteps(steps, device=latents.device)
    keep = [k and opts.controlnet_scale > 0 for k in control_keep(len(scheduler.timesteps), start, end)]
    for i, t in enumerate(scheduler.timesteps):
        v = guided_prediction(cig, scheduler.scale_model_input(latents, t), t, cond, opts, keep[i])
        latents = scheduler.step(v, t, latents, eta=0.0).prev_sample
        _note("v_guided", v)
        _note("latents", latents)
    return latents


# ---- conditioning ------------------------------------------------------------------------------------------


def _encode_text(encoder: Any, tokenizer: Any, prompts: list[str], device: torch.device,
                 penultimate: bool) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    if not penultimate:
        return encoder(ids)[0]
    # clip_skip=1 as the reference: penultimate layer, then the final LayerNorm.
    hidden = encoder(ids, output_hidden_states=True).hidden_states[-2]
    return getattr(encoder, "text_model", encoder).final_layer_norm(hidden)  # transformers 4 / 5 layouts


def _clip_pixels(cig: CIG, frame: np.ndarray) -> torch.Tensor:
    """Centre square crop resized to the CLIP input size, normalised (the reference's CLIP image path)."""
    h, w = frame.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = cig.feature_extractor.crop_size  # int, dict or (transformers 5) SizeDict
    if isinstance(crop, int):
        size = (crop, crop)
    else:
        size = tuple(int(crop[k] if isinstance(crop, dict) else getattr(crop, k))
                     for k in ("width", "height"))
    img = Image.fromarray(frame[top:top + side, left:left + side]).resize(size, Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    mean = np.asarray(cig.feature_extractor.image_mean, np.float32)
    std = np.asarray(cig.feature_extractor.image_std, np.float32)
    return torch.from_numpy(((arr - mean) / std).transpose(2, 0, 1)[None])


def _image_conditioning(cig: CIG, frame: np.ndarray, n_frames: int, gen: torch.Generator, dtype: torch.dtype,
                        offload: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive CLIP image embedding [1,1,D] and image latents [1,4,F,h,w] (frame 0 + k/(F-1) planes);
    the VAE posterior noise is drawn from ``gen``."""
    with _placed(cig, offload, cig.image_encoder):
        pixels = _clip_pixels(cig, frame).to(cig.device, dtype)
        embeds = cig.image_encoder(pixels).image_embeds[:, None]
    with _placed(cig, offload, cig.vae):
        # /255*2-1 in this order, as diffusers' image processor (bit-identical VAE input)
        x = torch.from_numpy(frame.astype(np.float32) / np.float32(255.0)).permute(2, 0, 1)[None]
        dist = cig.vae.encode(2.0 * x.to(cig.device) - 1.0).latent_dist
        # latent_dist.sample(gen), spelled out so the noise can be recorded
        noise = randn_tensor(dist.mean.shape, generator=gen, device=dist.mean.device, dtype=dist.mean.dtype)
        lat = (dist.mean + dist.std * noise) * cig.vae.config.scaling_factor
    _note("vae_noise", noise)
    lat = lat[:, :, None].to(dtype)
    planes = [torch.full_like(lat, (k + 1) / (n_frames - 1)) for k in range(n_frames - 1)]
    return embeds.to(dtype), torch.cat([lat, *planes], dim=2)


def _decode(cig: CIG, latents: torch.Tensor, chunk: int, offload: bool) -> np.ndarray:
    """Latents [1,4,F,h,w] -> uint8 frames [F,H,W,3], ``chunk`` frames per VAE call."""
    flat = 1 / cig.vae.config.scaling_factor * latents[0].permute(1, 0, 2, 3).float()  # as the reference
    out = []
    with _placed(cig, offload, cig.vae):
        for s in range(0, flat.shape[0], max(1, chunk)):
            img = cig.vae.decode(flat[s:s + chunk]).sample
            img = ((img / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            out.append(img.permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


# ---- the whole clip ----------------------------------------------------------------------------------------


def window_starts(n: int, window: int, overlap: int) -> list[int]:
    """First frame of each window: stride ``window - overlap``, the last window ends at frame ``n``."""
    if window <= 0 or n <= window:
        return [0]
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, window), got {overlap} with window {window}")
    starts = [0]
    while starts[-1] + window < n:
        starts.append(min(starts[-1] + window - overlap, n - window))
    return starts


def _cast(cig: CIG, dtype: torch.dtype) -> None:
    for m in (*cig.denoisers(), cig.text_encoder, cig.image_encoder, cig.cn_text_encoder):
        if next(m.parameters()).dtype != dtype:
            m.to(dtype)


@torch.no_grad()
def cig_generate(cig: CIG, edited_frame: np.ndarray, refined_depth: np.ndarray, params: Any) -> np.ndarray:
    """Generate ``[N, H, W, 3]`` uint8 frames from the edited first frame and the depth sequence (0..1)."""
    n, h, w = refined_depth.shape
    if edited_frame.shape != (h, w, 3) or edited_frame.dtype != np.uint8:
        raise ValueError(f"edited frame {edited_frame.shape} {edited_frame.dtype} does not match the depth "
                         f"canvas {(h, w)} (uint8 [H, W, 3] expected)")
    if h % 64 or w % 64:
        raise ValueError(f"canvas {h}x{w} must be a multiple of 64 (VAE factor 8 x three UNet downsamplings)")
    depth = np.nan_to_num(refined_depth.astype(np.float32))
    if depth.min() < -0.01 or depth.max() > 1.01:
        raise ValueError(f"refined depth must lie in 0..1, got {depth.min():.3g}..{depth.max():.3g}")
    # The 8-bit grid of the reference's depth PNGs (what the depth ControlNet was trained on): a float16 depth
    # of k/255 becomes exactly the reference's control value k/255.
    depth = np.round(np.clip(depth, 0.0, 1.0) * 255.0).astype(np.float32) / np.float32(255.0)
    dtype, offload = DTYPES[params.dtype], bool(params.cpu_offload)
    opts = step_options(params)
    _cast(cig, dtype)
    # Two CPU streams: the initial latents are the first draws of ``seed``'s (the reference's generator,
    # seed 0 included); the VAE posterior noise has its own (the reference's comes from the global RNG).
    gen = torch.Generator("cpu").manual_seed(int(params.seed))
    vae_gen = torch.Generator("cpu").manual_seed(vae_noise_seed(params))
    prompts = ([params.negative_prompt or ""] if opts.cfg else []) + [params.prompt]
    with _placed(cig, offload, cig.text_encoder, cig.cn_text_encoder):
        text = _encode_text(cig.text_encoder, cig.tokenizer, prompts, cig.device, True)
        cn_text = _encode_text(cig.cn_text_encoder, cig.cn_tokenizer, prompts, cig.device, False)
    window, overlap = int(params.window), int(params.overlap)
    out = np.zeros((n, h, w, 3), np.uint8)
    done = 0
    for s in window_starts(n, window, overlap):
        e = n if window <= 0 else min(n, s + window)
        first = edited_frame if s == 0 else out[s]
        embeds, image_latents = _image_conditioning(cig, first, e - s, vae_gen, dtype, offload)
        _note("image_latents", image_latents)
        control = torch.from_numpy(depth[s:e, None]).expand(-1, 3, -1, -1).to(cig.device, dtype)
        lat_h, lat_w = image_latents.shape[-2:]
        if control.shape[-2:] != (8 * lat_h, 8 * lat_w):  # pool to the actual latent size (not to 512)
            control = F.adaptive_avg_pool2d(control, (8 * lat_h, 8 * lat_w))
        cond = WindowCond(text, cn_text, image_latents, embeds, control, int(params.fps))
        noise = randn_tensor((1, 4, e - s, lat_h, lat_w), generator=gen, device=cig.device, dtype=dtype)
        _note("initial_latents", noise)
        with _placed(cig, offload, *cig.denoisers()):
            latents = denoise(cig, noise, cond, opts, int(params.steps),
                              float(params.control_guidance_start), float(params.control_guidance_end))
        frames = _decode(cig, latents, int(_opt(params, "decode_chunk", 4)), offload)
        _note("frames", frames)
        # Cross-fade the frames this window shares with the previous one (weight 0 on the shared first
        # frame, which conditioned this window), then append the rest.
        shared = done - s
        for j in range(shared):
            a = j / shared
            out[s + j] = np.round((1 - a) * out[s + j] + a * frames[j]).astype(np.uint8)
        out[done:e] = frames[shared:]
        done = e
    return out
