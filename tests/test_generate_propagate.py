"""generate / propagate: the offline generator, on the bear -> elephant edit and on synthetic clips.

The ISA inputs are computed by the real upstream stages (DIS flow, ground-prior depth, motion), with the
IS-Net masks of tests/data standing in for the source object masks and the edited shape.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from synthetic import OBJECT_COLOUR, Clip, edited_first_frame, make_clip, new_shape_masks

from stages import get_stage, metrics
from stages.base import MissingWeightsError, StageInputError
from stages.export import contact_sheet
from stages.generate import STAGE, GenerateParams
from stages.propagate import fill_holes
from stages.source_masks import track_masks

N, SIZE = 16, 512


def _read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def _read_mask(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)


def _squash(img: np.ndarray) -> np.ndarray:
    return cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def bear(bear_dir: Path) -> dict[str, np.ndarray]:
    frames = np.stack([_squash(_read_rgb(bear_dir / "frames" / f"{i:05d}.jpg")) for i in range(N)])
    objs = np.stack([_squash(_read_mask(bear_dir / "isnet-masks" / f"{i:05d}.png")) >= 128 for i in range(N)])
    edited = _read_rgb(bear_dir / "edited-first-frame-elephant.png")  # already 512² (squashed)
    shape = _read_mask(bear_dir / "isnet-mask-edited-first-frame-elephant.png") >= 128
    flows = get_stage("flow").run({"frames": frames}, backend="dis")["flows"]
    depth = get_stage("depth").run({"frames": frames, "object_masks": objs})["depth"]
    motion = get_stage("motion").run({"object_masks": objs, "flows": flows, "edited_shape": shape})
    return {"frames": frames, "object_masks": objs, "edited_frame": edited, "flows": flows, "depth": depth,
            **motion}


def _flows(video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DIS flows of a video: backward (pair t on frame t+1 -> t) and forward (on frame t -> t+1)."""
    flow = get_stage("flow")
    backward = flow.run({"frames": video}, backend="dis")["flows"]
    forward = flow.run({"frames": np.ascontiguousarray(video[::-1])}, backend="dis")["flows"][::-1]
    return backward, forward


@pytest.fixture(scope="module")
def bear_video(bear: dict[str, np.ndarray]) -> np.ndarray:
    return STAGE.run(bear, backend="propagate")["video"]


def test_bear_first_frame_and_contact_sheet(bear: dict[str, np.ndarray], bear_video: np.ndarray,
                                            tmp_path: Path) -> None:
    assert bear_video.shape == (N, SIZE, SIZE, 3) and bear_video.dtype == np.uint8
    psnr0 = metrics.psnr(bear_video[0], bear["edited_frame"])
    print(f"\nframe 0 PSNR vs the edited frame: {psnr0:.1f} dB")
    assert psnr0 >= 40
    path = tmp_path / "bear-elephant-propagate.png"
    contact_sheet(bear_video, path, cols=4, every=1, tile_width=256)
    print(f"contact sheet: {path}")
    # The old object is gone where the new shape does not cover it: those pixels differ from the bear's.
    t = N - 1
    uncovered = bear["object_masks"][t] & ~metrics.dilate(bear["shape_masks"][t], 3)
    if uncovered.sum() > 200:
        diff = np.abs(bear_video[t].astype(np.float32) - bear["frames"][t]).mean(-1)[uncovered]
        assert diff.mean() > 15


def test_bear_object_follows_shape_masks(bear: dict[str, np.ndarray], bear_video: np.ndarray) -> None:
    """IoU of the elephant in the output with S_t, the output's mask found two independent ways.

    1. ``track``: the project's tracker (source_masks.track_masks: S_0 carried by the DIS flow of the
       *output*, re-fitted to colour and edges). It measures the rendered motion but drifts: on the real
       bear against its IS-Net masks it falls to ~0.78 by frame 15, so it can only certify >= 0.8.
    2. ``appearance``: where the edited object's pixels ended up (metrics.track_by_appearance: masked
       template matching of the edited frame's pixels inside S_0 over each output frame, then only the
       pixels whose colour matches). Motion pasting moves the object rigidly (one mean flow inside the
       paste region), so its pixels sit at S_0 shifted; the search knows nothing of the simulated flow,
       so an object moved wrongly, smeared or left behind loses IoU. No drift: a strict >= 0.9.
    """
    shapes, edited = bear["shape_masks"], bear["edited_frame"]
    backward, _ = _flows(bear_video)
    tracked = track_masks(bear_video, shapes[0], backward)
    found = metrics.track_by_appearance(bear_video, edited, shapes[0])
    iou_track = np.array([metrics.iou(tracked[t], shapes[t]) for t in range(N)])
    iou_found = np.array([metrics.iou(found[t], shapes[t]) for t in range(N)])
    print(f"\nIoU tracked:    {np.round(iou_track, 3)}\nIoU appearance: {np.round(iou_found, 3)}")
    assert iou_track.min() >= 0.8
    assert iou_found.min() >= 0.9


