"""Damage injected into real stores: each kind is refused on read (ArtifactDamaged or DocumentDamaged), found by
verify, quarantined by repair, and a fresh write of the same artifact works afterwards."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from storage import ArtifactDamaged, ArtifactRef, ArtifactStore, DocumentDamaged, StoreNotFound
from storage.maintenance import gc, verify
from storage.store import COMMIT, TMP

RNG = np.random.default_rng(7)
FRAMES = RNG.integers(0, 255, size=(4, 32, 48, 3), dtype=np.uint8)
FLOWS = RNG.normal(size=(3, 32, 48, 2)).astype(np.float32)
IMAGE = RNG.integers(0, 255, size=(32, 48, 3), dtype=np.uint8)
ARRAYS = {"frames": FRAMES, "flows": FLOWS, "edited_frame": IMAGE}
DIMS = {"frames": ("frame", "y", "x", "channel"), "flows": ("pair", "y", "x", "component"),
        "edited_frame": ("y", "x", "channel")}
REF = ArtifactRef("flow", "ab" + "c" * 62)
OTHER = ArtifactRef("flow", "cd" + "e" * 62)


def _write(store: ArtifactStore, ref: ArtifactRef = REF, scale: int = 1) -> ArtifactRef:
    arrays = {n: (a * scale if n == "flows" else a) for n, a in ARRAYS.items()}
    return store.write(ref, arrays, DIMS, {"params": {"p": 1}})


def _shard(folder: Path, name: str = "frames") -> Path:
    return next(p for p in (folder / name).rglob("*") if p.is_file() and p.name != "zarr.json")


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x5A
    path.write_bytes(bytes(data))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _outside(folder: Path, outside: Path) -> None:
    """Replace ``folder`` by a symlink to a copy of it outside the store."""
    shutil.copytree(folder, outside)
    shutil.rmtree(folder)
    folder.symlink_to(outside, target_is_directory=True)


def _swap_shard(folder: Path, root: Path) -> None:
    """A valid shard of another artifact (same shape, other content) in place of this one's."""
    other = ArtifactStore(root)
    _write(other, OTHER, scale=3)
    shutil.copy(_shard(root / OTHER.path, "flows"), _shard(folder, "flows"))
    other.delete(OTHER)


def _stale_marker(folder: Path, root: Path) -> None:
    rec = json.loads((folder / COMMIT).read_text())
    rec["key"] = OTHER.key
    (folder / COMMIT).write_text(json.dumps(rec))


def _half_deleted(folder: Path) -> None:
    """What the old gc left when killed: marker removed first, then part of the tree."""
    (folder / COMMIT).unlink()
    shutil.rmtree(folder / "frames")


# kind -> (inject(folder, root, tmp_path), exists() afterwards). exists() is cheap: only some damage shows there.
ARTIFACT_DAMAGE: dict[str, tuple[Callable[[Path, Path, Path], None], bool]] = {
    "flipped byte in a shard": (lambda f, r, t: _flip(_shard(f)), True),
    "flipped byte in a chunk": (lambda f, r, t: _flip(_shard(f, "edited_frame")), True),
    "truncated shard": (lambda f, r, t: _truncate(_shard(f)), True),
    "empty shard": (lambda f, r, t: _truncate(_shard(f), 0), True),
    "deleted shard": (lambda f, r, t: _shard(f).unlink(), True),
    "deleted chunk": (lambda f, r, t: _shard(f, "edited_frame").unlink(), True),
    "shard of another artifact": (lambda f, r, t: _swap_shard(f, r), True),
    "deleted zarr.json": (lambda f, r, t: (f / "zarr.json").unlink(), False),
    "truncated zarr.json": (lambda f, r, t: _truncate(f / "zarr.json"), True),
    "empty zarr.json": (lambda f, r, t: _truncate(f / "zarr.json", 0), False),
    "deleted array zarr.json": (lambda f, r, t: (f / "frames" / "zarr.json").unlink(), True),
    "truncated array zarr.json": (lambda f, r, t: _truncate(f / "flows" / "zarr.json"), True),
    "deleted array folder": (lambda f, r, t: shutil.rmtree(f / "flows"), True),
    "missing v2v.commit": (lambda f, r, t: (f / COMMIT).unlink(), False),
    "empty v2v.commit": (lambda f, r, t: _truncate(f / COMMIT, 0), False),
    "truncated v2v.commit": (lambda f, r, t: _truncate(f / COMMIT), True),
    "v2v.commit of another artifact": (lambda f, r, t: _stale_marker(f, r), True),
    "half-deleted artifact": (lambda f, r, t: _half_deleted(f), False),
    "symlinked artifact folder": (lambda f, r, t: _outside(f, t / "elsewhere"), False),
    "symlinked stage folder": (lambda f, r, t: _outside(f.parent.parent, t / "elsewhere"), False),
}


