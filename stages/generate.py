"""Generate (CIG, spec §4): render the edited video from the edited first frame.

Backends:

* ``propagate`` (offline default, no weights): moves the edited object with the simulated motion over the
  source frames with the old object removed, ordered by depth (:func:`propagate_video`).
* ``i2vgenxl`` (weights): I2VGen-XL guided by the refined depth through the SD-1.5 depth ControlNet and
  Ctrl-Adapter; loader and runner live in ``stages.nets.cig`` (imported lazily: torch/diffusers).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from stages.base import ArraySpec, Backend, Params, Stage
from stages.prompts import DEFAULT_NEGATIVE_PROMPT

MAX_SEED = 2**63 - 2  # seed + 1 (the derived VAE noise seed) must still be a torch seed



class GenerateParams(Params):
    # ---- shared / CIG (i2vgenxl) -------------------------------------------------------------------
    prompt: str = ""
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    seed: int = Field(42, ge=0, le=MAX_SEED, description="CPU torch.Generator seed of the initial latents, as "
                      "the reference's (0 is a seed like any other; the reference runs unseeded then)")
    vae_noise_seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="seed of the first frame's VAE posterior noise (its own CPU "
                                             "generator); None = seed + 1. The reference draws it unseeded")
    steps: int = Field(50, ge=1, le=1000)
    guidance_scale: float = Field(9.0, ge=0.0)
    controlnet_scale: float = Field(1.0, ge=0.0)
    control_guidance_start: float = Field(0.0, ge=0.0, le=1.0)
    control_guidance_end: float = Field(1.0, ge=0.0, le=1.0)
    zero_control: Literal["none", "reference"] = Field(
        "none", description="where the ControlNet scale is 0 (controlnet_scale 0, or a step outside the "
                            "control window): 'none' = no control at all; 'reference' = as StableV2V, the "
                            "Ctrl-Adapter's mid output for zero residuals is still added")
    fps: int = Field(16, ge=1, le=120, description="I2VGen-XL fps micro-condition (and export rate)")
    window: int = Field(16, ge=2, description="frames per generation window")
    overlap: int = Field(4, ge=0, description="frames shared by consecutive windows")
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    cpu_offload: bool = Field(False, description="model CPU offload between components (less GPU memory)")
    controlnet_batch: int = Field(8, ge=1, description="ControlNet micro-batch (images per forward)")
    split_cfg: bool = Field(False, description="run the unconditional and conditional branches one after "
                                               "the other (less memory, a little slower)")
    decode_chunk: int = Field(4, ge=1, description="frames per VAE decode (VAE slicing)")
    # ---- propagate (offline default) ---------------------------------------------------------------
    removal_margin_px: int = Field(
        6, ge=0, le=128, description="growth of the source object mask before removing it (halo, shadows)")
    feather_px: float = Field(1.0, ge=0.0, le=16.0, description="soft edge of the moved object (sigma, px)")
    occlusion: bool = Field(True, description="hide the object where the source scene is nearer (depth)")
    occlusion_margin: float = Field(
        0.08, ge=0.0, le=1.0,
        description="how much nearer than the object's nearest part (fraction of the frame's depth range) "
                    "a background pixel must be to occlude it")
    fill_from_frames: bool = Field(True, description="fill the removed object's area from other frames first")
    inpaint_radius: int = Field(5, ge=1, le=32, description="cv2.inpaint radius for what no frame shows")
    background: Literal["source", "edited"] = Field(
        "source", description="'source': each source frame as it is, but where its old object (and shadow) "
                              "was, filled from the other frames; 'edited': the edited frame's whole "
                              "background moved with the camera (a restyled static scene; not exact "
                              "outside the edit)")
    match_fill_tone: bool = Field(
        True, description="fill pixels taken from the other layer get the output's look: with background "
                          "'source', the edited frame's pixels lose its low-frequency colour change (outside "
                          "the edit) so the fill matches the untouched source around it; with 'edited', the "
                          "source frames' pixels get it")
    shadow_px: int = Field(
        32, ge=0, le=256, description="how far beyond the removal margin the old object's shadow is looked "
                                      "for: pixels darker than the other frames show there, touching the "
                                      "object, are removed with it (0: off)")
    shadow_level: float = Field(16.0, gt=0, le=255, description="grey levels darker than the background "
                                                                "that count as shadow")

    @model_validator(mode="after")
    def _windows(self) -> GenerateParams:
        if self.overlap >= self.window:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than window ({self.window})")
        if self.control_guidance_end < self.control_guidance_start:
            raise ValueError("control_guidance_end must not be before control_guidance_start")
        return self


# ---- backends -------------------------------------------------------------------------------------

def _propagate(*, model: None, params: GenerateParams, **arrays: np.ndarray) -> dict[str, np.ndarray]:
    from stages.propagate import propagate_video  # lazily: its code is this backend's (own version), not the stage's

    return {"video": propagate_video(params=params, **arrays)}


def _load_cig(weights: str | None, device: str) -> Any:
    from stages.nets.cig import load_cig  # torch + diffusers: only when this backend is chosen

    assert weights is not None  # load_model refuses needs_weights backends without weights
    return load_cig(weights, device)


def _i2vgenxl(*, model: Any, params: GenerateParams, edited_frame: np.ndarray,
              refined_depth: np.ndarray) -> dict[str, np.ndarray]:
    from stages.nets.cig import cig_generate

    return {"video": cig_generate(model, edited_frame, refined_depth, params)}


PROPAGATE_USES = ("frames", "flows", "object_masks", "depth", "edited_frame", "shape_masks",
                  "simulated_flows")
PROPAGATE_READS = ("removal_margin_px", "feather_px", "occlusion", "occlusion_margin", "fill_from_frames",
                   "inpaint_radius", "background", "match_fill_tone", "shadow_px", "shadow_level")
# Every field cig_generate reads; the memory options too (they change float rounding, not the method).
I2VGENXL_READS = ("prompt", "negative_prompt", "seed", "vae_noise_seed", "steps", "guidance_scale",
                  "controlnet_scale", "control_guidance_start", "control_guidance_end", "zero_control", "fps",
                  "window", "overlap", "dtype", "cpu_offload", "controlnet_batch", "split_cfg", "decode_chunk")

STAGE = Stage(
    name="generate",
    version="1",
    inputs=("frames", "flows", "object_masks", "depth", "edited_frame", "shape_masks", "simulated_flows",
            "refined_depth"),
    outputs={"video": ArraySpec(("frame", "y", "x", "channel"), "uint8")},
    params=GenerateParams,
    backends={
        # version 2: the source as it is outside each frame's old object and the new shape; no ghosts
        "propagate": Backend("propagate", _propagate, uses=PROPAGATE_USES, reads=PROPAGATE_READS, version="2"),
        # version 2: seeded like the reference (initial latents first), own VAE-noise stream, 8-bit control
        "i2vgenxl": Backend("i2vgenxl", _i2vgenxl, uses=("edited_frame", "refined_depth"), load=_load_cig,
                            needs_weights=True, gpu=True, reads=I2VGENXL_READS, version="2", max_canvas=1024),
    },
    default_backend="propagate",
    doc="The edited video: the edited object moved with the simulated motion (propagate), or I2VGen-XL "
        "with depth ControlNet + Ctrl-Adapter (i2vgenxl).",
)
