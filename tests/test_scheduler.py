"""The scheduler's state machine on made-up plans: a fake executor runs fake stage calls on threads and records
what it was asked to run, how many ran at once and when exports ran; the store and its write-behind are real."""

from __future__ import annotations

import concurrent.futures as cf
import errno
import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flows.config.catalog import Job
from flows.exports.outputs import OutputsConfig
from flows.plan.calls import StageCall, Upstream
from flows.plan.planner import JobPlan, StagePlan
from flows.run.outcomes import BLOCKED, Done, FailureKind, TaskOutcome, outcome_of_future
from flows.run.results import JobResult, RunReport, StageResult
from flows.run.scheduler import schedule
from stages.base import StageInputError
from storage.store import ArtifactRef, ArtifactStore
from storage.write_behind import CommitError, store_for


def key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def stage(name: str, key_name: str, upstream: tuple[str, ...] = (), status: str = "run") -> StagePlan:
    inputs = {u: Upstream(u, key(u)) for u in upstream}  # only the shape matters here
    call = StageCall(name, "fake", {}, inputs, key=key(key_name))
    return StagePlan(name, status, (), call, upstream)  # type: ignore[arg-type]


def job_plan(job_id: str, stages: list[StagePlan], job: Job | None = None) -> JobPlan:
    return JobPlan(job_id, job, {sp.stage: sp for sp in stages})


class FakeExecutor:
    """Runs each fake stage call on a thread: sleeps ``seconds``, raises what ``fail`` names for its key, or
    writes a small artifact behind the compute (``write``: the store's real write-behind)."""

    name = "fake"

    def __init__(self, stage_slots: int | None = None, seconds: float = 0.0, threads: int = 8,
                 export_seconds: float = 0.0) -> None:
        self.stage_slots = stage_slots
        self.seconds, self.export_seconds = seconds, export_seconds
        self.pool = cf.ThreadPoolExecutor(max_workers=threads)
        self.fail: dict[str, BaseException] = {}  # key -> what its call raises
        self.fail_export: dict[str, BaseException] = {}  # job id -> what its export raises
        self.cached: set[str] = set()  # keys "found in the store"
        self.blocked: set[str] = set()  # keys whose task an orchestrator itself reports as never started
        self.write: str | None = None  # a store URL: every call writes its artifact there behind the compute
        self.calls: list[str] = []  # stage names, in submission order
        self.keys: list[str] = []
        self.log: list[tuple[str, str]] = []  # ("start" | "export-start" | "export-done", name)
        self.lock = threading.Lock()
        self.now = self.peak = 0

    def submit(self, job_id: str, sp: StagePlan, externals: dict[str, Any] | None) -> Any:
        self.calls.append(sp.stage)
        self.keys.append(sp.key)
        return self.pool.submit(self._run, sp)

    def _run(self, sp: StagePlan) -> dict[str, Any]:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
            self.log.append(("start", sp.stage))
        try:
            time.sleep(self.seconds)
            if sp.key in self.fail:
                raise self.fail[sp.key]
            if self.write is not None:
                store_for(self.write).write_later(ArtifactRef(sp.stage, sp.key), {"x": np.arange(4)},
                                                  {"x": ("i",)}, {})
            return {"stage": sp.stage, "key": sp.key, "cached": sp.key in self.cached, "seconds": 0.5,
                    "io_seconds": 0.1, "pid": os.getpid()}
        finally:
            with self.lock:
                self.now -= 1

    def submit_outputs(self, job_id: str, kwargs: dict[str, Any]) -> Any:
        def export() -> dict[str, str]:
            with self.lock:
                self.log.append(("export-start", job_id))
            time.sleep(self.export_seconds)
            with self.lock:
                self.log.append(("export-done", job_id))
            if job_id in self.fail_export:
                raise self.fail_export[job_id]
            return {"mp4": f"{kwargs['out_root']}/{job_id}/edit.mp4", "_seconds": "0.25"}

        return self.pool.submit(export)

    def on_done(self, handle: Any, fn: Callable[[], None]) -> None:
        handle.add_done_callback(lambda _: fn())

    def outcome(self, handle: Any) -> TaskOutcome:
        out = outcome_of_future(handle)
        return BLOCKED if isinstance(out, Done) and out.ref.get("key") in self.blocked else out


