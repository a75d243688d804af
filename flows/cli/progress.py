"""Terminal output: rich progress bars per job and stage, the plan table and the summary table.

Job ids, paths, backend names, reasons and errors are user text: always escaped (``[/x]`` in a path is text,
not rich markup), only our own styles are markup.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from flows.plan.planner import JobPlan
from flows.run.results import JobResult, RunReport, StageResult

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
        # Rows refused at load whose id a valid row has (a duplicate id): (id, reason); their bar is drawn failed
        # at once, and their report never touches the valid row's bar.
        self.refused: set[tuple[str, str | None]] = set()

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def start(self, plans: list[JobPlan]) -> None:
        self.overall = self.progress.add_task("[bold]catalog", total=len(plans))
        valid = {plan.job_id for plan in plans if plan.ok}
        for plan in plans:
            if not plan.ok and plan.job_id in valid:
                self.refused.add((plan.job_id, plan.error))
                bar = self.progress.add_task(f"{escape(plan.job_id)} [red]failed[/]", total=1)
                self.progress.update(bar, completed=1)  # finished (no spinner)
                continue
            total = sum(1 for s in plan.stages.values() if s.status != "skip") if plan.ok else 1
            self.tasks[plan.job_id] = self.progress.add_task(escape(plan.job_id), total=max(total, 1))

    def stage_done(self, job_id: str, result: StageResult) -> None:
        task = self.tasks.get(job_id)
        if task is None:
            return
        style = STATUS_STYLE.get(result.status, "")
        self.progress.update(task, advance=1,
                             description=f"{escape(job_id)} [dim]·[/] {escape(result.stage)} "
                                         f"[{style}]{escape(result.status)}[/]")

    def job_done(self, result: JobResult) -> None:
        task = None if (result.job_id, result.error) in self.refused else self.tasks.get(result.job_id)
        if task is not None:
            style = STATUS_STYLE.get(result.status, "")
            total = self.progress.tasks[task].total or 1
            self.progress.update(task, completed=total,
                                 description=f"{escape(result.job_id)} [{style}]{escape(result.status)}[/]")
        if self.overall is not None:
            self.progress.advance(self.overall)


def plan_table(plans: list[JobPlan]) -> Table:
    table = Table(title="plan", show_lines=False, header_style="bold")
    for col in ("job", "stage", "status", "backend", "key", "why"):
        table.add_column(col, overflow="fold")
    for plan in plans:
        if not plan.ok:
            table.add_row(escape(plan.job_id), "—", "[red]error[/]", "", "", escape(plan.error or ""))
            continue
        first = True
        for sp in plan.stages.values():
            style = STATUS_STYLE.get(sp.status, "")
            table.add_row(escape(plan.job_id) if first else "", escape(sp.stage), f"[{style}]{escape(sp.status)}[/]",
                          escape(sp.call.backend) if sp.call else "", escape(sp.key[:12]), escape(sp.reason))
            first = False
        table.add_section()
    return table


def summary_table(report: RunReport) -> Table:
    table = Table(title=f"summary ({report.orchestrator}, {report.wall_seconds:.1f} s)", header_style="bold")
    for col in ("job", "status", "seconds", "run / cached", "output / reason"):
        table.add_column(col, overflow="fold")
    for j in report.jobs:
        style = STATUS_STYLE.get(j.status, "")
        detail = escape((j.error or "") if j.status == "failed"
                        else (j.outputs.get("mp4") or j.outputs.get("contact_sheet") or ""))
        skipped = [s for s, r in j.stages.items() if r.status == "skipped"]
        if skipped and j.status != "failed":
            detail = f"{detail}  [dim](skipped: {escape(', '.join(skipped))})[/]"
        if j.notes:
            detail = f"{detail}  [yellow]{escape('; '.join(j.notes))}[/]"
        table.add_row(escape(j.job_id), f"[{style}]{escape(j.status)}[/]", f"{j.seconds:.1f}",
                      f"{j.computed} / {j.cached}", detail)
    return table
