"""Quality of the weight-free pipeline, before and after issue 15, on the synthetic family, the demo's
ball -> cone clip (exact truth) and the bear fixture (bear -> elephant, a shape-changing edit).

* Synthetic family (``tests/synthetic.py``, see ``bench/masks.py`` for the per-clip table): the summary of
  shape-follow IoU (the new shape against the true new shape, last frame) and source-mask tracking.
* Ball -> cone (``flows.config.demo_clip`` on the demo's 512² canvas, truth drawn with the clip): per frame
  t >= 1, the error against the true background (floor) where the ball, its shadow and the cone were at frame
  0 but nothing is now ("ghost"), on the ball's own shadow and body outside the new cone ("remnant"), the
  IoU of the new shape with the true cone, and the untouched-background PSNR (output against source, away
  from everything the edit may touch; on the canvas: mapping it back to the source's resolution is export's).
* Bear: every metric of the ``evaluate`` stage for the ``propagate`` generator, before and after, against
  naive baselines that skip the shape aligner (``repeat-first-frame``: the edited first frame repeated;
  ``paste-in-source-shape``: the edited pixels through the source object's silhouette, moved with it;
  ``paste-static``: the edited object pasted at its frame-0 place), plus the same untouched-background PSNR.

* At the source's resolution (the export): the untouched-background PSNR against the source, for the
  1280x720 static textured scene of ``tests/test_delivery.py`` and for the bear at its 854x480. Before: the
  whole frame mapped back through the canvas (``restore_source: true`` then); after: ``output: source``
  (``stages.export.deliver``: the source's own pixels outside the edit region).

"Before" runs ``source_masks``' track, ``motion`` and ``propagate`` as they were at ``bench.masks.BEFORE_REV``
(loaded from git); every other stage is today's. With ``--weights DIR`` (``clip/``, ``dover.onnx``,
``i3d_torchscript.pt``; see stages/nets/eval_models.py) the learned metrics are added for the bear.

Run: .venv/bin/python bench/quality.py [--frames 16] [--size 512] [--weights DIR] [--skip-family]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.masks import before, family_figures, print_family  # noqa: E402
from flows.config import demo_clip  # noqa: E402
from stages import get_stage, metrics  # noqa: E402
from stages.generate import GenerateParams  # noqa: E402
from stages.ingest import IngestParams, read_source  # noqa: E402

BEAR = ROOT / "tests" / "data" / "bear"
PROMPT = "an elephant walking on the rocks in a zoo"


class Before:
    """The three stages as they were before issue 15, called like ``Stage.run``."""

    def __init__(self) -> None:
        self.sm, self.motion, self.prop = before("source_masks"), before("motion"), before("propagate")
        fields = GenerateParams().model_dump()
        for new in ("match_fill_tone", "shadow_px", "shadow_level"):
            fields.pop(new)
        self.params = SimpleNamespace(**fields, carry_edit_tone=True)  # the defaults of then

    def source_masks(self, a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"object_masks": self.sm.track_masks(a["frames"], a["provided_masks"][0].astype(bool), a["flows"])}

    def motion_(self, a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        r = self.motion.simulate_motion(a["object_masks"], a["flows"], a["edited_shape"])
        return {"shape_masks": r.shape_masks, "paste_masks": r.paste_masks, "simulated_flows": r.simulated_flows}

    def generate(self, a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = ("frames", "flows", "object_masks", "depth", "edited_frame", "shape_masks", "simulated_flows")
        return {"video": self.prop.propagate_video(params=self.params, **{k: a[k] for k in names})}


def aligner(a: dict[str, np.ndarray], old: Before | None, timings: dict[str, float]) -> dict[str, np.ndarray]:
    """flow (if missing), source_masks track, depth, shape_mask change, motion, generate propagate."""
    a = dict(a)

    def run(stage: str, fn: Any = None, **kw: Any) -> None:
        start = time.perf_counter()
        a.update(fn(a) if fn is not None else get_stage(stage).run(a, **kw))
        timings[stage] = time.perf_counter() - start

    if "flows" not in a:
        run("flow")
    run("source_masks", old.source_masks if old else None, backend="track")
    run("depth", backend="ground-prior")
    run("shape_mask", backend="change")
    run("motion", old.motion_ if old else None)
    run("generate", old.generate if old else None, backend="propagate", params={"prompt": PROMPT})
    return a


def untouched_psnr(video: np.ndarray, frames: np.ndarray, touched: np.ndarray) -> float:
    """Mean over frames 1.. of the PSNR of the output against the source outside ``touched``."""
    return float(np.mean([metrics.psnr(video[t], frames[t], ~touched[t]) for t in range(1, len(video))]))


# ---- ball -> cone ------------------------------------------------------------------------------------

def ball_cone_truth(n: int, size: int = 512) -> dict[str, np.ndarray]:
    """The demo clip scaled to ``size``², and what it is made of: ball, shadow, floor, the cone's place."""
    frames, masks = demo_clip.frames_and_masks(0)
    frames, masks = frames[:n], masks[:n]
    floor = demo_clip._floor(np.random.default_rng(7))  # the clip's own floor (variant 0)
    s = demo_clip.SIZE
    shadows, cones = np.zeros((n, s, s), np.uint8), np.zeros((n, s, s), np.uint8)
    for t in range(n):
        cx, cy = demo_clip._ball_centre(t, 0)
        cv2.ellipse(shadows[t], (cx, cy + 22), (26, 6), 0, 0, 360, 1, -1, cv2.LINE_AA)
        cv2.fillConvexPoly(cones[t], np.array([[cx - 22, cy + 22], [cx + 22, cy + 22], [cx, cy - 48]], np.int32), 1)

    def up(x: np.ndarray, nearest: bool) -> np.ndarray:
        inter = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
        return np.stack([cv2.resize(f, (size, size), interpolation=inter) for f in x])

    bg = np.stack([np.ascontiguousarray(floor[:, demo_clip.PAN * t: demo_clip.PAN * t + s]) for t in range(n)])
    ball = up(masks, True) > 127
    edited = cv2.resize(demo_clip.edited_first_frame(frames[0], masks[0], 0), (size, size),
                        interpolation=cv2.INTER_LINEAR)
    return {"frames": up(frames, False), "background": up(bg, False), "ball": ball,
            "shadow": (up(shadows, True) > 0) & ~ball, "cone": up(cones, True) > 0, "edited_frame": edited,
            "pan": np.array(demo_clip.PAN * size / s)}


