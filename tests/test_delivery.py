"""Delivery (issue 15): the export at the source's size, frame rate and audio, the untouched background the
source's own pixels; canvases beyond 1024; an edited first frame of another aspect fitted as the frames are."""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from synthetic import NEW_COLOUR, texture

from stages import get_stage, metrics
from stages.base import StageInputError
from stages.edit import STAGE as EDIT
from stages.edit import EditParams, first_frame_fit, provided
from stages.export import composite_at_source, deliver, edit_region, export_video, restore_video
from stages.ingest import IngestParams, SourceClip, canvas_geometry, warp_to_canvas

# ---- a static textured scene at 1280x720 with exact truth ------------------------------------------------

W, H, R = 1280, 720, 60  # source size, the old object's radius


def scene(n: int = 16, speed: float = 24.0, size: tuple[int, int] = (H, W)) -> dict[str, np.ndarray]:
    """A flat disc with a shadow sliding over a static texture, and the perfect edit of frame 0: the disc and
    its shadow painted out, a green square standing where it was (moving with it)."""
    h, w = size
    bg = np.clip(texture(h, w, seed=5) + 0.5, 0, 255).astype(np.uint8)
    frames, masks, shadows, squares = [], [], [], []
    for t in range(n):
        cx, cy = int(w * 0.25 + speed * t), h // 2
        img, m, sh, sq = bg.copy(), np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
        cv2.ellipse(sh, (cx, cy + R), (int(1.2 * R), int(0.35 * R)), 0, 0, 360, 1, -1)
        cv2.circle(m, (cx, cy), R, 1, -1)
        cv2.rectangle(sq, (cx - R, cy - 2 * R), (cx + R, cy + R // 2), 1, -1)
        sh = (sh > 0) & (m == 0)
        img[sh] = (img[sh] * 0.45).astype(np.uint8)
        img[m > 0] = (150, 120, 100)
        frames.append(img), masks.append(m > 0), shadows.append(sh), squares.append(sq > 0)
    edited = bg.copy()
    edited[squares[0]] = NEW_COLOUR
    return {"frames": np.stack(frames), "masks": np.stack(masks), "shadows": np.stack(shadows),
            "squares": np.stack(squares), "edited": edited, "background": bg}


def offline_pipeline(sc: dict[str, np.ndarray], params: IngestParams) -> dict[str, np.ndarray]:
    """Every weight-free stage on the canvas, from the decoded clip (the row's per-frame masks given)."""
    clip = SourceClip(sc["frames"], np.arange(len(sc["frames"])), sc["masks"], len(sc["frames"]))
    a: dict[str, np.ndarray] = dict(get_stage("ingest").run(clip.arrays(), params))
    a["first_frame_image"] = sc["edited"]
    canvas = {"canvas": params.canvas, "width": params.width, "height": params.height}
    a.update(get_stage("edit").run(a, canvas, backend="provided"))
    a.update(get_stage("flow").run(a))
    a.update(get_stage("source_masks").run(a, backend="provided"))
    a.update(get_stage("depth").run(a, backend="ground-prior"))
    a.update(get_stage("shape_mask").run(a, backend="change"))
    a.update(get_stage("motion").run(a))
    a.update(get_stage("generate").run(a, backend="propagate"))
    return a


def grow(mask: np.ndarray, px: int) -> np.ndarray:
    return cv2.dilate(mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1,) * 2)) > 0


@pytest.fixture(scope="module")
def static_scene() -> dict[str, np.ndarray]:
    return scene()


