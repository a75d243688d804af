"""CIG on a GPU: peak memory and seconds per denoising step at 16 x 512^2 with CFG (bf16, SDPA).

Builds the real-size I2VGen-XL UNet, SD-1.5 depth ControlNet, Ctrl-Adapter (i2vgenxl_depth layout) and SD VAE
from configs written below, with random weights (no downloads), and runs the project's own denoising code
(``stages.nets.cig.denoise``) on random conditioning tensors. Rows: the memory options one at a time.
Text/image encoders are not built (they run once per window, before the loop); their bf16 weight size is
estimated from their configs so the effect of ``cpu_offload`` (encoders off the GPU while denoising) shows.

Run:  python bench/cig_gpu.py [--frames 16 --size 512 --steps 3] [--reference-attn]
      python bench/cig_gpu.py --tiny      # CPU: construct tiny models and run one step (no figures)
      python bench/cig_gpu.py --e2e --parity   # the issue-14 GPU rows, see below
Without a CUDA GPU (and without --tiny) it prints a message and exits 0.

``--e2e``: one whole video through ``cig_generate`` (text + CLIP image encoders, VAE encode, 50 DDIM steps,
decode) at 16 x 512^2 with the stage's defaults (bf16, CFG 9, ControlNet micro-batch 8, decode chunk 4), all
networks at full size with random weights and a byte-level stand-in tokenizer: seconds per video (a warm
second run) and peak GPU memory. ``--parity``: the reference parity fixture (``tests/data/cig-pipeline``)
through ``Stage.run`` on the GPU in fp32 (TF32 off), bf16 and fp16: max differences of the per-step latents
and of the frames against the reference's float32 run, to state the bf16/fp16 tolerances from.

Measured once on an NVIDIA H200 (torch 2.11, diffusers 0.42.1, 3 timed steps per row): 0.37 s/step and
8.4 GB peak with everything batched, 7.6 GB with ``split_cfg`` (0.41 s/step); +2.2 GB if the encoders stay
resident (no ``cpu_offload``); VAE decode of 16 frames peaks at 6.5 / 9.5 / 22.4 GB for chunks 1 / 4 / 16.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CROSS = ("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",)
UNET = dict(  # ali-vilab/i2vgen-xl unet/config.json
    sample_size=32, in_channels=4, out_channels=4, down_block_types=CROSS,
    up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3, block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2, norm_num_groups=32, cross_attention_dim=1024, attention_head_dim=64,
    num_attention_heads=64)
CONTROLNET = dict(  # lllyasviel/control_v11f1p_sd15_depth (SD-1.5 ControlNet)
    in_channels=4, conditioning_channels=3, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8, norm_num_groups=32, conditioning_embedding_out_channels=(16, 32, 96, 256))
VAE = dict(  # SD / I2VGen-XL VAE
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=4, norm_num_groups=32, scaling_factor=0.18215)
ADAPTER = dict(  # Ctrl-Adapter i2vgenxl_depth (tests/data/parity/README.md, B5)
    backbone_model_name="i2vgenxl", num_blocks=1, num_frames=16, num_adapters_per_location=3,
    cross_attention_dim=1024, add_spatial_resnet=True, add_temporal_resnet=True, add_spatial_transformer=True,
    add_temporal_transformer=True, add_adapter_location_A=True, add_adapter_location_B=True,
    add_adapter_location_C=True, add_adapter_location_D=True, add_adapter_location_M=True)
# Encoders (weights only, on the meta device): OpenCLIP ViT-H text (23 layers as in SD 2.x / I2VGen-XL),
# CLIP ViT-H/14 vision with projection, SD-1.5 CLIP ViT-L text.
TEXT_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
              projection_dim=1024, vocab_size=49408)
VISION_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                image_size=224, patch_size=14, projection_dim=1024)
TEXT_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              vocab_size=49408)


def tiny_configs() -> tuple[dict, dict, dict, dict]:
    unet = dict(UNET, block_out_channels=(32, 32, 64, 64), attention_head_dim=8, cross_attention_dim=32)
    cn = dict(CONTROLNET, block_out_channels=(32, 32, 64, 64), cross_attention_dim=24,
              conditioning_embedding_out_channels=(8, 16, 16, 32))
    vae = dict(VAE, block_out_channels=(8, 8, 16, 16), norm_num_groups=8, layers_per_block=1)
    adapter = dict(ADAPTER, cross_attention_dim=32, down_channels=[32] * 7 + [64] * 5, mid_channels=64,
                   attention_head_dim=16, inner_heads=2)
    return unet, cn, vae, adapter


def build(device, dtype, tiny: bool):
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, I2VGenXLUNet

    from stages.nets.cig import CIG, SCHEDULER_SETTINGS
    from stages.nets.ctrl_adapter import CtrlAdapter, CtrlAdapterConfig

    unet_cfg, cn_cfg, vae_cfg, ad_cfg = tiny_configs() if tiny else (UNET, CONTROLNET, VAE, ADAPTER)
    torch.manual_seed(0)
    with torch.device(device):  # random init straight on the device (fast), then cast
        unet = I2VGenXLUNet(**unet_cfg).to(dtype)
        controlnet = ControlNetModel(**cn_cfg).to(dtype)
        # .to(device) too: AlphaBlender makes its mix_factor with torch.Tensor(), which ignores the context
        adapter = CtrlAdapter(CtrlAdapterConfig.from_dict(ad_cfg)).to(device, dtype)
        vae = AutoencoderKL(**vae_cfg)
    nets = [m.eval().requires_grad_(False) for m in (unet, controlnet, adapter, vae)]
    return CIG(*nets[:3], vae=nets[3], text_encoder=None, tokenizer=None, image_encoder=None,
               feature_extractor=None, cn_text_encoder=None, cn_tokenizer=None,
               scheduler_config=dict(SCHEDULER_SETTINGS, set_alpha_to_one=True), device=torch.device(device))


def encoder_weight_gb(bytes_per_value: int = 2) -> float:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        models = [CLIPTextModel(CLIPTextConfig(**TEXT_H)), CLIPTextModel(CLIPTextConfig(**TEXT_L)),
                  CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION_H))]
    return sum(p.numel() for m in models for p in m.parameters()) * bytes_per_value / 1e9


def weight_gb(module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 1e9


def conditioning(cig, frames: int, size: int, dtype, tiny: bool):
    import torch

    from stages.nets.cig import WindowCond

    g = torch.Generator().manual_seed(0)
    dev = cig.device
    d_text, d_cn = (32, 24) if tiny else (1024, 768)
    lat = size // 8

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dev, dtype)

    cond = WindowCond(prompt_embeds=r(2, 77, d_text), cn_prompt_embeds=r(2, 77, d_cn),
                      image_latents=r(1, 4, frames, lat, lat), image_embeds=r(1, 1, d_text),
                      control=torch.rand(frames, 3, size, size, generator=g).to(dev, dtype), fps=16)
    return cond, r(1, 4, frames, lat, lat)


def measure(fn, cuda: bool) -> tuple[float, float, float]:
    """(seconds, peak allocated GB, peak reserved GB) of ``fn()``."""
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - start
    if not cuda:
        return secs, float("nan"), float("nan")
    return secs, torch.cuda.max_memory_allocated() / 1e9, torch.cuda.max_memory_reserved() / 1e9


def build_e2e(device: str, tiny: bool):
    """``build`` plus the encoders, tokenizers (byte-level stand-ins) and CLIP image processor."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cig = build(device, dtype, tiny)
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2 byte alphabet, no merges (offline)
    extra = iter(range(256, 512))
    chars = [chr(b) if b in keep else chr(next(extra)) for b in range(256)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c + s: 0 for s in ("", "</w>") for c in chars}}
    vocab = {k: i for i, k in enumerate(vocab)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    tiny_text = dict(vocab_size=514, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    text_h = dict(tiny_text, hidden_size=32) if tiny else TEXT_H
    text_l = dict(tiny_text, hidden_size=24) if tiny else TEXT_L
    vision = (dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                   patch_size=8, projection_dim=32) if tiny else VISION_H)
    with torch.device(device):
        cig.text_encoder = CLIPTextModel(CLIPTextConfig(**text_h, **ids)).to(dtype).eval()
        cig.cn_text_encoder = CLIPTextModel(CLIPTextConfig(**text_l, **ids)).to(dtype).eval()
        cig.image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision)).to(dtype).eval()
    cig.tokenizer = cig.cn_tokenizer = tokenizer
    side = vision["image_size"]
    cig.feature_extractor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return cig


