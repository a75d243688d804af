"""edit (PFE): the provided frame onto the canvas, and the four diffusers editors end to end on the CPU.

The diffusers backends run through their real loaders on tiny random-weight pipelines built from configs
and saved with ``save_pretrained`` into a tmp folder (no hub access: ``HF_HUB_OFFLINE=1``), on a 64² canvas
with 2 steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from flows.plan.calls import make_call
from stages import base
from stages.base import MissingWeightsError, StageInputError
from stages.edit import DEFAULT_MARGIN_PX, STAGE, grow, sketch_region, sketch_strokes, to_canvas
from stages.ingest import IngestParams
from stages.ingest import to_canvas as ingest_to_canvas
from stages.prompts import DEFAULT_NEGATIVE_PROMPT

SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> object:
    """Tiny models on a shared 2-core machine: one thread is 2-8x faster than oversubscribed threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


# ---- provided ---------------------------------------------------------------------------------------

def test_provided_canvas_sized_is_used_as_is(bear_dir: Path) -> None:
    edited = _rgb(bear_dir / "edited-first-frame-elephant.png")  # already squashed to 512²
    out = STAGE.run({"first_frame_image": edited})["edited_frame"]
    assert out.dtype == np.uint8 and np.array_equal(out, edited)


@pytest.mark.parametrize("canvas", ["squash", "letterbox", "crop"])
def test_provided_goes_onto_the_canvas_like_the_frames(bear_dir: Path, canvas: str) -> None:
    src = _rgb(bear_dir / "frames" / "00000.jpg")  # 854x480
    ingest = IngestParams(canvas=canvas, width=256, height=192)
    frames = ingest_to_canvas(model=None, params=ingest, source_frames=src[None],
                              source_frame_index=np.zeros(1, np.int64))["frames"]
    out = STAGE.run({"first_frame_image": src}, params={"canvas": canvas, "width": 256, "height": 192})
    assert np.array_equal(out["edited_frame"], frames[0])
    # RGBA and grey images are accepted (alpha composited over black, grey replicated).
    rgba = np.dstack([src, np.full(src.shape[:2], 255, np.uint8)])
    again = STAGE.run({"first_frame_image": rgba}, params={"canvas": canvas, "width": 256, "height": 192})
    assert np.array_equal(again["edited_frame"], frames[0])


def test_provided_bad_image() -> None:
    with pytest.raises(StageInputError, match="first_frame_image"):
        STAGE.run({"first_frame_image": np.zeros((8, 8, 3), np.float32)})
    with pytest.raises(StageInputError, match="multiples of 64"):
        STAGE.run({"first_frame_image": np.zeros((8, 8, 3), np.uint8)}, params={"width": 100})


# ---- sketch helpers ---------------------------------------------------------------------------------

def test_sketch_strokes_and_region(bear_dir: Path) -> None:
    drawing = cv2.imread(str(bear_dir / "sketch-elephant.png"), cv2.IMREAD_UNCHANGED)[..., [2, 1, 0, 3]]
    strokes = sketch_strokes(drawing)
    assert strokes.dtype == np.uint8 and set(np.unique(strokes)) <= {0, 255}
    assert 0.01 < (strokes > 0).mean() < 0.2  # white lines on black
    region = sketch_region(strokes)
    assert region.sum() > 2 * (strokes > 0).sum()  # the outline is filled in (thick strokes: 2.5x)
    assert region[300, 180] and not region[50, 450]  # the elephant's body / the top-right corner
    # Dark lines on white paper and strokes on a transparent sheet give the same strokes.
    paper = 255 - cv2.cvtColor(strokes, cv2.COLOR_GRAY2RGB)
    assert np.array_equal(sketch_strokes(paper), strokes)
    sheet = np.zeros(strokes.shape + (4,), np.uint8)
    sheet[..., 3] = strokes
    assert np.array_equal(sketch_strokes(sheet), strokes)


# ---- the diffusers editors --------------------------------------------------------------------------

