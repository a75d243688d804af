"""Hostile and odd inputs at decode, on real files written here: each refused with a one-line error naming the
file (and failing its job only), or converted correctly.

* size limits (pixels, frames, bytes; a profile's ``limits:``) checked before decoding, Pillow's 179 Mpx
  decompression-bomb guard included;
* 16-bit grey and RGB PNGs scaled to 8 bits (not clipped to white), palette, CMYK, alpha (over black), 1-bit,
  float (refused);
* fingerprints that cannot go stale: a file replaced in place with its size and mtime restored is noticed.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image
from test_flow_catalog import OFFLINE

from conftest import BEAR, encode_mp4
from flows.api import run_catalog
from flows.config.catalog import load_catalog
from flows.config.profiles import LimitsConfig, Profile, load_profile
from flows.plan import externals as ext_mod
from flows.plan import fingerprints as fp_mod
from flows.plan.planner import plan_catalog
from stages.base import StageInputError
from stages.ingest import DECODE_STATS, STAGE, IngestParams, read_source, source_ref
from stages.source_io import DecodeLimits, read_image
from storage import ArtifactStore

REPO = Path(__file__).resolve().parent.parent
TINY = {"ingest": {"n_frames": 3, "width": 64, "height": 64}}


def png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG that claims ``w`` x ``h`` (grey, 8 bits) with a few bytes of pixel data: what a decompression bomb
    looks like before decoding. Any decoder that gets past the header fails on the data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def _frames_dir(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        shutil.copy(BEAR / "frames" / f"{i:05d}.jpg", folder / f"{i:05d}.jpg")
    return folder


def _one_line(text: str) -> bool:
    return "\n" not in text.strip()


# ---- size limits -------------------------------------------------------------------------------------------

def test_a_bomb_first_frame_fails_only_its_job(tmp_path: Path) -> None:
    bomb = png_header_only(tmp_path / "bomb.png", 14_000, 13_000)  # 182 Mpx: over Pillow's own guard
    big = png_header_only(tmp_path / "big.png", 8_000, 6_000)  # 48 Mpx: over the default limit only
    (tmp_path / "cat.yaml").write_text(yaml.safe_dump({"jobs": [
        {"id": "bomb-job", "source": str(BEAR / "frames"), "masks": str(BEAR / "mask-00000.png"),
         "first_frame": str(bomb)},
        {"id": "big-job", "source": str(BEAR / "frames"), "masks": str(BEAR / "mask-00000.png"),
         "first_frame": str(big)},
        {"id": "good", "source": str(BEAR / "frames"), "masks": str(BEAR / "mask-00000.png"),
         "first_frame": str(BEAR / "edited-first-frame-elephant.png")}]}))
    prof = Profile(name="t", out=str(tmp_path / "out"), backends=OFFLINE, params=TINY, formats=("png",))
    report, _ = run_catalog(tmp_path / "cat.yaml", profile=prof, store=str(tmp_path / "store"),
                            orchestrator="inline")
    jobs = {j.job_id: j for j in report.jobs}
    assert jobs["good"].status == "done", jobs["good"].error
    assert jobs["bomb-job"].status == "failed" and "bomb.png" in jobs["bomb-job"].error
    assert "decompression bomb" in jobs["bomb-job"].error and _one_line(jobs["bomb-job"].error)
    assert jobs["big-job"].status == "failed" and "big.png: 8000x6000 is 48.0 Mpx" in jobs["big-job"].error
    assert "limits.max_pixels" in jobs["big-job"].error
    # The CLI names the job beside its one-line reason and exits 1 (not 3: the catalog went on).
    env = {**os.environ, "PYTHONPATH": str(REPO), "V2V_STORE": "", "V2V_PROFILE": "", "COLUMNS": "400"}
    prof_file = tmp_path / "p.yaml"
    prof_file.write_text(prof.model_dump_json())
    proc = subprocess.run([sys.executable, "-m", "flows.cli.main", "plan", str(tmp_path / "cat.yaml"), "--profile",
                           str(prof_file), "--store", str(tmp_path / "store")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    row = proc.stdout[proc.stdout.index("bomb-job"):proc.stdout.index("big-job")]  # the job's table row
    assert "bomb.png: refused as a decompression bomb" in " ".join(row.replace("│", " ").split()), proc.stdout


def test_a_bomb_frame_in_a_folder_fails_at_ingest(tmp_path: Path) -> None:
    frames = _frames_dir(tmp_path / "frames")
    png_header_only(frames / "00001.png", 14_000, 13_000)
    (frames / "00001.jpg").unlink()
    ref = source_ref(frames, IngestParams(n_frames=3))  # planning reads no pixels
    with pytest.raises(StageInputError, match=r"00001\.png: refused as a decompression bomb") as exc:
        STAGE.run({"source": ref}, IngestParams(n_frames=3))
    assert _one_line(str(exc.value))


def test_pixel_limit_checked_before_decoding(tmp_path: Path) -> None:
    # The header says 3000x3000 and the data is garbage: only a check before decoding gives the limit error.
    fake = png_header_only(tmp_path / "fake.png", 3000, 3000)
    with pytest.raises(StageInputError, match=r"fake\.png: 3000x3000 is 9\.0 Mpx.*limits\.max_pixels"):
        read_image(fake, limits=DecodeLimits(max_pixels=4_000_000))
    with pytest.raises(StageInputError, match="corrupt"):
        read_image(fake, limits=DecodeLimits(max_pixels=10_000_000))
    # A video: the stream's header is checked before a frame is decoded.
    video = encode_mp4(np.zeros((4, 240, 320, 3), np.uint8), tmp_path / "v.mp4")
    before = DECODE_STATS["frames"]
    with pytest.raises(StageInputError, match=r"v\.mp4: 320x240 .*limits\.max_pixels"):
        read_source(video, IngestParams(n_frames=2), limits=DecodeLimits(max_pixels=50_000))
    assert DECODE_STATS["frames"] == before


def test_frame_and_byte_limits(tmp_path: Path) -> None:
    video = encode_mp4(np.zeros((30, 48, 64, 3), np.uint8), tmp_path / "v.mp4")
    limits = DecodeLimits(max_frames=10)
    with pytest.raises(StageInputError, match=r"50 frames taken, over the limit of 10 \(limits\.max_frames"):
        source_ref(video, IngestParams(n_frames=50), limits=limits)  # at planning, from the parameters
    before = DECODE_STATS["frames"]
    with pytest.raises(StageInputError, match="11 frames taken, over the limit of 10"):
        read_source(video, IngestParams(n_frames=None), limits=limits)  # all frames: stopped at the 11th
    assert DECODE_STATS["frames"] - before == 11
    with pytest.raises(StageInputError, match=r"v\.mp4: [\d,]+ bytes, over the limit of 1,000 .*max_video_bytes"):
        source_ref(video, IngestParams(n_frames=2), limits=DecodeLimits(max_video_bytes=1000))
    with pytest.raises(StageInputError, match=r"00000\.jpg: [\d,]+ bytes.*max_image_bytes"):
        source_ref(BEAR / "frames", IngestParams(n_frames=2), limits=DecodeLimits(max_image_bytes=10_000))


def test_profile_limits_reach_planning_and_defaults_agree(tmp_path: Path) -> None:
    assert LimitsConfig().model_dump() == DecodeLimits().__dict__
    path = tmp_path / "p.yaml"
    path.write_text("name: strict\nlimits:\n  max_frames: 2\n")
    assert load_profile(str(path)).limits.max_frames == 2
    with pytest.raises(Exception, match="max_pixels"):
        Profile(limits={"max_pixels": 0})
    (tmp_path / "cat.yaml").write_text(yaml.safe_dump({"jobs": [
        {"id": "four", "source": str(BEAR / "frames"), "masks": str(BEAR / "mask-00000.png"),
         "first_frame": str(BEAR / "edited-first-frame-elephant.png"),
         "params": {"ingest": {"n_frames": 4}}},
        {"id": "two", "source": str(BEAR / "frames"), "masks": str(BEAR / "mask-00000.png"),
         "first_frame": str(BEAR / "edited-first-frame-elephant.png"),
         "params": {"ingest": {"n_frames": 2}}}]}))
    prof = Profile(name="t", backends=OFFLINE, limits={"max_frames": 2})
    plans = {p.job_id: p for p in plan_catalog(load_catalog(tmp_path / "cat.yaml"), prof,
                                              ArtifactStore(str(tmp_path / "store")))}
    assert plans["two"].ok and not plans["four"].ok
    assert "4 frames taken, over the limit of 2" in plans["four"].error


# ---- pixel formats ----------------------------------------------------------------------------------------

def _grey16() -> np.ndarray:
    return (np.arange(64 * 48).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64491


def test_16_bit_frames_and_first_frames_are_scaled_not_white(tmp_path: Path) -> None:
    g = _grey16()
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        assert cv2.imwrite(str(frames / f"{i}.png"), g)
        assert Image.open(frames / f"{i}.png").mode.startswith("I;16")
    clip = read_source(frames, IngestParams(n_frames=3))
    want = (g >> 8).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(clip.frames[0, ..., c], want)
    assert clip.frames.mean() < 200 and clip.frames.min() == 0  # not clipped to white
    rgb = np.stack([g, 65535 - g, g // 2], axis=-1)
    assert cv2.imwrite(str(tmp_path / "rgb16.png"), rgb[..., ::-1])  # OpenCV writes BGR
    got = read_image(tmp_path / "rgb16.png")
    np.testing.assert_array_equal(got, (rgb >> 8).astype(np.uint8))
    # A 16-bit first frame through the planner's externals.
    ext = ext_mod.JobExternals(type("J", (), {"first_frame": tmp_path / "rgb16.png"})(), {},
                               ArtifactStore(str(tmp_path / "store")))
    np.testing.assert_array_equal(ext.array("first_frame_image"), (rgb >> 8).astype(np.uint8))
    # A 16-bit mask: on from half the full scale.
    assert cv2.imwrite(str(tmp_path / "mask16.png"), g)
    np.testing.assert_array_equal(read_image(tmp_path / "mask16.png", mask=True), g >= 32768)


def test_palette_cmyk_alpha_and_bilevel(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    pal = Image.fromarray(rgb).quantize(16)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), np.asarray(pal.convert("RGB")))
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    assert np.abs(read_image(tmp_path / "c.jpg").astype(int) - rgb).mean() < 12
    alpha = np.zeros((20, 30), np.uint8)
    alpha[:, 15:] = 255
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "a.png")
    got = read_image(tmp_path / "a.png")
    assert got[:, :15].max() == 0  # transparent: black
    np.testing.assert_array_equal(got[:, 15:], rgb[:, 15:])
    Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png")[:, 15:, 1], rgb[:, 15:, 0])
    np.testing.assert_array_equal(read_image(tmp_path / "a.png", mask=True)[:, :15], False)
    Image.fromarray(rgb[..., 0] > 127).save(tmp_path / "b.png")
    np.testing.assert_array_equal(read_image(tmp_path / "b.png")[..., 2], (rgb[..., 0] > 127) * 255)
    Image.fromarray(rgb[..., 0].astype(np.float32) / 255, "F").save(tmp_path / "f.tif")
    with pytest.raises(StageInputError, match=r"f\.tif: F \(floating point\) pixels are not supported"):
        read_image(tmp_path / "f.tif")


# ---- fingerprints that cannot go stale ------------------------------------------------------------------

def _bmp_frames(folder: Path, n: int = 3) -> list[np.ndarray]:
    """Uncompressed frames over 128 KiB each, so a changed pixel in the middle keeps the file's size and its
    first and last 64 KiB: only the inode change time tells."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for _ in range(n)]
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i:05d}.bmp")
    return frames


