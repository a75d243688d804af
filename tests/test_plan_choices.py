"""What ``auto`` picks from the job's own data, and how the planner reports stale causes."""

from __future__ import annotations

from pathlib import Path

from test_flow_catalog import offline_profile

from flows.config.demo_clip import make_demo_clip
from flows.config.profiles import Profile
from flows.plan import causes as cz
from flows.plan.run_plan import prepare_catalog


def _catalog(tmp: Path, masks: Path) -> Path:
    ball = make_demo_clip(tmp / "ball")
    path = tmp / "c.yaml"
    path.write_text(f"jobs:\n  - id: ball\n    source: {ball['clip']}\n    masks: {masks}\n"
                    f"    first_frame: {ball['first_frame']}\n")
    return path


def test_auto_uses_the_rows_per_frame_masks(tmp_path: Path) -> None:
    ball = make_demo_clip(tmp_path / "ball")
    prof = Profile(name="auto", out=str(tmp_path / "out"), params={"ingest": {"n_frames": 4, "width": 128,
                                                                               "height": 128}})
    per_frame = prepare_catalog(_catalog(tmp_path, ball["masks"]), prof, str(tmp_path / "s"))[2][0]
    assert per_frame.ok, per_frame.error
    assert per_frame.stages["source_masks"].call.backend == "provided"
    one = prepare_catalog(_catalog(tmp_path, ball["mask"]), prof, str(tmp_path / "s"))[2][0]
    assert one.stages["source_masks"].call.backend == "track"


def test_stale_causes_are_typed(tmp_path: Path) -> None:
    from flows.api import run_catalog

    ball = make_demo_clip(tmp_path / "ball")
    cat = _catalog(tmp_path, ball["mask"])
    prof = offline_profile(tmp_path / "out")
    store = str(tmp_path / "store")
    _, plans = run_catalog(cat, profile=prof, store=store, orchestrator="inline")
    assert all(isinstance(c, cz.New) for sp in plans[0].stages.values() if sp.status == "run" for c in sp.causes)
    plans = prepare_catalog(cat, prof, store, {"params": {"motion": {"paste_margin_px": 5}}})[2]
    motion = plans[0].stages["motion"]
    assert motion.causes == (cz.ParamChanged("paste_margin_px", 15, 5),)
    assert "input shape_masks" in plans[0].stages["depth_sim"].reason
    assert any(isinstance(c, cz.InputChanged) and c.name == "shape_masks"
               for c in plans[0].stages["depth_sim"].causes)
    assert all(c == cz.InStore() for c in plans[0].stages["flow"].causes)


def test_a_job_that_can_make_no_video_fails_with_the_reason(tmp_path: Path) -> None:
    from flows.api import run_catalog

    ball = make_demo_clip(tmp_path / "ball")
    cat = tmp_path / "nomask.yaml"
    cat.write_text(f"jobs:\n  - id: ball\n    source: {ball['clip']}\n    first_frame: {ball['first_frame']}\n")
    report, plans = run_catalog(cat, profile=offline_profile(tmp_path / "out"), store=str(tmp_path / "store"),
                                orchestrator="inline")
    job = report.jobs[0]
    assert job.status == "failed" and "no video can be made" in (job.error or "")
    assert "provided_masks" in (job.error or "")  # the skip's own reason: the row gives no masks
