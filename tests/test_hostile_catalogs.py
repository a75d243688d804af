"""Hostile or careless catalogs and command-line text: refused clearly, per row where possible, never a crash.

Duplicate ids (the first row owns the id), YAML alias bombs and other oversized YAML (refused before anything
expands), CSV that is not text, user text that looks like rich markup, a read-only store serving a cached run,
and store commands on a store that is not there.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from test_flow_catalog import OFFLINE, SMALL

from flows.config import catalog as catalog_mod
from flows.config import safe_yaml
from flows.config.catalog import CatalogError, load_catalog

REPO = Path(__file__).resolve().parent.parent
BEAR = Path(__file__).parent / "data" / "bear"
FRAMES, MASK, EDIT = BEAR / "frames", BEAR / "mask-00000.png", BEAR / "edited-first-frame-elephant.png"


def v2v(*args: str, cwd: Path | None = None, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "V2V_STORE": "", "V2V_PROFILE": ""}
    return subprocess.run([*prefix, sys.executable, "-m", "flows.cli.main", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def job(job_id: str, **extra: object) -> str:
    lines = [f"  - id: {job_id}", f"    source: {FRAMES}", f"    masks: {MASK}", f"    first_frame: {EDIT}"]
    return "\n".join(lines + [f"    {k}: {v}" for k, v in extra.items()]) + "\n"


def bomb(levels: int = 9) -> str:
    """The classic "billion laughs": 9 levels of 9 aliases, 9^9 (~390 million) strings once expanded."""
    lines = ["jobs:", job("x").rstrip(), "    params:", "      ingest:",
             '        a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    prev = "a"
    for name in "bcdefghijklmnop"[: levels - 1]:
        lines.append(f"        {name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
        prev = name
    return "\n".join(lines) + "\n"


# ---- duplicate ids ----------------------------------------------------------------------------------------

def test_a_duplicate_id_fails_the_later_rows_naming_both_lines_and_the_first_row_stays(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("jobs:\n" + job("bear") + job("other") + job("bear", seed=3) + job("Bear"))
    cat = load_catalog(path)
    assert [j.id for j in cat.jobs] == ["bear", "other"]
    first, second = cat.errors
    assert (first.job_id, first.field, first.where) == ("bear", "id", f"{path} line 10")
    assert "duplicate job id 'bear': line 2 has it already; only that row runs" in first.message
    # Ids differing in case would share an output folder on a case-insensitive file system (macOS).
    assert (second.job_id, second.where) == ("Bear", f"{path} line 15")
    assert "line 2 has it already as 'bear' apart from case" in second.message

    table = tmp_path / "c.csv"
    with open(table, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerows([["id", "source", "first_frame"], ["a", FRAMES, EDIT], ["b", FRAMES, EDIT], ["a", FRAMES, EDIT]])
    cat = load_catalog(table)
    assert [j.id for j in cat.jobs] == ["a", "b"]
    (err,) = cat.errors
    assert err.where == f"{table} line 4" and "line 2 has it already" in err.message


def test_a_duplicate_row_does_not_cost_the_first_row_its_video(tmp_path: Path) -> None:
    from test_flow_catalog import offline_profile

    from flows.api import run_catalog

    path = tmp_path / "c.yaml"
    path.write_text("jobs:\n" + job("bear") + job("bear", seed=3))
    report, _ = run_catalog(path, profile=offline_profile(tmp_path / "out"), store=str(tmp_path / "store"),
                            orchestrator="inline")
    assert [(j.job_id, j.status) for j in report.jobs] == [("bear", "done"), ("bear", "failed")]
    assert (tmp_path / "out" / "bear" / "video.mp4").stat().st_size > 0


# ---- YAML limits ------------------------------------------------------------------------------------------

def test_a_billion_laughs_file_fails_fast_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb())
    assert path.stat().st_size < 1300  # the ~1.2 KB file that grew to 5.5 GB
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(CatalogError, match=r"bomb.yaml: YAML expands to more than 2,000,000 nodes .*alias bomb"):
        load_catalog(path)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 2.0 and peak < 50e6, (seconds, peak)


def test_aliases_within_the_limits_still_work(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("jobs:\n" + job("one", params="&p {ingest: {n_frames: 4}}") + job("two", params="*p")
                    + job("three", params="{<<: *p, motion: {paste_margin_px: 2}}"))
    cat = load_catalog(path)
    assert not cat.errors
    assert [j.params for j in cat.jobs] == [{"ingest": {"n_frames": 4}}] * 2 + [
        {"ingest": {"n_frames": 4}, "motion": {"paste_margin_px": 2}}]


@pytest.mark.parametrize(("text", "message"), [
    ("jobs: &a [*a]\n", "refers to a node containing it"),
    ("jobs:\n  - id: x\n    params: " + "[" * 80 + "]" * 80 + "\n", "nested too deeply"),
    # Merge keys expand too (each level copies the merged pairs).
    ("jobs:\n  - &a {id: x, s: 1}\n" + "".join(
        f"  - &{n} {{<<: [{', '.join([f'*{p}'] * 9)}]}}\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)),
     "expands to more than"),
])
def test_recursive_deep_or_expanding_yaml_is_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(CatalogError, match=message):
        load_catalog(path)
    assert time.perf_counter() - start < 2.0


def test_oversized_or_binary_catalog_files_are_refused_before_parsing(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("jobs:\n" + job("a") * 1)
    monkeypatch.setattr(catalog_mod, "MAX_YAML_BYTES", 100)
    with pytest.raises(CatalogError, match="more than the 0 MiB a YAML catalog may have"):
        load_catalog(path)
    monkeypatch.undo()
    with pytest.raises(safe_yaml.UnsafeYaml, match="more than"):
        monkeypatch.setattr(safe_yaml, "MAX_YAML_BYTES", 100)
        safe_yaml.safe_yaml("x" * 200, "text")
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"jobs:\n  - id: \xff\xfe\n")
    with pytest.raises(CatalogError, match="not UTF-8 text"):
        load_catalog(binary)
    huge = tmp_path / "h.csv"
    huge.write_text("id,source\na," + "x" * 200_000 + "\n")  # over csv's field size limit
    with pytest.raises(CatalogError, match=r"h.csv line \d: unreadable CSV \(field larger than field limit"):
        load_catalog(huge)


def test_a_csv_cell_is_yaml_within_the_same_limits(tmp_path: Path) -> None:
    cell = bomb().split("a: ", 1)[1].replace("\n        ", ", ")  # the bomb as one flow mapping's values
    cell = "{a: " + cell.strip() + "}"
    path = tmp_path / "c.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerows([["id", "source", "first_frame", "ingest.n_frames", "motion.paste_margin_px"],
                     ["a", FRAMES, EDIT, cell, "3"]])
    start = time.perf_counter()
    (a,) = load_catalog(path).jobs
    assert time.perf_counter() - start < 2.0
    assert a.params == {"ingest": {"n_frames": cell}, "motion": {"paste_margin_px": 3}}  # left as text


def test_control_characters_in_a_bad_id_are_escaped(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text('jobs:\n  - id: "\\e[31mred\\nline"\n' + job("ok").split("\n", 1)[1])
    (err,) = load_catalog(path).errors
    assert "\x1b" not in err.job_id + err.message and "\n" not in err.job_id + err.message
    assert err.job_id == "\\x1b[31mred\\nline" and err.field == "id"


# ---- the command line -------------------------------------------------------------------------------------

@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    (tmp_path / "offline.yaml").write_text(yaml.safe_dump({"name": "offline", "backends": OFFLINE,
                                                           "params": SMALL}))
    weird = tmp_path / "a[" / "x]b"  # "[/x]" in every path below, "[bold]" too
    weird.mkdir(parents=True)
    (weird / "[bold]edit.png").symlink_to(EDIT)
    (tmp_path / "catalog.yaml").write_text(f"""jobs:
  - id: bear
    source: {FRAMES}
    masks: {MASK}
    first_frame: "{weird / '[bold]edit.png'}"
  - id: "[/x]"
    source: {FRAMES}
    first_frame: {EDIT}
  - id: missing
    source: {FRAMES}
    first_frame: "{weird / '[/red]nope.png'}"
