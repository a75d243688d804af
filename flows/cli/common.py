"""Option types and helpers shared by the CLI modules."""

from __future__ import annotations

from typing import Annotated, Any

import typer

StoreOpt = Annotated[str | None, typer.Option("--store", envvar="V2V_STORE",
                                              help="artifact store URL (default ./v2v-store)")]
ProfileOpt = Annotated[str | None, typer.Option("--profile", "-p", envvar="V2V_PROFILE",
                                                help="profile name (profiles/NAME.yaml) or path; default local")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="stage parameter: STAGE.PARAM=VALUE")]
BackendOpt = Annotated[list[str] | None, typer.Option("--backend", "-b", help="stage backend: STAGE=NAME")]
WeightsOpt = Annotated[list[str] | None, typer.Option("--weights", help="weights path: BACKEND=PATH")]
OutOpt = Annotated[str | None, typer.Option("--out", "-o", help="folder for videos and contact sheets")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 ...")]
RunnerOpt = Annotated[str | None, typer.Option("--runner", help="local or ray")]
WorkersOpt = Annotated[int | None, typer.Option("--workers", "-j", help="stage tasks at once (local threads / "
                                                                         "Ray CPUs)")]
InlineOpt = Annotated[bool, typer.Option("--inline", help="run without Prefect (plain threads)")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect's own logs")]


def _console() -> Any:
    import sys

    from rich.console import Console

    # Piped into a log: wide enough that paths and reasons are not folded mid-word.
    return Console(stderr=False, highlight=False, width=None if sys.stdout.isatty() else 200)


def fail(message: str, code: int = 2) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {message}", markup=True)
    raise typer.Exit(code)
