"""Catalog files: YAML/CSV/Parquet rows, paths relative to the catalog, row-level errors with line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.config.catalog import CatalogError, Job, load_catalog, single_job

BEAR = Path(__file__).parent / "data" / "bear"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture()
def bear_links(tmp_path: Path) -> Path:
    """A folder with the bear files under short relative names (catalog paths are relative to the file)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "frames").symlink_to(BEAR / "frames")
    (data / "mask.png").symlink_to(BEAR / "mask-00000.png")
    (data / "edit.png").symlink_to(BEAR / "edited-first-frame-elephant.png")
    (data / "ref.jpg").symlink_to(BEAR / "reference-raccoon.jpg")
    return data


def test_yaml_rows_resolve_paths_merge_defaults_and_infer_modes(tmp_path: Path, bear_links: Path) -> None:
    cat = _write(tmp_path / "c.yaml", """
defaults:
  params: {ingest: {n_frames: 8, width: 256}}
jobs:
  - id: one
    source: data/frames
    masks: data/mask.png
    first_frame: data/edit.png
    prompt: an elephant
    params: {ingest: {width: 128}}
  - id: two
    source: data/frames
    reference: data/ref.jpg
    seed: 7
  - id: three
    source: data/frames
    instruction: turn the bear into a panda
""")
    c = load_catalog(cat)
    assert c.errors == []
    one, two, three = c.jobs
    assert one.source == (bear_links / "frames").resolve() and one.source.is_dir()
    assert one.mode == "provided" and one.edit_backend == "provided"
    # Row values win over defaults, and the untouched default survives the merge.
    assert one.params["ingest"] == {"n_frames": 8, "width": 128}
    assert two.mode == "reference" and two.edit_backend == "paint-by-example" and two.seed == 7
    assert three.mode == "instruction" and three.common_params()["instruction"].startswith("turn")


def test_bad_rows_name_line_and_field_and_do_not_stop_the_others(tmp_path: Path, bear_links: Path) -> None:
    cat = _write(tmp_path / "c.yaml", """jobs:
  - id: good
    source: data/frames
    first_frame: data/edit.png
  - id: missing-file
    source: data/nope
    first_frame: data/edit.png
  - id: no-edit-input
    source: data/frames
  - id: good
    source: data/frames
    first_frame: data/edit.png
  - id: typo
    source: data/frames
    first_frame: data/edit.png
    promt: oops
  - id: bad-seed
    source: data/frames
    first_frame: data/edit.png
    seed: -3
""")
    c = load_catalog(cat)
    assert [j.id for j in c.jobs] == ["good"]
    errs = {e.job_id + str(i): e for i, e in enumerate(c.errors)}
    by_id = [(e.job_id, e.field, e.where.rsplit(" ", 1)[-1]) for e in c.errors]
    assert ("missing-file", "source", "5") in by_id
    assert ("no-edit-input", "(row)", "8") in by_id
    assert ("good", "id", "10") in by_id  # duplicate id
    assert ("typo", "promt", "13") in by_id
    assert ("bad-seed", "seed", "17") in by_id
    missing = next(e for e in errs.values() if e.job_id == "missing-file")
    assert "no such file" in missing.message and str(cat) in str(missing)
    # Entries keep the file's order (the summary lists jobs as the catalog does).
    assert [getattr(e, "id", getattr(e, "job_id", None)) for e in c.entries] == \
        ["good", "missing-file", "no-edit-input", "good", "typo", "bad-seed"]


def test_csv_and_parquet_columns_nest_stage_params_and_backends(tmp_path: Path, bear_links: Path) -> None:
    rows = [
        {"id": "a", "source": "data/frames", "first_frame": "data/edit.png", "ingest.n_frames": "4",
         "motion.paste_margin_px": "3", "backend.shape_mask": "change", "seed": "5", "masks": ""},
        {"id": "b", "source": "data/frames", "first_frame": "", "ingest.n_frames": "", "motion.paste_margin_px": "",
         "backend.shape_mask": "", "seed": "", "masks": ""},
    ]
    import csv

    with open(tmp_path / "c.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    c = load_catalog(tmp_path / "c.csv")
    (a,) = c.jobs
    assert a.params == {"ingest": {"n_frames": 4}, "motion": {"paste_margin_px": 3}}
    assert a.backends == {"shape_mask": "change"} and a.seed == 5 and a.masks is None
    (err,) = c.errors
    assert err.job_id == "b" and err.where.endswith("line 3")

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    p = load_catalog(tmp_path / "c.parquet")
    assert p.jobs[0].params == a.params and p.errors[0].where.endswith("row 2")


def test_whole_file_problems_raise_catalog_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="no such catalog"):
        load_catalog(tmp_path / "absent.yaml")
    with pytest.raises(CatalogError, match="not valid YAML"):
        load_catalog(_write(tmp_path / "bad.yaml", "jobs: [\n  - id: x\n  source"))
    with pytest.raises(CatalogError, match="unknown top-level"):
        load_catalog(_write(tmp_path / "k.yaml", "jobz: []\n"))
    with pytest.raises(CatalogError, match="unknown catalog format"):
        load_catalog(_write(tmp_path / "c.txt", "id,source\n"))


def test_single_job_for_v2v_edit_names_the_job_after_the_video() -> None:
    c = single_job(BEAR / "frames", prompt="an elephant", first_frame=BEAR / "edited-first-frame-elephant.png",
                   masks=BEAR / "mask-00000.png")
    (job,) = c.jobs
    assert isinstance(job, Job) and job.id == "bear" and job.mode == "provided" and job.prompt == "an elephant"