def _source_digest(folder: Path, store: ArtifactStore) -> str:
    job = type("J", (), {"source": folder, "masks": None})()
    return ext_mod.JobExternals(job, IngestParams(n_frames=3).model_dump(), store).digest("source")


def test_a_frame_replaced_in_place_with_size_and_mtime_kept_is_noticed(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    frames = _bmp_frames(folder)
    store = ArtifactStore(str(tmp_path / "store"))
    first = _source_digest(folder, store)
    assert _source_digest(folder, store) == first  # from the index
    target = folder / "00001.bmp"
    stamp_before = fp_mod.fingerprint("frame", [target])
    st = target.stat()
    time.sleep(0.05)  # inode times move in clock ticks (a few ms): the write below lands in a later one
    changed = frames[1].copy()
    changed[120, 160] = 255 - changed[120, 160]  # the middle of the file
    Image.fromarray(changed).save(tmp_path / "other.bmp")
    shutil.copy2(tmp_path / "other.bmp", target)  # cp -p: the bytes, then the other file's mtime...
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and here the original mtime, as rsync -t does
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    assert after.st_ctime_ns != st.st_ctime_ns
    assert fp_mod.fingerprint("frame", [target]) != stamp_before  # the content was not read: the ctime tells
    fp_mod.flush_indexes()
    fp_mod.forget_indexes()  # a new process: the index is read from the store
    renewed = _source_digest(folder, store)
    assert renewed != first
    assert renewed == source_ref(folder, IngestParams(n_frames=3)).digest  # the true digest of the new bytes
    # A video modified in place the same way (a byte in its middle, mtime restored).
    video = encode_mp4(np.random.default_rng(2).integers(0, 256, (8, 240, 320, 3), dtype=np.uint8),
                       tmp_path / "v.mp4")
    assert video.stat().st_size > 2 * 128 * 1024
    job = type("J", (), {"source": video, "masks": None})()
    d1 = ext_mod.JobExternals(job, IngestParams(n_frames=2).model_dump(), store).digest("source")
    st = video.stat()
    time.sleep(0.05)
    with open(video, "r+b") as fh:
        fh.seek(st.st_size // 2)
        byte = fh.read(1)
        fh.seek(st.st_size // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.utime(video, ns=(st.st_atime_ns, st.st_mtime_ns))
    d2 = ext_mod.JobExternals(job, IngestParams(n_frames=2).model_dump(), store).digest("source")
    assert d2 != d1 and d2 == source_ref(video, IngestParams(n_frames=2)).digest
