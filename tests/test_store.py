from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from storage import ArtifactRef, ArtifactStore, open_job
from storage.maintenance import gc, verify
from storage.store import COMMIT, TMP

RNG = np.random.default_rng(0)
CLIP = RNG.integers(0, 255, size=(4, 64, 96, 3), dtype=np.uint8)
FLOW = RNG.normal(size=(3, 64, 96, 2)).astype(np.float32)
MASK = RNG.random((4, 64, 96)) > 0.5
DIMS = {"frames": ("frame", "y", "x", "channel"), "flows": ("pair", "y", "x", "component"),
        "object_masks": ("frame", "y", "x")}


def _store(kind: str, tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "store") if kind == "local" else f"memory://{uuid.uuid4().hex}")


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_round_trip(kind: str, tmp_path: Path) -> None:
    store = _store(kind, tmp_path)
    ref = ArtifactRef("flow", "ab" + "0" * 62)
    assert not store.exists(ref)
    store.write(ref, {"frames": CLIP, "flows": FLOW, "object_masks": MASK}, DIMS,
                {"params": {"a": 1}, "compute_seconds": 0.5})
    assert store.exists(ref)
    back = store.read(ref)
    np.testing.assert_array_equal(back["frames"], CLIP)
    np.testing.assert_array_equal(back["flows"], FLOW)
    np.testing.assert_array_equal(back["object_masks"], MASK)
    ds = store.open(ref)
    assert ds["flows"].dims == DIMS["flows"] and ds["frames"].dims == DIMS["frames"]
    assert ds["frames"].chunks[0] == (1, 1, 1, 1)  # one chunk per frame
    np.testing.assert_array_equal(ds["flows"].values, FLOW)
    rec = store.attrs(ref)
    assert rec["stage"] == "flow" and rec["params"] == {"a": 1} and rec["compute_seconds"] == 0.5
    assert set(rec["checksums"]) == set(DIMS) and "zarr" in rec["library_versions"]
    assert verify(store).damaged == []


def test_zarr_layout_and_codec(tmp_path: Path) -> None:
    import zarr

    store = ArtifactStore(tmp_path / "s")
    ref = store.write(ArtifactRef("ingest", "cd" + "1" * 62), {"frames": CLIP}, DIMS, {})
    path = tmp_path / "s" / "ingest" / "cd" / ref.key
    assert (path / COMMIT).is_file() and (path / "zarr.json").is_file()
    arr = zarr.open_array(str(path / "frames"), mode="r")
    assert arr.metadata.dimension_names == DIMS["frames"]
    codec = arr.compressors[0]
    assert type(codec).__name__ == "BloscCodec" and codec.cname.value == "zstd"
    # xarray opens the group directly, as users will.
    ds = xr.open_zarr(str(path), zarr_format=3)
    assert ds["frames"].shape == CLIP.shape


