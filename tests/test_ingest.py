from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import BEAR, encode_mp4
from flows.plan.calls import make_call
from flows.run.execute import execute
from stages.base import StageInputError
from stages.ingest import (
    MAX_CANVAS,
    STAGE,
    IngestParams,
    canvas_geometry,
    read_source,
    restore_from_canvas,
    source_ref,
)
from storage import ArtifactStore


def _bear(n: int = 16) -> np.ndarray:
    return np.stack([np.asarray(Image.open(BEAR / "frames" / f"{i:05d}.jpg").convert("RGB")) for i in range(n)])


def test_bear_folder_to_canvas(tmp_path: Path) -> None:
    clip = read_source(BEAR / "frames", masks=BEAR / "mask-00000.png")
    assert clip.frames.shape == (16, 480, 854, 3) and clip.available == 16
    assert clip.masks is not None and clip.masks.shape == (1, 480, 854)
    out = STAGE.run(clip.arrays(), {})
    assert out["frames"].shape == (16, 512, 512, 3) and out["frames"].dtype == np.uint8
    assert out["provided_masks"].shape == (1, 512, 512) and out["provided_masks"].dtype == bool
    # Squashing keeps the mask's share of the image.
    src_share = clip.masks[0].mean()
    assert abs(out["provided_masks"][0].mean() - src_share) < 0.01
    # Colour content is preserved by the resize (mean of each channel).
    np.testing.assert_allclose(out["frames"].mean(axis=(0, 1, 2)), clip.frames.mean(axis=(0, 1, 2)), atol=1.0)


def test_mp4_of_bear_ingests_like_the_folder(tmp_path: Path) -> None:
    video = encode_mp4(_bear(), tmp_path / "bear.mp4")
    params = IngestParams(n_frames=8, start=4, stride=1)
    from_video = read_source(video, params)
    from_folder = read_source(BEAR / "frames", params)
    assert from_video.frames.shape == (8, 480, 854, 3)
    assert list(from_video.frame_index) == list(range(4, 12))
    err = np.abs(from_video.frames.astype(int) - from_folder.frames.astype(int)).mean()
    assert err < 4.0, f"decoded video differs from the frames by {err:.2f} grey levels"


def test_stride_and_all_frames() -> None:
    clip = read_source(BEAR / "frames", IngestParams(n_frames=None, start=1, stride=5))
    assert list(clip.frame_index) == [1, 6, 11]
    clip = read_source(BEAR / "frames", IngestParams(n_frames=3, start=2, stride=6))
    assert list(clip.frame_index) == [2, 8, 14]


def test_davis_layout_palette_masks(tmp_path: Path) -> None:
    root = tmp_path / "DAVIS"
    frames_dir = root / "JPEGImages" / "480p" / "bear"
    ann_dir = root / "Annotations" / "480p" / "bear"
    frames_dir.mkdir(parents=True)
    ann_dir.mkdir(parents=True)
    for i in range(4):
        shutil.copy(BEAR / "frames" / f"{i:05d}.jpg", frames_dir / f"{i:05d}.jpg")
        ids = np.zeros((480, 854), np.uint8)
        ids[100:200, 100:300] = 1  # object 1
        ids[300:400, 500:600] = 2  # object 2
        im = Image.fromarray(ids, mode="P")
        im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9))
        im.save(ann_dir / f"{i:05d}.png")
    (frames_dir / "Thumbs.db").write_bytes(b"junk")
    every = read_source(frames_dir, IngestParams(n_frames=4))
    assert every.masks is not None and every.masks.shape == (4, 480, 854)
    assert every.masks[0].sum() == 100 * 200 + 100 * 100
    one = read_source(frames_dir, IngestParams(n_frames=4, mask_object_id=2))
    assert one.masks is not None and one.masks[0].sum() == 100 * 100
    # Read as grey, the dark-red palette entry would fall under the threshold: ids must be used.
    assert one.masks[0, 350, 550] and not one.masks[0, 150, 150]


@pytest.mark.parametrize("mode", ["letterbox", "crop"])
def test_letterbox_and_crop_geometry(mode: str) -> None:
    clip = read_source(BEAR / "frames", IngestParams(n_frames=2), masks=BEAR / "mask-00000.png")
    params = IngestParams(n_frames=2, canvas=mode, width=512, height=256)
    out = STAGE.run(clip.arrays(), params)
    assert out["frames"].shape == (2, 256, 512, 3)
    geo = canvas_geometry(854, 480, params)
    assert geo["scale"][0] == geo["scale"][1]  # aspect kept
    if mode == "letterbox":
        assert geo["offset"][1] == 0 and geo["offset"][0] > 0
        assert out["frames"][0][:, :10].max() == 0  # black bars at the sides
        back = restore_from_canvas(out["frames"][0], geo)
        assert back.shape == (480, 854, 3)
        err = np.abs(back.astype(int) - clip.frames[0].astype(int)).mean()
        assert err < 12, err
    else:
        assert geo["offset"][1] < 0  # the top and bottom are cropped
        assert out["frames"][0].min(axis=(0, 1)).max() > 0 or out["frames"][0].mean() > 20