@pytest.fixture(scope="module")
def pipeline(static_scene: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return offline_pipeline(static_scene, IngestParams(n_frames=16, width=512, height=512))


def test_untouched_background_is_the_source_on_every_frame(static_scene: dict[str, np.ndarray],
                                                           pipeline: dict[str, np.ndarray], tmp_path: Path) -> None:
    sc, a = static_scene, pipeline
    geometry = canvas_geometry(W, H, IngestParams())
    out = deliver(a["video"], sc["frames"], geometry, a["frames"], a["object_masks"], a["shape_masks"],
                  a["edited_frame"])
    assert out.shape == sc["frames"].shape and out.dtype == np.uint8
    # Lossless PNG frames: what is written is what was delivered.
    pngs = sorted(export_video(out, tmp_path, formats=("png",))["png"].glob("*.png"))
    written = np.stack([cv2.imread(str(p))[..., ::-1] for p in pngs])
    assert np.array_equal(written, out)
    # Untouched: 64 source px (~26 canvas px) away from the old disc, its shadow and the new square.
    old_way = restore_video(a["video"], geometry)  # the whole frame through the canvas and back
    for t in range(len(out)):
        untouched = ~grow(sc["masks"][t] | sc["shadows"][t] | sc["squares"][t], 64)
        assert untouched.mean() > 0.8
        assert np.array_equal(written[t][untouched], sc["frames"][t][untouched]), t
        assert metrics.psnr(old_way[t], sc["frames"][t], untouched) < 35.0  # what it was: detail lost
    # Inside, the edit: the new square is there, and the old disc and its shadow are gone.
    for t in range(1, len(out)):
        core = sc["squares"][t] & ~grow(~sc["squares"][t], 12)
        assert np.abs(written[t][core].astype(np.float32) - NEW_COLOUR).mean() < 12.0, t
        gone = (sc["masks"][t] | sc["shadows"][t]) & ~grow(sc["squares"][t], 12)
        err = np.abs(written[t][gone].astype(np.float32) - sc["background"][gone]).mean()
        assert err < 12.0, (t, err)  # the canvas's fill, upsampled: blurrier than the source, not the disc


def test_composite_is_exact_outside_the_region_in_every_canvas_mode() -> None:
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, (2, 300, 500, 3), dtype=np.uint8)
    for mode in ("squash", "letterbox", "crop"):
        geometry = canvas_geometry(500, 300, IngestParams(canvas=mode, width=128, height=128))
        canvas = np.stack([warp_to_canvas(f, geometry) for f in src]).astype(np.uint8)
        video = canvas.copy()
        video[:, 40:70, 50:80] = (0, 255, 0)
        region = np.zeros(video.shape[:3], bool)
        region[:, 40:70, 50:80] = True
        out = composite_at_source(video, src, region, geometry, feather_px=3.0)
        scale = 1 / min(geometry["scale"])
        (sx, sy), (ox, oy) = geometry["scale"], geometry["offset"]
        # The source box of the region, grown by the feather and a pixel: everything outside is the source.
        x0, x1 = int((50 - 4 - ox) / sx) - 1, int((80 + 4 - ox) / sx) + 2
        y0, y1 = int((40 - 4 - oy) / sy) - 1, int((70 + 4 - oy) / sy) + 2
        outside = np.ones(src.shape[1:3], bool)
        outside[max(y0, 0):y1, max(x0, 0):x1] = False
        assert np.array_equal(out[:, outside], src[:, outside]), mode
        # The region itself is the canvas's content mapped back (a feather width inside its edge).
        cx0, cx1 = int((50 - ox) / sx + scale * 3), int((80 - ox) / sx - scale * 3)
        cy0, cy1 = int((40 - oy) / sy + scale * 3), int((70 - oy) / sy - scale * 3)
        assert (out[:, cy0:cy1, cx0:cx1] == (0, 255, 0)).all(), mode
    with pytest.raises(StageInputError, match="source frames"):
        composite_at_source(video, src[:, :100], region, geometry)


def test_a_restyle_is_delivered_whole_and_masks_only_bound_the_generators_changes() -> None:
    rng = np.random.default_rng(2)
    frames = np.stack([np.clip(texture(128, 128, seed=s) + 0.5, 0, 255).astype(np.uint8) for s in range(3)])
    masks = np.zeros((3, 128, 128), bool)
    masks[:, 20:30, 20:30] = True
    # The edited first frame changed the colours of frame 0 away from the masks: a restyle, the whole frame.
    tint = np.clip(frames[0] * np.float32([1.2, 0.9, 0.7]), 0, 255).astype(np.uint8)
    assert edit_region(frames, frames, masks, masks, tint) is None
    # An editor's re-rendering (fine-scale noise of 12 levels everywhere): not a restyle.
    noisy = np.clip(frames[0] + rng.normal(0, 12, frames[0].shape), 0, 255).astype(np.uint8)
    assert edit_region(frames, frames, masks, masks, noisy) is not None
    # A generator that changed a shadow next to the object: that is in; the same change far away is not.
    video = frames.copy()
    video[:, 31:36, 20:30] = 0  # next to the object
    video[:, 100:110, 100:110] = 0  # beyond reach_px (48)
    region = edit_region(frames, video, masks, None, frames[0], grow_px=2)
    assert region is not None and region[:, 31:36, 20:30].all() and not region[:, 100:110, 100:110].any()
    assert not region[:, :10].any() and not region[:, 40:].any()
    assert edit_region(frames, video) is None  # no masks at all: nothing says where the edit is


