"""gc beside running writers (leases, in other processes), killed mid-delete, and never out of the store."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from storage import ArtifactRef, ArtifactStore
from storage.leases import leases, store_lock
from storage.maintenance import gc, verify

DIMS = {"flows": ("pair", "y", "x", "component")}
REFS = [ArtifactRef(f"stage{i}", f"{i:02x}" + "7" * 62) for i in range(3)]
REPO = Path(__file__).resolve().parents[1]


def _flows(i: int) -> np.ndarray:
    return np.full((2, 8, 8, 2), float(i), np.float32)


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the subprocess ended early ({proc.returncode})"
        assert time.time() < deadline, f"timed out waiting for {path.name}"
        time.sleep(0.02)


WRITER = textwrap.dedent("""
    import contextlib, sys, time
    from pathlib import Path
    import numpy as np
    from storage import ArtifactRef, ArtifactStore
    root, flags, use_lease = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"
    store = ArtifactStore(root)
    refs = [ArtifactRef(f"stage{i}", f"{i:02x}" + "7" * 62) for i in range(3)]
    with (store.lease("writer", ttl_s=float(sys.argv[4]), heartbeat_s=0.2) if use_lease
          else contextlib.nullcontext()) as lease:
        if lease is not None:
            lease.protect(refs)  # what the run planned, before it looks at the store
        for i, ref in enumerate(refs):
            store.write(ref, {"flows": np.full((2, 8, 8, 2), float(i), np.float32)},
                        {"flows": ("pair", "y", "x", "component")}, {})
            (flags / f"committed-{i}").touch()
            while not (flags / f"go-{i}").exists():
                time.sleep(0.02)
        store.record_job("job", {r.stage: r for r in refs})  # the manifest comes only at the end
