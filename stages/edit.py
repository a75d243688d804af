"""Edit (PFE, spec §2): the edited first frame, on the working canvas.

Backends:

* ``provided`` (offline default): the user's edited first frame (``first_frame_image``, any size) brought
  onto the canvas exactly as ingest brought the frames (params carry ingest's canvas mode and size).
* ``instructpix2pix``: InstructPix2Pix on frame 0 (Euler-Ancestral, image guidance 1.0), text instruction.
* ``paint-by-example``: Paint-by-Example in the edit region, guided by ``reference_image``.
* ``sd-inpaint``: SD-1.5 inpainting in the edit region, guided by the prompt.
* ``sketch``: SD-1.5 inpainting + scribble ControlNet (UniPC), guided by ``sketch_image`` and the prompt.

Each editor gets the reference runner's call (spec section 2): its steps, guidance scales, negative prompt
and seed (``None`` fields take the backend's reference value, :data:`REFERENCE_CALL`), and the edit region is
the frame-0 object mask dilated as the reference does it, with a square ``k x k`` kernel (Paint-by-Example
+4 px, SD-inpaint +81 px, sketch +45 px; ``mask_margin_px`` overrides). Deliberate differences: the frames
and masks are ingest's canvas ones; the sketch's own filled outline joins its region so a larger new shape
fits; every backend is seeded (CPU ``torch.Generator``; the reference's Paint-by-Example and InstructPix2Pix
runs are unseeded); by default the result is composited back over frame 0 outside the (feathered) region, so
the untouched background keeps its pixels instead of the VAE's re-rendering.
Pipelines load from local folders only (``local_files_only=True``), once per worker (``Backend.load``).
"""

from __future__ import annotations

import json
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydantic import Field

from stages.base import ArraySpec, Backend, MissingWeightsError, Stage, StageInputError
from stages.ingest import CanvasParams, canvas_geometry, source_size, warp_to_canvas
from stages.prompts import DEFAULT_NEGATIVE_PROMPT

log = logging.getLogger("v2v.edit")

# Reference margins (px on the 512² canvas): PBE 9x9 kernel once (+4), SD-inpaint 19x19 x 9 (+81),
# sketch script 19x19 x 5 (+45).
DEFAULT_MARGIN_PX = {"paint-by-example": 4, "sd-inpaint": 81, "sketch": 45}
# The reference's (steps, guidance scale, seed) per editor: inference.py's defaults (50 steps, CFG 9, seed
# 42; PBE and IP2P run unseeded there, v2v seeds them with 42) and the sketch script's (20, 7.5, seed 23).
REFERENCE_CALL = {"instructpix2pix": (50, 9.0, 42), "paint-by-example": (50, 9.0, 42),
                  "sd-inpaint": (50, 9.0, 42), "sketch": (20, 7.5, 23)}
# StableV2V mirror folder names, for the sketch backend given the checkpoints root.
MIRROR_INPAINT, MIRROR_SCRIBBLE = "stable-diffusion-v1-5-inpaint", "controlnet-scribble"


class EditParams(CanvasParams):
    # the canvas fields (provided): must match ingest's
    # ---- diffusers editors ---------------------------------------------------------------------------
    prompt: str = Field("", description="what the edit region shows (sd-inpaint, sketch)")
    instruction: str = Field("", description="InstructPix2Pix edit instruction (falls back to prompt)")
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    seed: int | None = Field(None, ge=0, description="CPU generator seed; None = the reference's (42; sketch 23)")
    steps: int | None = Field(None, ge=1, le=1000, description="None = the reference's (50; sketch 20)")
    guidance_scale: float | None = Field(None, ge=0.0, description="None = the reference's (9.0; sketch 7.5)")
    image_guidance_scale: float = Field(1.0, ge=0.0, description="InstructPix2Pix image guidance")
    controlnet_scale: float = Field(1.0, ge=0.0, description="sketch: scribble ControlNet strength")
    mask_margin_px: int | None = Field(
        None, ge=0, le=512, description="growth of the frame-0 object mask into the edit region; None = "
                                        "the backend's reference default")
    composite: bool = Field(True, description="keep frame 0's pixels outside the edit region")
    feather_px: float = Field(2.0, ge=0.0, le=32.0, description="soft edge of the composite (sigma, px)")


# ---- image helpers --------------------------------------------------------------------------------

