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
    """One bar for the catalog and one per job in flight, advanced as stages finish.

    Plans stream in while the run computes: a job's bar appears when it is planned. In a large catalog
    (over ``KEEP_BARS`` jobs) a finished job's bar goes away again, so the display follows the jobs in flight;
    the summary names every failed job."""

    KEEP_BARS = 20

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}", markup=True),
                                 BarColumn(bar_width=24), MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=console, transient=False)
        self.tasks: dict[str, Any] = {}
        self.overall: Any = None
        self.keep = True
        # Rows refused at load whose id a valid row has (a duplicate id): (id, reason); their bar is drawn failed
        # at once, and their report never touches the valid row's bar.
        self.refused: set[tuple[str, str | None]] = set()

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def start(self, total: int | None) -> None:
        self.overall = self.progress.add_task("[bold]catalog", total=total)
        self.keep = total is not None and total <= self.KEEP_BARS

    def job_planned(self, plan: JobPlan) -> None:
        if not plan.ok and plan.job_id in self.tasks:  # a duplicate of a valid row's id
            self.refused.add((plan.job_id, plan.error))
            if self.keep:
                bar = self.progress.add_task(f"{escape(plan.job_id)} [red]failed[/]", total=1)
                self.progress.update(bar, completed=1)  # finished (no spinner)
            return
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
        refused = (result.job_id, result.error) in self.refused
        task = None if refused else self.tasks.get(result.job_id)
        if task is not None:
            if self.keep:
                style = STATUS_STYLE.get(result.status, "")
                total = self.progress.tasks[task].total or 1
                self.progress.update(task, completed=total,
                                     description=f"{escape(result.job_id)} [{style}]{escape(result.status)}[/]")
            else:
                self.progress.remove_task(task)
                del self.tasks[result.job_id]
        if self.overall is not None:
            self.progress.advance(self.overall)


PLAN_COLUMNS = (("job", 18), ("stage", 13), ("status", 7), ("backend", 14), ("key", 12), ("why", None))


def plan_table(plans: list[JobPlan], *, header: bool = True) -> Table:
    """The plan of these jobs, a row per stage; the columns are fixed, so that the tables of a streamed plan
    (``header`` on the first only) line up."""
    table = Table(title="plan" if header else None, show_header=header, show_lines=False, header_style="bold",
                  show_edge=False, box=None, pad_edge=False)
    for col, width in PLAN_COLUMNS:
        table.add_column(col, overflow="fold", width=width, no_wrap=False)
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
    return table


SUMMARY_ROWS = 50  # a larger catalog's summary lists its failed jobs only, then counts the others


def summary_table(report: RunReport) -> Table:
    jobs = report.jobs if len(report.jobs) <= SUMMARY_ROWS else report.failed
    title = f"summary ({report.orchestrator}, {report.wall_seconds:.1f} s)"
    if jobs is not report.jobs:
        counts: dict[str, int] = {}
        for j in report.jobs:
            counts[j.status] = counts.get(j.status, 0) + 1
        title += f": {len(report.jobs)} jobs, " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        title += " (failed jobs below)" if jobs else ""
    table = Table(title=title, header_style="bold")
    for col in ("job", "status", "seconds", "run / cached", "output / reason"):
        table.add_column(col, overflow="fold")
    for j in jobs:
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