""")


def _writer(tmp_path: Path, use_lease: bool, ttl_s: float = 600) -> tuple[subprocess.Popen[bytes], Path]:
    flags = tmp_path / "flags"
    flags.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "store"), str(flags),
                             "1" if use_lease else "0", str(ttl_s)], cwd=REPO)
    return proc, flags


def test_gc_beside_a_leased_writer_keeps_what_it_committed(tmp_path: Path) -> None:
    proc, flags = _writer(tmp_path, use_lease=True)
    store = ArtifactStore(tmp_path / "store")
    try:
        for i in range(3):
            _wait_for(flags / f"committed-{i}", proc)
            report = gc(store, min_age_s=0)  # as aggressive as gc gets
            assert report.removed_unreferenced == [] and report.kept_leased == REFS[: i + 1]
            assert all(store.exists(r) for r in REFS[: i + 1])
            (flags / f"go-{i}").touch()
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    assert leases(store) == []  # released at the end of the run
    for i, ref in enumerate(REFS):
        np.testing.assert_array_equal(store.read(ref)["flows"], _flows(i))
    assert gc(store, min_age_s=0).removed_unreferenced == [] and verify(store).clean


def test_without_a_lease_gc_deletes_what_a_run_just_committed(tmp_path: Path) -> None:
    """The failure leases prevent (so the test above can fail): no manifest yet, so it looks unreferenced."""
    proc, flags = _writer(tmp_path, use_lease=False)
    store = ArtifactStore(tmp_path / "store")
    try:
        _wait_for(flags / "committed-0", proc)
        assert gc(store).removed_unreferenced == []  # the default age bound alone keeps a fresh commit ...
        assert gc(store, min_age_s=0).removed_unreferenced == [REFS[0]]  # ... and nothing else does
        assert not store.exists(REFS[0])
        for i in range(3):
            (flags / f"go-{i}").touch()
        assert proc.wait(60) == 0
    finally:
        proc.kill()


def test_a_killed_runs_lease_expires(tmp_path: Path) -> None:
    proc, flags = _writer(tmp_path, use_lease=True, ttl_s=5.0)
    store = ArtifactStore(tmp_path / "store")
    _wait_for(flags / "committed-0", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = time.time()
    report = gc(store, min_age_s=0)
    assert report.kept_leased == [REFS[0]] and store.exists(REFS[0]) and report.removed_leases == []
    [info] = leases(store)
    time.sleep(max(0.0, info.heartbeat + info.ttl_s + 0.2 - time.time()))
    assert time.time() - killed < 15
    report = gc(store, min_age_s=0)
    assert report.removed_leases == ["writer"] and report.removed_unreferenced == [REFS[0]]
    assert leases(store) == [] and not store.exists(REFS[0])


@pytest.mark.parametrize("heartbeat_s", [0.2, 0.0])
def test_the_heartbeat_keeps_a_lease_alive(heartbeat_s: float, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "s")
    store.write(REFS[0], {"flows": _flows(0)}, DIMS, {})
    with store.lease("long-run", ttl_s=2.0, heartbeat_s=heartbeat_s) as lease:
        lease.protect([REFS[0]])
        time.sleep(3.0)  # past the ttl
        report = gc(store, min_age_s=0)
        if heartbeat_s:
            assert report.kept_leased == [REFS[0]] and store.exists(REFS[0])
        else:  # no heartbeat: the lease is taken for a dead run's
            assert report.removed_leases == ["long-run"] and not store.exists(REFS[0])


def test_protect_waits_for_a_delete_in_progress(tmp_path: Path) -> None:
    """The lease lock orders protect and gc's deletes: protect returns only once gc's step is over."""
    store = ArtifactStore(tmp_path / "s")
    store.write(REFS[0], {"flows": _flows(0)}, DIMS, {})
    lease = store.lease("r", heartbeat_s=0)
    done = threading.Event()
    with store_lock(store, exclusive=True):
        worker = threading.Thread(target=lambda: (lease.protect([REFS[0]]), done.set()))
        worker.start()
        assert not done.wait(0.5)
    worker.join(10)
    assert done.is_set() and gc(store, min_age_s=0).kept_leased == [REFS[0]]
    lease.release()


GC_KILLED = textwrap.dedent("""
    import os, sys, time
    from storage import ArtifactStore, localfs
    from storage.maintenance import gc
    root, flag = sys.argv[1], sys.argv[2]
    def half_then_hang(path):
        files = sorted(os.path.join(t, f) for t, _, fs in os.walk(path) for f in fs)
        for f in files[: len(files) // 2]:
            os.unlink(f)
        open(flag, "w").close()  # half of an artifact is gone: kill me now
        time.sleep(120)
    localfs.purge = half_then_hang
    gc(ArtifactStore(root), min_age_s=0)
""")


def test_a_gc_killed_mid_delete_leaves_nothing_half(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = ArtifactStore(root)
    for i, ref in enumerate(REFS):
        store.write(ref, {"flows": _flows(i)}, DIMS, {})
    keep = ArtifactRef("kept", "ff" + "1" * 62)
    store.write(keep, {"flows": _flows(9)}, DIMS, {})
    store.record_job("job", {"kept": keep})
    flag = tmp_path / "half-deleted"
    proc = subprocess.Popen([sys.executable, "-c", GC_KILLED, str(root), str(flag)], cwd=REPO)
    try:
        _wait_for(flag, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The artifact being deleted left its place in one rename; the rest is untouched and whole.
    assert sum(not store.exists(r) for r in REFS) == 1
    assert all(ok for _, ok in store.iter_artifacts(include_incomplete=True))
    assert any((root / ".trash").iterdir())
    for i, ref in enumerate(REFS):
        if store.exists(ref):
            np.testing.assert_array_equal(store.read(ref)["flows"], _flows(i))
    report = gc(store, min_age_s=0)
    assert report.finished_trash == 1 and len(report.removed_unreferenced) == 2
    assert verify(store).clean and not any((root / ".trash").iterdir())
    np.testing.assert_array_equal(store.read(keep)["flows"], _flows(9))


def test_gc_never_follows_a_symlink_out_of_the_store(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = ArtifactStore(root)
    store.write(REFS[0], {"flows": _flows(0)}, DIMS, {})
    outside = tmp_path / "outside"
    for name in ("tmp", "stage", "artifact"):
        (outside / name / "ab").mkdir(parents=True)
        (outside / name / "ab" / "precious").write_text(name)
    old = time.time() - 7200
    for p in outside.rglob("*"):
        os.utime(p, (old, old), follow_symlinks=False)
    (root / ".tmp").rmdir()  # the write's, empty
    (root / ".tmp").symlink_to(outside / "tmp", target_is_directory=True)
    (root / "linked_stage").symlink_to(outside / "stage", target_is_directory=True)
    (root / "stage1" / "ab").mkdir(parents=True)
    (root / "stage1" / "ab" / ("ab" + "2" * 62)).symlink_to(outside / "artifact", target_is_directory=True)
    report = gc(store, min_age_s=0)
    assert sorted(p for p, _ in report.skipped) == [".tmp", "linked_stage", f"stage1/ab/ab{'2' * 62}"]
    assert sorted(p.read_text() for p in outside.rglob("precious")) == ["artifact", "stage", "tmp"]
    assert report.removed_unreferenced == [REFS[0]]  # and it still did its work
    fixed = verify(store, repair=True, min_age_s=0)
    assert len(fixed.findings) == 3 and all(f.repaired for f in fixed.findings)
    assert sorted(p.read_text() for p in outside.rglob("precious")) == ["artifact", "stage", "tmp"]
    assert verify(store).clean


def test_an_unreadable_manifest_stops_unreferenced_deletes(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "s")
    a = store.write(REFS[0], {"flows": _flows(0)}, DIMS, {})
    b = store.write(REFS[1], {"flows": _flows(1)}, DIMS, {})
    store.record_job("a", {a.stage: a})
    store.record_job("b", {b.stage: b})
    manifest = tmp_path / "s" / "jobs" / "b.json"
    manifest.write_text(manifest.read_text()[:20])  # b may be the job that uses it: gc cannot know
    report = gc(store, min_age_s=0)
    assert report.removed_unreferenced == [] and store.exists(b)
    assert report.skipped == [("jobs/b.json", "unreadable job manifest: no unreferenced artifact removed "
                                              "(verify --repair)")]


def test_gc_dry_run_and_dead_lease_document(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "s")
    store.write(REFS[0], {"flows": _flows(0)}, DIMS, {})
    (tmp_path / "s" / ".leases").mkdir()
    dead = {"run": "old", "refs": [REFS[0].path], "heartbeat": time.time() - 3600, "ttl_s": 600, "pid": 1}
    (tmp_path / "s" / ".leases" / "old.json").write_text(json.dumps(dead))
    dry = gc(store, min_age_s=0, dry_run=True)
    assert dry.removed_leases == ["old"] and dry.removed_unreferenced == [REFS[0]] and store.exists(REFS[0])
    assert [i.run for i in leases(store)] == ["old"]
    done = gc(store, min_age_s=0)
    assert done.removed_unreferenced == [REFS[0]] and leases(store) == [] and not store.exists(REFS[0])


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[None]:
    """``path`` read-only for real: a read-only bind mount as root (permissions do not stop root), else chmod."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")] if not p.is_symlink()}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    mounted = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("root without mount: cannot make a read-only folder")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path), str(path)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True, capture_output=True)


