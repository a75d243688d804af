"""Mask quality of the offline defaults on the demo ball (its true mask is known in every frame).

Prints, per frame of the synthetic demo clip on the demo's 512² canvas (the 256² clip scaled up, as ingest's
default squash does; the ball's radius and speed are printed):

* ``source_masks track`` from the frame-0 mask: IoU against the true ball, with the default anchor and with
  the chained warp alone (``track_anchor_gap=1``);
* ``motion``: pixels of the paste region P_t farther than 1 px from P_0 moved by the summed mean motion
  (streaks left behind the shape), for ``accumulate`` compose (default) and iterate (reference), and the
  paste region's area.

Inputs are made as the pipeline makes them: DIS flows (``flow`` default) and the edited shape from the
demo's edited first frame (``shape_mask change``).

Run: .venv/bin/python bench/masks.py [--frames 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.config.demo_clip import edited_first_frame, frames_and_masks  # noqa: E402
from stages import get_stage  # noqa: E402
from stages.metrics import iou  # noqa: E402
from stages.motion import MotionParams, simulate_motion  # noqa: E402


def streak_pixels(res: object) -> list[int]:
    """Per frame: pixels of P_t farther than 1 px from P_0 moved by the summed mean motion."""
    pastes, means = res.paste_masks, res.mean_flows  # type: ignore[attr-defined]
    p0 = pastes[0].astype(np.uint8)
    h, w = p0.shape
    out = []
    for t in range(len(pastes)):
        shift = -means[:t].sum(axis=0)
        want = cv2.warpAffine(p0, np.float32([[1, 0, shift[0]], [0, 1, shift[1]]]), (w, h)) > 0
        near = cv2.dilate(want.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        out.append(int((pastes[t] & ~near).sum()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=16)
    n = ap.parse_args().frames
    clip, clip_masks = frames_and_masks(0)
    edited = cv2.resize(edited_first_frame(clip[0], clip_masks[0], 0), (512, 512), interpolation=cv2.INTER_LINEAR)
    frames = np.stack([cv2.resize(f, (512, 512), interpolation=cv2.INTER_LINEAR) for f in clip[:n]])
    truth = np.stack([cv2.resize(m, (512, 512), interpolation=cv2.INTER_NEAREST) for m in clip_masks[:n]]) > 127
    centres = np.array([np.argwhere(m).mean(axis=0)[::-1] for m in truth])
    speed = np.linalg.norm(np.diff(centres, axis=0), axis=1)
    radius = np.sqrt(truth[0].sum() / np.pi)
    flows = get_stage("flow").run({"frames": frames})["flows"]
    track = get_stage("source_masks")

    def line(label: str, values: list[float], fmt: str) -> None:
        print(f"{label:<34}" + " ".join(format(v, fmt) for v in values))

    print(f"demo ball, {n} frames at 512x512: radius {radius:.0f} px, moving {speed.mean():.1f} px per frame "
          f"(min {speed.min():.1f}, max {speed.max():.1f}) in the image; per frame 0..{n - 1}")
    for label, params in (("track IoU, default", {}), ("track IoU, chained warp only", {"track_anchor_gap": 1})):
        masks = track.run({"frames": frames, "provided_masks": truth[:1], "flows": flows}, params,
                          backend="track")["object_masks"]
        line(label, [iou(m, r) for m, r in zip(masks, truth, strict=True)], "5.2f")

    shape = get_stage("shape_mask").run({"edited_frame": edited, "frames": frames, "object_masks": truth},
                                        backend="change")["edited_shape"]
    for acc in ("compose", "iterate"):
        res = simulate_motion(truth, flows, shape, MotionParams(accumulate=acc))
        line(f"motion {acc}: streak px", streak_pixels(res), "5d")
        line(f"motion {acc}: paste area px", [int(p.sum()) for p in res.paste_masks], "5d")


if __name__ == "__main__":
    main()
