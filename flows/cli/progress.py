"""Terminal output: rich progress bars per job and stage, the plan table and the summary table."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from flows.plan.planner import JobPlan
from flows.run.engine import JobResult, RunReport, StageResult

STATUS_STYLE = {"done": "green", "cached": "blue", "failed": "red", "run": "yellow", "skip": "dim",
                "computed": "green", "blocked": "red", "skipped": "dim"}


class RichReporter:
    """One bar for the catalog and one per job, advanced as stages finish."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}", markup=True),
                                 BarColumn(bar_width=24), MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=console, transient=False)
        self.tasks: dict[str, Any] = {}
        self.overall: Any = None

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def start(self, plans: list[JobPlan]) -> None:
        self.overall = self.progress.add_task("[bold]catalog", total=len(plans))
        for plan in plans:
            total = sum(1 for s in plan.stages.values() if s.status != "skip") if plan.ok else 1
            self.tasks[plan.job_id] = self.progress.add_task(f"{plan.job_id}", total=max(total, 1))

    def stage_done(self, job_id: str, result: StageResult) -> None:
        task = self.tasks.get(job_id)
        if task is None:
            return
        style = STATUS_STYLE.get(result.status, "")
        self.progress.update(task, advance=1,
                             description=f"{job_id} [dim]·[/] {result.stage} [{style}]{result.status}[/]")

    def job_done(self, result: JobResult) -> None:
        task = self.tasks.get(result.job_id)
        if task is not None:
            style = STATUS_STYLE.get(result.status, "")
            total = self.progress.tasks[task].total or 1
            self.progress.update(task, completed=total, description=f"{result.job_id} [{style}]{result.status}[/]")
        if self.overall is not None:
            self.progress.advance(self.overall)


def plan_table(plans: list[JobPlan]) -> Table:
    table = Table(title="plan", show_lines=False, header_style="bold")
    for col in ("job", "stage", "status", "backend", "key", "why"):
        table.add_column(col, overflow="fold")
    for plan in plans:
        if not plan.ok:
            table.add_row(plan.job_id, "—", "[red]error[/]", "", "", plan.error or "")
            continue
        first = True
        for sp in plan.stages.values():
            style = STATUS_STYLE.get(sp.status, "")
            table.add_row(plan.job_id if first else "", sp.stage, f"[{style}]{sp.status}[/]",
                          sp.call.backend if sp.call else "", sp.key[:12], sp.reason)
            first = False
        table.add_section()
    return table


def summary_table(report: RunReport) -> Table:
    table = Table(title=f"summary ({report.orchestrator}, {report.wall_seconds:.1f} s)", header_style="bold")
    for col in ("job", "status", "seconds", "run / cached", "output / reason"):
        table.add_column(col, overflow="fold")
    for j in report.jobs:
        style = STATUS_STYLE.get(j.status, "")
        detail = j.error if j.status == "failed" else (j.outputs.get("mp4") or j.outputs.get("contact_sheet") or "")
        skipped = [s for s, r in j.stages.items() if r.status == "skipped"]
        if skipped and j.status != "failed":
            detail = f"{detail}  [dim](skipped: {', '.join(skipped)})[/]"
        table.add_row(j.job_id, f"[{style}]{j.status}[/]", f"{j.seconds:.1f}", f"{j.computed} / {j.cached}",
                      detail or "")
    return table
