"""Quality of the weight-free pipeline on the bear fixture (bear -> elephant, a shape-changing edit).

Every metric of the ``evaluate`` stage for the ``propagate`` generator against naive baselines that skip
the shape aligner, printed as a table:

* ``repeat-first-frame``: the edited first frame, repeated (no motion at all);
* ``paste-in-source-shape``: the edited frame's pixels shown through the *source* object's silhouette,
  moved with it (the new object forced into the old shape: what a generator conditioned on the source
  masks/depth gets without shape alignment);
* ``paste-static``: the edited object (inside S_0) pasted onto every source frame at its frame-0 place.

The stages run through their ``STAGE.run`` (ingest, flow, source_masks, depth, edit with the fixture's
edited frame as ``provided``, shape_mask, motion, generate). With ``--weights DIR`` (a folder with
``clip/``, ``dover.onnx``, ``i3d_torchscript.pt``; see stages/nets/eval_models.py) the learned metrics
are added.

Run: .venv/bin/python bench/quality.py [--frames 16] [--size 512] [--weights DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages import get_stage  # noqa: E402
from stages.ingest import IngestParams, read_source  # noqa: E402

BEAR = ROOT / "tests" / "data" / "bear"
PROMPT = "an elephant walking on the rocks in a zoo"


def run(stage: str, arrays: dict[str, np.ndarray], timings: dict[str, float], **kw: object
        ) -> dict[str, np.ndarray]:
    start = time.perf_counter()
    out = get_stage(stage).run(arrays, **kw)  # type: ignore[arg-type]
    timings[stage] = time.perf_counter() - start
    return out


def pipeline(n_frames: int, size: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Source arrays, motion and the propagate output; the seconds of each stage."""
    t: dict[str, float] = {}
    params = IngestParams(n_frames=n_frames, width=size, height=size)
    clip = read_source(BEAR / "frames", params, masks=BEAR / "mask-00000.png")
    a = run("ingest", clip.arrays(), t, params=params)
    a.update(run("flow", a, t))
    a.update(run("source_masks", a, t, backend="track"))
    a.update(run("depth", a, t, backend="ground-prior"))
    a["first_frame_image"] = cv2.cvtColor(cv2.imread(str(BEAR / "edited-first-frame-elephant.png")),
                                          cv2.COLOR_BGR2RGB)
    a.update(run("edit", a, t, backend="provided", params={"width": size, "height": size}))
    a.update(run("shape_mask", a, t, backend="change"))
    a.update(run("motion", a, t))
    a.update(run("generate", a, t, backend="propagate", params={"prompt": PROMPT}))
    return a, t


def _shift(image: np.ndarray, dx: float, dy: float) -> np.ndarray:
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(image, m, image.shape[1::-1], flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()]) if len(xs) else np.zeros(2)


def baselines(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    frames, edited, objs, s0 = a["frames"], a["edited_frame"], a["object_masks"], a["edited_shape"]
    n = len(frames)
    repeat = np.repeat(edited[None], n, axis=0)
    source_shape = frames.copy()
    static = frames.copy()
    c0 = _centroid(objs[0])
    for t in range(n):
        dx, dy = _centroid(objs[t]) - c0 if objs[t].any() else (0.0, 0.0)
        moved = _shift(edited, dx, dy)
        source_shape[t][objs[t]] = moved[objs[t]]
        static[t][s0] = edited[s0]
    return {"repeat-first-frame": repeat, "paste-in-source-shape": source_shape, "paste-static": static}


COLUMNS = [("warping_error", "warp err", ".5f"), ("occluded_fraction", "occl.", ".3f"),
           ("shape_iou", "shape IoU", ".3f"), ("shape_iou_last", "IoU last", ".3f"),
           ("first_frame_psnr", "1st PSNR", ".2f"), ("first_frame_ssim", "1st SSIM", ".4f"),
           ("background_psnr", "bkg PSNR", ".2f"), ("clip_score", "CLIP", ".2f"),
           ("clip_temporal", "CLIP-T", ".4f"), ("dover_overall", "DOVER", ".4f"),
           ("seconds", "eval s", ".1f")]


def summary(out: dict[str, np.ndarray], seconds: float) -> dict[str, float | None]:
    from stages import metrics

    row: dict[str, float | None] = {k: metrics.mean_or_none(out[k]) if k in out else None
                                    for k, _, _ in COLUMNS}
    row["background_psnr"] = metrics.mean_or_none(out["background_psnr"], out["background_fraction"])
    row["shape_iou_last"] = float(out["shape_iou"][-1])
    row["seconds"] = seconds
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--weights", help="learned-metric folder (clip/, dover.onnx, i3d_torchscript.pt)")
    args = ap.parse_args()
    start = time.perf_counter()
    a, timings = pipeline(args.frames, args.size)
    print(f"pipeline on bear ({args.frames} frames, {args.size}²): " +
          ", ".join(f"{s} {sec:.2f}s" for s, sec in timings.items()))
    print(f"edited shape S_0: {int(a['edited_shape'].sum())} px; "
          f"source object O_0: {int(a['object_masks'][0].sum())} px")
    videos = {"propagate": a["video"], **baselines(a)}
    backend, weights = ("learned", args.weights) if args.weights else ("metrics", None)
    if not args.weights:
        print("CLIP score, CLIP-Temporal, DOVER, FVD: skipped (no weights; pass --weights DIR)")
    rows, outs = {}, {}
    evaluate = get_stage("evaluate")
    for name, video in videos.items():
        t0 = time.perf_counter()
        outs[name] = evaluate.run({**a, "video": video}, {"prompt": PROMPT}, backend=backend, weights=weights)
        rows[name] = summary(outs[name], time.perf_counter() - t0)
    head = f"{'configuration':<24}" + "".join(f"{h:>11}" for _, h, _ in COLUMNS)
    print("\n" + head + "\n" + "-" * len(head))
    for name, row in rows.items():
        cells = "".join(f"{'—' if row[k] is None else format(row[k], f):>11}" for k, _, f in COLUMNS)
        print(f"{name:<24}{cells}")
    if "fvd_features" in outs["propagate"]:
        # FVD compares sets of videos; with one video each, print the I3D feature distance instead.
        print("\nI3D feature distance output -> source (FVD needs a set of videos: see `v2v report`):")
        for name, out in outs.items():
            dist = float(np.linalg.norm(out["fvd_features"] - out["fvd_source_features"]))
            print(f"  {name:<24}{dist:.3f}")
    for name, out in outs.items():
        print(f"per-frame shape IoU, {name}: {np.round(out['shape_iou'].astype(float), 3).tolist()}")
    print(f"total {time.perf_counter() - start:.1f}s")



if __name__ == "__main__":
    main()