def test_key_depends_on_pixels_and_params_not_names(tmp_path: Path) -> None:
    """The key covers the source files' bytes (a SourceRef's digest) and the parameters, not their names."""
    store = ArtifactStore(f"memory://{tmp_path.name}")
    copy = tmp_path / "renamed"
    shutil.copytree(BEAR / "frames", copy)
    a = source_ref(BEAR / "frames", IngestParams(n_frames=4))
    b = source_ref(copy, IngestParams(n_frames=4))
    ka = make_call("ingest", params={"n_frames": 4}, inputs={"source": a.digest}).key
    assert ka == make_call("ingest", params={"n_frames": 4}, inputs={"source": b.digest}).key
    assert ka != make_call("ingest", params={"n_frames": 4, "canvas": "crop"}, inputs={"source": a.digest}).key
    im = np.asarray(Image.open(copy / "00002.jpg")).copy()
    im[0, 0] = 255 - im[0, 0]
    Image.fromarray(im).save(copy / "00002.png")
    (copy / "00002.jpg").unlink()
    c = source_ref(copy, IngestParams(n_frames=4))
    assert make_call("ingest", params={"n_frames": 4}, inputs={"source": c.digest}).key != ka
    out = execute(make_call("ingest", params={"n_frames": 4}, inputs={"source": a.digest}), store,
                  externals={"source": a})
    assert not out.cached
    assert store.attrs(out.ref)["geometry"]["source_size"] == [854, 480]


# ---- bad input: a clear error naming the file ---------------------------------------------------------

def _frames_dir(tmp_path: Path, n: int = 3) -> Path:
    d = tmp_path / "frames"
    d.mkdir()
    for i in range(n):
        shutil.copy(BEAR / "frames" / f"{i:05d}.jpg", d / f"{i}.jpg")
    return d


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(StageInputError, match="no-such-clip"):
        read_source(tmp_path / "no-such-clip")


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"x")
    with pytest.raises(StageInputError, match="empty folder"):
        read_source(tmp_path / "empty")


def test_corrupt_image_and_video(tmp_path: Path) -> None:
    d = _frames_dir(tmp_path)
    (d / "1.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(StageInputError, match=r"1\.jpg.*corrupt"):
        read_source(d, IngestParams(n_frames=3))
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x13" * 500)
    with pytest.raises(StageInputError, match="broken.mp4"):
        read_source(bad)


def test_fewer_frames_than_asked(tmp_path: Path) -> None:
    d = _frames_dir(tmp_path, 3)
    with pytest.raises(StageInputError, match="only 3 frames"):
        read_source(d, IngestParams(n_frames=16))
    video = encode_mp4(_bear(5), tmp_path / "short.mp4")
    with pytest.raises(StageInputError, match=r"short\.mp4.*only 5 frames"):
        read_source(video, IngestParams(n_frames=16))


def test_numeric_order_and_non_images_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "frames"
    d.mkdir()
    for i in (0, 1, 2, 10):
        shutil.copy(BEAR / "frames" / f"{i:05d}.jpg", d / f"frame{i}.jpg")
    (d / "notes.txt").write_text("hello")
    with caplog.at_level(logging.WARNING, logger="v2v.ingest"):
        clip = read_source(d, IngestParams(n_frames=4))
    assert "notes.txt" in caplog.text
    # frame10 comes last (numeric, not lexicographic order)
    np.testing.assert_array_equal(clip.frames[3], np.asarray(Image.open(BEAR / "frames" / "00010.jpg")))


def test_mixed_frame_sizes(tmp_path: Path) -> None:
    d = _frames_dir(tmp_path)
    Image.open(d / "2.jpg").resize((640, 360)).save(d / "2.jpg")
    with pytest.raises(StageInputError, match="mixed frame sizes"):
        read_source(d, IngestParams(n_frames=3))


def test_mask_count_and_size_mismatch(tmp_path: Path) -> None:
    d = _frames_dir(tmp_path, 4)
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(2):
        shutil.copy(BEAR / "mask-00000.png", masks / f"{i}.png")
    with pytest.raises(StageInputError, match="2 masks for 4 frames"):
        read_source(d, IngestParams(n_frames=4), masks=masks)
    small = tmp_path / "small.png"
    Image.open(BEAR / "mask-00000.png").resize((100, 50)).save(small)
    with pytest.raises(StageInputError, match=r"small\.png.*100x50"):
        read_source(d, IngestParams(n_frames=4), masks=small)


def test_bad_canvas_is_refused() -> None:
    with pytest.raises(ValueError, match="multiples of 64"):
        IngestParams(width=500)
    with pytest.raises(StageInputError, match="bad parameters"):
        STAGE.resolve_params({"height": MAX_CANVAS + 64})  # 2048 before the canvas limit rose to MAX_CANVAS
