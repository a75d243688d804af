"""The report: per-job rows and the per-configuration table from a store, checked in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from flows.exports.report import aggregate, collect_job, write_report
from stages import metrics
from stages.evaluate import STAGE as EVALUATE
from storage.store import ArtifactRef, ArtifactStore

N, H, W = 4, 48, 64
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (N, H, W, 3), dtype=np.uint8)
    shape = np.zeros((N, H, W), bool)
    shape[:, 10:30, 10:40] = True
    video = frames.copy()
    video[shape] = (200, 40, 40)
    return {"video": video, "frames": frames, "edited_frame": video[0].copy(), "shape_masks": shape,
            "paste_masks": shape, "object_masks": shape}


def _store_job(store: ArtifactStore, job_id: str, backend: str, seed: int, features: np.ndarray | None,
               video_override: np.ndarray | None = None) -> None:
    arrays = _arrays(seed)
    if video_override is not None:
        arrays["video"] = video_override
    refs = {}
    gen = ArtifactRef("generate", f"{job_id}-gen".ljust(64, "0"))
    store.write(gen, {"video": arrays["video"]}, {"video": ("frame", "y", "x", "channel")},
                {"backend": backend, "compute_seconds": 2.5})
    ing = ArtifactRef("ingest", f"{job_id}-ing".ljust(64, "0"))
    store.write(ing, {"frames": arrays["frames"]}, {"frames": ("frame", "y", "x", "channel")},
                {"backend": "decode", "compute_seconds": 0.5})
    out = EVALUATE.run(arrays, {"shape_tracker": "flow"})
    if features is not None:
        out["fvd_features"], out["fvd_source_features"] = features[0], features[1]
    ev = ArtifactRef("evaluate", f"{job_id}-ev".ljust(64, "0"))
    store.write(ev, out, {k: EVALUATE.outputs[k].dims for k in out}, {"backend": "metrics",
                                                                      "compute_seconds": 0.1})
    refs.update(generate=gen, ingest=ing, evaluate=ev)
    store.record_job(job_id, refs, {"status": "done", "stages": {"ingest": {"status": "cached"},
                                                                 "generate": {"status": "computed"},
                                                                 "evaluate": {"status": "computed"}}})


def _catalog(tmp_path: Path, bear_dir: Path, ids: list[str]) -> Path:
    lines = ["jobs:"]
    for job_id in ids:
        lines += [f"  - id: {job_id}", f"    source: {bear_dir / 'frames'}",
                  f"    first_frame: {bear_dir / 'edited-first-frame-elephant.png'}",
                  "    prompt: an elephant"]
    path = tmp_path / "cat.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def report_dir(tmp_path: Path, bear_dir: Path) -> tuple[Path, ArtifactStore]:
    store = ArtifactStore(tmp_path / "store")
    rng = np.random.default_rng(9)
    feats = rng.normal(size=(3, 2, 6)).astype(np.float32)
    for i in range(3):
        _store_job(store, f"a{i}", "propagate", i, feats[i])
    frozen = np.repeat(_arrays(7)["video"][:1], N, axis=0)
    _store_job(store, "b0", "repeat-first-frame", 7, None, video_override=frozen)
    catalog = _catalog(tmp_path, bear_dir, ["a0", "a1", "a2", "b0", "never-run"])
    page = write_report(store, catalog, tmp_path / "report")
    return page, store


def test_rows_table_and_fvd(report_dir: tuple[Path, ArtifactStore]) -> None:
    page, store = report_dir
    rep = collect_job(store, "a0")
    assert list(rep.stage_seconds.items()) == [("ingest", 0.5), ("generate", 2.5), ("evaluate", 0.1)]
    assert rep.metrics["seconds"] == pytest.approx(3.0)  # evaluate is not inference time
    assert rep.cache == {"ingest": True, "generate": False, "evaluate": False}
    ev = store.read(ArtifactRef("evaluate", store.job("a0")["artifacts"]["evaluate"]))
    assert rep.metrics["warping_error"] == pytest.approx(float(ev["warping_error"].mean()))
    md = (page.parent / "summary.md").read_text()
    assert "| generate=propagate | 3 |" in md and "| generate=repeat-first-frame | 1 |" in md
    assert "| never-run | (not run) | not run |" in md and "| (not run) | 1 |" not in md
    assert "ingest 0.50 (cached), generate 2.50 (run), evaluate 0.10 (run)" in md
    reports = [collect_job(store, j) for j in ("a0", "a1", "a2")]
    for r in reports:
        r.config = "x"
    (row,) = aggregate(reports)
    feats = [store.read(ArtifactRef("evaluate", store.job(j)["artifacts"]["evaluate"]))
             for j in ("a0", "a1", "a2")]
    expect = metrics.fvd(np.stack([f["fvd_features"] for f in feats]),
                         np.stack([f["fvd_source_features"] for f in feats]))
    assert row["fvd"] == pytest.approx(expect) and row["jobs"] == 3
    assert (page.parent / "media" / "a0.webm").stat().st_size > 0
    assert not (page.parent / "media" / "never-run.webm").exists()


@pytest.mark.skipif(CHROMIUM is None,
                    reason="headless Chromium not installed (Debian: apt-get install chromium)")
def test_page_loads_in_headless_chromium(report_dir: tuple[Path, ArtifactStore], tmp_path: Path) -> None:
    page, _ = report_dir
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--mute-audio",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=8000", "--dump-dom",
           page.resolve().as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert "<table id=\"summary\">" in dom and "<table id=\"jobs\">" in dom
    assert len(re.findall(r"<tr id=\"job-", dom)) == 5
    tags = re.findall(r"<(?:img|video) [^>]*class=\"media[^\"]*\"[^>]*>", dom)
    assert len(tags) == 8  # a strip and a video for each of the 4 jobs that ran
    assert sum(t.startswith("<video") for t in tags) == 4
    assert all('data-ok="1"' in t and "broken" not in t for t in tags), tags  # all decoded, none failed


def test_cli_command(report_dir: tuple[Path, ArtifactStore], tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from flows.exports.report import register

    page, store = report_dir
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps typer from flattening `report`
    out = tmp_path / "cli-report"
    args = ["report", str(tmp_path / "cat.yaml"), "--store", store.url, "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (out / "index.html").read_text().count("<tr id='job-") == 5 and (out / "summary.md").is_file()