# ---- frame rate and audio: the job's export ---------------------------------------------------------------

SR, FPS = 44100, 25


def chirp(seconds: float) -> np.ndarray:
    """A rising tone (200 Hz + 200 Hz/s): where a piece of it starts is where it came from."""
    t = np.arange(int(seconds * SR)) / SR
    return (0.5 * np.sin(2 * np.pi * np.cumsum(200 + 200 * t) / SR)).astype(np.float32)


def write_clip(path: Path, n: int = 75, size: tuple[int, int] = (240, 320), audio: bool = True,
               seed: int = 0) -> Path:
    h, w = size
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 2)
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=FPS)
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        if audio:
            a = out.add_stream("aac", rate=SR, layout="mono")
            frame = av.AudioFrame.from_ndarray(chirp(n / FPS)[None], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = SR, 0
            out.mux(a.encode(frame))
            out.mux(a.encode(None))
        for i in range(n):
            img = np.roll(base, 3 * i, axis=1)
            out.mux(v.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")))
        out.mux(v.encode(None))
    return path


def stored_job(tmp_path: Path, source: Path, params: dict[str, int | str]) -> tuple[str, dict[str, str]]:
    """ingest through the flows (its real artifact and attributes), then a generator's output: the canvas
    frames with a green box painted where the (given) object mask is."""
    from flows.plan.calls import make_call
    from flows.run.execute import execute
    from stages.ingest import source_ref
    from storage import ArtifactRef, ArtifactStore

    store_url = str(tmp_path / "store")
    store = ArtifactStore(store_url)
    ref = source_ref(source, IngestParams(**params))
    call = make_call("ingest", params=params, inputs={"source": ref.digest})
    execute(call, store, externals={"source": ref})
    frames = store.read(call.ref, ["frames"])["frames"]
    masks = np.zeros(frames.shape[:3], bool)
    masks[:, 10:30, 20:40] = True
    video = frames.copy()
    video[masks] = (0, 255, 0)
    refs = {"ingest": call.ref.key}
    for stage, name, arr, dims in (("source_masks", "object_masks", masks, ("frame", "y", "x")),
                                   ("generate", "video", video, ("frame", "y", "x", "channel"))):
        key = f"{stage[:4].encode().hex()}{call.ref.key[8:]}"
        store.write(ArtifactRef(stage, key), {name: arr}, {name: dims}, {"params": {"fps": 16}})
        refs[stage] = key
    return store_url, refs


def decoded(path: str) -> tuple[np.ndarray, Fraction, np.ndarray | None, int]:
    with av.open(path) as c:
        v = c.streams.video[0]
        rate = v.average_rate
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(v)])
    with av.open(path) as c:
        if not c.streams.audio:
            return frames, rate, None, 0
        a = c.streams.audio[0]
        samples = np.concatenate([f.to_ndarray() for f in c.decode(a)], axis=1)[0]
        return frames, rate, samples, int(a.duration * a.time_base * SR)


def where_from(piece: np.ndarray, signal: np.ndarray) -> float:
    """Seconds into ``signal`` where ``piece`` matches best (normalised cross-correlation)."""
    scores = np.correlate(signal, piece, mode="valid") / (
        np.sqrt(np.convolve(signal**2, np.ones(len(piece)), mode="valid")) * np.linalg.norm(piece) + 1e-9)
    return float(np.argmax(scores) / SR)