class Reporter:
    def __init__(self) -> None:
        self.stages: list[tuple[str, str, str]] = []
        self.jobs: list[str] = []

    def start(self, total: int | None) -> None: ...

    def job_planned(self, plan: JobPlan) -> None: ...

    def stage_done(self, job_id: str, result: StageResult) -> None:
        self.stages.append((job_id, result.stage, result.status))

    def job_done(self, result: JobResult) -> None:
        self.jobs.append(result.job_id)


def run(plans: list[JobPlan], ex: FakeExecutor, store: ArtifactStore, outputs: OutputsConfig | None = None,
        reporter: Reporter | None = None) -> dict[str, JobResult]:
    report = schedule(plans, ex, store, reporter, outputs)
    assert isinstance(report, RunReport) and [j.job_id for j in report.jobs] == [p.job_id for p in plans]
    return {j.job_id: j for j in report.jobs}


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store")


def test_a_shared_key_is_computed_once_and_counts_as_cached_for_the_others(store: ArtifactStore) -> None:
    plans = [job_plan(f"j{i}", [stage("ingest", "clip"), stage("edit", f"edit{i}", ("ingest",))]) for i in range(3)]
    ex = FakeExecutor()
    jobs = run(plans, ex, store)
    assert ex.keys.count(key("clip")) == 1 and sorted(ex.calls) == ["edit", "edit", "edit", "ingest"]
    assert [jobs[j].stages["ingest"].status for j in ("j0", "j1", "j2")] == ["computed", "cached", "cached"]
    assert all(jobs[j].stages["edit"].status == "computed" and jobs[j].status == "done" for j in jobs)
    # Its compute time is the first job's only; a key found in the store is cached for every job.
    assert jobs["j0"].compute_seconds == 1.0 and jobs["j1"].compute_seconds == 0.5
    ex2 = FakeExecutor()
    ex2.cached = {key("clip"), key("edit0")}
    again = run(plans[:1], ex2, store)
    assert again["j0"].status == "cached" and again["j0"].computed == 0


def test_a_failure_blocks_only_its_descendants(store: ArtifactStore) -> None:
    # j0: ingest -> (bad -> after -> join), (side -> join); j1 shares ingest; j2 shares the failing key.
    j0 = job_plan("j0", [stage("ingest", "clip"), stage("bad", "bad", ("ingest",)),
                         stage("side", "side", ("ingest",)), stage("after", "after", ("bad",)),
                         stage("join", "join", ("after", "side"))])
    j1 = job_plan("j1", [stage("ingest", "clip"), stage("edit", "edit1", ("ingest",))])
    j2 = job_plan("j2", [stage("ingest", "clip"), stage("bad", "bad", ("ingest",)),
                         stage("other", "other2", ("ingest",))])
    ex = FakeExecutor(seconds=0.01)
    ex.fail[key("bad")] = StageInputError("stage 'bad': 3 masks for 4 frames")
    rep = Reporter()
    jobs = run([j0, j1, j2], ex, store, reporter=rep)
    assert "after" not in ex.calls and "join" not in ex.calls and ex.calls.count("bad") == 1
    s0 = jobs["j0"].stages
    assert {s: r.status for s, r in s0.items()} == {"ingest": "computed", "bad": "failed", "side": "computed",
                                                    "after": "blocked", "join": "blocked"}
    assert s0["bad"].failure is FailureKind.INPUT and s0["join"].failure is FailureKind.BLOCKED
    assert s0["join"].error == "an upstream stage failed"
    assert jobs["j0"].status == "failed" and jobs["j0"].error == "bad: stage 'bad': 3 masks for 4 frames"
    assert jobs["j0"].failure is FailureKind.INPUT
    assert jobs["j1"].status == "done" and jobs["j1"].error is None
    # The job sharing the failing key fails with it; its sibling stage still ran.
    assert jobs["j2"].status == "failed" and jobs["j2"].stages["other"].status == "computed"
    # Each stage reported once per job (join has two failed paths above it), each job ended once.
    assert len(rep.stages) == len(set(rep.stages)) == 5 + 2 + 3 and sorted(rep.jobs) == ["j0", "j1", "j2"]