def as_rgb(image: np.ndarray, what: str, background: int = 0) -> np.ndarray:
    """uint8 RGB from grey, RGB or RGBA (alpha composited over ``background``)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or image.size == 0:
        raise StageInputError(f"edit: {what} must be a uint8 image [y, x] or [y, x, 3|4], got {image.dtype} "
                              f"{image.shape}")
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    if image.shape[2] == 4:
        a = image[..., 3:].astype(np.float32) / 255.0
        return np.clip(image[..., :3] * a + background * (1 - a) + 0.5, 0, 255).astype(np.uint8)
    if image.shape[2] != 3:
        raise StageInputError(f"edit: {what} has {image.shape[2]} channels (expected 1, 3 or 4)")
    return image


def to_canvas(image: np.ndarray, mode: str, width: int, height: int) -> np.ndarray:
    """An external image onto the canvas like ingest's frames; canvas-sized images are used as they are."""
    if image.shape[:2] == (height, width):
        return image
    h, w = image.shape[:2]
    geometry = canvas_geometry(w, h, CanvasParams(canvas=mode, width=width, height=height))
    return np.ascontiguousarray(warp_to_canvas(image, geometry)).astype(np.uint8)


def _disk(r: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def grow(mask: np.ndarray, px: int) -> np.ndarray:
    """Grow by ``px`` with a square kernel, as the reference's ``cv2.dilate(mask, ones((k, k)), iterations=n)``
    (one ``(2 px + 1)``-square dilation equals ``n`` dilations by a ``k``-square when ``px = n (k - 1) / 2``)."""
    if px <= 0 or not mask.any():
        return mask.astype(bool, copy=True)
    return cv2.dilate(mask.astype(np.uint8), np.ones((2 * px + 1, 2 * px + 1), np.uint8)) > 0


def sketch_strokes(sketch: np.ndarray) -> np.ndarray:
    """White strokes on black (what the scribble ControlNet expects), uint8 0/255, from a drawing.

    A mostly transparent RGBA sheet: the opaque pixels are the strokes. Otherwise the bright pixels are,
    after inverting a drawing that is mostly bright (dark lines on white paper).
    """
    if sketch.ndim == 3 and sketch.shape[2] == 4 and (sketch[..., 3] < 128).mean() > 0.5:
        return (sketch[..., 3] >= 128).astype(np.uint8) * 255
    grey = cv2.cvtColor(as_rgb(sketch, "sketch_image"), cv2.COLOR_RGB2GRAY)
    if np.median(grey) >= 128:
        grey = 255 - grey
    return (grey >= 128).astype(np.uint8) * 255


def sketch_region(strokes: np.ndarray) -> np.ndarray:
    """The area the sketched outline encloses (strokes closed, then holes filled)."""
    closed = cv2.morphologyEx(strokes, cv2.MORPH_CLOSE, _disk(5)) > 0
    # Connected background components that touch the border are outside; the others are enclosed.
    _, labels = cv2.connectedComponents((~closed).astype(np.uint8), connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return closed | ~np.isin(labels, border)


# ---- checks ---------------------------------------------------------------------------------------

def _frame0(frames: np.ndarray) -> np.ndarray:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise StageInputError(f"edit: frames must be uint8 [frame, y, x, 3], got {frames.dtype} "
                              f"{frames.shape}")
    h, w = frames.shape[1:3]
    if h % 8 or w % 8:
        raise StageInputError(f"edit: the canvas {w}x{h} must be a multiple of 8 for the diffusion editors")
    return frames[0]


def _mask0(object_masks: np.ndarray, frame: np.ndarray) -> np.ndarray:
    if object_masks.ndim != 3 or object_masks.shape[1:] != frame.shape[:2] or len(object_masks) == 0:
        raise StageInputError(f"edit: object_masks {object_masks.shape} do not match the frames "
                              f"{frame.shape[:2]}")
    return object_masks[0].astype(bool)


def _region(mask: np.ndarray, params: EditParams, backend: str) -> np.ndarray:
    margin = DEFAULT_MARGIN_PX[backend] if params.mask_margin_px is None else params.mask_margin_px
    return grow(mask, margin)


def _composite(generated: np.ndarray, frame: np.ndarray, region: np.ndarray, params: EditParams
               ) -> np.ndarray:
    if not params.composite:
        return generated
    m = region.astype(np.float32)
    if params.feather_px > 0:  # feathered outwards: the region itself stays fully generated
        m = np.maximum(m, cv2.GaussianBlur(m, (0, 0), params.feather_px))
    m = m[..., None]
    return np.clip(generated * m + frame * (1 - m) + 0.5, 0, 255).astype(np.uint8)


# ---- backends -------------------------------------------------------------------------------------

ASPECT_TOLERANCE = 0.01  # a resize's rounding stays far inside it (854x480 from 1280x720: 0.05 %)


def first_frame_fit(image_size: tuple[int, int], source_size: tuple[int, int], canvas: tuple[int, int]
                    ) -> str | None:
    """Why a first frame of ``image_size`` (w, h) is stretched to the source's ``source_size`` before going
    onto the canvas; None when its aspect is the source's (within 1 %) or it is canvas-sized (a canvas image,
    taken as it is)."""
    (w, h), (sw, sh) = image_size, source_size
    if (w, h) == tuple(canvas) or abs((w / h) / (sw / sh) - 1) <= ASPECT_TOLERANCE:
        return None
    return (f"the edited first frame is {w}x{h} (aspect {w / h:.3f}) and the source {sw}x{sh} ({sw / sh:.3f}): "
            "it is stretched to the source's size, so it lands where the frames do (give it at the source's "
            "aspect if it is a crop)")


def provided(*, model: None, params: EditParams, first_frame_image: np.ndarray, source: Any = None
             ) -> dict[str, np.ndarray]:
    """The user's frame on the canvas. With the ``source`` (ingest's reference, or a decoded clip), a frame
    of another aspect is first stretched to the source's size: placed exactly as the frames are, in every
    canvas mode (no bars where the frames have none), with a warning (:func:`first_frame_fit`)."""
    image = as_rgb(first_frame_image, "first_frame_image")
    if source is not None:
        sw, sh = source_size(source)
        why = first_frame_fit((image.shape[1], image.shape[0]), (sw, sh), (params.width, params.height))
        if why:
            log.warning("edit (provided): %s", why)
            shrink = sw * sh < image.shape[0] * image.shape[1]
            image = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return {"edited_frame": to_canvas(image, params.canvas, params.width, params.height)}


def _attrs(params: EditParams, first_frame_image: np.ndarray | None = None, source: Any = None, **_: Any
           ) -> dict[str, Any]:
    """The aspect fit's warning, kept with the artifact: the export repeats it with the job's name."""
    if first_frame_image is None or source is None or first_frame_image.ndim < 2:
        return {}
    size = (first_frame_image.shape[1], first_frame_image.shape[0])
    why = first_frame_fit(size, source_size(source), (params.width, params.height))
    return {"warnings": [f"edit: {why}"]} if why else {}


def _pil(a: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(a))


def _bicubic() -> Any:
    from PIL import Image

    return Image.Resampling.BICUBIC  # PIL's default for RGB resizes, what the reference gets


def reference_call(params: EditParams, backend: str) -> tuple[int, float, int]:
    """(steps, guidance scale, seed): the params', else the reference runner's for this editor."""
    steps, scale, seed = REFERENCE_CALL[backend]
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return int(pick(params.steps, steps)), float(pick(params.guidance_scale, scale)), int(pick(params.seed, seed))


def _run(pipe: Any, params: EditParams, backend: str, size: tuple[int, int], **kwargs: Any) -> np.ndarray:
    """Call a diffusers pipeline with a seeded CPU generator; returns uint8 [y, x, 3] at ``size`` (h, w)."""
    import torch

    steps, scale, seed = reference_call(params, backend)
    generator = torch.Generator("cpu").manual_seed(seed)  # the stream torch.manual_seed(seed) gives too
    with torch.inference_mode():
        out = pipe(num_inference_steps=steps, guidance_scale=scale, generator=generator, output_type="np",
                   **kwargs).images[0]
    img = np.clip(np.asarray(out, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if img.shape[:2] != size:  # pipelines round sizes to their latent grid
        img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return img


def instructpix2pix(*, model: Any, params: EditParams, frames: np.ndarray) -> dict[str, np.ndarray]:
    frame = _frame0(frames)
    text = params.instruction or params.prompt
    if not text.strip():
        raise StageInputError("edit (instructpix2pix): give the edit instruction (param 'instruction')")
    out = _run(model, params, "instructpix2pix", frame.shape[:2], prompt=text, image=_pil(frame),
               negative_prompt=params.negative_prompt, image_guidance_scale=params.image_guidance_scale)
    return {"edited_frame": out}


def paint_by_example(*, model: Any, params: EditParams, frames: np.ndarray, object_masks: np.ndarray,
                     reference_image: np.ndarray) -> dict[str, np.ndarray]:
    frame = _frame0(frames)
    region = _region(_mask0(object_masks, frame), params, "paint-by-example")
    reference = as_rgb(reference_image, "reference_image", background=255)
    if not region.any():  # nothing to replace: frame 0 stays as it is
        return {"edited_frame": frame.copy()}
    # Squashed onto the canvas with PIL's bicubic, as the reference (before the pipeline's own CLIP crop).
    # The reference also passes its negative prompt, which this pipeline ignores (a learned uncond vector).
    example = _pil(reference).resize((frame.shape[1], frame.shape[0]), _bicubic())
    out = _run(model, params, "paint-by-example", frame.shape[:2], example_image=example, image=_pil(frame),
               mask_image=_pil(region.astype(np.uint8) * 255))
    return {"edited_frame": _composite(out, frame, region, params)}


def sd_inpaint(*, model: Any, params: EditParams, frames: np.ndarray, object_masks: np.ndarray
               ) -> dict[str, np.ndarray]:
    frame = _frame0(frames)
    region = _region(_mask0(object_masks, frame), params, "sd-inpaint")
    if not region.any():
        return {"edited_frame": frame.copy()}
    h, w = frame.shape[:2]
    out = _run(model, params, "sd-inpaint", (h, w), prompt=params.prompt, negative_prompt=params.negative_prompt,
               image=_pil(frame), mask_image=_pil(region.astype(np.uint8) * 255), height=h, width=w)
    return {"edited_frame": _composite(out, frame, region, params)}


def sketch(*, model: Any, params: EditParams, frames: np.ndarray, object_masks: np.ndarray,
           sketch_image: np.ndarray) -> dict[str, np.ndarray]:
    frame = _frame0(frames)
    h, w = frame.shape[:2]
    drawing = np.asarray(sketch_image)
    if drawing.ndim < 2 or drawing.dtype != np.uint8:
        raise StageInputError(f"edit: sketch_image must be a uint8 image, got {drawing.dtype} "
                              f"{drawing.shape}")
    # Drawn over frame 0: brought onto the canvas as the frames were (a canvas-sized one as it is).
    strokes = sketch_strokes(to_canvas(drawing, params.canvas, w, h))
    region = _region(_mask0(object_masks, frame) | sketch_region(strokes), params, "sketch")
    if not region.any():
        raise StageInputError("edit (sketch): the sketch is empty and there is no object mask to edit")
    out = _run(model, params, "sketch", (h, w), prompt=params.prompt, negative_prompt=params.negative_prompt,
               image=_pil(frame), mask_image=_pil(region.astype(np.uint8) * 255),
               control_image=_pil(np.repeat(strokes[..., None], 3, axis=2)), height=h, width=w,
               controlnet_conditioning_scale=params.controlnet_scale)
    return {"edited_frame": _composite(out, frame, region, params)}


# ---- loading --------------------------------------------------------------------------------------

def _sketch_folders(root: Path) -> tuple[Path, Path | None]:
    """SD-inpaint folder and, unless its model_index already lists one, the scribble ControlNet folder."""
    index = root / "model_index.json"
    if index.is_file():
        if "controlnet" in json.loads(index.read_text()):
            return root, None
        if (root / "controlnet" / "config.json").is_file():
            return root, root / "controlnet"
    elif (root / MIRROR_INPAINT / "model_index.json").is_file() and (root / MIRROR_SCRIBBLE).is_dir():
        return root / MIRROR_INPAINT, root / MIRROR_SCRIBBLE
    raise MissingWeightsError(
        f"edit (sketch): {root} holds neither an SD-inpaint pipeline with a 'controlnet' (in "
        f"model_index.json or as a subfolder) nor the StableV2V mirror folders {MIRROR_INPAINT}/ and "
        f"{MIRROR_SCRIBBLE}/")


def _dtype_kw() -> str:
    """``dtype`` where this diffusers has it (``torch_dtype`` is deprecated there), else ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


def _load_paint_by_example(root: Path, dtype: Any) -> Any:
    """Built from its components: model_index.json names the image encoder's library differently across
    diffusers versions ("paint_by_example" upstream, "diffusers" when saved by 0.42), and neither resolves
    now that the pipeline sits under ``pipelines.deprecated``."""
    import diffusers
    from transformers import CLIPImageProcessor

    try:
        from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder
    except ImportError:  # diffusers < 0.33
        from diffusers.pipelines.paint_by_example import PaintByExampleImageEncoder
    scheduler_cls = json.loads((root / "model_index.json").read_text())["scheduler"][1]
    model = {"local_files_only": True, _dtype_kw(): dtype, "low_cpu_mem_usage": False}
    return diffusers.PaintByExamplePipeline(
        vae=diffusers.AutoencoderKL.from_pretrained(root, subfolder="vae", **model),
        image_encoder=PaintByExampleImageEncoder.from_pretrained(root, subfolder="image_encoder", **model),
        unet=diffusers.UNet2DConditionModel.from_pretrained(root, subfolder="unet", **model),
        scheduler=getattr(diffusers, scheduler_cls).from_pretrained(root, subfolder="scheduler",
                                                                    local_files_only=True),
        safety_checker=None,
        feature_extractor=CLIPImageProcessor.from_pretrained(root, subfolder="feature_extractor",
                                                             local_files_only=True),
        requires_safety_checker=False,
    )


def load_editor(kind: str, weights: str | None, device: str) -> Any:
    """The diffusers pipeline of an editor, from a local folder (no hub access); once per worker."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not weights or not Path(weights).is_dir():
        raise MissingWeightsError(f"edit ({kind}): weights folder {weights!r} not found")
    import diffusers
    import torch

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    common: dict[str, Any] = {"local_files_only": True, _dtype_kw(): dtype, "low_cpu_mem_usage": False,
                              "safety_checker": None, "requires_safety_checker": False}
    if kind == "instructpix2pix":
        pipe = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(weights, **common)
        pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    elif kind == "paint-by-example":
        pipe = _load_paint_by_example(Path(weights), dtype)
    elif kind == "sd-inpaint":
        pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(weights, **common)
    elif kind == "sketch":
        base, cn_dir = _sketch_folders(Path(weights))
        if cn_dir is not None:
            common["controlnet"] = diffusers.ControlNetModel.from_pretrained(
                cn_dir, local_files_only=True, low_cpu_mem_usage=False, **{_dtype_kw(): dtype})
        pipe = diffusers.StableDiffusionControlNetInpaintPipeline.from_pretrained(base, **common)
        pipe.scheduler = diffusers.UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    else:
        raise ValueError(f"unknown editor {kind!r}")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


_CALL = ("negative_prompt", "seed", "steps", "guidance_scale")
_REGION = ("mask_margin_px", "composite", "feather_px")
EDITOR_READS = {
    "instructpix2pix": ("instruction", "prompt", *_CALL, "image_guidance_scale"),
    "paint-by-example": ("seed", "steps", "guidance_scale", *_REGION),
    "sd-inpaint": ("prompt", *_CALL, *_REGION),
    "sketch": ("canvas", "prompt", *_CALL, "controlnet_scale", *_REGION),
}


def _editor(name: str, fn: Any, uses: tuple[str, ...]) -> Backend:
    # version 2: the reference runner's call (per-editor steps/CFG/seed, square mask dilation, PBE example
    # squashed onto the canvas)
    return Backend(name, fn, uses=uses, load=partial(load_editor, name), needs_weights=True, gpu=True,
                   reads=EDITOR_READS[name], version="2", max_canvas=1024)


STAGE = Stage(
    name="edit",
    version="1",
    inputs=("frames", "object_masks", "first_frame_image", "reference_image", "sketch_image", "source"),
    outputs={"edited_frame": ArraySpec(("y", "x", "channel"), "uint8")},
    params=EditParams,
    backends={
        "provided": Backend("provided", provided, uses=("first_frame_image", "source"), optional=("source",),
                            reads=("canvas", "width", "height")),
        "instructpix2pix": _editor("instructpix2pix", instructpix2pix, ("frames",)),
        "paint-by-example": _editor("paint-by-example", paint_by_example,
                                    ("frames", "object_masks", "reference_image")),
        "sd-inpaint": _editor("sd-inpaint", sd_inpaint, ("frames", "object_masks")),
        "sketch": _editor("sketch", sketch, ("frames", "object_masks", "sketch_image")),
    },
    default_backend="provided",
    doc="The edited first frame on the canvas: the user's, or made by an image editor (diffusers).",
    attrs_fn=_attrs,
)
