"""Export: mp4 (H.264 via PyAV), GIF and PNG frames, restored to the source geometry on request."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from stages.base import StageInputError
from stages.export import contact_sheet, export_video
from stages.ingest import IngestParams, canvas_geometry


@pytest.fixture(scope="module")
def bear_clip(bear_dir: Path) -> np.ndarray:
    """8 real frames on a 256² squash canvas (real texture: a fair test of the encoder)."""
    frames = [cv2.imread(str(bear_dir / "frames" / f"{i:05d}.jpg"))[..., ::-1] for i in range(8)]
    return np.stack([cv2.resize(f, (256, 256), interpolation=cv2.INTER_AREA) for f in frames])


def _decode(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(stream)])


def test_mp4_round_trip(bear_clip: np.ndarray, tmp_path: Path) -> None:
    out = export_video(bear_clip, tmp_path, fps=16, formats=("mp4",))
    assert set(out) == {"mp4"} and out["mp4"] == tmp_path / "video.mp4"
    decoded = _decode(out["mp4"])
    assert decoded.shape == bear_clip.shape
    err = np.abs(decoded.astype(np.float32) - bear_clip.astype(np.float32)).mean()
    assert err < 4.0, err  # crf 18 + yuv420p chroma subsampling on real texture
    # No temporary files are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video.mp4"]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity (Linux)")
def test_the_same_video_gives_the_same_mp4_bytes_whatever_cpus_the_process_may_use(bear_clip: np.ndarray,
                                                                                     tmp_path: Path) -> None:
    """x264's output depends on its thread count; left on auto it follows the CPUs this process may use, which a
    library pinning its threads changes mid-run (a cached re-export then differed from the first)."""
    import hashlib

    from stages.export import write_mp4

    before = os.sched_getaffinity(0)
    digests = [hashlib.sha256(write_mp4(bear_clip, tmp_path / "all.mp4").read_bytes()).hexdigest()]
    try:
        os.sched_setaffinity(0, {min(before)})
        digests.append(hashlib.sha256(write_mp4(bear_clip, tmp_path / "one.mp4").read_bytes()).hexdigest())
    finally:
        os.sched_setaffinity(0, before)
    assert digests[0] == digests[1]


def test_mp4_odd_size_is_padded_to_even(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    video = cv2.GaussianBlur(rng.integers(0, 256, (4, 33, 47, 3), dtype=np.uint8).reshape(4 * 33, 47, 3),
                             (0, 0), 2).reshape(4, 33, 47, 3)
    decoded = _decode(export_video(video, tmp_path, formats=("mp4",))["mp4"])
    assert decoded.shape == (4, 34, 48, 3)
    assert np.abs(decoded[:, :33, :47].astype(np.float32) - video).mean() < 6.0


def test_gif_and_pngs(bear_clip: np.ndarray, tmp_path: Path) -> None:
    out = export_video(bear_clip, tmp_path, fps=8, formats=("gif", "png"))
    with Image.open(out["gif"]) as im:
        assert im.n_frames == len(bear_clip)
        assert im.size == (256, 256)
        assert im.info["duration"] == 120  # 125 ms, in the format's 10 ms steps
        decoded = []
        for i in range(im.n_frames):
            im.seek(i)
            decoded.append(np.asarray(im.convert("RGB")))
    # One 256-colour palette for the clip, no dithering: close to the frames, not merely the right shape.
    assert np.abs(np.stack(decoded).astype(np.float32) - bear_clip).mean() < 4.0
    pngs = sorted(out["png"].glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:05d}.png" for i in range(len(bear_clip))]
    assert np.array_equal(cv2.imread(str(pngs[3]))[..., ::-1], bear_clip[3])  # lossless
    # Exporting again replaces the folder as a whole (fewer frames: no stale 00004..).
    out2 = export_video(bear_clip[:3], tmp_path, formats=("png",))
    assert len(list(out2["png"].glob("*.png"))) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_restore_to_source_geometry(bear_dir: Path, tmp_path: Path) -> None:
    src = cv2.imread(str(bear_dir / "frames" / "00000.jpg"))[..., ::-1]
    for mode in ("squash", "letterbox", "crop"):
        geometry = canvas_geometry(854, 480, IngestParams(canvas=mode, width=512, height=512))
        from stages.ingest import warp_to_canvas

        canvas = np.stack([warp_to_canvas(src, geometry)] * 2)
        out = export_video(canvas, tmp_path / mode, formats=("png", "mp4"), geometry=geometry,
                           restore_source=True)
        back = cv2.imread(str(out["png"] / "00000.png"))[..., ::-1]
        assert back.shape == (480, 854, 3)
        assert _decode(out["mp4"]).shape == (2, 480, 854, 3)
        if mode != "crop":  # crop lost the sides; the rest must come back close to the source
            assert np.abs(back.astype(np.float32) - src).mean() < 8.0, mode


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(StageInputError, match="uint8"):
        export_video(np.zeros((2, 8, 8, 3), np.float32), tmp_path)
    with pytest.raises(StageInputError, match="unknown formats"):
        export_video(np.zeros((2, 8, 8, 3), np.uint8), tmp_path, formats=("avi",))
    with pytest.raises(StageInputError, match="geometry"):
        export_video(np.zeros((2, 8, 8, 3), np.uint8), tmp_path, restore_source=True)


def test_contact_sheet(bear_clip: np.ndarray, tmp_path: Path) -> None:
    sheet = contact_sheet(bear_clip, tmp_path / "sheet.png", cols=4, every=3, tile_width=64)
    assert sheet.shape == (64, 4 * 64, 3)  # frames 0, 3, 6 and the last (7)
    assert (tmp_path / "sheet.png").is_file()


def test_job_contact_sheet_is_in_pipeline_order_from_memory_or_store(tmp_path: Path) -> None:
    """The sheet a run writes (arrays still in memory, stages in completion order) equals one rebuilt later
    from the store (arrays read back sorted by name), whatever order the artifacts are listed in."""
    from flows.api import run_catalog
    from flows.config.demo_clip import make_demo_clip
    from flows.config.profiles import Profile
    from flows.exports.outputs import contact_sheet as job_sheet
    from storage import ArtifactRef, ArtifactStore

    clip = make_demo_clip(tmp_path / "clip")
    cat = tmp_path / "cat.yaml"
    cat.write_text(f"jobs:\n  - id: cone\n    source: {clip['clip']}\n    masks: {clip['masks']}\n"
                   f"    first_frame: {clip['first_frame']}\n    prompt: a green cone\n")
    prof = Profile(name="t", out=str(tmp_path / "out"), params={"ingest": {"n_frames": 4, "width": 64,
                                                                           "height": 64}},
                   backends={"source_masks": "provided", "shape_mask": "change", "depth": "ground-prior"})
    report, _ = run_catalog(cat, profile=prof, store=str(tmp_path / "store"), orchestrator="inline")
    written = np.asarray(Image.open(report.jobs[0].outputs["contact_sheet"]))
    store = ArtifactStore(tmp_path / "store")
    refs = {s: ArtifactRef(s, k) for s, k in store.job("cone")["artifacts"].items()}
    again = job_sheet(store, dict(reversed(list(refs.items()))), tmp_path / "again.png")
    assert again is not None
    assert np.array_equal(np.asarray(Image.open(again)), written)


def test_png_export_on_a_full_disk_fails_and_leaves_no_half_folder(tmp_path: Path) -> None:
    import subprocess

    from stages.export import write_pngs

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        noise = np.random.default_rng(0).integers(0, 256, (24, 64, 64, 3), dtype=np.uint8)
        with pytest.raises(OSError, match="could not write"):
            write_pngs(noise, disk / "video_frames")
        assert not (disk / "video_frames").exists()
        assert not [p for p in disk.iterdir() if p.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(disk)], check=False)