def end_to_end(args, cuda: bool) -> None:
    import numpy as np

    from stages.generate import GenerateParams
    from stages.nets.cig import cig_generate

    frames, size, steps = (4, 64, 2) if args.tiny else (args.frames, args.size, 50)
    cig = build_e2e("cuda" if cuda else "cpu", args.tiny)
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    depth = np.repeat(np.linspace(0, 1, size, dtype=np.float16)[None, :, None], frames, 0).repeat(size, 2)
    params = GenerateParams(prompt="an elephant walking on the rocks in a zoo", steps=steps, window=frames,
                            overlap=min(4, frames - 1), dtype="bf16" if cuda else "fp32")
    rows = []
    for run in ("first (kernel selection)", "second"):
        secs, alloc, reserved = measure(lambda: cig_generate(cig, frame, depth, params), cuda)
        rows.append((run, secs, alloc, reserved))
    print(f"\nend to end: cig_generate, {frames} frames x {size}^2, {steps} DDIM steps, {params.dtype}, CFG 9, "
          f"ControlNet micro-batch {params.controlnet_batch}, decode chunk {params.decode_chunk}, no offload")
    print(f"{'run':28s} {'s/video':>8s} {'peak GB':>8s} {'reserved':>9s}")
    for run, secs, alloc, reserved in rows:
        print(f"{run:28s} {secs:8.1f} {alloc:8.2f} {reserved:9.2f}")


