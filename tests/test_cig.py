"""CIG (I2VGen-XL + depth ControlNet + Ctrl-Adapter) end to end on the CPU with tiny random-weight components.

The components are built from configs, saved with ``save_pretrained`` in the StableV2V mirror layout and
loaded back through ``load_cig`` with ``HF_HUB_OFFLINE=1`` (no hub access, local files only).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from stages.nets import cig as cig_mod
from stages.nets.cig import WindowCond, guided_prediction, load_cig, step_options, window_starts
from stages.nets.ctrl_adapter import CtrlAdapter, CtrlAdapterConfig, save_ctrl_adapter

CHANNELS = (32, 32, 64, 64)
SKIP_CHANNELS = (32,) * 7 + (64,) * 5  # conv_in, then per block its resnets and downsampler
TEXT_DIM, CN_TEXT_DIM = 32, 24  # distinct so a swapped text encoder fails loudly


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass(frozen=True)
class Params:  # the GenerateParams fields cig_generate reads
    prompt: str = "an elephant walking"
    negative_prompt: str = "blurry, static"
    seed: int = 7
    steps: int = 3
    guidance_scale: float = 9.0
    controlnet_scale: float = 1.0
    control_guidance_start: float = 0.0
    control_guidance_end: float = 1.0
    fps: int = 16
    window: int = 3
    overlap: int = 1
    dtype: str = "fp32"
    cpu_offload: bool = False
    vae_noise_seed: int | None = None
    zero_control: str = "none"


def _tokenizer():
    from transformers import CLIPTokenizer

    # Byte-level alphabet (GPT-2 mapping) as single-character tokens, no merges: works offline for any text.
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    chars = [chr(b) if b in keep else chr(next(extra)) for b in range(256)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give zero-initialised tensors (ControlNet zero convs, biases) small random values: every path acts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def build_mirror(root) -> None:
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, I2VGenXLUNet
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(0)
    base, sd15 = root / "i2vgenxl", root / "stable-diffusion-v1.5"
    I2VGenXLUNet(block_out_channels=CHANNELS, layers_per_block=2, norm_num_groups=32,
                 cross_attention_dim=TEXT_DIM, attention_head_dim=8).save_pretrained(base / "unet")
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(8, 8, 16, 16), norm_num_groups=8, layers_per_block=1,
                  latent_channels=4).save_pretrained(base / "vae")
    text = dict(vocab_size=514, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPTextModel(CLIPTextConfig(hidden_size=TEXT_DIM, **text)).save_pretrained(base / "text_encoder")
    CLIPTextModel(CLIPTextConfig(hidden_size=CN_TEXT_DIM, **text)).save_pretrained(sd15 / "text_encoder")
    for folder in (base / "tokenizer", sd15 / "tokenizer"):
        _tokenizer().save_pretrained(folder)
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=TEXT_DIM)).save_pretrained(base / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        base / "feature_extractor")
    DDIMScheduler(**cig_mod.SCHEDULER_SETTINGS).save_pretrained(base / "scheduler")
    controlnet = ControlNetModel(block_out_channels=CHANNELS, layers_per_block=2, attention_head_dim=8,
                                 cross_attention_dim=CN_TEXT_DIM,
                                 conditioning_embedding_out_channels=(8, 16, 16, 32))
    _randomise(controlnet, 1).save_pretrained(root / "controlnet-depth")
    adapter_cfg = CtrlAdapterConfig(
        num_blocks=1, num_frames=16, cross_attention_dim=TEXT_DIM, add_temporal_resnet=True,
        add_temporal_transformer=True, add_adapter_location_A=True, add_adapter_location_B=True,
        add_adapter_location_C=True, add_adapter_location_D=True, add_adapter_location_M=True,
        down_channels=SKIP_CHANNELS, mid_channels=CHANNELS[-1], attention_head_dim=16, inner_heads=2)
    save_ctrl_adapter(_randomise(CtrlAdapter(adapter_cfg), 2), str(root / "ctrl-adapter-i2vgenxl-depth"))


@pytest.fixture(scope="module")
def mirror_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cig_weights")
    build_mirror(root)
    return root


@pytest.fixture(scope="module")
def cig(mirror_root, test_device):
    root = mirror_root
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        model = load_cig(str(root), test_device)
    return model


def _device(cig) -> torch.device:
    return next(cig.unet.parameters()).device


def _inputs(n: int = 5, h: int = 64, w: int = 128):
    yy, xx = np.mgrid[0:h, 0:w]
    frame = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1).astype(np.uint8)
    depth = np.stack([(yy / h * 0.8 + 0.1 * t / n) for t in range(n)]).astype(np.float16)
    return frame, depth


def test_windows_cover_the_clip():
    assert window_starts(5, 3, 1) == [0, 2]
    assert window_starts(16, 16, 1) == [0]
    assert window_starts(40, 16, 4) == [0, 12, 24]
    assert window_starts(20, 16, 1) == [0, 4]  # the last window is pulled back to end at the last frame
    with pytest.raises(ValueError):
        window_starts(10, 4, 4)


def test_generate_windows_non_square_and_deterministic(cig, monkeypatch):
    frame, depth = _inputs()
    seen: list[np.ndarray] = []
    original = cig_mod._image_conditioning

    def spy(model, first, *args, **kwargs):
        seen.append(first.copy())
        return original(model, first, *args, **kwargs)

    monkeypatch.setattr(cig_mod, "_image_conditioning", spy)
    out = cig_mod.cig_generate(cig, frame, depth, Params())
    assert out.shape == (5, 64, 128, 3) and out.dtype == np.uint8
    assert out.std() > 1.0  # not a constant image
    # Two windows ([0,3) and [2,5)); the second is conditioned on output frame 2, which it keeps.
    assert len(seen) == 2
    np.testing.assert_array_equal(seen[0], frame)
    np.testing.assert_array_equal(seen[1], out[2])
    again = cig_mod.cig_generate(cig, frame, depth, Params())
    np.testing.assert_array_equal(out, again)
    other = cig_mod.cig_generate(cig, frame, depth, Params(seed=8))
    assert np.abs(other.astype(int) - out).max() > 0


def test_depth_acts_only_inside_the_control_window(cig):
    frame, depth = _inputs(n=3)
    flipped = depth[:, ::-1].copy()
    p = Params(window=0, steps=2)
    on_a, on_b = (cig_mod.cig_generate(cig, frame, d, p) for d in (depth, flipped))
    assert np.abs(on_a.astype(int) - on_b).max() > 0
    off = replace(p, control_guidance_end=0.0)  # ControlNet branch never on
    off_a, off_b = (cig_mod.cig_generate(cig, frame, d, off) for d in (depth, flipped))
    np.testing.assert_array_equal(off_a, off_b)
    # Scale 0 is the same as no control at all.
    zero_scale = cig_mod.cig_generate(cig, frame, depth, replace(p, controlnet_scale=0.0))
    np.testing.assert_array_equal(zero_scale, off_a)


def test_seeds_give_the_references_streams(cig):
    """Initial latents: the first draws of ``torch.Generator().manual_seed(seed)`` (0 included: a seed like any
    other, where the reference would run unseeded); VAE noise: its own stream, ``vae_noise_seed`` or seed + 1."""
    frame, depth = _inputs(n=3)
    p = Params(window=0, steps=1, seed=0)

    def run(params):
        with cig_mod.recording() as rec:
            return cig_mod.cig_generate(cig, frame, depth, params), rec

    out, rec = run(p)
    (noise,), (vae_noise,) = rec["initial_latents"], rec["vae_noise"]
    assert noise.shape == (1, 4, 3, 8, 16) and vae_noise.shape == (1, 4, 8, 16)
    np.testing.assert_array_equal(noise, torch.randn(noise.shape, generator=torch.Generator().manual_seed(0)))
    np.testing.assert_array_equal(vae_noise, torch.randn(vae_noise.shape, generator=torch.Generator().manual_seed(1)))
    again, _ = run(p)
    np.testing.assert_array_equal(out, again)
    explicit, rec2 = run(replace(p, vae_noise_seed=5))
    np.testing.assert_array_equal(rec2["initial_latents"][0], noise)  # the initial latents do not move
    np.testing.assert_array_equal(
        rec2["vae_noise"][0], torch.randn(vae_noise.shape, generator=torch.Generator().manual_seed(5)))
    assert np.abs(explicit.astype(int) - out).max() > 0
    seed1, rec3 = run(replace(p, seed=1))
    assert np.abs(seed1.astype(int) - out).max() > 0
    np.testing.assert_array_equal(  # the derived VAE seed follows the seed
        rec3["vae_noise"][0], torch.randn(vae_noise.shape, generator=torch.Generator().manual_seed(2)))


def test_zero_control_reference_adds_the_adapter_mid_output(cig):
    """At ControlNet scale 0 the reference still runs the adapter on the (zeroed) residuals and adds its mid
    output; ``zero_control="reference"`` does the same, the default adds nothing."""
    cond, latents = _cond(cig)
    t = torch.tensor(501, device=_device(cig))
    ref_opts = replace(step_options(Params()), zero_control="reference")
    with torch.no_grad():
        got = guided_prediction(cig, latents, t, cond, ref_opts, False)
        none = guided_prediction(cig, latents, t, cond, step_options(Params()), False)
        # The reference's way: the ControlNet at scale 0 (exact zeros), the whole adapter, down outputs dropped.
        x = latents.repeat(2, 1, 1, 1, 1)
        down, mid = cig_mod.control_residuals(cig, x, t, cond, replace(ref_opts, controlnet_scale=0.0))
        assert mid is not None and all(r.abs().max() > 0 for r in down)  # adapted zeros are not zeros
        pos = cond.image_embeds.reshape(1, 1, -1)
        with cig.injector.active(None, mid):
            pred = cig.unet(x, t, fps=torch.full((2,), 16, device=x.device), image_latents=cond.image_latents
                            .repeat(2, 1, 1, 1, 1), image_embeddings=torch.cat([torch.zeros_like(pos), pos]),
                            encoder_hidden_states=cond.prompt_embeds, return_dict=False)[0]
        uncond, text = pred.chunk(2)
        expected = uncond + 9.0 * (text - uncond)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - none).abs().max() > 1e-3  # the mid output acts
    # Through the whole clip: scale 0 and a step outside the control window are the same (cond scale 0), and
    # the depth still plays no part in either.
    frame, depth = _inputs(n=3)
    p = Params(window=0, steps=2, zero_control="reference")
    zero = cig_mod.cig_generate(cig, frame, depth, replace(p, controlnet_scale=0.0))
    outside = cig_mod.cig_generate(cig, frame, depth[:, ::-1].copy(), replace(p, control_guidance_end=0.0))
    np.testing.assert_array_equal(zero, outside)
    plain = cig_mod.cig_generate(cig, frame, depth, replace(p, controlnet_scale=0.0, zero_control="none"))
    assert np.abs(zero.astype(int) - plain).max() > 0


def test_first_window_is_the_one_window_run_and_the_hand_over_is_a_cross_fade(mirror_root):
    """6 frames, windows of 4 sharing 2 (starts 0 and 2), through ``Stage.run`` (reads= enforced).

    Stated bound: output frames up to the hand-over frame (2, which conditions window 2) are window 1's
    exactly, i.e. the one-window run's; a shared frame after it differs from window 1's rendering by at most
    its cross-fade weight (j / overlap) times the two windows' disagreement, from window 2's by at most the
    rest, plus 0.5 for rounding. (With random tiny weights the two renderings disagree by ~35 grey levels on
    average, so their agreement itself says nothing here: that needs real weights.)"""
    from stages.generate import STAGE

    frame, depth = _inputs(n=6)
    root = mirror_root
    params = {"prompt": "an elephant walking", "negative_prompt": "blurry, static", "seed": 7, "steps": 2,
              "dtype": "fp32", "window": 4, "overlap": 2}
    arrays = {"edited_frame": frame, "refined_depth": depth}
    with cig_mod.recording() as rec:
        out = STAGE.run(arrays, params, backend="i2vgenxl", weights=str(root))["video"]
    one = STAGE.run({"edited_frame": frame, "refined_depth": depth[:4]}, params, backend="i2vgenxl",
                    weights=str(root))["video"]
    a, b = rec["frames"]  # each window's own rendering
    np.testing.assert_array_equal(a, one)
    np.testing.assert_array_equal(out[:3], one[:3])
    np.testing.assert_array_equal(out[4:], b[2:])
    a3, b3, o3 = a[3].astype(float), b[1].astype(float), out[3].astype(float)
    weight = 1 / 2  # frame 3 is the second of 2 shared frames
    assert np.all(np.abs(o3 - a3) <= weight * np.abs(b3 - a3) + 0.5)
    assert np.all(np.abs(o3 - b3) <= (1 - weight) * np.abs(b3 - a3) + 0.5)
    assert np.abs(b3 - a3).max() > 0  # the bound is not vacuous: the windows do differ there


def test_bad_inputs_are_rejected(cig):
    frame, depth = _inputs()
    with pytest.raises(ValueError, match="multiple of 64"):
        cig_mod.cig_generate(cig, frame[:48], depth[:, :48], Params())
    with pytest.raises(ValueError, match="0..1"):
        cig_mod.cig_generate(cig, frame, (depth * 255).astype(np.float16), Params())


def _cond(cig, f: int = 3):
    g = torch.Generator().manual_seed(0)
    dev = _device(cig)
    r = lambda *s: torch.randn(*s, generator=g).to(dev)  # noqa: E731
    cond = WindowCond(prompt_embeds=r(2, 77, TEXT_DIM), cn_prompt_embeds=r(2, 77, CN_TEXT_DIM),
                      image_latents=r(1, 4, f, 8, 16), image_embeds=r(1, 1, TEXT_DIM),
                      control=torch.rand(f, 3, 64, 128, generator=g).to(dev), fps=16)
    return cond, r(1, 4, f, 8, 16)


def test_memory_options_do_not_change_the_prediction(cig):
    cond, latents = _cond(cig)
    t = torch.tensor(501, device=_device(cig))
    with torch.no_grad():
        ref = guided_prediction(cig, latents, t, cond, step_options(Params()), True)
        for opts in ({"split_cfg": True}, {"controlnet_batch": 1}, {"controlnet_batch": 5}):
            p = type("P", (), {**Params().__dict__, **opts})()
            got = guided_prediction(cig, latents, t, cond, step_options(p), True)
            # On a GPU each batch size picks its own kernels: float32 rounding then differs a little more.
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 if latents.device.type == "cpu" else 1e-4)


def test_hooks_add_residuals_to_the_matching_skips(cig):
    """Skips seen by each up block and the mid output differ exactly by the injected residuals."""
    cond, latents = _cond(cig, f=2)
    unet, dev = cig.unet, _device(cig)
    captured: dict[str, list] = {"skips": [], "mid": []}
    def grab(_m, _a, kwargs):
        captured["skips"].append(kwargs["res_hidden_states_tuple"])

    hooks = [b.register_forward_pre_hook(grab, with_kwargs=True) for b in unet.up_blocks]
    hooks.append(unet.mid_block.register_forward_hook(lambda m, a, o: captured["mid"].append(o)))

    def run(down, mid):
        with torch.no_grad(), cig.injector.active(down, mid):
            unet(latents, torch.tensor(301, device=dev), fps=torch.tensor([16], device=dev),
                 image_latents=cond.image_latents[:, :, :2], image_embeddings=cond.image_embeds[0],
                 encoder_hidden_states=cond.prompt_embeds[1:], return_dict=False)

    g = torch.Generator().manual_seed(1)
    try:
        run(None, None)
        shapes = [s.shape for block in reversed(captured["skips"]) for s in block]
        down = [torch.randn(s, generator=g).to(dev) for s in shapes]
        mid = torch.randn(captured["mid"][0].shape, generator=g).to(dev)
        base_skips, base_mid = captured["skips"], captured["mid"][0]
        captured["skips"], captured["mid"] = [], []
        run(down, mid)
    finally:
        for h in hooks:
            h.remove()
    assert [s[1] for s in shapes] == list(SKIP_CHANNELS)
    # The mid residual is added after the mid block; the first up block's skips are then unchanged inputs.
    torch.testing.assert_close(captured["mid"][0] - base_mid, mid, atol=1e-5, rtol=0)
    flat_base = [s for block in reversed(base_skips) for s in block]
    flat_new = [s for block in reversed(captured["skips"]) for s in block]
    for old, new, res in zip(flat_base, flat_new, down, strict=True):
        torch.testing.assert_close(new - old, res, atol=1e-5, rtol=0)


def test_keys_cover_what_each_generate_backend_reads():
    from stages.generate import STAGE

    cig_key = STAGE.key_params("i2vgenxl", {"seed": 42})
    assert {"prompt", "negative_prompt", "seed", "vae_noise_seed", "zero_control", "steps"} <= set(cig_key)
    assert not {"removal_margin_px", "background"} & set(cig_key)  # propagate's own knobs
    for change in ({"vae_noise_seed": 0}, {"seed": 0}, {"zero_control": "reference"}):
        assert STAGE.key_params("i2vgenxl", {"seed": 42, **change}) != cig_key
    # propagate renders no text and draws no noise: job texts and seeds stay out of its key.
    prop_key = STAGE.key_params("propagate", {"prompt": "a", "seed": 1})
    assert prop_key == STAGE.key_params("propagate", {"prompt": "b", "seed": 2})
    assert "feather_px" in prop_key