@pytest.mark.parametrize("slots", [1, 3])
def test_stage_slots_are_respected(store: ArtifactStore, slots: int) -> None:
    plans = [job_plan(f"j{i}", [stage(f"s{n}", f"j{i}s{n}") for n in range(4)]) for i in range(3)]
    ex = FakeExecutor(stage_slots=slots, seconds=0.05)
    jobs = run(plans, ex, store)
    assert ex.peak == slots and len(ex.calls) == 12
    assert all(j.status == "done" for j in jobs.values())


def test_the_earliest_job_gets_a_free_slot_and_exports_take_none(store: ArtifactStore, tmp_path: Path) -> None:
    jobs_ = [Job(id=f"j{i}", source=tmp_path, mode="inpaint", prompt="a cone") for i in range(2)]
    plans = [job_plan(f"j{i}", [stage("ingest", f"clip{i}"), stage("edit", f"edit{i}", ("ingest",))], jobs_[i])
             for i in range(2)]
    ex = FakeExecutor(stage_slots=1, seconds=0.02, export_seconds=0.5)
    jobs = run(plans, ex, store, OutputsConfig(str(tmp_path / "out")))
    # j0 first, whole (its export can start early), then j1; one stage at a time.
    assert ex.keys == [key("clip0"), key("edit0"), key("clip1"), key("edit1")] and ex.peak == 1
    # j1's stages ran while j0's export did: the export held no stage slot.
    starts = [e for e in ex.log if e[0] == "start" or e == ("export-done", "j0")]
    assert starts.index(("export-done", "j0")) == 4
    assert jobs["j0"].outputs == {"mp4": f"{tmp_path / 'out'}/j0/edit.mp4"} and jobs["j0"].outputs_seconds == 0.25


def _slow_writes(monkeypatch: pytest.MonkeyPatch, fail_stage: str | None = None) -> None:
    real = ArtifactStore.write

    def slow(self: ArtifactStore, ref: ArtifactRef, *args: Any, **kw: Any) -> ArtifactRef:
        time.sleep(0.2)
        if ref.stage == fail_stage:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, ref, *args, **kw)

    monkeypatch.setattr(ArtifactStore, "write", slow)


class RecordingStore(ArtifactStore):
    """Logs each manifest with whether every artifact it points at was committed on disk by then."""

    log: list[tuple[Any, ...]]

    def record_job(self, job_id: str, refs: Any, extra: Any = None) -> None:
        on_disk = ArtifactStore(self.url)  # not this process's write-behind view
        self.log.append(("record", job_id, all(on_disk.exists(r) for r in refs.values())))
        super().record_job(job_id, refs, extra)


@pytest.mark.parametrize("exports", [True, False])
def test_a_manifest_is_recorded_after_the_commits_and_the_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   exports: bool) -> None:
    _slow_writes(monkeypatch)
    store = RecordingStore(tmp_path / "store")
    job = Job(id="j0", source=tmp_path, mode="inpaint", prompt="a cone")
    plan = job_plan("j0", [stage("ingest", "clip"), stage("edit", "edit", ("ingest",))], job)
    ex = FakeExecutor()
    ex.write = store.url  # committed behind the compute; the fake export does not wait for it
    store.log = ex.log  # type: ignore[assignment]  # one timeline
    jobs = run([plan], ex, store, OutputsConfig(str(tmp_path / "out")) if exports else None)
    assert jobs["j0"].status == "done"
    ends = [e for e in ex.log if e[0] in ("export-done", "record")]
    assert ends == ([("export-done", "j0")] if exports else []) + [("record", "j0", True)]
    if exports:
        assert jobs["j0"].outputs["mp4"].endswith("j0/edit.mp4")
    manifest = ArtifactStore(store.url).job("j0")
    assert manifest["status"] == "done" and manifest["artifacts"] == {"ingest": key("clip"), "edit": key("edit")}