def _tokenizer() -> object:
    """A CLIP tokenizer over single byte-level characters (no merges), built offline."""
    from transformers import CLIPTokenizer

    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2 byte-to-unicode table
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        DDIMScheduler,
        PaintByExamplePipeline,
        PNDMScheduler,
        StableDiffusionControlNetInpaintPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionInstructPix2PixPipeline,
        UNet2DConditionModel,
    )
    from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig

    root = tmp_path_factory.mktemp("tiny-editors")
    torch.manual_seed(0)
    tokenizer = _tokenizer()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                                        num_attention_heads=4, num_hidden_layers=2, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1, projection_dim=32))
    vae = AutoencoderKL(block_out_channels=[32, 64], latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)

    def unet(in_channels: int) -> UNet2DConditionModel:
        return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=32,
                                    in_channels=in_channels, out_channels=4, cross_attention_dim=32,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))

    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)
    sd = {"vae": vae, "text_encoder": text, "tokenizer": tokenizer, "scheduler": ddim, "safety_checker": None,
          "feature_extractor": None, "image_encoder": None, "requires_safety_checker": False}
    StableDiffusionInstructPix2PixPipeline(unet=unet(8), **sd).save_pretrained(root / "instructpix2pix")
    StableDiffusionInpaintPipeline(unet=unet(9), **sd).save_pretrained(root / "sd-inpaint")
    controlnet = ControlNetModel(block_out_channels=(32, 64), layers_per_block=1, in_channels=4,
                                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                 cross_attention_dim=32, conditioning_embedding_out_channels=(16, 32))
    StableDiffusionControlNetInpaintPipeline(unet=unet(9), controlnet=controlnet, **sd).save_pretrained(
        root / "sketch")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=32, num_attention_heads=4,
                              num_hidden_layers=4, image_size=32, patch_size=4)
    encoder = PaintByExampleImageEncoder(vision, proj_size=32)
    PaintByExamplePipeline(vae=vae, image_encoder=encoder, unet=unet(9),
                           scheduler=PNDMScheduler(skip_prk_steps=True), safety_checker=None,
                           feature_extractor=CLIPImageProcessor(size=32, crop_size=32),
                           requires_safety_checker=False).save_pretrained(root / "paint-by-example")
    return {name: root / name for name in ("instructpix2pix", "paint-by-example", "sd-inpaint", "sketch")}


