"""Planning keys sources without decoding them; ingest decodes on its worker only the frames it takes.

* a plan holds no arrays (walked object graph) and planning decodes no source frame;
* the ingest input is a small JSON-able reference whose digest covers the files' bytes;
* a video is decoded no further than its last frame taken, a start far in is reached by seeking (the same
  frames as decoding through), and only one source frame at a time is in memory (tracemalloc);
* the fingerprint index is written in batches and read back by a fresh process' index (no re-hash).
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_flow_catalog import OFFLINE

from conftest import BEAR, encode_mp4
from flows.config.catalog import load_catalog
from flows.config.profiles import Profile
from flows.plan import externals as ext_mod
from flows.plan import fingerprints as fp_mod
from flows.plan.calls import make_call
from flows.plan.planner import plan_catalog
from flows.run.execute import execute
from stages.ingest import DECODE_STATS, STAGE, IngestParams, SourceRef, read_source, source_ref
from storage import ArtifactStore


def _clip(n: int, w: int = 96, h: int = 64, seed: int = 0) -> np.ndarray:
    """Frames that differ from each other everywhere (a moving gradient and a frame number pattern)."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        out[t, ..., 0] = (xx * 2 + t * 7 + seed) % 256
        out[t, ..., 1] = (yy * 3 + t * 5) % 256
        out[t, ..., 2] = ((xx + yy) // 4 * 16 + t * 11) % 256
    return out


def _gop_mp4(frames: np.ndarray, path: Path, gop: int = 25) -> Path:
    """An H.264 clip with a keyframe every ``gop`` frames (what seeking lands on)."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0",
                          "bf": "0"}
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        out.mux(stream.encode(None))
    return path


def _arrays_reachable(root: Any, min_bytes: int = 1024) -> list[tuple[str, tuple[int, ...]]]:
    """numpy arrays of at least ``min_bytes`` reachable from ``root`` (modules and classes not followed)."""
    import types

    seen: set[int] = set()
    stack = [root]
    found = []
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (types.ModuleType, type, types.FunctionType, str, bytes)):
            continue
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            if obj.nbytes >= min_bytes:
                found.append((str(obj.dtype), obj.shape))
            continue
        stack.extend(gc.get_referents(obj))
    return found


def _catalog(tmp_path: Path) -> Path:
    from flows.config.demo_clip import make_demo_clip

    ball = make_demo_clip(tmp_path / "ball")
    video = encode_mp4(_clip(12, 128, 96), tmp_path / "moving.mp4")
    mask = np.zeros((96, 128), np.uint8)
    mask[30:60, 40:90] = 255
    Image.fromarray(mask).save(tmp_path / "moving-mask.png")
    text = f"""jobs:
  - id: bear
    source: {BEAR / 'frames'}
    masks: {BEAR / 'mask-00000.png'}
    first_frame: {BEAR / 'edited-first-frame-elephant.png'}
  - id: ball
    source: {ball['clip']}
    masks: {ball['masks']}
    first_frame: {ball['first_frame']}
  - id: moving
    source: {video}
    masks: {tmp_path / 'moving-mask.png'}
    first_frame: {ball['first_frame']}
"""
    (tmp_path / "catalog.yaml").write_text(text)
    return tmp_path / "catalog.yaml"


def test_plans_hold_no_arrays_and_decode_no_source_frame(tmp_path: Path) -> None:
    profile = Profile(name="t", backends=OFFLINE, params={"ingest": {"n_frames": 4, "width": 128, "height": 128}})
    store = ArtifactStore(str(tmp_path / "store"))
    before = DECODE_STATS["frames"]
    plans = plan_catalog(load_catalog(_catalog(tmp_path)), profile, store)
    assert all(p.ok for p in plans), [p.error for p in plans]
    assert DECODE_STATS["frames"] == before, "planning decoded source frames"
    assert _arrays_reachable(plans) == []
    for p in plans:
        ref = p.externals.array("source")
        assert isinstance(ref, SourceRef) and len(ref.digest) == 64
        doc = json.loads(json.dumps(ref.to_json()))  # JSON-able, and back
        assert SourceRef.from_json(doc) == ref
        assert len(json.dumps(doc)) < 4000
        ingest = p.stages["ingest"]
        assert ingest.call.inputs["source"] == ref.digest and ingest.externals == ("source",)
    # The masks decide ingest's optional output (a mask file, a folder of them, none).
    assert all(p.externals.supplies("source_masks") for p in plans)
    bare = type("J", (), {"source": tmp_path / "moving.mp4", "masks": None})()
    assert not ext_mod.JobExternals(bare, {"n_frames": 4}, store).supplies("source_masks")


def test_ingest_from_a_reference_equals_the_decoded_clip(tmp_path: Path) -> None:
    """The worker path (a SourceRef, streamed onto the canvas) gives the same arrays as decoding first."""
    store = ArtifactStore(str(tmp_path / "store"))
    params = IngestParams(n_frames=5, start=2, stride=2, width=128, height=64, canvas="letterbox")
    ref = source_ref(BEAR / "frames", params, BEAR / "mask-00000.png")
    assert ref.frames == ("00002.jpg", "00004.jpg", "00006.jpg", "00008.jpg", "00010.jpg")
    call = make_call("ingest", params=params.model_dump(), inputs={"source": ref.digest})
    out = execute(call, store, externals={"source": ref})
    got = store.read(out.ref)
    want = STAGE.run(read_source(BEAR / "frames", params, BEAR / "mask-00000.png").arrays(), params)
    np.testing.assert_array_equal(got["frames"], want["frames"])
    np.testing.assert_array_equal(got["provided_masks"], want["provided_masks"])
    assert list(got["source_frame_index"]) == [2, 4, 6, 8, 10]
    assert store.attrs(out.ref)["geometry"]["source_size"] == [854, 480]


def test_a_source_changed_after_planning_is_refused(tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        (frames / f"{i}.jpg").write_bytes((BEAR / "frames" / f"{i:05d}.jpg").read_bytes())
    ref = source_ref(frames, IngestParams(n_frames=3))
    (frames / "1.jpg").write_bytes((BEAR / "frames" / "00009.jpg").read_bytes())
    with pytest.raises(Exception, match="changed since planning"):
        STAGE.run({"source": ref}, IngestParams(n_frames=3))


def test_video_decoded_no_further_than_needed(tmp_path: Path) -> None:
    frames = _clip(150)
    video = _gop_mp4(frames, tmp_path / "long.mp4", gop=25)
    everything = read_source(video, IngestParams(n_frames=None))
    assert everything.frames.shape[0] == 150
    # The first 4: the decoder stops at frame 3.
    before = DECODE_STATS["frames"]
    head = read_source(video, IngestParams(n_frames=4))
    assert DECODE_STATS["frames"] - before == 4
    np.testing.assert_array_equal(head.frames, everything.frames[:4])
    # Far in: a seek to the keyframe at 125, then 125..131 decoded; identical to decoding through.
    before = DECODE_STATS["frames"]
    far = read_source(video, IngestParams(n_frames=3, start=128, stride=2))
    assert DECODE_STATS["frames"] - before <= 25 + 7, DECODE_STATS["frames"] - before
    assert list(far.frame_index) == [128, 130, 132]
    np.testing.assert_array_equal(far.frames, everything.frames[[128, 130, 132]])
    with pytest.raises(Exception, match="only 150 frames"):
        read_source(video, IngestParams(n_frames=4, start=140, stride=5))


def test_one_source_frame_in_memory_at_a_time(tmp_path: Path) -> None:
    """40 frames of 1280x720 through the ingest backend onto a 128² canvas: the peak of numpy memory is a few
    source frames (decoding first would hold all 40: 110 MB)."""
    n, w, h = 40, 1280, 720
    yy, xx = np.mgrid[0:h, 0:w]
    base = ((xx // 8 + yy // 8) % 2 * 120 + 60).astype(np.uint8)
    clip = np.repeat(np.stack([np.roll(base, 4 * t, axis=1) for t in range(n)])[..., None], 3, axis=3)
    video = _gop_mp4(clip, tmp_path / "hd.mp4", gop=50)
    del clip, base, xx, yy
    ref = source_ref(video, IngestParams(n_frames=n, width=128, height=128))
    frame_bytes = w * h * 3
    tracemalloc.start()
    try:
        out = STAGE.run({"source": ref}, IngestParams(n_frames=n, width=128, height=128))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out["frames"].shape == (n, 128, 128, 3)
    assert peak < 6 * frame_bytes, f"peak {peak / 1e6:.0f} MB for {frame_bytes / 1e6:.1f} MB frames"


def test_index_written_in_batches_and_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A warm plan takes the digests from the index (a fresh process' index: nothing in memory)."""
    profile = Profile(name="t", backends=OFFLINE, params={"ingest": {"n_frames": 4, "width": 128, "height": 128}})
    store = ArtifactStore(str(tmp_path / "store"))
    catalog = load_catalog(_catalog(tmp_path))
    cold = plan_catalog(catalog, profile, store)
    fp_mod.flush_indexes()
    names = store.list_json(fp_mod.INDEX_DIR)
    assert len(names) == 1, names  # one batch document for the catalog, not one per job
    doc = store.get_json(f"{fp_mod.INDEX_DIR}/{names[0]}.json")
    assert len(doc["entries"]) == 5  # 3 sources + 2 first frames (two jobs share one)
    fp_mod.forget_indexes()  # what a new process sees
    import stages.ingest as ingest_mod

    def no_hashing(ref: SourceRef) -> SourceRef:
        raise AssertionError(f"{ref.path} hashed again")

    def no_decoding(self: ext_mod.JobExternals, name: str) -> np.ndarray:
        raise AssertionError(f"{name} decoded again")

    monkeypatch.setattr(ingest_mod, "with_digest", no_hashing)
    monkeypatch.setattr(ext_mod.JobExternals, "_load_image", no_decoding)
    warm = plan_catalog(catalog, profile, store)
    assert [p.stages["ingest"].key for p in warm] == [p.stages["ingest"].key for p in cold]
    assert [p.stages["edit"].key for p in warm] == [p.stages["edit"].key for p in cold]


def test_many_index_batches_are_merged(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    for i in range(fp_mod.MAX_BATCHES + 3):
        store.put_json(f"{fp_mod.INDEX_DIR}/{i:04d}.json", {"v": fp_mod.INDEX_VERSION, "entries": {f"fp{i}": {
            "digest": f"d{i}"}}})
    index = fp_mod.FingerprintIndex(store)
    assert index.get("fp3") == {"digest": "d3"}
    assert len(store.list_json(fp_mod.INDEX_DIR)) == 1
    again = fp_mod.FingerprintIndex(store)
    assert all(again.get(f"fp{i}") == {"digest": f"d{i}"} for i in range(fp_mod.MAX_BATCHES + 3))


def test_the_index_holds_a_few_batches_not_every_entry(tmp_path: Path) -> None:
    """A warm plan of a big catalog finds every fingerprint while only a few batch documents stay decoded."""
    store = ArtifactStore(str(tmp_path / "store"))
    n = fp_mod.FLUSH_EVERY * (fp_mod.CACHED_BATCHES + 4) + 7
    writer = fp_mod.FingerprintIndex(store)
    for i in range(n):
        writer.put(f"{i:064x}", {"digest": f"d{i}"})
    writer.flush()
    assert len(store.list_json(fp_mod.INDEX_DIR)) == fp_mod.CACHED_BATCHES + 5  # full batches are not packed
    reader = fp_mod.FingerprintIndex(store)  # a new process
    assert len(reader) == n
    held = 0
    for i in range(n):  # in the order they were written, as a re-plan of the same catalog reads them
        assert reader.get(f"{i:064x}") == {"digest": f"d{i}"}
        held = max(held, sum(len(b) for b in reader.batches.values()))
    assert held <= fp_mod.CACHED_BATCHES * fp_mod.FLUSH_EVERY
    assert reader.get(f"{n:064x}") is None
    # Out of order too (each miss of the decoded batches reads one document).
    assert all(reader.get(f"{i:064x}") == {"digest": f"d{i}"} for i in range(n - 1, 0, -997))


def test_an_index_entry_is_found_again_in_the_process_that_wrote_it(tmp_path: Path) -> None:
    """Two jobs on one source: the second finds the first's entry, whether still pending or flushed, and a
    batch that another planner removed since is only a miss."""
    store = ArtifactStore(str(tmp_path / "store"))
    index = fp_mod.FingerprintIndex(store)
    index.put("a" * 64, {"digest": "da"})
    assert index.get("a" * 64) == {"digest": "da"}  # pending
    index.flush()
    index.batches.clear()  # decoded batches forgotten: found through the prefix directory
    assert index.get("a" * 64) == {"digest": "da"}
    for name in store.list_json(fp_mod.INDEX_DIR):
        store.fs.rm_file(f"{store.root}/{fp_mod.INDEX_DIR}/{name}.json")
    index.batches.clear()
    assert index.get("a" * 64) is None
