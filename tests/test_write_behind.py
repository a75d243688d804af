"""Artifacts committed behind the compute (in-process executors): readable at once, committed in order,
failures reported to the job that made them, nothing half-written."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import numpy as np
import pytest

from storage import ArtifactRef, ArtifactStore
from storage.write_behind import CommitError, WorkerStore

RNG = np.random.default_rng(3)
FRAMES = RNG.integers(0, 255, size=(4, 32, 48, 3), dtype=np.uint8)
DIMS = {"frames": ("frame", "y", "x", "channel")}


class SlowStore(ArtifactStore):
    """Commits wait for a gate, so the test can look at the store while writes are pending."""

    gate = threading.Event()
    order: list[str] = []

    def write(self, ref, arrays, dims, attrs, **kw):  # type: ignore[no-untyped-def,override]
        self.gate.wait(10)
        if "fail" in attrs:
            raise OSError(errno.ENOSPC, "No space left on device")
        out = super().write(ref, arrays, dims, attrs, **kw)
        self.order.append(ref.key)
        return out


def test_pending_artifacts_read_from_memory_then_commit_in_order(tmp_path: Path) -> None:
    SlowStore.gate.clear()
    SlowStore.order.clear()
    store = WorkerStore(SlowStore(tmp_path / "s"))
    refs = [ArtifactRef("ingest", f"{i:02x}" + "a" * 62) for i in range(3)]
    for i, ref in enumerate(refs):
        store.write_later(ref, {"frames": FRAMES + i}, DIMS, {})
    plain = ArtifactStore(tmp_path / "s")  # another process's view: nothing committed yet
    assert all(store.exists(r) for r in refs) and not any(plain.exists(r) for r in refs)
    back = store.read(refs[1], ["frames"])["frames"]
    np.testing.assert_array_equal(back, FRAMES + 1)
    back[...] = 0  # a stage writing into its input does not touch what will be committed
    SlowStore.gate.set()
    store.flush()
    assert SlowStore.order == [r.key for r in refs]  # one FIFO writer: commits keep the compute order
    for i, ref in enumerate(refs):
        np.testing.assert_array_equal(plain.read(ref)["frames"], FRAMES + i)


def test_threads_opening_one_store_at_once_share_its_pending_writes(tmp_path: Path) -> None:
    """The first stage tasks of a run open the store together; a second store object would hide the first
    one's pending writes from the next stage (seen as a flaky 'no complete artifact' in CI)."""
    from storage.write_behind import store_for

    for trial in range(5):
        url = str(tmp_path / f"s{trial}")
        barrier, got = threading.Barrier(8), []

        def open_at_once(url: str = url, barrier: threading.Barrier = barrier, got: list = got) -> None:
            barrier.wait()
            got.append(store_for(url))

        threads = [threading.Thread(target=open_at_once) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len({id(s) for s in got}) == 1
        ref = ArtifactRef("ingest", f"{trial:02x}" + "d" * 62)
        got[0].write_later(ref, {"frames": FRAMES}, DIMS, {})
        np.testing.assert_array_equal(got[-1].read(ref, ["frames"])["frames"], FRAMES)
        got[0].flush()


def test_a_failed_commit_is_raised_by_flush_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    import storage.write_behind

    monkeypatch.setattr(storage.write_behind, "PENDING_MAX_BYTES", 1)  # every write waits for the one before
    SlowStore.gate.set()
    store = WorkerStore(SlowStore(tmp_path / "s"))
    good, bad = ArtifactRef("flow", "b" * 64), ArtifactRef("flow", "c" * 64)
    store.write_later(bad, {"frames": FRAMES}, DIMS, {"fail": True})
    # The failed commit stays pending until a flush reports it; it must not hold later writes back forever.
    writer = threading.Thread(target=store.write_later, args=(good, {"frames": FRAMES}, DIMS, {}),
                              daemon=True)
    writer.start()
    writer.join(10)
    assert not writer.is_alive()
    store.flush([good.key])  # the good one is not held up by the bad one
    with pytest.raises(CommitError, match="the flow artifact c{12} could not be committed: OSError.*No space left"):
        store.flush([bad.key])
    plain = ArtifactStore(tmp_path / "s")
    assert plain.exists(good) and not plain.exists(bad) and not store.exists(bad)
    store.flush()  # reported once: nothing else is pending


def test_a_job_whose_commit_fails_is_failed_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    from flows.api import run_catalog
    from flows.config.demo_clip import make_demo_clip
    from flows.config.profiles import Profile

    clips = [make_demo_clip(tmp_path / f"clip{i}", variant=i) for i in range(2)]
    rows = "".join(f"""  - id: job{i}
    source: {c['clip']}
    masks: {c['masks']}
    first_frame: {c['first_frame']}
    prompt: a green cone
""" for i, c in enumerate(clips))
    cat = tmp_path / "cat.yaml"
    cat.write_text("jobs:\n" + rows)
    prof = Profile(name="t", out=str(tmp_path / "out"), params={"ingest": {"n_frames": 4, "width": 64,
                                                                           "height": 64}},
                   backends={"source_masks": "provided", "shape_mask": "change", "depth": "ground-prior"})
    real_write = ArtifactStore.write
    first_refine: list[str] = []

    def flaky_write(self, ref, arrays, dims, attrs, **kw):  # type: ignore[no-untyped-def]
        if ref.stage == "refine" and (not first_refine or first_refine[0] == ref.key):
            first_refine.append(ref.key)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, ref, arrays, dims, attrs, **kw)

    monkeypatch.setattr(ArtifactStore, "write", flaky_write)
    report, _ = run_catalog(cat, profile=prof, store=str(tmp_path / "store"), orchestrator="inline")
    status = {j.job_id: j for j in report.jobs}
    failed = [j for j in report.jobs if j.status == "failed"]
    assert len(failed) == 1, [(j.job_id, j.status, j.error) for j in report.jobs]
    assert (failed[0].error or "").startswith("store: the refine artifact"), failed[0].error
    assert "No space left on device" in (failed[0].error or "")
    other = next(j for j in status.values() if j.status != "failed")
    assert other.status == "done" and Path(other.outputs["mp4"]).is_file()
    store = ArtifactStore(tmp_path / "store")
    assert not store.exists(ArtifactRef("refine", first_refine[0]))
    # The next run computes only what is missing and finishes every job.
    monkeypatch.setattr(ArtifactStore, "write", real_write)
    again, _ = run_catalog(cat, profile=prof, store=str(tmp_path / "store"), orchestrator="inline")
    assert all(j.status in ("done", "cached") for j in again.jobs)
    redo = next(j for j in again.jobs if j.job_id == failed[0].job_id)
    assert redo.stages["refine"].status == "computed" and redo.stages["ingest"].status == "cached"