def parity(args, cuda: bool) -> None:
    import numpy as np
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from test_cig_pipeline_parity import DATA, PARAMS, fixture_inputs

    from stages.generate import STAGE
    from stages.nets import cig as cig_mod

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if cuda else "cpu"
    with np.load(DATA / "reference.npz") as ref:
        expected = {k: ref[k] for k in ref.files}
    print(f"\nparity with the reference (tests/data/cig-pipeline, float32 reference run) on {device}")
    print(f"{'dtype':6s} {'lat0':>9s} {'lat1':>9s} {'lat2':>9s} {'frames max':>10s} {'mean':>7s} {'% differ':>9s}")
    for dtype in (("fp32",) if args.tiny else ("fp32", "bf16", "fp16")):
        with cig_mod.recording() as rec:
            video = STAGE.run(fixture_inputs(), {**PARAMS, "dtype": dtype}, backend="i2vgenxl",
                              weights=str(DATA), device=device)["video"]
        lat = [float(np.abs(rec["latents"][k] - expected[f"step{k}_latents"]).max()) for k in range(3)]
        diff = np.abs(video.astype(np.int16) - expected["frames_uint8"])
        print(f"{dtype:6s} {lat[0]:9.2e} {lat[1]:9.2e} {lat[2]:9.2e} {int(diff.max()):10d} "
              f"{diff.mean():7.3f} {100 * (diff > 0).mean():9.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU: construction check only")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3, help="timed denoising steps per row (after 1 warm-up)")
    ap.add_argument("--reference-attn", action="store_true",
                    help="add a row with materialised attention (what torch 1.13 gave the reference)")
    ap.add_argument("--e2e", action="store_true", help="one whole video through cig_generate (50 steps)")
    ap.add_argument("--parity", action="store_true", help="the reference fixture in fp32/bf16/fp16")
    args = ap.parse_args()
    import torch
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        print("cig_gpu: no CUDA GPU here, nothing to measure (use --tiny to check construction on the CPU)")
        return 0
    if args.e2e or args.parity:
        name = torch.cuda.get_device_name(0) if cuda else "cpu (tiny models)"
        print(f"device: {name}; torch {torch.__version__}")
        if args.e2e:
            end_to_end(args, cuda)
        if args.parity:
            parity(args, cuda)
        return 0
    from stages.nets.cig import StepOptions, _decode, denoise

    if args.tiny:
        args.frames, args.size, args.steps = min(args.frames, 4), 64, 1
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.perf_counter()
    cig = build(device, dtype, args.tiny)
    name = torch.cuda.get_device_name(0) if cuda else "cpu (tiny models)"
    print(f"device: {name}; torch {torch.__version__}; built in {time.perf_counter() - t0:.1f} s")
    print("weights GB: " + ", ".join(f"{n} {weight_gb(m):.2f}" for n, m in
                                     (("unet", cig.unet), ("controlnet", cig.controlnet),
                                      ("adapter", cig.adapter), ("vae(fp32)", cig.vae))))
    enc = 0.0 if args.tiny else encoder_weight_gb()
    if enc:
        print(f"text+image encoders (bf16, estimated from configs, not built): {enc:.2f} GB")
    cond, noise = conditioning(cig, args.frames, args.size, dtype, args.tiny)
    base = StepOptions(guidance_scale=9.0, controlnet_scale=1.0, controlnet_batch=2 * args.frames)
    rows = [("CN all 2F images at once, CFG batched", base),
            ("CN micro-batch 8", replace(base, controlnet_batch=8)),
            ("CN micro-batch 8 + split CFG", replace(base, controlnet_batch=8, split_cfg=True)),
            ("CN micro-batch 4 + split CFG", replace(base, controlnet_batch=4, split_cfg=True))]
    results = []
    with torch.no_grad():
        for name, opts in rows:
            denoise(cig, noise, cond, opts, 1)  # warm-up (kernel selection, allocator)
            secs, alloc, reserved = measure(lambda o=opts: denoise(cig, noise, cond, o, args.steps), cuda)
            results.append((name, secs / args.steps, alloc, reserved))
        if args.reference_attn and cuda:
            from diffusers.models.attention_processor import AttnProcessor

            for net in (cig.unet, cig.controlnet):
                net.set_attn_processor(AttnProcessor())
            try:
                secs, alloc, reserved = measure(lambda: denoise(cig, noise, cond, base, 1), cuda)
                results.append(("materialised attention (reference-like)", secs, alloc, reserved))
            except torch.OutOfMemoryError:
                results.append(("materialised attention (reference-like)", float("nan"), float("inf"), 0.0))
            torch.cuda.empty_cache()
        latents = noise.to(dtype)
        for chunk in (1, 4, args.frames):
            secs, alloc, reserved = measure(lambda c=chunk: _decode(cig, latents, c, False), cuda)
            results.append((f"VAE decode {args.frames} frames, chunk {chunk}", secs, alloc, reserved))
    print(f"\n{args.frames} frames x {args.size}^2, CFG, {'bf16' if cuda else 'fp32'}, SDPA; "
          f"s/step = mean of {args.steps} DDIM steps (ControlNet + adapter + UNet)")
    print(f"{'configuration':44s} {'s/step':>8s} {'peak GB':>8s} {'+enc GB':>8s} {'reserved':>9s}")
    for name, secs, alloc, reserved in results:
        with_enc = alloc + enc if not name.startswith("VAE") else float("nan")
        print(f"{name:44s} {secs:8.3f} {alloc:8.2f} {with_enc:8.2f} {reserved:9.2f}")
    print("peak GB: everything the process allocated (all four networks resident, encoders not built);\n"
          "+enc GB: the same with the encoders also resident (no cpu_offload); VAE rows: s per decode.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
