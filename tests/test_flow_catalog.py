"""The catalog flow through Prefect: runs, cache hits, invalidation, failure isolation.

Small clips (4 frames at 128², offline backends) keep the whole file well under a minute once the temporary
Prefect server is up (started once and shared by every flow test in the session).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
from pathlib import Path

# Prefect reads its settings at import: a private home (reused across sessions, so its database is
# migrated once) keeps the tests off the user's ~/.prefect.
os.environ.setdefault("PREFECT_HOME", str(Path(tempfile.gettempdir()) / "v2v-test-prefect"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from flows.api import prepare_catalog, run_catalog  # noqa: E402
from flows.config.profiles import Profile  # noqa: E402
from flows.run import execute as execute_mod  # noqa: E402
from stages.base import Stage  # noqa: E402

BEAR = Path(__file__).parent / "data" / "bear"
OFFLINE = {"source_masks": "track", "flow": "dis", "depth": "ground-prior", "shape_mask": "change",
           "refine": "flow-fill", "generate": "propagate", "evaluate": "metrics"}
SMALL = {"ingest": {"n_frames": 4, "width": 128, "height": 128}}


def offline_profile(out: Path) -> Profile:
    return Profile(name="test", out=str(out), backends=OFFLINE, params=SMALL)


def write_catalog(folder: Path, extra: str = "") -> Path:
    from flows.config.demo_clip import make_demo_clip

    ball = make_demo_clip(folder / "ball")
    text = f"""jobs:
  - id: bear
    source: {BEAR / 'frames'}
    masks: {BEAR / 'mask-00000.png'}
    first_frame: {BEAR / 'edited-first-frame-elephant.png'}
    prompt: an elephant walking on the rocks in a zoo
  - id: ball
    source: {ball['clip']}
    masks: {ball['mask']}
    first_frame: {ball['first_frame']}
    prompt: a green cone
  - id: bear-seed7
    source: {BEAR / 'frames'}
    masks: {BEAR / 'mask-00000.png'}
    first_frame: {BEAR / 'edited-first-frame-elephant.png'}
    prompt: an elephant walking on the rocks in a zoo
    seed: 7
    params: {{generate: {{feather_px: 2.0}}}}  # the seed alone would change nothing offline: propagate reads none
{extra}"""
    path = folder / "catalog.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def prefect_server() -> str:
    from flows.orchestrate import prefect_env

    return prefect_env.ensure_server()


def latest_flow_task_runs(expected: int, timeout: float = 20.0) -> set[str]:
    """Names of the task runs of the newest flow run, once Prefect has recorded ``expected`` of them (the
    temporary server records task-run events in batches, every second)."""
    import time

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        deadline = time.monotonic() + timeout
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
            if len(runs) >= expected or time.monotonic() > deadline:
                return {r.name for r in runs}
            time.sleep(0.5)


def counts() -> dict[str, int]:
    return dict(execute_mod.COMPUTE_COUNT)


def delta(before: dict[str, int]) -> dict[str, int]:
    now = counts()
    return {k: now[k] - before.get(k, 0) for k in now if now[k] != before.get(k, 0)}


def test_catalog_runs_then_reruns_compute_nothing(tmp_path: Path, prefect_server: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cat = write_catalog(tmp_path)
    store = str(tmp_path / "store")
    prof = offline_profile(tmp_path / "out")
    before = counts()
    # The local runner keeps one more stage task in flight than stages computing (max_workers = 1): Prefect's
    # own work overlaps the computing stage, never a second computation.
    running, most, lock, real_run, nested = [0], [0], threading.Lock(), Stage.run, threading.local()

    def counted(self: Stage, *a: object, **k: object) -> object:
        if getattr(nested, "inside", False):  # evaluate runs the flow stage on the generated video
            return real_run(self, *a, **k)
        nested.inside = True
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            return real_run(self, *a, **k)
        finally:
            nested.inside = False
            with lock:
                running[0] -= 1

    monkeypatch.setattr(Stage, "run", counted)
    report, plans = run_catalog(cat, profile=prof, store=store)
    assert most[0] == 1
    assert report.orchestrator == "prefect"
    assert [j.status for j in report.jobs] == ["done", "done", "done"], [j.error for j in report.jobs]
    stages_run = {s for p in plans for s in p.to_run()}
    assert "generate" in stages_run and "ingest" in stages_run
    # Jobs sharing a source share its source stages: the two bear jobs differ only in the generator's feather.
    computed = delta(before)
    assert computed["ingest"] == 2 and computed["flow"] == 2 and computed["depth"] == 2
    assert computed["generate"] == 3
    for job in report.jobs:
        assert Path(job.outputs["mp4"]).stat().st_size > 0
        assert Path(job.outputs["contact_sheet"]).is_file()
    # Prefect recorded one task run per stage call and per export, named job:stage.
    names = latest_flow_task_runs(expected=len({sp.key for p in plans for sp in p.stages.values()
                                                if sp.status == "run"}) + 3)
    assert {"bear:generate", "ball:motion", "bear-seed7:export"} <= names, sorted(names)

    # Second run: no stage function may be called at all.
    def forbidden(self: Stage, *a: object, **k: object) -> None:
        raise AssertionError(f"stage {self.name} computed on a cached run")

    monkeypatch.setattr(Stage, "run", forbidden)
    before = counts()
    again, _ = run_catalog(cat, profile=prof, store=store)
    assert [j.status for j in again.jobs] == ["cached"] * 3 and delta(before) == {}
    assert again.orchestrator.startswith("none")  # nothing to run: Prefect is not even started
    assert [j.outputs for j in again.jobs] == [j.outputs for j in report.jobs]
    # Through Prefect anyway: every task finds its artifact (Prefect's own records are not needed).
    third, _ = run_catalog(cat, profile=prof, store=store, skip_when_cached=False)
    assert third.orchestrator == "prefect" and [j.status for j in third.jobs] == ["cached"] * 3
    assert delta(before) == {}


def test_parameter_change_reruns_exactly_the_stage_and_its_descendants(tmp_path: Path, prefect_server: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cat = write_catalog(tmp_path)
    store = str(tmp_path / "store")
    prof = offline_profile(tmp_path / "out")
    run_catalog(cat, profile=prof, store=store, orchestrator="inline")
    # A flag-style override of one motion parameter, for every job.
    over = {"params": {"motion": {"paste_margin_px": 5}}}
    _, _, plans, _ = prepare_catalog(cat, prof, store, over)
    bear = plans[0]
    expected = bear.descendants("motion")
    assert {"motion", "depth_sim", "refine", "generate"} <= expected and "flow" not in expected
    assert set(bear.to_run()) == expected
    assert "paste_margin_px=5 (was 15)" in bear.stages["motion"].reason
    before = counts()
    report, _ = run_catalog(cat, profile=prof, store=store, request=over)
    assert all(j.status == "done" for j in report.jobs)
    # motion and everything fed by it run once per distinct key: shared by the two bear jobs up to generate.
    ran = delta(before)
    assert set(ran) == expected
    assert ran["motion"] == 2 and ran["generate"] == 3
    # A catalog row override touches that row only.
    row = write_catalog(tmp_path / "row", extra="    negative_prompt: blurry\n")
    run_catalog(row, profile=prof, store=store, orchestrator="inline")
    _, _, plans, _ = prepare_catalog(row, prof, store, {"params": {"evaluate": {"occlusion_check": False}}})
    assert [sorted(p.to_run()) for p in plans] == [["evaluate"]] * 3
    # Bumping a stage's code version invalidates it and its descendants only.
    import stages.depth_sim as depth_sim

    monkeypatch.setattr(depth_sim, "STAGE", dataclasses.replace(depth_sim.STAGE, version="test-2"))
    _, _, plans, _ = prepare_catalog(cat, prof, store, over)
    assert set(plans[0].to_run()) == plans[0].descendants("depth_sim")
    assert "code version" in plans[0].stages["depth_sim"].reason


def test_a_bad_row_fails_alone_with_its_reason(tmp_path: Path, prefect_server: str,
                                               capfd: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "tiny-shape.png")
    extra = f"""  - id: wrong-shape-mask
    source: {BEAR / 'frames'}
    first_frame: {BEAR / 'edited-first-frame-elephant.png'}
    masks: {BEAR / 'mask-00000.png'}
    shape: {tmp_path / 'tiny-shape.png'}
    backends: {{shape_mask: provided}}
  - id: no-such-clip
    source: {tmp_path / 'missing.mp4'}
    first_frame: {BEAR / 'edited-first-frame-elephant.png'}
"""
    cat = write_catalog(tmp_path, extra)
    report, _ = run_catalog(cat, profile=offline_profile(tmp_path / "out"), store=str(tmp_path / "store"))
    status = {j.job_id: j for j in report.jobs}
    assert [status[j].status for j in ("bear", "ball", "bear-seed7")] == ["done"] * 3
    bad = status["wrong-shape-mask"]
    assert bad.status == "failed" and bad.error.startswith("shape_mask:") and "10, 10" in bad.error
    # Its upstream stages ran (and are shared with the bear jobs); its downstream stages never started.
    assert bad.stages["motion"].status == "blocked" and bad.stages["flow"].status in ("computed", "cached")
    missing = status["no-such-clip"]
    line = cat.read_text().splitlines().index("  - id: no-such-clip") + 1
    assert missing.status == "failed" and f"line {line}, field 'source'" in missing.error
    assert len(report.failed) == 2
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