def ball_cone_figures(a: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, float]:
    video, n = a["video"], len(a["video"])
    bg, ball, shadow, cone = truth["background"], truth["ball"], truth["shadow"], truth["cone"]
    h, w = ball.shape[1:]
    first = (ball[0] | shadow[0] | cone[0] | a["shape_masks"][0]).astype(np.uint8)
    ghost_err, shadow_err, body_err, touched = [], [], [], np.zeros_like(ball)
    for t in range(n):
        new = metrics.dilate(a["shape_masks"][t], 3)
        near = metrics.dilate(ball[t] | shadow[t], 16) | metrics.dilate(cone[t], 16) | metrics.dilate(new, 4)
        touched[t] = near
        if t == 0:
            continue
        err = np.abs(video[t].astype(np.float32) - bg[t]).mean(-1)
        # Where the object was at frame 0, moved with the camera (the floor pans left).
        was = cv2.warpAffine(first, np.float32([[1, 0, -float(truth["pan"]) * t], [0, 1, 0]]), (w, h)) > 0
        ghost = was & ~metrics.dilate(ball[t] | shadow[t], 8) & ~metrics.dilate(cone[t] | new, 8)
        ghost_err.append(err[ghost].mean() if ghost.any() else 0.0)
        sh, body = shadow[t] & ~new, ball[t] & ~new
        shadow_err.append(err[sh].mean() if sh.any() else 0.0)
        body_err.append(err[body].mean() if body.any() else 0.0)
    shape_ious = [metrics.iou(a["shape_masks"][t], cone[t]) for t in range(n)]
    return {"ghost err": float(np.mean(ghost_err)), "shadow err": float(np.mean(shadow_err)),
            "old body err": float(np.mean(body_err)),
            "track IoU min": min(metrics.iou(m, r) for m, r in zip(a["object_masks"], ball, strict=True)),
            "shape IoU min": min(shape_ious), "shape IoU last": shape_ious[-1],
            "untouched PSNR": untouched_psnr(video, truth["frames"], touched)}


def ball_cone(n: int) -> None:
    truth = ball_cone_truth(n)
    base = {"frames": truth["frames"], "provided_masks": truth["ball"][:1], "edited_frame": truth["edited_frame"]}
    base["flows"] = get_stage("flow").run(base)["flows"]
    rows = {}
    for label, old in (("before", Before()), ("after", None)):
        timings: dict[str, float] = {}
        rows[label] = ball_cone_figures(aligner(base, old, timings), truth)
        rows[label]["seconds"] = sum(timings.values())
    cols = list(rows["after"])
    print(f"\nball -> cone (demo clip, {n} frames at 512²): mean abs error against the true floor (0..255) where "
          "the ball/shadow/cone were at frame 0 and nothing is now (ghost), on the ball's shadow and body outside "
          "the new shape; IoU of S_t with the true cone; untouched-background PSNR (capped)")
    print(f"{'':<8}" + "".join(f"{c:>16}" for c in cols))
    for label, row in rows.items():
        print(f"{label:<8}" + "".join(f"{row[c]:>16.3f}" for c in cols))