def test_a_failed_commit_fails_its_job_as_a_store_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _slow_writes(monkeypatch, fail_stage="edit")
    store = ArtifactStore(tmp_path / "store")
    jobs_ = [Job(id=f"j{i}", source=tmp_path, mode="inpaint", prompt="a cone") for i in range(2)]
    plans = [job_plan("j0", [stage("ingest", "clip0"), stage("edit", "edit0", ("ingest",))], jobs_[0]),
             job_plan("j1", [stage("ingest", "clip1")], jobs_[1])]
    ex = FakeExecutor()
    ex.write = store.url
    jobs = run(plans, ex, store)
    assert jobs["j0"].status == "failed" and jobs["j0"].failure is FailureKind.STORE
    assert (jobs["j0"].error or "").startswith("store: the edit artifact") and "No space left" in jobs["j0"].error
    assert jobs["j1"].status == "done" and store.job("j1")["status"] == "done"
    assert store.job("j0")["status"] == "failed"


@pytest.mark.parametrize(("exc", "kind", "text"), [
    (StageInputError("stage 'x': bad parameters"), FailureKind.INPUT, "x: stage 'x': bad parameters"),
    (CommitError("store: the x artifact 0a could not be read"), FailureKind.STORE,
     "x: store: the x artifact 0a could not be read"),
    (RuntimeError("out of cheese"), FailureKind.INTERNAL, "x: RuntimeError: out of cheese"),
])
def test_a_stage_failure_has_a_kind_and_the_summary_text(store: ArtifactStore, exc: BaseException,
                                                          kind: FailureKind, text: str) -> None:
    ex = FakeExecutor()
    ex.fail[key("x")] = exc
    jobs = run([job_plan("j0", [stage("x", "x")])], ex, store)
    assert (jobs["j0"].status, jobs["j0"].failure, jobs["j0"].error) == ("failed", kind, text)
    assert jobs["j0"].stages["x"].failure is kind


@pytest.mark.parametrize(("exc", "kind", "text"), [
    (OSError(errno.EACCES, "Permission denied"), FailureKind.EXPORT, "export: PermissionError: [Errno 13] "
                                                                      "Permission denied"),
    (CommitError("store: the edit artifact 0a could not be committed: OSError"), FailureKind.STORE,
     "store: the edit artifact 0a could not be committed: OSError"),
])
def test_an_export_failure_fails_that_job_only(store: ArtifactStore, tmp_path: Path, exc: BaseException,
                                               kind: FailureKind, text: str) -> None:
    jobs_ = [Job(id=f"j{i}", source=tmp_path, mode="inpaint", prompt="a cone") for i in range(2)]
    plans = [job_plan(f"j{i}", [stage("edit", f"edit{i}")], jobs_[i]) for i in range(2)]
    ex = FakeExecutor()
    ex.fail_export["j0"] = exc
    jobs = run(plans, ex, store, OutputsConfig(str(tmp_path / "out")))
    assert (jobs["j0"].status, jobs["j0"].failure, jobs["j0"].error) == ("failed", kind, text)
    assert jobs["j0"].stages["edit"].status == "computed" and jobs["j1"].status == "done"
    assert store.job("j0")["status"] == "failed" and store.job("j1")["outputs"]["mp4"].endswith("j1/edit.mp4")


class _Unreadable:
    def arrays(self, names: list[str]) -> dict[str, np.ndarray]:
        raise FileNotFoundError(2, "No such file or directory", "clip.mp4")


def test_planning_errors_unreadable_job_arrays_and_orchestrator_blocks(store: ArtifactStore) -> None:
    bad_plan = JobPlan("rowerr", None, error="line 3, field 'source': no such file")
    gone = job_plan("gone", [StagePlan("ingest", "run", (), StageCall("ingest", "fake", {}, {"frames": "d0"},
                                                                      key=key("gone")), (), ("frames",)),
                             stage("edit", "edit-gone", ("ingest",))])
    gone.externals = _Unreadable()  # type: ignore[assignment]
    held = job_plan("held", [stage("a", "held-a"), stage("b", "held-b", ("a",))])
    skipped = job_plan("skipped", [stage("a", "skip-a", status="skip")])
    ex = FakeExecutor()
    ex.blocked = {key("held-a")}
    jobs = run([bad_plan, gone, held, skipped], ex, store)
    assert (jobs["rowerr"].status, jobs["rowerr"].failure) == ("failed", FailureKind.INPUT)
    assert jobs["rowerr"].error == "line 3, field 'source': no such file"
    assert jobs["gone"].failure is FailureKind.INTERNAL and jobs["gone"].error.startswith(
        "ingest: FileNotFoundError: [Errno 2] No such file or directory")
    assert key("gone") not in ex.keys
    assert jobs["gone"].stages["edit"].status == "blocked"
    # An orchestrator that reports a task as never started: blocked with its descendants, nothing to blame.
    assert {s: r.status for s, r in jobs["held"].stages.items()} == {"a": "blocked", "b": "blocked"}
    assert jobs["held"].status == "failed" and jobs["held"].error is None
    assert jobs["skipped"].status == "cached" and jobs["skipped"].stages["a"].status == "skipped"