def test_a_read_only_store_serves_reads_and_its_lease_is_inactive(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "s")
    store.write(REFS[0], {"flows": _flows(0)}, DIMS, {})
    store.record_job("job", {REFS[0].stage: REFS[0]})
    with _read_only(tmp_path / "s"):
        with pytest.raises(OSError):
            (tmp_path / "s" / "probe").write_text("x")
        with store.lease("ro") as lease:
            lease.protect([REFS[0]])
            assert not lease.active
            assert store.exists(REFS[0]) and store.job("job")["artifacts"] == {REFS[0].stage: REFS[0].key}
            np.testing.assert_array_equal(store.read(REFS[0])["flows"], _flows(0))
        assert verify(store).clean


def test_gc_purges_old_quarantine_entries_only_when_asked(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "s")
    store.write(REFS[0], {"flows": _flows(0)}, DIMS, {})
    store.record_job("job", {REFS[0].stage: REFS[0]})
    name = store.quarantine(REFS[0], "test")
    assert gc(store, min_age_s=0).removed_quarantine == [] and len(store.quarantined()) == 1
    assert gc(store, min_age_s=0, purge_quarantine_s=3600).removed_quarantine == []  # young
    assert gc(store, min_age_s=0, purge_quarantine_s=0).removed_quarantine == [name]
    assert store.quarantined() == [] and not any((tmp_path / "s" / ".quarantine").iterdir())
