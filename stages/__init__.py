"""StableV2V stages: pure functions over arrays plus their declarations (see ``stages.base``).

Global array names (each produced by one stage, or supplied by the job as an external array):

===================  =============================  ======================  ==========================
array                dims                           dtype                   produced by
===================  =============================  ======================  ==========================
frames               frame, y, x, channel           uint8 RGB               ingest
provided_masks       mask_frame, y, x               bool                    ingest (only if given)
object_masks         frame, y, x                    bool                    source_masks
flows                pair, y, x, component          float32 (x, y) pixels   flow: pair t lives on
                                                                            frame t+1, points into t
depth                frame, y, x                    float16, near = large   depth
first_frame_image    src_y, src_x, channel          uint8 (external)        the job (user's frame)
reference_image      ref_y, ref_x, channel          uint8 (external)        the job
sketch_image         sketch_y, sketch_x, channel    uint8 (external)        the job
edited_frame         y, x, channel                  uint8                   edit (PFE)
edited_shape         y, x                           bool                    shape_mask
shape_masks          frame, y, x                    bool (S_t)              motion
paste_masks          frame, y, x                    bool (P_t)              motion
simulated_flows      pair, y, x, component          float32                 motion
simulated_depth      frame, y, x                    float16                 depth_sim
hole_masks           frame, y, x                    bool                    refine
refined_depth        frame, y, x                    float16                 refine
video                frame, y, x, channel           uint8 RGB               generate
warping_error ...    pair / frame / () (metrics)    float32                 evaluate (see its module)
===================  =============================  ======================  ==========================

Stage modules import only numpy/OpenCV/pydantic at module level; torch, onnxruntime, diffusers and
friends are imported inside backend loaders so that the CLI and the orchestration start fast.
"""

from __future__ import annotations

import importlib

from stages.base import Stage

# What a job exists to make: a job none of whose stages can produce it fails at planning, with the reason.
DELIVERABLE = "video"

# Stage modules in dependency order; each defines ``STAGE``.
PIPELINE: tuple[str, ...] = (
    "ingest",
    "source_masks",
    "flow",
    "depth",
    "edit",
    "shape_mask",
    "motion",
    "depth_sim",
    "refine",
    "generate",
    "evaluate",
)


def get_stage(name: str) -> Stage:
    return importlib.import_module(f"stages.{name}").STAGE


def available_stages() -> dict[str, Stage]:
    """Stages whose modules exist, in pipeline order."""
    out: dict[str, Stage] = {}
    for name in PIPELINE:
        try:
            out[name] = get_stage(name)
        except ModuleNotFoundError as exc:
            if exc.name != f"stages.{name}":
                raise
    return out