# ---- streamed plans: pulled as the run goes, forgotten once ended ---------------------------------------

class Pulled:
    """A generator of plans that records how many it has yielded."""

    def __init__(self, plans: list[JobPlan]) -> None:
        self.plans, self.yielded = plans, 0

    def __iter__(self) -> Any:
        for plan in self.plans:
            self.yielded += 1
            yield plan


def test_streamed_plans_are_pulled_while_the_run_goes_and_forgotten_once_ended(store: ArtifactStore) -> None:
    from flows.run.scheduler import Scheduler

    plans = [job_plan(f"j{i}", [stage("ingest", f"clip{i}"), stage("edit", f"edit{i}", ("ingest",))])
             for i in range(40)]
    source = Pulled(plans)
    ex = FakeExecutor(stage_slots=2, seconds=0.002)
    seen: dict[str, int] = {"first_submit_pulled": -1, "jobs": 0, "keys": 0}
    sched = Scheduler(iter(source), ex, store, window=4, total=40)
    submit = ex.submit

    def watching(job_id: str, sp: StagePlan, externals: dict[str, Any] | None) -> Any:
        if seen["first_submit_pulled"] < 0:
            seen["first_submit_pulled"] = source.yielded
        seen["jobs"] = max(seen["jobs"], len(sched.jobs))
        seen["keys"] = max(seen["keys"], len(sched.keys))
        return submit(job_id, sp, externals)

    ex.submit = watching  # type: ignore[method-assign]
    report = sched.run()
    assert [j.job_id for j in report.jobs] == [p.job_id for p in plans]
    assert all(j.status == "done" and j.computed == 2 for j in report.jobs)
    # The first stage ran before the catalog was planned; at most `window` jobs (and their keys) were held.
    assert seen["first_submit_pulled"] == 4 and source.yielded == 40
    assert seen["jobs"] <= 4 and seen["keys"] <= 8
    assert not sched.jobs and not sched.keys  # everything forgotten at the end; the results stay


def test_a_streamed_job_joins_a_shared_key_in_flight_or_takes_its_outcome(store: ArtifactStore) -> None:
    # Six edits of one clip, two jobs in flight at a time: the clip is computed once while later jobs join it,
    # and a key that failed for an earlier job fails a later one with the same reason (never run twice).
    plans = [job_plan(f"j{i}", [stage("ingest", "clip"), stage("bad", "bad", ("ingest",)),
                                stage("edit", f"edit{i}", ("ingest",))]) for i in range(6)]
    ex = FakeExecutor(stage_slots=1, seconds=0.01)
    ex.fail[key("bad")] = StageInputError("stage 'bad': no")
    report = schedule(Pulled(plans), ex, store, window=2)
    jobs = {j.job_id: j for j in report.jobs}
    assert ex.keys.count(key("bad")) == 1
    # Also when every job that saw it fail has ended (its key forgotten): one failure per key per run.
    alone = [job_plan(f"k{i}", [stage("bad", "bad")]) for i in range(4)]
    ex2 = FakeExecutor(stage_slots=1)
    ex2.fail[key("bad")] = StageInputError("stage 'bad': no")
    report2 = schedule(Pulled(alone), ex2, store, window=1)
    assert ex2.keys.count(key("bad")) == 1 and all(j.status == "failed" for j in report2.jobs)
    assert [jobs[f"j{i}"].stages["ingest"].status for i in range(6)].count("computed") == 1
    assert all(jobs[f"j{i}"].status == "failed" and jobs[f"j{i}"].error == "bad: stage 'bad': no" for i in range(6))
    assert all(jobs[f"j{i}"].stages["edit"].status in ("computed", "cached") for i in range(6))