@pytest.fixture(scope="module")
def bear_small(bear_dir: Path) -> dict[str, np.ndarray]:
    frame = cv2.resize(_rgb(bear_dir / "frames" / "00000.jpg"), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    mask = cv2.resize(cv2.imread(str(bear_dir / "mask-00000.png"), cv2.IMREAD_GRAYSCALE), (SIZE, SIZE),
                      interpolation=cv2.INTER_AREA) >= 128
    drawing = cv2.imread(str(bear_dir / "sketch-elephant.png"), cv2.IMREAD_UNCHANGED)[..., [2, 1, 0, 3]]
    return {"frames": np.stack([frame, frame]), "object_masks": np.stack([mask, mask]),
            "reference_image": _rgb(bear_dir / "reference-raccoon.jpg"), "sketch_image": drawing}


EDITS = {"instructpix2pix": {"instruction": "turn the bear into an elephant"},
         "paint-by-example": {"mask_margin_px": 4},
         "sd-inpaint": {"prompt": "an elephant", "mask_margin_px": 6},
         "sketch": {"prompt": "an elephant", "mask_margin_px": 2}}


@pytest.mark.parametrize("backend", list(EDITS))
def test_diffusers_editor_end_to_end(backend: str, tiny_weights: dict[str, Path],
                                     bear_small: dict[str, np.ndarray],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = str(tiny_weights[backend])
    run = lambda seed: STAGE.run(bear_small, params={**EDITS[backend], "steps": 2, "seed": seed},  # noqa: E731
                                 backend=backend, weights=weights)["edited_frame"]
    first, again, other = run(7), run(7), run(8)
    assert first.shape == (SIZE, SIZE, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)  # one seed, one result
    assert not np.array_equal(first, other)
    assert sum(k[:3] == ("edit", backend, weights) for k in base.loaded_models()) == 1  # loaded once
    if backend != "instructpix2pix":  # composited: frame 0's pixels outside the (feathered) region
        frame, mask = bear_small["frames"][0], bear_small["object_masks"][0]
        region = mask | (sketch_region(sketch_strokes(cv2.resize(bear_small["sketch_image"], (SIZE, SIZE),
                                                                 interpolation=cv2.INTER_AREA)))
                         if backend == "sketch" else False)
        outside = ~grow(region, EDITS[backend]["mask_margin_px"] + 8)
        assert outside.any() and np.array_equal(first[outside], frame[outside])
        assert not np.array_equal(first[mask], frame[mask])


def test_editor_keys_include_guidance_content(tiny_weights: dict[str, Path], bear_small: dict[str, np.ndarray]
                                              ) -> None:
    weights = str(tiny_weights["paint-by-example"])
    key = lambda arrays, **p: make_call("edit", backend="paint-by-example", params=p, inputs=arrays,  # noqa: E731
                                        weights=weights).key
    k0 = key(bear_small)
    assert key(bear_small) == k0
    other_ref = dict(bear_small, reference_image=bear_small["reference_image"][::-1].copy())
    assert key(other_ref) != k0
    assert key(bear_small, seed=43) != k0
    assert key(dict(bear_small, sketch_image=np.zeros((4, 4, 3), np.uint8))) == k0  # not used by PBE
    ip2p = lambda text: make_call("edit", backend="instructpix2pix", params={"instruction": text},  # noqa: E731
                                  inputs=bear_small, weights=str(tiny_weights["instructpix2pix"])).key
    assert ip2p("make it an elephant") != ip2p("make it a panda")


def test_editor_errors(tiny_weights: dict[str, Path], bear_small: dict[str, np.ndarray],
                       tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError):
        STAGE.run(bear_small, backend="sd-inpaint")  # no weights configured
    with pytest.raises(MissingWeightsError):
        STAGE.run(bear_small, backend="sd-inpaint", weights=str(tmp_path / "nowhere"))
    with pytest.raises(MissingWeightsError, match="controlnet"):
        STAGE.run(bear_small, backend="sketch", weights=str(tiny_weights["sd-inpaint"]))
    with pytest.raises(StageInputError, match="instruction"):
        STAGE.run(bear_small, params={"steps": 2}, backend="instructpix2pix",
                  weights=str(tiny_weights["instructpix2pix"]))
    # An empty frame-0 mask: nothing to replace, frame 0 comes back unchanged (no NaN, no error).
    empty = dict(bear_small, object_masks=np.zeros_like(bear_small["object_masks"]))
    out = STAGE.run(empty, params={"steps": 2}, backend="sd-inpaint", weights=str(tiny_weights["sd-inpaint"]))
    assert np.array_equal(out["edited_frame"], bear_small["frames"][0])


def test_sketch_loads_the_stablev2v_mirror_layout(tiny_weights: dict[str, Path],
                                                  bear_small: dict[str, np.ndarray], tmp_path: Path) -> None:
    """<root>/stable-diffusion-v1-5-inpaint + <root>/controlnet-scribble, as the StableV2V HF mirror."""
    import json
    import shutil

    shutil.copytree(tiny_weights["sketch"], tmp_path / "stable-diffusion-v1-5-inpaint")
    shutil.move(tmp_path / "stable-diffusion-v1-5-inpaint" / "controlnet", tmp_path / "controlnet-scribble")
    index_path = tmp_path / "stable-diffusion-v1-5-inpaint" / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = "StableDiffusionInpaintPipeline"
    del index["controlnet"]
    index_path.write_text(json.dumps(index))
    params = {**EDITS["sketch"], "steps": 2, "seed": 7}
    mirror = STAGE.run(bear_small, params=params, backend="sketch", weights=str(tmp_path))["edited_frame"]
    packed = STAGE.run(bear_small, params=params, backend="sketch", weights=str(tiny_weights["sketch"]))
    assert np.array_equal(mirror, packed["edited_frame"])  # same weights, same seed: same edit


# ---- each editor gets the reference runner's call ---------------------------------------------------

def test_grow_is_the_references_square_dilation(bear_dir: Path) -> None:
    """``grow(mask, px)`` is the reference's ``cv2.dilate(mask, ones((k, k)), iterations=n)`` for each
    runner's kernel (PBE 9x9 once, SD-inpaint 19x19 x 9, sketch script 19x19 x 5), on a real 512² mask."""
    mask = cv2.resize(cv2.imread(str(bear_dir / "mask-00000.png"), cv2.IMREAD_GRAYSCALE), (512, 512),
                      interpolation=cv2.INTER_NEAREST) >= 128
    for backend, (k, n) in {"paint-by-example": (9, 1), "sd-inpaint": (19, 9), "sketch": (19, 5)}.items():
        reference = cv2.dilate(mask.astype(np.uint8) * 255, np.ones((k, k), np.uint8), iterations=n) > 127
        grown = grow(mask, DEFAULT_MARGIN_PX[backend])
        assert np.array_equal(grown, reference), backend
        assert grown.sum() > mask.sum()


@pytest.fixture()
def recorded_call(tiny_weights: dict[str, Path], test_device: str) -> Iterator[Callable[[str], list[dict]]]:
    """The editor's real pipeline (the one ``Stage.run`` uses: loaded once per worker) with its ``__call__``
    recorded by a subclass that then runs the real call."""
    restore: list[tuple[Any, type]] = []

    def attach(backend: str) -> list[dict]:
        pipe = base.load_model(STAGE, STAGE.backend(backend), str(tiny_weights[backend]), test_device)
        calls: list[dict] = []
        real = type(pipe)

        class Recording(real):  # type: ignore[misc, valid-type]
            def __call__(self, *args: Any, **kwargs: Any) -> Any:
                calls.append({**kwargs, "args": args})
                return super().__call__(*args, **kwargs)

        pipe.__class__ = Recording
        restore.append((pipe, real))
        return calls

    yield attach
    for pipe, real in restore:
        pipe.__class__ = real


def _pixels(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image)


def _common(call: dict, steps: int, scale: float, seed: int) -> None:
    assert call["num_inference_steps"] == steps and call["guidance_scale"] == scale
    assert call["generator"].initial_seed() == seed and call["generator"].device.type == "cpu"


def test_instructpix2pix_gets_the_reference_call(recorded_call: Callable[[str], list[dict]],
                                                 bear_small: dict[str, np.ndarray],
                                                 tiny_weights: dict[str, Path]) -> None:
    calls = recorded_call("instructpix2pix")
    text = "turn the bear into an elephant"
    STAGE.run(bear_small, params={"instruction": text}, backend="instructpix2pix",
              weights=str(tiny_weights["instructpix2pix"]))
    (call,) = calls
    _common(call, 50, 9.0, 42)  # reference: 50 steps, CFG 9 (unseeded there; v2v seeds 42)
    assert call["prompt"] == text and call["negative_prompt"] == DEFAULT_NEGATIVE_PROMPT
    assert call["image_guidance_scale"] == 1.0  # --image-guidance-scale (library default 1.5)
    assert np.array_equal(_pixels(call["image"]), bear_small["frames"][0])  # frame 0 on the canvas, as is
    assert "height" not in call and "width" not in call  # the pipeline keeps the image's size


def test_paint_by_example_gets_the_reference_call(recorded_call: Callable[[str], list[dict]],
                                                  bear_small: dict[str, np.ndarray],
                                                  tiny_weights: dict[str, Path]) -> None:
    from PIL import Image

    calls = recorded_call("paint-by-example")
    STAGE.run(bear_small, backend="paint-by-example", weights=str(tiny_weights["paint-by-example"]))
    (call,) = calls
    _common(call, 50, 9.0, 42)  # reference: pipeline default steps, --guidance-scale 9 (unseeded there)
    frame, mask = bear_small["frames"][0], bear_small["object_masks"][0]
    assert np.array_equal(_pixels(call["image"]), frame)
    reference = cv2.dilate(mask.astype(np.uint8) * 255, np.ones((9, 9), np.uint8), iterations=1)
    assert np.array_equal(_pixels(call["mask_image"]), reference)
    # The example image squashed onto the canvas with PIL's default (bicubic), as the reference resizes it.
    squashed = Image.fromarray(bear_small["reference_image"]).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    assert call["example_image"].size == (SIZE, SIZE)
    assert np.array_equal(_pixels(call["example_image"]), np.asarray(squashed))
    assert "negative_prompt" not in call  # the pipeline ignores it (deliberately not passed: not in the key)


def test_sd_inpaint_gets_the_reference_call(recorded_call: Callable[[str], list[dict]],
                                            bear_small: dict[str, np.ndarray], tiny_weights: dict[str, Path]) -> None:
    calls = recorded_call("sd-inpaint")
    params = {"prompt": "an elephant", "mask_margin_px": 6}  # +81 px would cover the whole 64² test canvas
    STAGE.run(bear_small, params=params, backend="sd-inpaint", weights=str(tiny_weights["sd-inpaint"]))
    (call,) = calls
    _common(call, 50, 9.0, 42)  # reference: 50 steps, CFG 9, CPU generator seeded with --seed 42
    assert call["prompt"] == "an elephant" and call["negative_prompt"] == DEFAULT_NEGATIVE_PROMPT
    assert (call["height"], call["width"]) == (SIZE, SIZE)
    frame, mask = bear_small["frames"][0], bear_small["object_masks"][0]
    assert np.array_equal(_pixels(call["image"]), frame)
    assert np.array_equal(_pixels(call["mask_image"]) > 0, grow(mask, 6))
    # Unset, the margin is the reference's 19x19 kernel x 9 (+81 px; here the whole canvas).
    STAGE.run(bear_small, params={"prompt": "an elephant", "steps": 1}, backend="sd-inpaint",
              weights=str(tiny_weights["sd-inpaint"]))
    reference = cv2.dilate(mask.astype(np.uint8) * 255, np.ones((19, 19), np.uint8), iterations=9)
    assert np.array_equal(_pixels(calls[1]["mask_image"]), reference) and calls[1]["num_inference_steps"] == 1


def test_sketch_gets_the_reference_scripts_call(recorded_call: Callable[[str], list[dict]],
                                                bear_small: dict[str, np.ndarray],
                                                tiny_weights: dict[str, Path]) -> None:
    calls = recorded_call("sketch")
    params = {"prompt": "an elephant", "mask_margin_px": 2}
    STAGE.run(bear_small, params=params, backend="sketch", weights=str(tiny_weights["sketch"]))
    (call,) = calls
    _common(call, 20, 7.5, 23)  # scripts/inference_controlnet_inpaint.py: 20 steps, CFG 7.5, seed 23
    assert call["prompt"] == "an elephant" and call["negative_prompt"] == DEFAULT_NEGATIVE_PROMPT
    assert (call["height"], call["width"]) == (SIZE, SIZE) and call["controlnet_conditioning_scale"] == 1.0
    frame, mask = bear_small["frames"][0], bear_small["object_masks"][0]
    strokes = sketch_strokes(to_canvas(bear_small["sketch_image"], "squash", SIZE, SIZE))
    assert np.array_equal(_pixels(call["image"]), frame)
    assert np.array_equal(_pixels(call["control_image"]), np.repeat(strokes[..., None], 3, axis=2))
    assert np.array_equal(_pixels(call["mask_image"]) > 0, grow(mask | sketch_region(strokes), 2))


def test_editor_reads_are_what_each_call_uses() -> None:
    """Keys: job texts reach only the editors that use them (PBE renders no text)."""
    key = lambda backend, **p: STAGE.key_params(backend, p)  # noqa: E731
    assert key("paint-by-example", prompt="a", negative_prompt="x") == key("paint-by-example", prompt="b")
    assert key("sd-inpaint", prompt="a") != key("sd-inpaint", prompt="b")
    assert key("sd-inpaint", negative_prompt="a") != key("sd-inpaint")
    assert key("instructpix2pix", instruction="a") != key("instructpix2pix", instruction="b")
    assert key("sketch", canvas="crop") != key("sketch") and key("sd-inpaint", canvas="crop") == key("sd-inpaint")
    for backend in ("instructpix2pix", "paint-by-example", "sd-inpaint", "sketch"):
        assert key(backend, seed=1) != key(backend) and key(backend, steps=3) != key(backend)
