"""File catalogs stream: checked whole and counted at load, validated row by row each time they are iterated.

Re-reading gives the same entries; the duplicate-id rule and YAML aliases reach across the whole file;
``defaults:`` may follow ``jobs:``; every whole-file refusal still comes at load; and memory while iterating
grows by only the duplicate check's id and line per row, not by the rows.
"""

from __future__ import annotations

import csv
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.config.catalog import CatalogError, Job, RowError, load_catalog, single_job
from flows.config.request import RunRequest, catalog_payload, load_catalog_arg

BEAR = Path(__file__).parent / "data" / "bear"
FRAMES, EDIT = BEAR / "frames", BEAR / "edited-first-frame-elephant.png"
COLUMNS = ["id", "source", "first_frame", "prompt", "seed", "motion.paste_margin_px"]


def yaml_job(job_id: str, *extra: str) -> str:
    return "".join(f"{line}\n" for line in (f"  - id: {job_id}", f"    source: {FRAMES}", f"    first_frame: {EDIT}",
                                            *(f"    {e}" for e in extra)))


def yaml_catalog(path: Path, n: int, head: str = "", tail: str = "") -> Path:
    path.write_text(head + "jobs:\n" + "".join(yaml_job(f"job-{i:05d}", f"prompt: row {i}", f"seed: {i}",
                                                        "params: {motion: {paste_margin_px: 2}}")
                                               for i in range(n)) + tail)
    return path


def csv_catalog(path: Path, n: int) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        w.writerows([f"job-{i:05d}", FRAMES, EDIT, f"row {i}", i, 2] for i in range(n))
    return path