def test_a_streamed_run_protects_the_jobs_in_flight_and_releases_the_ended(store: ArtifactStore) -> None:
    from flows.run.lease import run_lease
    from storage.leases import LeaseBook

    plans = [job_plan(f"j{i}", [stage("ingest", f"clip{i}"), stage("edit", f"edit{i}", ("ingest",))])
             for i in range(12)]
    ex = FakeExecutor(stage_slots=1)
    book = LeaseBook(store)
    checked: list[bool] = []
    sizes: list[int] = []
    submit = ex.submit

    def watching(job_id: str, sp: StagePlan, externals: dict[str, Any] | None) -> Any:
        protected = book.protected()  # what gc would see now
        checked.append(sp.call.ref.path in protected)  # type: ignore[union-attr]
        sizes.append(len(protected))
        return submit(job_id, sp, externals)

    ex.submit = watching  # type: ignore[method-assign]
    with run_lease(store) as lease:
        report = schedule(Pulled(plans), ex, store, window=4, lease=lease)
    assert all(j.status == "done" for j in report.jobs)
    assert checked and all(checked)  # every call's artifact was protected before it was submitted
    assert max(sizes) <= 2 * (4 + 4 // 4)  # the jobs in flight (and one refill), not the catalog
    assert book.protected() == set()  # the lease is gone with the run


def test_the_lease_keeps_a_shared_key_until_its_last_job_and_releases_cached_ones(store: ArtifactStore) -> None:
    """Counted protection (``flows.run.lease.ProtectedPlans``, shared with job tasks): a key every job uses stays
    protected while any of them is in flight, and ended jobs' artifacts, cached ones included, are released."""
    from flows.run.lease import run_lease
    from storage.leases import LeaseBook

    plans = [job_plan(f"j{i}", [stage("ingest", f"clip{i}", status="cached"), stage("model", "shared"),
                                stage("edit", f"edit{i}", ("ingest", "model"))]) for i in range(40)]
    shared = plans[0].stages["model"].call.ref.path  # type: ignore[union-attr]
    ex = FakeExecutor(stage_slots=1)
    book = LeaseBook(store)
    seen: list[tuple[bool, int]] = []
    submit = ex.submit

    def watching(job_id: str, sp: StagePlan, externals: dict[str, Any] | None) -> Any:
        protected = book.protected()
        seen.append((shared in protected, len(protected)))
        return submit(job_id, sp, externals)

    ex.submit = watching  # type: ignore[method-assign]
    with run_lease(store) as lease:
        report = schedule(Pulled(plans), ex, store, window=4, lease=lease)
    assert all(j.status == "done" for j in report.jobs)
    assert seen and all(kept for kept, _ in seen)
    assert max(n for _, n in seen) <= 1 + 2 * (4 + 4 // 4)  # the jobs in flight and one refill, not 40 jobs


def test_an_ended_jobs_arrays_leave_the_process_cache(store: ArtifactStore) -> None:
    """Written behind, an artifact's arrays stay in this process's cache for the next stage; once every job
    that reads them has ended they are dropped, so a long run does not fill the cache with finished work."""
    from storage.write_behind import ARRAYS

    plans = [job_plan(f"j{i}", [stage("ingest", f"clip{i}"), stage("edit", f"edit{i}", ("ingest",)),
                                stage("after", f"after{i}", ("edit",))]) for i in range(6)]
    ex = FakeExecutor(stage_slots=1, seconds=0.1)  # the commits finish while the next stages compute
    ex.write = store.url
    every = {sp.key for p in plans for sp in p.stages.values()}
    cached: list[int] = []
    submit = ex.submit

    def watching(job_id: str, sp: StagePlan, externals: dict[str, Any] | None) -> Any:
        cached.append(len(every & set(ARRAYS.names)))  # committed arrays of jobs in flight, kept for reads
        return submit(job_id, sp, externals)

    ex.submit = watching  # type: ignore[method-assign]
    report = schedule(Pulled(plans), ex, store, window=2)
    assert all(j.status == "done" for j in report.jobs)
    assert max(cached) > 0
    assert not every & {k for k, _ in ARRAYS.items} and not every & set(ARRAYS.names)
    assert all(store.exists(sp.call.ref) for p in plans for sp in p.stages.values())  # type: ignore[union-attr]