""")
    return tmp_path


def _clean(proc: subprocess.CompletedProcess[str]) -> str:
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text and "internal error" not in text, text
    return text


def test_user_text_that_looks_like_markup_is_printed_as_text(workspace: Path) -> None:
    out = workspace / "a[" / "x]b" / "out"
    common = ("--profile", str(workspace / "offline.yaml"), "--store", str(workspace / "a[" / "x]b" / "store"))
    plan = v2v("plan", str(workspace / "catalog.yaml"), *common)
    text = _clean(plan)
    assert plan.returncode == 1 and "[/x]" in text and "[/red]nope.png" in text
    run = v2v("run", str(workspace / "catalog.yaml"), *common, "--out", str(out), "--inline")
    text = _clean(run)
    assert run.returncode == 1, text  # two bad rows; the good one ran
    assert "[/x]" in text and "a[/x]b/out/bear/video.mp4" in text and "[/red]nope.png" in text
    assert (out / "bear" / "video.mp4").stat().st_size > 0


def test_store_commands_on_a_missing_store_say_so_exit_1_and_create_nothing(tmp_path: Path) -> None:
    for where in (tmp_path / "nope", tmp_path / "a[" / "x]b"):
        for args in (("ls",), ("verify",), ("gc",), ("gc", "--dry-run")):
            proc = v2v("store", *args, "--store", str(where))
            text = _clean(proc)
            flat = "".join(text.split())  # rich wraps the message at the terminal's width
            assert proc.returncode == 1 and f"nostoreat{where}" in flat, (args, text)
        assert not where.exists()


def _read_only(store: Path) -> tuple[str, ...] | None:
    """A way to run a command with ``store`` read-only: permissions, or (as root, whom they do not stop) a
    read-only bind mount in a private mount namespace. None when neither is possible here."""
    if os.geteuid() != 0:
        for folder, dirs, files in os.walk(store):
            for name in (*dirs, *files):
                os.chmod(os.path.join(folder, name), 0o555 if name in dirs else 0o444, follow_symlinks=False)
        store.chmod(0o555)
        return ()
    if not shutil.which("unshare"):
        return None
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind '{store}' '{store}' && "
                            f"mount -o remount,bind,ro '{store}' && ! touch '{store}/probe' 2>/dev/null"],
                           capture_output=True)
    if probe.returncode != 0:
        return None
    script = (f'mount --bind "{store}" "{store}" && mount -o remount,bind,ro "{store}" && exec "$@"')
    return ("unshare", "-m", "sh", "-c", script, "sh")


def test_a_read_only_store_still_serves_a_fully_cached_run(workspace: Path) -> None:
    store, out = workspace / "store", workspace / "out"
    cat = workspace / "ro.yaml"
    cat.write_text("jobs:\n" + job("bear"))
    common = (str(cat), "--profile", str(workspace / "offline.yaml"), "--store", str(store), "--inline")
    first = v2v("run", *common, "--out", str(workspace / "first"))
    assert first.returncode == 0, _clean(first)
    prefix = _read_only(store)
    if prefix is None:
        pytest.skip("cannot make a folder read-only here (root without mount namespaces)")
    try:
        again = v2v("run", *common, "--out", str(out), prefix=prefix)
        text = _clean(again)
        assert again.returncode == 0, text
        assert (out / "bear" / "video.mp4").stat().st_size > 0  # exported from the read-only store
        assert not (store / "probe").exists()
    finally:
        for folder, dirs, _files in os.walk(store):
            for name in dirs:
                os.chmod(os.path.join(folder, name), 0o755)
        store.chmod(0o755)