# ---- bear -----------------------------------------------------------------------------------------

def bear_pipeline(n_frames: int, size: int, old: Before | None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    t: dict[str, float] = {}
    params = IngestParams(n_frames=n_frames, width=size, height=size)
    clip = read_source(BEAR / "frames", params, masks=BEAR / "mask-00000.png")
    a = get_stage("ingest").run(clip.arrays(), params)
    a["first_frame_image"] = cv2.cvtColor(cv2.imread(str(BEAR / "edited-first-frame-elephant.png")),
                                          cv2.COLOR_BGR2RGB)
    a.update(get_stage("edit").run(a, backend="provided", params={"width": size, "height": size}))
    return aligner(a, old, t), t


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
           ("background_psnr", "bkg PSNR", ".2f"), ("untouched_psnr", "untouched", ".2f"),
           ("clip_score", "CLIP", ".2f"), ("clip_temporal", "CLIP-T", ".4f"), ("dover_overall", "DOVER", ".4f"),
           ("seconds", "eval s", ".1f")]


def summary(out: dict[str, np.ndarray], seconds: float) -> dict[str, float | None]:
    row: dict[str, float | None] = {k: metrics.mean_or_none(out[k]) if k in out else None
                                    for k, _, _ in COLUMNS}
    row["background_psnr"] = metrics.mean_or_none(out["background_psnr"], out["background_fraction"])
    row["shape_iou_last"] = float(out["shape_iou"][-1])
    row["seconds"] = seconds
    return row


def bear(args: argparse.Namespace) -> None:
    runs = {}
    for label, old in (("before", Before()), ("after", None)):
        a, timings = bear_pipeline(args.frames, args.size, old)
        runs[label] = a
        print(f"\nbear pipeline {label} ({args.frames} frames, {args.size}²): "
              + ", ".join(f"{s} {sec:.2f}s" for s, sec in timings.items()))
    a = runs["after"]
    print(f"edited shape S_0: {int(a['edited_shape'].sum())} px; "
          f"source object O_0: {int(a['object_masks'][0].sum())} px")
    # One region for every row: away from both runs' source masks and new shapes (16 px).
    near = np.zeros(a["object_masks"].shape, bool)
    for r in runs.values():
        near |= np.stack([metrics.dilate(o, 16) | metrics.dilate(s, 16)
                          for o, s in zip(r["object_masks"], r["shape_masks"], strict=True)])
    videos = {"propagate (before)": runs["before"]["video"], "propagate": a["video"], **baselines(a)}
    backend, weights = ("learned", args.weights) if args.weights else ("metrics", None)
    if not args.weights:
        print("CLIP score, CLIP-Temporal, DOVER, FVD: skipped (no weights; pass --weights DIR)")
    rows, outs = {}, {}
    evaluate = get_stage("evaluate")
    for name, video in videos.items():
        t0 = time.perf_counter()
        src = runs["before"] if "before" in name else a
        outs[name] = evaluate.run({**src, "video": video}, {"prompt": PROMPT}, backend=backend, weights=weights)
        rows[name] = summary(outs[name], time.perf_counter() - t0)
        rows[name]["untouched_psnr"] = untouched_psnr(video, a["frames"], near)
    head = f"{'configuration':<24}" + "".join(f"{h:>11}" for _, h, _ in COLUMNS)
    print("\n" + head + "\n" + "-" * len(head))
    for name, row in rows.items():
        cells = "".join(f"{'—' if row[k] is None else format(row[k], f):>11}" for k, _, f in COLUMNS)
        print(f"{name:<24}{cells}")
    print("untouched: PSNR against the source 16 px away from every run's source masks and new shapes (capped)")
    if "fvd_features" in outs["propagate"]:
        # FVD compares sets of videos; with one video each, print the I3D feature distance instead.
        print("\nI3D feature distance output -> source (FVD needs a set of videos: see `v2v report`):")
        for name, out in outs.items():
            dist = float(np.linalg.norm(out["fvd_features"] - out["fvd_source_features"]))
            print(f"  {name:<24}{dist:.3f}")
    for name, out in outs.items():
        print(f"per-frame shape IoU, {name}: {np.round(out['shape_iou'].astype(float), 3).tolist()}")
    bear_at_source(args, runs, near)