def test_job_export_keeps_size_rate_and_audio_span(tmp_path: Path) -> None:
    from flows.exports.outputs import job_outputs
    from stages.ingest import read_source

    src = write_clip(tmp_path / "clip.mp4")
    params = {"n_frames": 16, "start": 25, "stride": 2, "width": 128, "height": 128}
    store_url, refs = stored_job(tmp_path, src, params)
    files = job_outputs(store_url, None, "j", refs, str(tmp_path / "out"), ("mp4", "png"), output="source",
                        source=str(src))
    frames, rate, samples, duration = decoded(files["mp4"])
    assert frames.shape == (16, 240, 320, 3)
    assert rate == Fraction(25, 2)  # the source's 25 fps over stride 2
    span = 16 * 2 / FPS  # 1.28 s of the source, from frame 25 (1.0 s)
    assert abs(duration / SR - span) < 0.01, duration / SR
    assert span <= len(samples) / SR < span + 1024 / SR + 0.01  # whole AAC frames decoded
    full = chirp(3.0)
    assert abs(where_from(samples[SR // 10: SR // 10 + 4096], full) - (1.0 + 0.1)) < 0.005
    assert abs(where_from(samples[SR: SR + 4096], full) - 2.0) < 0.005
    # Outside the edit region, the PNG frames are the source's decoded frames, exactly.
    source = read_source(src, IngestParams(**params)).frames
    pngs = np.stack([cv2.imread(str(p))[..., ::-1] for p in sorted(Path(files["png"]).glob("*.png"))])
    geometry = canvas_geometry(320, 240, IngestParams(**params))
    box = np.zeros((128, 128), bool)
    box[10:30, 20:40] = True
    near = cv2.resize(grow(box, 10).astype(np.uint8), (320, 240), interpolation=cv2.INTER_NEAREST) > 0
    assert np.array_equal(pngs[:, ~near], source[:, ~near]) and geometry["mode"] == "squash"
    # The canvas as it is, on request: same rate and audio, the canvas size.
    canvas = job_outputs(store_url, None, "j", refs, str(tmp_path / "canvas"), ("mp4",), output="canvas",
                         source=str(src))
    frames, rate, samples, _ = decoded(canvas["mp4"])
    assert frames.shape == (16, 128, 128, 3) and rate == Fraction(25, 2) and samples is not None
    # Another clip under the same name: refused, not silently mixed.
    write_clip(src, seed=1)
    with pytest.raises(StageInputError, match="not the clip ingest read"):
        job_outputs(store_url, None, "j", refs, str(tmp_path / "again"), ("mp4",), output="source", source=str(src))


def test_job_export_of_a_frame_folder_and_without_audio(tmp_path: Path) -> None:
    from flows.exports.outputs import OutputsConfig, job_outputs

    folder = tmp_path / "frames"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(8):
        cv2.imwrite(str(folder / f"{i:05d}.png"), rng.integers(0, 256, (96, 160, 3), dtype=np.uint8))
    params = {"n_frames": 4, "stride": 2, "width": 64, "height": 64}
    store_url, refs = stored_job(tmp_path, folder, params)
    files = job_outputs(store_url, None, "f", refs, str(tmp_path / "out"), ("mp4",), output="source",
                        source=str(folder))
    frames, rate, samples, _ = decoded(files["mp4"])
    assert frames.shape == (4, 96, 160, 3) and rate == Fraction(8) and samples is None  # 16 fps / stride 2
    files = job_outputs(store_url, None, "f", refs, str(tmp_path / "out24"), ("mp4",), output="source",
                        source=str(folder), source_fps=24)
    assert decoded(files["mp4"])[1] == Fraction(12)
    clip = write_clip(tmp_path / "silent.mp4", n=20, audio=False)
    store2, refs2 = stored_job(tmp_path / "s", clip, {"n_frames": 4, "width": 64, "height": 64})
    silent = job_outputs(store2, None, "s", refs2, str(tmp_path / "out2"), ("mp4",), output="source", source=str(clip))
    frames, rate, samples, _ = decoded(silent["mp4"])
    assert frames.shape == (4, 240, 320, 3) and rate == Fraction(25) and samples is None
    # A profile of before `output` existed keeps its meaning; the new default is the source's size.
    old = type("P", (), {"out": str(tmp_path), "formats": ("mp4",), "restore_source": False})()
    assert OutputsConfig.of(old).output == "canvas"
    assert OutputsConfig(str(tmp_path)).output == "source"


# ---- canvases beyond 1024 -----------------------------------------------------------------------------

def test_canvas_sides_up_to_4096() -> None:
    assert IngestParams(width=4096, height=2304).width == 4096
    assert EditParams(width=2048, height=1152).height == 1152
    for bad in (4160, 1000, 0):
        with pytest.raises(ValueError, match="multiples of 64 between 64 and 4096"):
            IngestParams(width=bad)


def test_offline_pipeline_runs_on_a_canvas_beyond_1024() -> None:
    sc = scene(n=3, speed=24.0)
    a = offline_pipeline(sc, IngestParams(n_frames=3, width=1280, height=704))
    assert a["video"].shape == (3, 704, 1280, 3)
    # Exact on the canvas outside the edit, as on a small one (the stage's guarantee holds at this size).
    region = edit_region(a["frames"], a["video"], a["object_masks"], a["shape_masks"], a["edited_frame"])
    assert region is not None and region.mean() < 0.2
    assert np.array_equal(a["video"][1:][~region[1:]], a["frames"][1:][~region[1:]])


# ---- an edited first frame of another aspect ----------------------------------------------------------

@pytest.mark.parametrize("mode", ["squash", "letterbox", "crop"])
def test_first_frame_of_another_aspect_lands_where_the_frames_do(mode: str, caplog: pytest.LogCaptureFixture
                                                                 ) -> None:
    h, w = 360, 640
    frame = np.clip(texture(h, w, seed=9, blur=3.0) + 0.5, 0, 255).astype(np.uint8)
    clip = SourceClip(frame[None], np.zeros(1, np.int64), None, 1)
    params = EditParams(canvas=mode, width=256, height=192)
    on_canvas = warp_to_canvas(frame, canvas_geometry(w, h, params)).astype(np.uint8)
    square = cv2.resize(frame, (400, 400), interpolation=cv2.INTER_AREA)  # e.g. from a square-only editor
    before = provided(model=None, params=params, first_frame_image=square)["edited_frame"]
    with caplog.at_level(logging.WARNING, logger="v2v.edit"):
        after = provided(model=None, params=params, first_frame_image=square, source=clip)["edited_frame"]
    assert "stretched to the source's size" in caplog.text and "400x400" in caplog.text
    assert metrics.psnr(after, on_canvas) > 30.0
    if mode != "squash":  # squash stretched it onto the whole canvas anyway; the others put it elsewhere
        assert metrics.psnr(before, on_canvas) < 20.0
    warnings = EDIT.attrs_fn(params, first_frame_image=square, source=clip)["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("edit: the edited first frame is 400x400")


def test_first_frame_fit_tolerance_and_canvas_sized_frames() -> None:
    assert first_frame_fit((854, 480), (1280, 720), (512, 512)) is None  # 0.05 %: a resize's rounding
    assert first_frame_fit((512, 512), (1280, 720), (512, 512)) is None  # a canvas image: as it is
    assert first_frame_fit((1000, 720), (1280, 720), (512, 512)) is not None
    assert EDIT.attrs_fn(EditParams(), first_frame_image=np.zeros((480, 854, 3), np.uint8),
                         source=SourceClip(np.zeros((1, 720, 1280, 3), np.uint8), np.zeros(1), None, 1)) == {}


def test_export_names_the_job_in_stage_warnings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from flows.exports.outputs import job_outputs
    from storage import ArtifactRef, ArtifactStore

    clip = write_clip(tmp_path / "c.mp4", n=8, audio=False)
    store_url, refs = stored_job(tmp_path, clip, {"n_frames": 2, "width": 64, "height": 64})
    attrs = EDIT.attrs_fn(EditParams(), first_frame_image=np.zeros((400, 400, 3), np.uint8),
                          source=SourceClip(np.zeros((1, 240, 320, 3), np.uint8), np.zeros(1), None, 1))
    store = ArtifactStore(store_url)
    store.write(ArtifactRef("edit", "ed" * 32), {"edited_frame": np.zeros((64, 64, 3), np.uint8)},
                {"edited_frame": ("y", "x", "channel")}, attrs)
    with caplog.at_level(logging.WARNING, logger="v2v.exports"):
        job_outputs(store_url, None, "the-job", {**refs, "edit": "ed" * 32}, str(tmp_path / "out"), ("png",),
                    output="source", source=str(clip))
    assert "job the-job: edit: the edited first frame is 400x400" in caplog.text


# ---- end to end: a catalog run (needs the profile's `output` and the scheduler passing the source) ------

def _wired() -> bool:
    from flows.config.profiles import Profile

    return "output" in Profile.model_fields


@pytest.mark.skipif(not _wired(), reason="the profile has no `output` yet (issue 15's wiring patch)")
def test_catalog_run_delivers_at_the_source_by_default(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from flows.api import run_catalog
    from flows.config.profiles import Profile

    sc = scene(n=6)
    folder, masks = tmp_path / "frames", tmp_path / "masks"
    folder.mkdir(), masks.mkdir()
    for i, (f, m) in enumerate(zip(sc["frames"], sc["masks"], strict=True)):
        cv2.imwrite(str(folder / f"{i:05d}.png"), f[..., ::-1])
        cv2.imwrite(str(masks / f"{i:05d}.png"), m.astype(np.uint8) * 255)
    cv2.imwrite(str(tmp_path / "edited.png"), sc["edited"][..., ::-1])
    square = cv2.resize(sc["edited"], (600, 600), interpolation=cv2.INTER_AREA)  # another aspect
    cv2.imwrite(str(tmp_path / "square.png"), square[..., ::-1])
    cat = tmp_path / "cat.yaml"
    cat.write_text(f"jobs:\n  - id: wide\n    source: {folder}\n    masks: {masks}\n    first_frame: "
                   f"{tmp_path / 'edited.png'}\n    fps: 25\n"
                   f"  - id: squared\n    source: {folder}\n    masks: {masks}\n    first_frame: "
                   f"{tmp_path / 'square.png'}\n")
    prof = Profile(name="t", out=str(tmp_path / "out"), formats=("mp4", "png"),
                   params={"ingest": {"n_frames": 6, "width": 256, "height": 256, "canvas": "letterbox"}},
                   backends={"source_masks": "provided", "shape_mask": "change", "depth": "ground-prior"})
    with caplog.at_level(logging.WARNING, logger="v2v.exports"):
        report, _ = run_catalog(cat, profile=prof, store=str(tmp_path / "store"), orchestrator="inline")
    jobs = {j.job_id: j for j in report.jobs}
    assert all(j.status == "done" for j in jobs.values()), [(j.job_id, j.error) for j in jobs.values()]
    frames, rate, samples, _ = decoded(jobs["wide"].outputs["mp4"])
    assert frames.shape == (6, H, W, 3) and rate == Fraction(25) and samples is None
    assert decoded(jobs["squared"].outputs["mp4"])[1] == Fraction(16)  # a folder without a row fps
    for job in jobs.values():
        pngs = np.stack([cv2.imread(str(p))[..., ::-1] for p in sorted(Path(job.outputs["png"]).glob("*.png"))])
        # Frame 0 is the edited frame near the edit (48 canvas px, 240 source px here): squared's is lossy.
        for t in range(0 if job.job_id == "wide" else 1, 6):
            untouched = ~grow(sc["masks"][t] | sc["shadows"][t] | sc["squares"][t], 64)
            assert np.array_equal(pngs[t][untouched], sc["frames"][t][untouched]), (job.job_id, t)
    # The squared first frame was stretched to the source's aspect (no bars on the letterbox canvas).
    assert "job squared: edit: the edited first frame is 600x600" in caplog.text
    assert "job wide:" not in caplog.text


@pytest.mark.skipif(not _wired(), reason="the learned backends declare no canvas limit yet (issue 15's patch)")
def test_learned_backend_refuses_a_canvas_beyond_its_limit(tmp_path: Path) -> None:
    from flows.config.catalog import load_catalog
    from flows.config.profiles import Profile
    from flows.plan.planner import plan_catalog
    from storage import ArtifactStore

    clip = write_clip(tmp_path / "c.mp4", n=4, audio=False)
    cv2.imwrite(str(tmp_path / "e.png"), np.zeros((240, 320, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "m.png"), cv2.circle(np.zeros((240, 320), np.uint8), (160, 120), 30, 255, -1))
    cat = tmp_path / "cat.yaml"
    cat.write_text(f"jobs:\n  - id: big\n    source: {clip}\n    masks: {tmp_path / 'm.png'}\n    first_frame: "
                   f"{tmp_path / 'e.png'}\n")
    store = ArtifactStore(tmp_path / "store")
    big = {"ingest": {"n_frames": 2, "width": 2048, "height": 1152}}
    plans = plan_catalog(load_catalog(cat), Profile(name="t", params=big, backends={"flow": "raft"}), store)
    assert "stage 'flow' (raft): the canvas 2048x1152 is beyond what this backend takes (1024" in plans[0].error
    auto = plan_catalog(load_catalog(cat), Profile(name="t", params=big), store)[0]
    assert auto.error is None and auto.stages["flow"].call.backend == "dis"