def test_bear_warping_error_below_fixed_paste(bear: dict[str, np.ndarray], bear_video: np.ndarray) -> None:
    """Lai et al. warping error (DIS flow of each video, forward-backward occlusion check).

    Baseline: the edited object pasted at its frame-0 place over the source frames (frame 0 = the edited
    frame in both, so the jump from the edited frame to frame 1 is shared).
    """
    shape0, edited = bear["shape_masks"][0], bear["edited_frame"]
    fixed = bear["frames"].copy()
    fixed[0] = edited
    fixed[1:, shape0] = edited[shape0]
    errors = {}
    for name, video in (("propagate", bear_video), ("fixed paste", fixed)):
        backward, forward = _flows(video)
        errors[name] = np.array([metrics.warping_error(video[t], video[t + 1], backward[t], forward[t])[0]
                                 for t in range(N - 1)])
    print("\nwarping error x1e3: " + ", ".join(f"{k} {v.mean() * 1e3:.3f}" for k, v in errors.items()))
    assert errors["propagate"].mean() < errors["fixed paste"].mean()


# ---- synthetic clips: exact expectations ----------------------------------------------------------------

def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.uniform(40, 215, (h, w, 3)).astype(np.float32), (0, 0), 2.0)


def _synthetic(pan: int = 2, move: int = 1, n: int = 8, size: int = 96, pole: bool = False
               ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A camera panning ``pan`` px/frame over a texture; a square moving ``move`` px/frame in the frame.

    The edit replaces the square by a smaller disk. Flows are exact. Returns the stage inputs and the true
    background of every frame (what the removed square hid).
    """
    world = _texture(size, size + pan * n)
    bg = np.stack([world[:, t * pan: t * pan + size] for t in range(n)])
    if pole:  # a near vertical bar, fixed in the world
        bg[:, :, :] = world[:, :size][None]  # static camera when testing depth order
        bg[:, 10:90, 70:76] = (250, 250, 30)
    frames, objs = bg.copy(), np.zeros((n, size, size), bool)
    for t in range(n):
        x = 30 + move * t
        objs[t, 30:58, x:x + 28] = True
        if pole:
            objs[t, :, 70:76] = False  # the square passes behind the pole
    frames[objs] = (200, 40, 40)
    frames = np.clip(frames + 0.5, 0, 255).astype(np.uint8)
    flows = np.zeros((n - 1, size, size, 2), np.float32)
    flows[..., 0] = 0 if pole else pan
    for t in range(n - 1):
        flows[t][objs[t + 1]] = (-move, 0)
    yy, xx = np.mgrid[:size, :size]
    disk = (yy - 44) ** 2 + (xx - 44) ** 2 <= 9 ** 2
    edited = frames[0].copy()
    edited[objs[0]] = np.clip(bg[0][objs[0]] + 0.5, 0, 255).astype(np.uint8)
    edited[disk] = (30, 60, 220)
    depth = np.full((n, size, size), 0.2, np.float16)
    depth[objs] = 0.5
    if pole:
        depth[:, 10:90, 70:76] = 1.0
    motion = get_stage("motion").run({"object_masks": objs, "flows": flows, "edited_shape": disk})
    arrays = {"frames": frames, "object_masks": objs, "edited_frame": edited, "flows": flows, "depth": depth,
              **motion}
    return arrays, bg


@pytest.mark.parametrize("background", ["source", "edited"])
def test_removed_object_area_shows_the_true_background(background: str) -> None:
    arrays, bg = _synthetic()
    video = STAGE.run(arrays, params={"background": background})["video"]
    assert np.array_equal(video[0], arrays["edited_frame"])
    for t in range(1, len(video)):
        shape = arrays["shape_masks"][t]
        revealed = arrays["object_masks"][t] & ~metrics.dilate(shape, 3)
        err = np.abs(video[t].astype(np.float32) - bg[t])[revealed].mean()
        assert err < 6, (t, err)  # filled from the edited frame / other frames, registered by the flow
        core = ~metrics.dilate(~shape, 3)  # 3 px inside the (feathered) edge
        assert np.abs(video[t][core].astype(np.float32) - (30, 60, 220)).max() <= 2  # the disk moved


def test_depth_order_pole_in_front() -> None:
    arrays, _ = _synthetic(move=4, pole=True)
    video = STAGE.run(arrays)["video"]
    flat = STAGE.run(arrays, params={"occlusion": False})["video"]
    t = len(video) - 1
    core = ~metrics.dilate(~arrays["shape_masks"][t], 3)  # inside the disk's feathered edge
    behind = core & (np.arange(96) >= 70)[None, :] & (np.arange(96) < 76)[None, :]
    assert behind.sum() > 40  # the disk reached the pole
    assert np.abs(video[t][behind].astype(int) - (250, 250, 30)).max() <= 3  # the pole stays in front
    assert np.abs(flat[t][behind].astype(int) - (30, 60, 220)).max() <= 3  # without depth order: the disk


def test_empty_masks_and_one_frame() -> None:
    arrays, _ = _synthetic()
    for name in ("object_masks", "shape_masks"):
        arrays[name] = np.zeros_like(arrays[name])
    arrays["simulated_flows"] = arrays["flows"].copy()
    video = STAGE.run(arrays)["video"]
    assert video.dtype == np.uint8 and np.array_equal(video[0], arrays["edited_frame"])
    one = {k: v[:1] for k, v in arrays.items() if k != "edited_frame"}
    one["edited_frame"] = arrays["edited_frame"]
    one["flows"] = one["simulated_flows"] = np.zeros((0, 96, 96, 2), np.float32)
    assert np.array_equal(STAGE.run(one)["video"], arrays["edited_frame"][None])


def test_bad_inputs_and_params() -> None:
    arrays, _ = _synthetic()
    bad = dict(arrays, shape_masks=arrays["shape_masks"][:-1])
    with pytest.raises(StageInputError, match="shape_masks"):
        STAGE.run(bad)
    with pytest.raises(StageInputError, match="edited_frame"):
        STAGE.run(dict(arrays, edited_frame=arrays["edited_frame"][:64]))
    nan = arrays["simulated_flows"].copy()
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(StageInputError, match="NaN"):
        STAGE.run(dict(arrays, simulated_flows=nan))
    with pytest.raises(StageInputError, match="overlap"):
        STAGE.resolve_params({"window": 8, "overlap": 8})
    assert STAGE.used_inputs("i2vgenxl") == ("edited_frame", "refined_depth")
    with pytest.raises(MissingWeightsError, match="i2vgenxl"):
        STAGE.run({"edited_frame": arrays["edited_frame"], "refined_depth": arrays["depth"]},
                  backend="i2vgenxl")
    assert GenerateParams().negative_prompt.startswith("Distorted, discontinuous")


def test_fill_holes_keeps_known_pixels_and_texture() -> None:
    img = np.clip(_texture(64, 64) + 0.5, 0, 255).astype(np.uint8)
    hole = np.zeros((64, 64), bool)
    hole[20:44, 24:40] = True
    out = fill_holes(img, hole)
    assert np.array_equal(out[~hole], img[~hole])
    # Texture, not a smear: the filled area keeps a variance comparable to its surroundings.
    ring = metrics.dilate(hole, 8) & ~hole
    assert out[hole].astype(np.float32).std() > 0.5 * img[ring].astype(np.float32).std()


# ---- exact truth (tests/synthetic.py): what the output must leave alone, and what must go -----------------

def _edit(n: int = 8, **kw: object) -> tuple[Clip, dict[str, np.ndarray]]:
    """A synthetic clip and the stage inputs: true masks, the true new shape moved by the motion stage (real
    DIS flows), a perfect edit of frame 0."""
    clip = make_clip(n=n, size=(80, 144), **{"speed": 6.0, "radius": 11.0, **kw})  # type: ignore[arg-type]
    new = new_shape_masks(clip)
    flows = get_stage("flow").run({"frames": clip.frames})["flows"]
    motion = get_stage("motion").run({"object_masks": clip.masks, "flows": flows, "edited_shape": new[0]})
    depth = np.full(clip.masks.shape, 0.3, np.float16)
    arrays = {"frames": clip.frames, "object_masks": clip.masks, "edited_frame": edited_first_frame(clip, new),
              "flows": flows, "depth": depth, **motion}
    return clip, arrays


def _edit_region(clip: Clip, arrays: dict[str, np.ndarray], t: int) -> np.ndarray:
    """The old object of frame t grown by the removal margin, and the new shape grown by its feather."""
    margin = GenerateParams().removal_margin_px
    return metrics.dilate(clip.masks[t], margin) | metrics.dilate(arrays["shape_masks"][t], 3)


@pytest.mark.parametrize("kw", [{"shape": "disc"}, {"shape": "star", "textured_object": True, "pan": 2}],
                         ids=["flat-disc", "textured-star-pan"])
def test_untouched_source_is_exact_and_no_ghost(kw: dict[str, object]) -> None:
    """Where neither the old object of frame t (grown by the removal margin) nor the new shape (grown by its
    feather) is, frame t is the source frame to the byte: in particular where the object and the new shape
    were at frame 0 (no ghost). What the removed object hid is the true background."""
    clip, arrays = _edit(**kw)
    video = STAGE.run(arrays)["video"]
    for t in range(1, len(video)):
        edit = _edit_region(clip, arrays, t)
        assert np.array_equal(video[t][~edit], clip.frames[t][~edit]), t
        ghost = (clip.masks[0] | arrays["shape_masks"][0]) & ~edit
        if t >= 4:  # the object has moved off its frame-0 place
            assert ghost.sum() > 50 and np.array_equal(video[t][ghost], clip.background[t][ghost])
        revealed = _edit_region(clip, arrays, t) & ~metrics.dilate(arrays["shape_masks"][t], 3)
        err = np.abs(video[t].astype(np.float32) - clip.background[t])[revealed].mean()
        assert err < 3, (t, err)


@pytest.mark.parametrize("growth", [1.04, 0.96], ids=["growing", "shrinking"])
def test_no_remnant_of_a_growing_or_shrinking_object(growth: float) -> None:
    """The new shape moves rigidly; the old object changes size. Every frame's own source mask is removed,
    so nothing of the old object shows outside the new shape (the frame-0 mask moved along would leave the
    grown part, or erase background the shrunk one no longer covers)."""
    clip, arrays = _edit(n=10, growth=growth, speed=3.0, radius=14.0 if growth > 1 else 20.0)
    video = STAGE.run(arrays)["video"]
    for t in range(1, len(video)):
        old = clip.masks[t] & ~metrics.dilate(arrays["shape_masks"][t], 3)
        if t == (len(video) - 1 if growth > 1 else 1):
            assert old.sum() > 50  # the old object sticks out of the new shape there
        # Not the old object's colour anywhere (flat: any pixel of it would be exactly OBJECT_COLOUR) ...
        like_old = np.abs(video[t][old].astype(np.int16) - OBJECT_COLOUR).max(-1) <= 12
        assert like_old.sum() <= max(2, 0.01 * old.sum()), (t, int(like_old.sum()), int(old.sum()))
        # ... and the true background where another frame shows it (elsewhere it is inpainted).
        err = np.abs(video[t].astype(np.float32) - clip.background[t]).mean(-1)[old]
        assert np.median(err) < 3 if old.any() else True, (t, np.median(err))


def test_old_shadow_goes_with_the_object() -> None:
    clip, arrays = _edit(shadow=True)
    video = STAGE.run(arrays)["video"]
    kept = STAGE.run(arrays, {"shadow_px": 0})["video"]
    for t in range(1, len(video)):
        shadow = clip.shadows[t] & ~metrics.dilate(arrays["shape_masks"][t], 3)
        assert shadow.sum() > 20
        err = np.abs(video[t].astype(np.float32) - clip.background[t])[shadow].mean()
        err_kept = np.abs(kept[t].astype(np.float32) - clip.background[t])[shadow].mean()
        assert err < 4 and err_kept > 15, (t, err, err_kept)


def test_full_frame_and_empty_masks() -> None:
    """A source mask (or new shape) over the whole frame, or none at all: no crash (fill_holes had nothing to
    take from); without any mask the source frames come back untouched."""
    clip, arrays = _edit(n=5)
    full = np.ones_like(arrays["object_masks"])
    for over in ({"object_masks": full}, {"object_masks": full, "shape_masks": full}):
        for background in ("source", "edited"):
            video = STAGE.run({**arrays, **over}, {"background": background})["video"]
            assert video.shape == clip.frames.shape and np.array_equal(video[0], arrays["edited_frame"])
    empty = np.zeros_like(arrays["object_masks"])
    video = STAGE.run({**arrays, "object_masks": empty, "shape_masks": empty})["video"]
    assert np.array_equal(video[1:], clip.frames[1:])
    img = clip.frames[0]
    assert np.array_equal(fill_holes(img, np.ones(img.shape[:2], bool)), img)


def test_propagate_is_deterministic() -> None:
    _, arrays = _edit(n=6, shape="star", pan=2, shadow=True)
    first = STAGE.run(arrays)["video"]
    assert np.array_equal(first, STAGE.run({k: v.copy() for k, v in arrays.items()})["video"])