@pytest.mark.parametrize("kind", list(ARTIFACT_DAMAGE))
def test_artifact_damage_is_refused_found_and_repaired(kind: str, tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = ArtifactStore(root)
    _write(store)
    assert verify(store).clean
    inject, still_exists = ARTIFACT_DAMAGE[kind]
    inject(root / REF.path, root, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    outside = sorted(p.name for p in elsewhere.rglob("*")) if elsewhere.exists() else []

    assert store.exists(REF) is still_exists
    with pytest.raises(ArtifactDamaged) as err:
        store.read(REF)
    assert err.value.ref == REF and err.value.what
    if kind != "shard of another artifact":  # valid chunks of other content: only whole-array checksums tell
        # Lazy views check structure when opened and each chunk's crc32c when decoded (zarr's ValueError).
        with pytest.raises((ArtifactDamaged, ValueError)):
            store.open(REF).load()

    found = verify(store, min_age_s=0)
    assert [f.path for f in found.findings] in ([REF.path], [REF.stage]), found.findings
    assert found.findings[0].repaired is None and store.quarantined() == []

    fixed = verify(store, repair=True, min_age_s=0)
    assert fixed.findings[0].repaired.startswith("quarantined as")
    assert not store.exists(REF) and len(fixed.quarantined) == 1
    assert fixed.quarantined[0]["reason"] and fixed.quarantined[0]["path"] in (REF.path, REF.stage)
    if outside:  # repair moved the link, never what it points to
        assert sorted(p.name for p in (tmp_path / "elsewhere").rglob("*")) == outside

    _write(store)
    back = store.read(REF)
    for name, arr in ARRAYS.items():
        np.testing.assert_array_equal(back[name], arr)
    again = verify(store)
    assert again.clean and again.checked == 1 and len(again.quarantined) == 1  # still listed for inspection


@pytest.mark.parametrize("kind", [k for k, (_, ok) in ARTIFACT_DAMAGE.items() if not ok])
def test_write_replaces_a_damaged_folder_that_exists_denies(kind: str, tmp_path: Path) -> None:
    """A run sees no artifact (exists says no), recomputes, and its write moves the damaged folder aside."""
    root = tmp_path / "store"
    store = ArtifactStore(root)
    _write(store)
    ARTIFACT_DAMAGE[kind][0](root / REF.path, root, tmp_path)
    _write(store)
    np.testing.assert_array_equal(store.read(REF)["frames"], FRAMES)
    assert len(store.quarantined()) == 1
    assert verify(store).clean


def test_quarantine_then_rewrite_after_a_read_found_damage(tmp_path: Path) -> None:
    """The runner's path for damage exists() cannot see: read raises, quarantine, recompute."""
    store = ArtifactStore(tmp_path / "s")
    _write(store)
    _flip(_shard(tmp_path / "s" / REF.path, "flows"))
    with pytest.raises(ArtifactDamaged) as err:
        store.read(REF, ["flows"])
    np.testing.assert_array_equal(store.read(REF, ["frames"])["frames"], FRAMES)  # other arrays are fine
    name = store.quarantine(REF, err.value.what)
    assert name and not store.exists(REF) and store.quarantine(REF, "again") is None
    note = store.quarantined()[0]
    assert note["name"] == name and note["path"] == REF.path and "flows" in note["reason"]
    assert (tmp_path / "s" / ".quarantine" / name / COMMIT).is_file()  # kept whole for inspection
    _write(store)
    np.testing.assert_array_equal(store.read(REF)["flows"], FLOWS)


def test_damage_to_an_all_zero_array_is_still_found(tmp_path: Path) -> None:
    """Zarr serves the fill value for a missing chunk: an all-zero array reads the same without its shard, so
    only the structure check (every chunk is stored) can tell."""
    store = ArtifactStore(tmp_path / "s")
    zeros = np.zeros((3, 16, 16), bool)
    ref = store.write(ArtifactRef("source_masks", "ee" + "1" * 62), {"object_masks": zeros},
                      {"object_masks": ("frame", "y", "x")}, {})
    _shard(tmp_path / "s" / ref.path, "object_masks").unlink()
    with pytest.raises(ArtifactDamaged, match="missing chunk"):
        store.open(ref)
    assert [f.ref for f in verify(store).findings] == [ref]


def test_symlink_inside_an_artifact(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "s")
    _write(store)
    shard = _shard(tmp_path / "s" / REF.path)
    copy = tmp_path / "copy"
    shutil.copy(shard, copy)
    shard.unlink()
    shard.symlink_to(copy)
    report = verify(store, repair=True)
    assert [f.kind for f in report.findings] == ["artifact"] and "symlink inside" in report.findings[0].what
    assert copy.is_file() and not store.exists(REF)


# ---- documents and the store's own folders ------------------------------------------------------------
def _manifest(store: ArtifactStore) -> Path:
    store.record_job("bear", {"flow": REF})
    return Path(store.root) / "jobs" / "bear.json"


DOC_DAMAGE: dict[str, tuple[str, Callable[[ArtifactStore], Path]]] = {
    "truncated job manifest": ("manifest", lambda s: _manifest(s)),
    "corrupt job manifest": ("manifest", lambda s: _manifest(s)),
    "truncated source index": ("index", lambda s: (s.put_json("index/source/ff.json", {"digests": {"a": "b"}}),
                                                  Path(s.root) / "index/source/ff.json")[1]),
    "truncated image index": ("index", lambda s: (s.put_json("index/image/aa.json", {"digest": "x"}),
                                                 Path(s.root) / "index/image/aa.json")[1]),
    "truncated lease": ("lease", lambda s: (s.lease("r1", heartbeat_s=0).refresh(),
                                            Path(s.root) / ".leases" / "r1.json")[1]),
}


@pytest.mark.parametrize("kind", list(DOC_DAMAGE))
def test_document_damage(kind: str, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "s")
    _write(store)
    finding_kind, make = DOC_DAMAGE[kind]
    path = make(store)
    rel = path.relative_to(store.root).as_posix()
    if kind.startswith("corrupt"):
        path.write_text(json.dumps({"job": "bear", "artifacts": ["not", "a", "mapping"]}))
        with pytest.raises(DocumentDamaged, match="not a job manifest"):
            store.job("bear")
    else:
        _truncate(path)
        with pytest.raises(DocumentDamaged) as err:
            store.get_json(rel)
        assert err.value.relpath == rel
        assert store.get_json(rel, on_damage="ignore") is None and path.exists()
    found = verify(store)
    assert [(f.kind, f.path) for f in found.findings] == [(finding_kind, rel)]
    fixed = verify(store, repair=True)
    assert fixed.findings[0].repaired.startswith("quarantined") and not path.exists()
    assert verify(store).clean and store.exists(REF)


def test_an_index_lookup_can_quarantine_and_miss(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "s")
    store.put_json("index/source/ff.json", {"digests": {}})
    _truncate(Path(store.root) / "index/source/ff.json")
    assert store.get_json("index/source/ff.json", on_damage="quarantine") is None  # a cache: rebuilt
    assert store.get_json("index/source/ff.json") is None
    assert [q["path"] for q in store.quarantined()] == ["index/source/ff.json"]


def test_symlinked_tmp_is_found_moved_aside_and_never_written_through(tmp_path: Path) -> None:
    root = tmp_path / "s"
    store = ArtifactStore(root)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    root.mkdir()
    (root / TMP).symlink_to(outside, target_is_directory=True)
    os.utime(outside / "precious", (0, 0))
    report = verify(store, min_age_s=0)
    assert [(f.kind, f.path) for f in report.findings] == [("symlink", TMP)]
    assert gc(store, min_age_s=0).skipped[0][0] == TMP
    _write(store)  # writes never go through the link: it is moved aside first
    assert sorted(p.name for p in outside.iterdir()) == ["precious"] and (root / TMP).is_dir()
    assert not (root / TMP).is_symlink() and store.exists(REF)
    assert verify(store).clean and (outside / "precious").read_text() == "keep me"


def test_stray_temp_leftovers(tmp_path: Path) -> None:
    root = tmp_path / "s"
    store = ArtifactStore(root)
    _write(store)
    store.record_job("bear", {"flow": REF})
    stray = root / TMP / f"{'9' * 64}.{uuid.uuid4().hex}"
    (stray / "frames").mkdir(parents=True)
    doc_tmp = root / "jobs" / f"bear.json.{uuid.uuid4().hex}.tmp"
    doc_tmp.write_text('{"half')
    assert verify(store).clean  # young: may be writes in progress
    old = time.time() - 7200
    for p in (stray, doc_tmp):
        os.utime(p, (old, old))
    report = verify(store, repair=True)
    assert sorted((f.kind, f.path) for f in report.findings) == sorted([
        ("temp", f"jobs/{doc_tmp.name}"), ("temp", f"{TMP}/{stray.name}")])
    assert not stray.exists() and not doc_tmp.exists() and verify(store).clean


def test_leftover_trash_is_finished_by_verify(tmp_path: Path) -> None:
    root = tmp_path / "s"
    store = ArtifactStore(root)
    _write(store)
    (root / ".trash" / "half.deleted" / "x").mkdir(parents=True)
    report = verify(store)
    assert report.clean and report.finished_trash == 1 and not any((root / ".trash").iterdir())


@pytest.mark.parametrize("kind", ["flipped byte in a shard", "deleted shard", "truncated zarr.json"])
def test_damage_on_an_object_store(kind: str) -> None:
    store = ArtifactStore(f"memory://{uuid.uuid4().hex}")
    _write(store)
    fs, base = store.fs, store._p(REF.path)
    shard = next(p for p in sorted(fs.find(base)) if "/frames/c/" in p)
    target = f"{base}/zarr.json" if "zarr.json" in kind else shard
    data = bytearray(fs.cat_file(target))
    if kind.startswith("flipped"):
        data[len(data) // 2] ^= 0x5A
        fs.pipe_file(target, bytes(data))
    elif kind.startswith("deleted"):
        fs.rm_file(target)
    else:
        fs.pipe_file(target, bytes(data[: len(data) // 2]))
    with pytest.raises(ArtifactDamaged):
        store.read(REF)
    assert [f.ref for f in verify(store).findings] == [REF]
    assert verify(store, repair=True).findings[0].repaired
    assert not store.exists(REF) and len(store.quarantined()) == 1
    _write(store)
    np.testing.assert_array_equal(store.read(REF)["frames"], FRAMES)
    assert verify(store).clean


def test_inspecting_a_missing_store_creates_nothing(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "typo")
    for action in (verify, gc):
        with pytest.raises(StoreNotFound, match="no store at"):
            action(store)
    assert not store.present() and not (tmp_path / "typo").exists()
    assert not store.exists(REF) and list(store.iter_artifacts()) == [] and store.jobs() == []
    assert not (tmp_path / "typo").exists()


def test_damage_errors_pickle_and_read_as_absent_to_old_callers() -> None:
    import pickle

    from storage import ArtifactNotFound

    err = pickle.loads(pickle.dumps(ArtifactDamaged(REF, "checksum mismatch in 'frames'")))
    assert err.ref == REF and err.what == "checksum mismatch in 'frames'" and REF.path in str(err)
    assert isinstance(err, ArtifactNotFound) and isinstance(err, KeyError)
    doc = pickle.loads(pickle.dumps(DocumentDamaged("jobs/a.json", "truncated or not JSON")))
    assert doc.relpath == "jobs/a.json" and isinstance(doc, ValueError)
    missing = pickle.loads(pickle.dumps(StoreNotFound("/nowhere")))
    assert str(missing) == "no store at /nowhere" and isinstance(missing, FileNotFoundError)


def test_a_store_root_may_itself_be_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "disk" / "store"
    real.mkdir(parents=True)
    (tmp_path / "store").symlink_to(real, target_is_directory=True)
    store = ArtifactStore(tmp_path / "store")
    _write(store)
    store.record_job("bear", {"flow": REF})
    assert [r for r, _ in store.iter_artifacts()] == [REF]
    report = verify(store)
    assert report.clean and report.checked == 1 and report.documents == 1
    assert gc(store, min_age_s=0).removed_unreferenced == [] and store.exists(REF)
