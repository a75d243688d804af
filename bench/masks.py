"""Mask quality of the offline shape aligner, before and after issue 15, on clips whose truth is known.

1. The synthetic family (``tests/synthetic.py``: disc/square/ellipse/star, flat-coloured and textured,
   2-15 px per frame over texture, a flat object over a flat background, a growing and a shrinking object;
   16 frames): per clip, ``source_masks track`` from the frame-0 mask (min IoU over the frames against the
   true mask) and the new shape moved by ``motion`` from the tracked masks (IoU with the true new shape in
   the last frame, and with the true per-frame masks: the motion estimate alone), before and after.
2. The demo ball on the demo's 512² canvas (the 256² clip scaled up, as ingest's default squash does):
   ``track`` IoU per frame, before/after and with the chained warp alone (``track_anchor_gap=1``);
   ``motion`` streaks (pixels of P_t farther than 1 px from P_0 moved by the summed motion).

"Before" is the code of commit ``BEFORE_REV`` (``git show``): the stages as they were before issue 15.
Inputs are made as the pipeline makes them: DIS flows (``flow`` default), the edited shape from the demo's
edited first frame (``shape_mask change``).

Run: .venv/bin/python bench/masks.py [--frames 16] [--skip-family] [--skip-ball]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from synthetic import family, new_shape_masks  # noqa: E402

from flows.config.demo_clip import edited_first_frame, frames_and_masks  # noqa: E402
from stages import get_stage  # noqa: E402
from stages.metrics import iou  # noqa: E402
from stages.motion import MotionParams, simulate_motion  # noqa: E402
from stages.source_masks import track_masks  # noqa: E402

BEFORE_REV = "57e64ca"  # the last commit before issue 15 changed motion, source_masks and propagate


def before(module: str) -> types.ModuleType:
    """``stages.<module>`` as it was at ``BEFORE_REV`` (loaded from git, beside the current one)."""
    src = subprocess.run(["git", "show", f"{BEFORE_REV}:stages/{module}.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    mod = types.ModuleType(f"before_{module}")
    sys.modules[mod.__name__] = mod  # pydantic and dataclasses look their module up
    exec(compile(src, f"{BEFORE_REV}:stages/{module}.py", "exec"), mod.__dict__)
    return mod


def family_figures(n: int = 16) -> list[dict[str, Any]]:
    """Per synthetic clip: track min IoU, new-shape IoU in the last frame (tracked / true masks), before
    and after."""
    old_sm, old_motion = before("source_masks"), before("motion")
    flow = get_stage("flow")
    rows = []
    for label, clip in family(n=n):
        flows = flow.run({"frames": clip.frames})["flows"]
        truth = new_shape_masks(clip)
        row: dict[str, Any] = {"clip": label}
        for when, track, simulate in (("before", old_sm.track_masks, old_motion.simulate_motion),
                                      ("after", track_masks, simulate_motion)):
            tracked = track(clip.frames, clip.masks[0], flows)
            row[f"track {when}"] = min(iou(m, r) for m, r in zip(tracked, clip.masks, strict=True))
            row[f"shape {when}"] = iou(simulate(tracked, flows, truth[0]).shape_masks[-1], truth[-1])
            row[f"motion {when}"] = iou(simulate(clip.masks, flows, truth[0]).shape_masks[-1], truth[-1])
        rows.append(row)
    return rows


FAMILY_COLUMNS = ("track before", "track after", "shape before", "shape after", "motion before", "motion after")


def print_family(rows: list[dict[str, Any]], per_clip: bool = True) -> None:
    print("synthetic family (tests/synthetic.py), 16 frames: track = min IoU of the tracked source mask; shape = "
          "IoU of the new shape with the true new shape in the last frame (motion from the tracked masks); "
          "motion = the same from the true masks")
    head = f"{'clip':<28}" + "".join(f"{c:>15}" for c in FAMILY_COLUMNS)
    if per_clip:
        print(head + "\n" + "-" * len(head))
        for r in rows:
            print(f"{r['clip']:<28}" + "".join(f"{r[c]:>15.2f}" for c in FAMILY_COLUMNS))
    print(f"{'mean':<28}" + "".join(f"{np.mean([r[c] for r in rows]):>15.3f}" for c in FAMILY_COLUMNS))
    print(f"{'clips >= 0.9':<28}" + "".join(f"{sum(r[c] >= 0.9 for r in rows):>12d}/{len(rows)}"
                                            for c in FAMILY_COLUMNS))


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


def demo_ball(n: int) -> None:
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

    print(f"\ndemo ball, {n} frames at 512x512: radius {radius:.0f} px, moving {speed.mean():.1f} px per frame "
          f"(min {speed.min():.1f}, max {speed.max():.1f}) in the image; per frame 0..{n - 1}")
    old = before("source_masks").track_masks(frames, truth[0], flows)
    line("track IoU, before", [iou(m, r) for m, r in zip(old, truth, strict=True)], "5.2f")
    for label, params in (("track IoU, after", {}), ("track IoU, chained warp only", {"track_anchor_gap": 1})):
        masks = track.run({"frames": frames, "provided_masks": truth[:1], "flows": flows}, params,
                          backend="track")["object_masks"]
        line(label, [iou(m, r) for m, r in zip(masks, truth, strict=True)], "5.2f")

    shape = get_stage("shape_mask").run({"edited_frame": edited, "frames": frames, "object_masks": truth},
                                        backend="change")["edited_shape"]
    for acc in ("compose", "iterate"):
        res = simulate_motion(truth, flows, shape, MotionParams(accumulate=acc))
        line(f"motion {acc}: streak px", streak_pixels(res), "5d")
        line(f"motion {acc}: paste area px", [int(p.sum()) for p in res.paste_masks], "5d")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--skip-family", action="store_true")
    ap.add_argument("--skip-ball", action="store_true")
    args = ap.parse_args()
    if not args.skip_family:
        print_family(family_figures(args.frames))
    if not args.skip_ball:
        demo_ball(args.frames)


if __name__ == "__main__":
    main()
