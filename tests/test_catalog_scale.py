"""Bad input at scale: a long catalog with bad rows scattered through it; each is reported with its line and
field, every other row is planned and run, and the command exits 1."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from test_flow_catalog import OFFLINE

from flows.api import run_catalog
from flows.config.demo_clip import make_demo_clip
from flows.config.profiles import Profile

REPO = Path(__file__).resolve().parent.parent
TINY = {"ingest": {"n_frames": 3, "width": 64, "height": 64}}

# kind -> (row lines, the field the error must name)
BAD = {
    "missing-source": ("    source: {d}/absent.mp4\n    first_frame: {ff}\n", "source"),
    "unknown-field": ("    source: {clip}\n    first_frame: {ff}\n    promt: typo\n", "promt"),
    "bad-seed": ("    source: {clip}\n    first_frame: {ff}\n    seed: many\n", "seed"),
    "no-edit-input": ("    source: {clip}\n", "first_frame"),
    "bad-stage": ("    source: {clip}\n    first_frame: {ff}\n    params: {{nosuchstage: {{x: 1}}}}\n", "nosuchstage"),
    "missing-first-frame": ("    source: {clip}\n    first_frame: {d}/absent.png\n", "first_frame"),
    "bad-id": ("    source: {clip}\n    first_frame: {ff}\n", "id"),
    "bad-param": ("    source: {clip}\n    first_frame: {ff}\n    params: {{motion: {{paste_margin_px: 999}}}}\n",
                  "paste_margin_px"),
}


def test_bad_rows_in_a_long_catalog(tmp_path: Path) -> None:
    ball = make_demo_clip(tmp_path / "ball")
    fill = {"clip": ball["clip"], "ff": ball["first_frame"], "d": tmp_path}
    lines = ["jobs:"]
    where: dict[str, tuple[int, str]] = {}
    good = []
    for i in range(120):
        kind = list(BAD)[i // 15] if i % 15 == 7 else None
        job_id = f"job-{i:04d}" if kind != "bad-id" else f"bad id/{i}"
        if kind:
            where[job_id] = ("\n".join(lines).count("\n") + 2, BAD[kind][1])  # the row's `- id:` line
            body = BAD[kind][0].format(**fill)
        else:
            good.append(job_id)
            body = f"    source: {fill['clip']}\n    masks: {ball['mask']}\n    first_frame: {fill['ff']}\n"
        lines.append(f"  - id: {job_id}\n    prompt: row {i}\n" + body.rstrip("\n"))
    cat = tmp_path / "long.yaml"
    cat.write_text("\n".join(lines) + "\n")
    assert len(where) == len(BAD)
    prof = Profile(name="tiny", out=str(tmp_path / "out"), backends=OFFLINE, params=TINY, formats=("png",))
    report, plans = run_catalog(cat, profile=prof, store=str(tmp_path / "store"), orchestrator="inline")
    status = {j.job_id: j for j in report.jobs}
    assert len(report.jobs) == 120
    assert all(status[j].status in ("done", "cached") for j in good), [
        (j, status[j].error) for j in good if status[j].status == "failed"]
    failed = {j.job_id for j in report.failed}
    assert len(failed) == len(BAD), ([(j, status[j].status) for j in where if j not in failed], where.keys())
    text = "\n".join(j.error or "" for j in report.failed)
    for job_id, (line, field) in where.items():
        err = next(j.error for j in report.failed if j.error and re.search(rf"line {line}\b", j.error))
        assert field in err, (job_id, line, err, text)
    env = {**os.environ, "PYTHONPATH": str(REPO), "V2V_STORE": "", "V2V_PROFILE": ""}
    profile_file = tmp_path / "tiny.yaml"
    profile_file.write_text(prof.model_dump_json())
    proc = subprocess.run([sys.executable, "-m", "flows.cli.main", "run", str(cat), "--profile", str(profile_file),
                           "--store", str(tmp_path / "store"), "--inline"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