# ---- at the source's resolution (the export) ----------------------------------------------------------

def _at_source_rows(runs: dict[str, dict[str, np.ndarray]], source: np.ndarray, geometry: dict[str, Any]
                    ) -> dict[str, np.ndarray]:
    """Before: the whole frame through the canvas and back (``restore_source: true`` then); after: the
    export's :func:`stages.export.deliver` (the source outside the edit region), and the whole-frame
    restore of today's video beside it (what the canvas round trip alone costs)."""
    from stages.export import deliver, restore_video

    a = runs["after"]
    return {"before: whole frame restored": restore_video(runs["before"]["video"], geometry),
            "after: whole frame restored": restore_video(a["video"], geometry),
            "after: delivered (output: source)": deliver(a["video"], source, geometry, a["frames"],
                                                         a["object_masks"], a["shape_masks"], a["edited_frame"])}


def _print_at_source(title: str, rows: dict[str, np.ndarray], source: np.ndarray, untouched: np.ndarray) -> None:
    n = len(source)
    print(f"\n{title}: untouched-background PSNR against the source, dB (100 = exact, capped)")
    print(f"{'':<36}{'frame 1':>10}{f'frame {n - 1}':>10}{'mean 1..':>10}{'exact px':>10}")
    for label, video in rows.items():
        p = [metrics.psnr(video[t], source[t], untouched[t]) for t in range(1, n)]
        exact = float(np.mean([(video[t][untouched[t]] == source[t][untouched[t]]).all(-1).mean()
                               for t in range(1, n)]))
        print(f"{label:<36}{p[0]:>10.2f}{p[-1]:>10.2f}{np.mean(p):>10.2f}{exact:>10.3f}")


def static_scene_at_source(n: int) -> None:
    """The 1280x720 static textured scene of tests/test_delivery.py (a flat disc and its shadow -> a green
    square), on the reference's squashed 512² canvas, exported at 1280x720."""
    from test_delivery import scene

    from stages.ingest import SourceClip, canvas_geometry

    sc = scene(n)
    params = IngestParams(n_frames=n)
    a = get_stage("ingest").run(SourceClip(sc["frames"], np.arange(n), sc["masks"][:1], n).arrays(), params)
    a["first_frame_image"] = sc["edited"]
    a.update(get_stage("edit").run(a, backend="provided"))
    base = {"frames": a["frames"], "provided_masks": a["provided_masks"], "edited_frame": a["edited_frame"]}
    base["flows"] = get_stage("flow").run(base)["flows"]
    runs = {label: aligner(base, old, {}) for label, old in (("before", Before()), ("after", None))}
    h, w = sc["frames"].shape[1:3]
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (129, 129))  # 64 px away from everything touched
    untouched = np.stack([cv2.dilate((m | s | q).astype(np.uint8), kernel) == 0
                          for m, s, q in zip(sc["masks"], sc["shadows"], sc["squares"], strict=True)])
    rows = _at_source_rows(runs, sc["frames"], canvas_geometry(w, h, params))
    _print_at_source(f"static textured scene {w}x{h}, {n} frames, 512² squash canvas, 64 px from the truth",
                     rows, sc["frames"], untouched)


def bear_at_source(args: argparse.Namespace, runs: dict[str, dict[str, np.ndarray]], near: np.ndarray) -> None:
    """The bear exported at its 854x480: untouched = 16 canvas px away from every run's masks."""
    from stages.export import _mask_to_source
    from stages.ingest import canvas_geometry

    source = read_source(BEAR / "frames", IngestParams(n_frames=args.frames)).frames
    geometry = canvas_geometry(source.shape[2], source.shape[1], IngestParams(width=args.size, height=args.size))
    untouched = ~np.stack([_mask_to_source(m, geometry) for m in near])
    rows = _at_source_rows(runs, source, geometry)
    _print_at_source(f"bear at its {source.shape[2]}x{source.shape[1]}", rows, source, untouched)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--weights", help="learned-metric folder (clip/, dover.onnx, i3d_torchscript.pt)")
    ap.add_argument("--skip-family", action="store_true", help="skip the synthetic family (~1 min)")
    args = ap.parse_args()
    start = time.perf_counter()
    if not args.skip_family:
        print_family(family_figures(args.frames), per_clip=False)
    ball_cone(args.frames)
    static_scene_at_source(args.frames)
    bear(args)
    print(f"total {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