def test_a_catalog_iterated_twice_gives_equal_entries_in_every_format(tmp_path: Path) -> None:
    rows = [[f"job-{i}", FRAMES, EDIT if i != 3 else tmp_path / "absent.png", f"row {i}", i, 2] for i in range(6)]
    with open(tmp_path / "c.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([COLUMNS, *rows])
    pq.write_table(pa.Table.from_pylist([dict(zip(COLUMNS, map(str, r), strict=True)) for r in rows]),
                   tmp_path / "c.parquet")
    yaml_catalog(tmp_path / "c.yaml", 5, tail=yaml_job("job-00001"))  # a duplicate
    for name in ("c.yaml", "c.csv", "c.parquet"):
        cat = load_catalog(tmp_path / name)
        assert len(cat) == 6
        first, second = list(cat.stream()), list(cat.stream())
        assert first == second and len(first) == 6, name
        assert [type(e) for _, e in first].count(RowError) == 1, (name, first)  # the absent file / duplicate
        assert all(isinstance(w, str) and w.startswith(str(tmp_path / name)) for w, _ in first)
        # The materialising API sees the same entries, and where() names a valid row's line.
        assert cat.entries == [e for _, e in first]
        job = cat.jobs[-1]
        assert cat.where(job.id) == next(w for w, e in first if e is job or e == job)


def test_len_counts_rows_at_load_without_validating_them(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("jobs:\n" + "".join(f"  - {{id: r{i}, source: {tmp_path}/nope-{i}}}\n" for i in range(40))
                    + "  - not a mapping\n")
    cat = load_catalog(path)
    assert len(cat) == 41 and cat  # truthy even though it will hold no job
    entries = [e for _, e in cat.stream()]
    assert len(entries) == 41 and all(isinstance(e, RowError) for e in entries)
    assert entries[-1].message == "a job must be a mapping of fields" and entries[-1].job_id == "row-41"


def test_a_duplicate_id_far_down_the_file_names_the_first_rows_line(tmp_path: Path) -> None:
    path = yaml_catalog(tmp_path / "c.yaml", 2000, tail=yaml_job("JOB-00001") + yaml_job("job-00002"))
    cat = load_catalog(path)
    tail = list(cat.stream())[-2:]
    (w1, e1), (w2, e2) = tail
    per_job = len(yaml_job("job-00000", "prompt: row 0", "seed: 0", "params: {motion: {paste_margin_px: 2}}")
                  .splitlines())
    assert isinstance(e1, RowError) and isinstance(e2, RowError)
    assert w1 == e1.where == f"{path} line {2 + 2000 * per_job}"
    assert e1.field == "id" and f"line {2 + per_job} has it already as 'job-00001' apart from case" in e1.message
    assert f"line {2 + 2 * per_job} has it already; only that row runs" in e2.message
    table = csv_catalog(tmp_path / "c.csv", 3000)
    with open(table, "a", newline="") as fh:
        csv.writer(fh).writerow(["job-00007", FRAMES, EDIT, "again", 1, 2])
    (*_, (where, err)) = load_catalog(table).stream()
    assert isinstance(err, RowError) and where == f"{table} line 3002" and "line 9 has it already" in err.message


def test_defaults_after_jobs_apply_and_merge(tmp_path: Path) -> None:
    defaults = "defaults:\n  negative_prompt: blurry\n  params: {ingest: {n_frames: 4}, motion: {paste_margin_px: 9}}\n"
    path = yaml_catalog(tmp_path / "c.yaml", 3, tail=defaults)
    jobs = [e for _, e in load_catalog(path).stream()]
    assert all(isinstance(j, Job) for j in jobs) and len(jobs) == 3
    assert all(j.negative_prompt == "blurry" for j in jobs)  # type: ignore[union-attr]
    # The row's own value wins; the default it does not set survives.
    assert all(j.params == {"ingest": {"n_frames": 4}, "motion": {"paste_margin_px": 2}} for j in jobs)  # type: ignore


def test_an_alias_in_job_500_to_an_anchor_in_job_1_works(tmp_path: Path) -> None:
    first = yaml_job("job-first", "params: &p {ingest: {n_frames: 5}, motion: {paste_margin_px: 4}}",
                     "prompt: &words a bear made of glass")
    middle = "".join(yaml_job(f"job-{i}") for i in range(2, 500))
    last = yaml_job("job-500", "params: *p", "prompt: *words") + yaml_job("job-501", "params: {<<: *p, edit: {}}")
    path = tmp_path / "c.yaml"
    path.write_text("jobs:\n" + first + middle + last)
    cat = load_catalog(path)
    assert len(cat) == 501
    *_, (_, j500), (_, j501) = cat.stream()
    assert isinstance(j500, Job) and isinstance(j501, Job), (j500, j501)
    assert j500.params == {"ingest": {"n_frames": 5}, "motion": {"paste_margin_px": 4}}
    assert j500.prompt == "a bear made of glass"
    assert j501.params == {"ingest": {"n_frames": 5}, "motion": {"paste_margin_px": 4}, "edit": {}}


def _bomb_job() -> str:
    levels = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    levels += [f"{n}: &{n} [" + ",".join([f"*{p}"] * 9) + "]" for p, n in zip("abcdefgh", "bcdefghi", strict=True)]
    return yaml_job("bomb", "params:", "  ingest:", *(f"    {line}" for line in levels))


@pytest.mark.parametrize(("bad", "message"), [
    (_bomb_job(), r"YAML expands to more than 2,000,000 nodes .*alias bomb"),
    (yaml_job("deep", "params: {ingest: {x: " + "[" * 70 + "]" * 70 + "}}"), "nested too deeply"),
    # Depth through aliases: each anchor is shallow where it is written, the expanded tree is not.
    (yaml_job("via-aliases", "params:", "  a: &a " + "[" * 30 + "]" * 30, "  b: &b " + "[" * 30 + "*a" + "]" * 30,
              "  c: " + "[" * 10 + "*b" + "]" * 10), "nested too deeply"),
    (yaml_job("recursive", "params: &r {ingest: {x: *r}}"), "refers to a node containing it"),
    ("  - {id: x, seed: [1\n", "not valid YAML"),
])
def test_a_bad_job_far_down_the_file_fails_the_whole_file_at_load(tmp_path: Path, bad: str, message: str) -> None:
    path = yaml_catalog(tmp_path / "c.yaml", 1000, tail=bad)
    with pytest.raises(CatalogError, match=message):
        load_catalog(path)


def test_a_file_changed_into_a_bomb_after_load_still_fails_within_the_limits(tmp_path: Path) -> None:
    path = yaml_catalog(tmp_path / "c.yaml", 3)
    cat = load_catalog(path)
    yaml_catalog(path, 3, tail=_bomb_job())  # every read is bounded, not only the one at load
    with pytest.raises(CatalogError, match="changed while it was read.*alias bomb"):
        list(cat.stream())


def test_an_in_memory_catalog_keeps_its_rows_wheres_through_a_flow_payload() -> None:
    cat = single_job(FRAMES, prompt="an elephant", first_frame=EDIT)
    assert len(cat) == 1 and [w for w, _ in cat.stream()] == ["command line"]
    again = load_catalog_arg(catalog_payload(cat), RunRequest())
    assert list(again.stream()) == list(cat.stream()) and again.where("bear") == "command line"


def _iteration_peak(path: Path) -> int:
    """tracemalloc's peak over loading ``path`` and streaming every entry (each dropped as the next comes)."""
    load_catalog(path)  # imports and caches first
    tracemalloc.start()
    try:
        cat = load_catalog(path)
        n = sum(1 for _ in cat.stream())
        assert n == len(cat)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(("make", "suffix"), [(yaml_catalog, ".yaml"), (csv_catalog, ".csv")])
def test_memory_while_iterating_grows_by_the_duplicate_check_alone(tmp_path: Path, make: Callable[[Path, int], Path],
                                                                   suffix: str) -> None:
    small = _iteration_peak(make(tmp_path / f"small{suffix}", 500))
    large = _iteration_peak(make(tmp_path / f"large{suffix}", 5000))
    # The duplicate-id check keeps an id and a line number per row (~100 B); holding the validated rows
    # themselves, as the catalog did before it streamed, costs ~2.8 kB per row (14 MB at 5,000).
    assert large < 2 * small + 4500 * 200, (small, large)
