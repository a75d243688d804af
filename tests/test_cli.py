"""The ``v2v`` command line, as a user runs it (subprocesses): fast help, clear errors, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_flow_catalog import OFFLINE, SMALL

REPO = Path(__file__).resolve().parent.parent
BEAR = Path(__file__).parent / "data" / "bear"


def v2v(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "V2V_STORE": "", "V2V_PROFILE": ""}
    return subprocess.run([sys.executable, "-m", "flows.cli.main", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def clean(proc: subprocess.CompletedProcess[str]) -> str:
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text
    return text


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    (tmp_path / "offline.yaml").write_text(yaml.safe_dump({"name": "offline", "backends": OFFLINE,
                                                           "params": SMALL}))
    (tmp_path / "catalog.yaml").write_text(f"""jobs:
  - id: bear
    source: {BEAR / 'frames'}
    masks: {BEAR / 'mask-00000.png'}
    first_frame: {BEAR / 'edited-first-frame-elephant.png'}
    prompt: an elephant
  - id: broken
    source: {BEAR / 'frames'}
    first_frame: {tmp_path / 'nope.png'}
""")
    return tmp_path


def test_help_is_fast() -> None:
    start = time.perf_counter()
    proc = v2v("--help")
    seconds = time.perf_counter() - start
    assert proc.returncode == 0 and "run" in proc.stdout and "inspect" in proc.stdout
    assert seconds < 3.0, f"v2v --help took {seconds:.2f} s (heavy imports at module level?)"
    assert v2v("store", "--help").returncode == 0


def test_user_mistakes_give_one_line_and_exit_2(workspace: Path) -> None:
    cases = [
        (("run", str(workspace / "absent.yaml")), "no such catalog"),
        (("plan", str(workspace / "catalog.yaml"), "--profile", "nosuch"), "no profile 'nosuch'"),
        (("run", str(workspace / "catalog.yaml"), "--set", "n_frames=4"), "STAGE.PARAM=VALUE"),
        (("inspect", "nosuch", "--store", str(workspace / "store")), "no job 'nosuch'"),
        (("models", "fetch", "nosuch"), "unknown model"),
        (("edit", str(BEAR / "frames"), "--prompt", "x"), "exactly one of --first-frame"),
    ]
    for args, message in cases:
        proc = v2v(*args)
        text = clean(proc)
        assert proc.returncode == 2, (args, text)
        assert message in text and "error" in text, (args, text)


@pytest.mark.parametrize("args, message", [
    (("run",), "Missing argument 'catalog'"),
    (("edit", "clip.mp4"), "Missing option '--prompt'"),
    (("run", "c.yaml", "--bogus"), "No such option: --bogus"),
    (("frobnicate",), "No such command 'frobnicate'"),
    (("run", "c.yaml", "--workers", "many"), "Invalid value for '--workers'"),
    (("store",), "`v2v store` needs a command"),
    ((), "no command given"),
])
def test_usage_mistakes_give_one_line_naming_them_and_exit_2(args: tuple[str, ...], message: str) -> None:
    proc = v2v(*args)
    assert proc.returncode == 2, proc
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr


def test_plan_run_inspect_and_store_commands(workspace: Path) -> None:
    common = ("--profile", str(workspace / "offline.yaml"), "--store", str(workspace / "store"))
    cat = str(workspace / "catalog.yaml")
    plan = v2v("plan", cat, *common)
    text = clean(plan)
    assert plan.returncode == 1  # the broken row is an error in the plan too
    assert "generate" in text and "new" in text and "nope.png" in text
    assert not (workspace / "store" / "generate").exists()  # planning computes nothing

    run = v2v("run", cat, *common, "--out", str(workspace / "out"), "--inline")
    text = clean(run)
    assert run.returncode == 1, text  # one job failed: non-zero, the other finished
    assert "done" in text and "failed" in text and "first_frame" in text
    assert (workspace / "out" / "bear" / "video.mp4").is_file()

    # The seed is not read by the offline generator: nothing to re-run. A field it reads re-runs it.
    again = v2v("plan", cat, *common, "--set", "generate.seed=3")
    text = clean(again)
    assert "cached" in text and "0 stage(s) to run" in text
    again = v2v("plan", cat, *common, "--set", "generate.feather_px=2")
    text = clean(again)
    assert "cached" in text and "feather_px=2.0 (was 1.0)" in text

    inspect = v2v("inspect", "bear", *common, "--sheet", str(workspace / "sheet.png"))
    text = clean(inspect)
    assert inspect.returncode == 0 and "xarray.Dataset" in text and "refined_depth" in text
    assert (workspace / "sheet.png").stat().st_size > 10_000

    ls = v2v("store", "ls", *common)
    assert ls.returncode == 0 and "bear" in clean(ls)
    verify = v2v("store", "verify", *common)
    assert verify.returncode == 0 and "0 damaged" in clean(verify)
    missing = v2v("store", "verify", "--store", str(workspace / "no-such-store"))
    assert missing.returncode == 1 and "no store at" in clean(missing)
    assert not (workspace / "no-such-store").exists()
    gc = v2v("store", "gc", "--dry-run", *common)
    assert gc.returncode == 0 and "would remove" in clean(gc)


def test_edit_one_video(workspace: Path) -> None:
    proc = v2v("edit", str(BEAR / "frames"), "--prompt", "an elephant", "--first-frame",
               str(BEAR / "edited-first-frame-elephant.png"), "--masks", str(BEAR / "mask-00000.png"),
               "--id", "one", "--profile", str(workspace / "offline.yaml"), "--store", str(workspace / "store"),
               "--out", str(workspace / "out"), "--inline")
    text = clean(proc)
    assert proc.returncode == 0, text
    assert (workspace / "out" / "one" / "video.mp4").is_file()
