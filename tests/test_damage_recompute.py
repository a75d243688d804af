"""A run never computes from damaged data: a damaged input artifact is quarantined and recomputed in the same
run, and the plan says so for damage it can see cheaply."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_flow_catalog import counts, delta, offline_profile, write_catalog

from flows.api import run_catalog
from flows.plan import causes as cz
from flows.plan.run_plan import prepare_catalog
from storage import open_job, write_behind
from storage.store import open_store


def _artifact_dir(store: Path, stage: str, key: str) -> Path:
    return store / stage / key[:2] / key


def _flip_a_byte(folder: Path) -> Path:
    data = max((p for p in folder.rglob("*") if p.is_file() and p.suffix != ".json" and p.name != "v2v.commit"),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x5A
    data.write_bytes(bytes(raw))
    return data


def test_a_damaged_input_is_quarantined_and_recomputed_in_the_same_run(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cat = write_catalog(tmp_path)
    prof = offline_profile(tmp_path / "out")
    store = tmp_path / "store"
    _, plans = run_catalog(cat, profile=prof, store=str(store), orchestrator="inline")
    flow_key = plans[0].stages["flow"].key
    reference = open_job(str(store), "bear")["video"].values.copy()
    _flip_a_byte(_artifact_dir(store, "flow", flow_key))
    # As in a new process: nothing served from this one's memory of the arrays it wrote.
    monkeypatch.setattr(write_behind, "ARRAYS", write_behind.ArrayCache(0))
    # A motion change makes motion read the (silently) damaged flows: it must not compute from them.
    over = {"params": {"motion": {"paste_margin_px": 14}}}
    before = counts()
    report, _ = run_catalog(cat, profile=prof, store=str(store), request=over, orchestrator="inline")
    assert all(j.status == "done" for j in report.jobs), [(j.job_id, j.error) for j in report.jobs]
    ran = delta(before)
    bear = next(j for j in report.jobs if j.job_id == "bear")
    assert any("damaged" in n and "recomputed" in n for n in bear.notes), bear.notes
    assert "recomputed" in report.rows()[0]["reason"]
    assert ran.get("flow", 0) >= 1  # recomputed in this run
    st = open_store(str(store))
    assert any(flow_key in str(q.get("path", "")) or flow_key in str(q.get("name", "")) for q in st.quarantined())
    # Back to the original parameters: the recomputed flows give the first run's video exactly.
    again, _ = run_catalog(cat, profile=prof, store=str(store), orchestrator="inline")
    assert np.array_equal(open_job(str(store), "bear")["video"].values, reference)
    assert again.jobs[0].status in ("done", "cached")


def test_the_plan_names_damage_it_can_see_cheaply(tmp_path: Path) -> None:
    cat = write_catalog(tmp_path)
    prof = offline_profile(tmp_path / "out")
    store = tmp_path / "store"
    _, plans = run_catalog(cat, profile=prof, store=str(store), orchestrator="inline")
    key = plans[0].stages["depth"].key
    (_artifact_dir(store, "depth", key) / "v2v.commit").unlink()
    plans = prepare_catalog(cat, prof, str(store))[2]
    depth = plans[0].stages["depth"]
    assert depth.status == "run" and any(isinstance(c, cz.ArtifactDamaged) for c in depth.causes), depth.reason
    assert "damaged" in depth.reason
    report, _ = run_catalog(cat, profile=prof, store=str(store), orchestrator="inline")
    assert all(j.status in ("done", "cached") for j in report.jobs)
    assert open_store(str(store)).exists(plans[0].stages["depth"].call.ref)