def test_chunks_follow_the_dims(tmp_path: Path) -> None:
    """Per-frame chunks in one shard (one file per array) for frame/pair arrays; one chunk for an image."""
    import zarr

    store = ArtifactStore(tmp_path / "s")
    image = CLIP[0]
    ref = store.write(ArtifactRef("edit", "ef" + "2" * 62), {"frames": CLIP, "edited_frame": image},
                      {"frames": DIMS["frames"], "edited_frame": ("y", "x", "channel")}, {})
    group = zarr.open_group(str(tmp_path / "s" / ref.path), mode="r")
    frames, edited = group["frames"], group["edited_frame"]
    assert frames.chunks == (1, *CLIP.shape[1:]) and frames.shards == CLIP.shape
    assert edited.chunks == image.shape and edited.shards is None
    files = [p for p in (tmp_path / "s" / ref.path / "frames").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(files) == 1  # the shard
    # A single frame is read through the shard index without decoding the others.
    np.testing.assert_array_equal(frames[2], CLIP[2])
    np.testing.assert_array_equal(store.read(ref)["edited_frame"], image)


def test_writer_killed_mid_artifact_is_never_a_hit(tmp_path: Path) -> None:
    root = tmp_path / "store"
    flag = tmp_path / "half-written"
    key = "ee" + "2" * 62
    script = textwrap.dedent(f"""
        import time, numpy as np, zarr
        from storage.store import ArtifactStore, ArtifactRef
        real = zarr.Group.create_array
        def slow(self, name, **kw):
            arr = real(self, name, **kw)
            open({str(flag)!r}, "w").close()   # first array is being written: now kill me
            time.sleep(60)
            return arr
        zarr.Group.create_array = slow
        s = ArtifactStore({str(root)!r})
        s.write(ArtifactRef("flow", {key!r}), {{"flows": np.ones((3, 8, 8, 2), np.float32)}},
                {{"flows": ("pair", "y", "x", "component")}}, {{}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not flag.exists():
        assert proc.poll() is None and time.time() < deadline, "writer died before the kill"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = ArtifactStore(root)
    ref = ArtifactRef("flow", key)
    assert not store.exists(ref)
    assert any((root / TMP).iterdir())  # the leftover is there ...
    report = gc(store, min_age_s=0)
    assert report.removed_temp and not any((root / TMP).iterdir())  # ... and gc removes it
    flows = np.full((3, 8, 8, 2), 2.0, np.float32)
    store.write(ref, {"flows": flows}, {"flows": ("pair", "y", "x", "component")}, {})
    np.testing.assert_array_equal(store.read(ref)["flows"], flows)


def test_object_store_without_marker_is_incomplete() -> None:
    store = ArtifactStore(f"memory://{uuid.uuid4().hex}")
    ref = ArtifactRef("depth", "aa" + "3" * 62)
    # A crash on an object store leaves the arrays but never the commit marker (written last).
    store._write_group(store._p(ref.path), {"frames": CLIP}, DIMS, {}, True)
    assert not store.exists(ref)
    with pytest.raises(KeyError):
        store.read(ref)
    assert list(store.iter_artifacts()) == []
    assert gc(store, min_age_s=0).removed_incomplete == [ref]
    store.write(ref, {"frames": CLIP}, DIMS, {})
    np.testing.assert_array_equal(store.read(ref)["frames"], CLIP)


def _concurrent_writer(root: str, key: str, barrier: mp.synchronize.Barrier) -> None:
    store = ArtifactStore(root)
    barrier.wait()
    store.write(ArtifactRef("flow", key), {"flows": FLOW, "frames": CLIP}, DIMS, {})


def test_concurrent_writers_of_one_key(tmp_path: Path) -> None:
    root = str(tmp_path / "store")
    key = "bb" + "4" * 62
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_concurrent_writer, args=(root, key, barrier)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    store = ArtifactStore(root)
    assert [r for r, _ in store.iter_artifacts()] == [ArtifactRef("flow", key)]
    np.testing.assert_array_equal(store.read(ArtifactRef("flow", key))["flows"], FLOW)
    assert verify(store).damaged == []
    assert not any((Path(root) / TMP).iterdir())


def test_verify_reports_damage(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "s")
    ref = store.write(ArtifactRef("flow", "cc" + "5" * 62), {"flows": FLOW}, DIMS, {})
    chunk = next(p for p in (tmp_path / "s" / ref.path / "flows").rglob("*") if p.is_file()
                 and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    report = verify(store)
    assert report.checked == 1 and [(f.kind, f.ref) for f in report.findings] == [("artifact", ref)]
    assert "checksum" in report.findings[0].what  # the chunk's crc32c


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_open_job_and_gc_of_unreferenced(kind: str, tmp_path: Path) -> None:
    store = _store(kind, tmp_path)
    a = store.write(ArtifactRef("ingest", "11" + "6" * 62), {"frames": CLIP}, DIMS, {})
    b = store.write(ArtifactRef("flow", "22" + "7" * 62), {"flows": FLOW}, DIMS, {})
    c = store.write(ArtifactRef("source_masks", "33" + "8" * 62), {"object_masks": MASK}, DIMS, {})
    orphan = store.write(ArtifactRef("flow", "44" + "9" * 62), {"flows": FLOW * 2}, DIMS, {})
    store.record_job("bear-elephant", {"ingest": a, "flow": b, "source_masks": c})
    ds = open_job(store, "bear-elephant")
    assert set(ds.data_vars) == {"frames", "flows", "object_masks"}
    assert ds.sizes["frame"] == 4 and ds.sizes["pair"] == 3
    assert ds["flows"].attrs["stage"] == "flow" and ds["flows"].attrs["key"] == b.key
    assert hasattr(ds["frames"].data, "dask")  # lazy
    np.testing.assert_array_equal(ds["object_masks"].values, MASK)
    with pytest.raises(KeyError, match="bear-elephant"):
        open_job(store, "no-such-job")
    report = gc(store, min_age_s=0)
    assert report.removed_unreferenced == [orphan]
    assert store.exists(a) and store.exists(b) and store.exists(c) and not store.exists(orphan)


def test_store_pickles_by_url(tmp_path: Path) -> None:
    import pickle

    store = ArtifactStore(tmp_path / "s")
    again = pickle.loads(pickle.dumps(store))
    assert again.url == store.url and not os.path.exists(again.root)  # opening creates nothing


@pytest.mark.parametrize("how", ["cp -p", "tar -x"])
@pytest.mark.parametrize("content", ["none", "partial", "full"])
def test_a_file_replaced_with_the_same_size_and_mtime_changes_its_stamp(how: str, content: str,
                                                                       tmp_path: Path) -> None:
    import shutil
    import tarfile

    from storage.stamps import stamp

    frames = Path(__file__).parent / "data" / "bear" / "frames"
    clip = tmp_path / "clip"
    clip.mkdir()
    for p in sorted(frames.glob("*.jpg"))[:3]:
        shutil.copy(p, clip / p.name)
    target = clip / "00001.jpg"
    other = bytearray(target.read_bytes())
    other[1000] ^= 0xFF  # same size, other content (within the part a partial hash reads)
    src = tmp_path / "src" / target.name
    src.parent.mkdir()
    src.write_bytes(bytes(other))
    for p in (src, target):  # whole seconds: what tar keeps
        os.utime(p, (1_700_000_000, 1_700_000_000))
    before = stamp(clip, content)  # type: ignore[arg-type]
    old_style = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(clip.iterdir())]
    time.sleep(0.01)
    if how == "cp -p":
        subprocess.run(["cp", "-p", str(src), str(target)], check=True)
    else:
        with tarfile.open(tmp_path / "a.tar", "w") as tar:
            tar.add(src, arcname=target.name)
        with tarfile.open(tmp_path / "a.tar") as tar:
            tar.extractall(clip, filter="data")
    assert [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(clip.iterdir())] == old_style
    after = stamp(clip, content)  # type: ignore[arg-type]
    assert after != before and after[0] == before[0] and after[2] == before[2]  # only that file's stamp
    if content != "none":
        assert after[1][5] != before[1][5]  # its content digest
