"""``v2v store ls|verify|gc``, ``v2v models fetch|list`` and ``v2v schedule`` (kept apart from the run commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from flows.cli.common import ProfileOpt, StoreOpt, _console, fail


def _esc(text: Any) -> str:
    """User text (paths, names, messages quoting them) printed through rich: never read as markup."""
    from rich.markup import escape

    return escape(str(text))


def _store(store: str | None, profile: str | None, *, must_exist: bool = True) -> Any:
    """The profile's store; a store that is not there is an error (exit 1), never created by looking."""
    from flows.api import resolve
    from storage.errors import StoreNotFound

    st = resolve(profile, store, None)[1]
    if must_exist:
        try:
            st.require()
        except StoreNotFound as exc:
            fail(f"{_esc(exc)} (mistyped path? --store or $V2V_STORE)", code=1)
    return st


def store_ls(store: StoreOpt = None, profile: ProfileOpt = None) -> None:
    """Jobs and artifacts in the store (count and size per stage), quarantined items, live leases."""
    from rich.markup import escape
    from rich.table import Table

    from storage.errors import DocumentDamaged
    from storage.leases import leases

    st = _store(store, profile)
    console = _console()
    stages: dict[str, list[int]] = {}
    for ref, _ in st.iter_artifacts():
        try:
            size = st.fs.du(f"{st.root}/{ref.path}", total=True)
        except Exception:
            size = 0
        entry = stages.setdefault(ref.stage, [0, 0])
        entry[0] += 1
        entry[1] += int(size)
    table = Table(title=f"artifacts in {escape(st.url)}", header_style="bold")
    for col in ("stage", "artifacts", "MB"):
        table.add_column(col)
    for stage, (n, size) in sorted(stages.items()):
        table.add_row(stage, str(n), f"{size / 1e6:.1f}")
    console.print(table)
    jobs = Table(title="jobs", header_style="bold")
    for col in ("job", "status", "stages", "outputs"):
        jobs.add_column(col, overflow="fold")
    for job_id in st.jobs():
        try:
            doc = st.job(job_id)
        except DocumentDamaged as exc:
            jobs.add_row(escape(job_id), "[red]damaged manifest[/]", "", escape(exc.what))
            continue
        outputs = doc.get("outputs") or {}
        jobs.add_row(escape(job_id), escape(str(doc.get("status", ""))), str(len(doc.get("artifacts", {}))),
                     escape(outputs.get("mp4") or outputs.get("contact_sheet") or (doc.get("error") or "")))
    console.print(jobs)
    held = [lease for lease in leases(st) if lease.alive()]
    if held:
        console.print(f"{len(held)} running job lease(s): " + ", ".join(escape(lease.run) for lease in held))
    quarantined = st.quarantined()
    if quarantined:
        console.print(f"{len(quarantined)} quarantined item(s) (v2v store verify lists them)")


def store_verify(store: StoreOpt = None, profile: ProfileOpt = None,
                 repair: Annotated[bool, typer.Option(
                     "--repair", help="quarantine damaged artifacts and documents, remove leftovers")] = False
                 ) -> None:
    """Re-read every artifact, manifest and index entry; exit 1 when anything is damaged (and not repaired)."""
    from rich.markup import escape

    from storage.maintenance import verify

    st = _store(store, profile)
    console = _console()
    with console.status("verifying checksums…"):
        report = verify(st, repair=repair)
    unrepaired = 0
    for f in report.findings:
        fixed = f.repaired and not f.repaired.startswith("repair failed")
        unrepaired += not fixed
        console.print(f"[{'yellow' if fixed else 'red'}]{escape(f.kind)}[/] {escape(f.path)}: {escape(f.what)}"
                      + (f" [dim]({escape(f.repaired)})[/]" if f.repaired else ""))
    for item in report.quarantined:
        console.print(f"[dim]quarantined: {escape(str(item.get('path', item.get('name'))))}: "
                      f"{escape(str(item.get('reason', '')))}[/]")
    console.print(f"{report.checked} artifact(s) and {report.documents} document(s) checked, "
                  f"{len(report.findings)} damaged" + (f", {len(report.findings) - unrepaired} repaired"
                                                       if repair else ""))
    raise typer.Exit(1 if unrepaired else 0)


def store_gc(store: StoreOpt = None, profile: ProfileOpt = None,
             dry_run: Annotated[bool, typer.Option("--dry-run", help="only list what would go")] = False,
             keep_unreferenced: Annotated[bool, typer.Option(
                 "--keep-unreferenced", help="keep artifacts no job refers to")] = False,
             min_age: Annotated[float, typer.Option(
                 "--min-age", help="seconds: younger leftovers and commits may be a run in progress")] = 3600.0,
             purge_quarantine: Annotated[float | None, typer.Option(
                 "--purge-quarantine", help="also delete quarantined items older than SECONDS")] = None) -> None:
    """Remove write leftovers, incomplete artifacts and (unless told) artifacts no job refers to.

    Safe beside running jobs: artifacts of live runs (their leases) and recent commits are kept."""
    from rich.markup import escape

    from storage.maintenance import gc

    st = _store(store, profile)
    report = gc(st, keep_unreferenced=keep_unreferenced, min_age_s=min_age, dry_run=dry_run,
                purge_quarantine_s=purge_quarantine)
    verb = "would remove" if dry_run else "removed"
    console = _console()
    for ref in report.removed_unreferenced:
        console.print(f"{verb} unreferenced {escape(ref.path)}")
    for path, why in report.skipped:
        console.print(f"[yellow]skipped[/] {escape(path)}: {escape(why)}")
    console.print(f"{verb}: {len(report.removed_temp)} temporary, {len(report.removed_incomplete)} incomplete, "
                  f"{len(report.removed_unreferenced)} unreferenced, {len(report.removed_quarantine)} quarantined; "
                  f"kept {len(report.kept_leased)} in use by running jobs")


def fetch_model(name: str) -> Path:
    """``stages.models.fetch`` accepting short names (isnet -> isnet-medium)."""
    from stages import models

    names = [name] + [n for n in models.MODELS if n.split("-")[0] == name and n != name]
    known = [n for n in names if n in models.MODELS]
    if not known:
        raise models.MissingWeightsError(f"unknown model {name!r}; known: {sorted(models.MODELS)}")
    return models.fetch(known[0])


def models_fetch(name: Annotated[str, typer.Argument(help="model name, e.g. isnet")]) -> None:
    """Fetch a model's weights into the cache (only IS-Net can be fetched automatically)."""
    from stages.models import FetchError

    console = _console()
    try:
        with console.status(f"fetching {_esc(name)}…"):
            path = fetch_model(name)
    except FetchError as exc:
        fail(_esc(exc), code=1)
    console.print(f"{_esc(name)}: [cyan]{_esc(path)}[/]")


def models_list() -> None:
    """Known models, whether they are cached, and where they come from."""
    from rich.table import Table

    from stages import models

    table = Table(header_style="bold")
    for col in ("model", "cached", "source"):
        table.add_column(col, overflow="fold")
    for name, spec in models.MODELS.items():
        found = models.find_weights(name)
        table.add_row(name, str(found) if found else "—", spec.how)
    _console().print(table)


def models_check(profile: ProfileOpt = None,
                 weights: Annotated[list[str] | None, typer.Option(
                     "--weights", help="also check BACKEND=PATH")] = None) -> None:
    """Check every configured weights path before any compute: published layout, state-dict keys and shapes."""
    from rich.markup import escape

    from flows.config.profiles import load_profile, parse_assignments
    from stages import available_stages
    from stages.models import check_weights

    prof = load_profile(profile)
    given = {**prof.weights, **{k: str(v) for k, v in parse_assignments(weights, "--weights").items()}}
    console = _console()
    bad = 0
    stages = available_stages()
    for backend, path in sorted(given.items()):
        owners = [name for name, st in stages.items() if backend in st.backends]
        if not owners:
            console.print(f"[red]{escape(backend)}[/]: no stage has this backend")
            bad += 1
            continue
        for stage in owners:
            problems = [f"not found: {path}"] if not Path(path).expanduser().exists() else \
                check_weights(stage, backend, path)
            bad += bool(problems)
            status = "[green]ok[/]" if not problems else "[red]" + escape("; ".join(problems)) + "[/]"
            console.print(f"{escape(stage)}.{escape(backend)} {escape(path)}: {status}")
    if not given:
        console.print("no weights configured (profile `weights:` or --weights BACKEND=PATH)")
    raise typer.Exit(1 if bad else 0)


def schedule(catalog: Annotated[Path, typer.Argument(help="catalog file")],
             cron: Annotated[str, typer.Option("--cron", help="cron schedule, e.g. '0 * * * *'")],
             name: Annotated[str, typer.Option("--name", help="deployment name")] = "v2v-catalog",
             profile: ProfileOpt = None, store: StoreOpt = None) -> None:
    """Serve a Prefect deployment that runs CATALOG on a cron schedule (new rows run, finished rows are cached).

    Needs a running Prefect server (``prefect server start``; PREFECT_API_URL set): the temporary server of
    one-off runs has no scheduler.
    """
    import os

    from flows.orchestrate import prefect_env

    if not os.environ.get("PREFECT_API_URL"):
        fail("schedules need a running Prefect server: run `prefect server start` and set "
             "PREFECT_API_URL=http://127.0.0.1:4200/api (see docs/workflow.md)")
    if not catalog.is_file():
        fail(f"{_esc(catalog)}: no such catalog file")
    prefect_env.configure()
    from flows.config.profiles import load_profile
    from flows.orchestrate.prefect_flows import edit_catalog, task_runner_for

    prof = load_profile(profile)
    params = {"catalog": str(catalog.resolve()), "profile": profile or prof.name, "store": store or prof.store}
    _console().print(f"serving deployment [bold]edit_catalog/{name}[/] ({cron}); Ctrl-C stops it")
    edit_catalog.with_options(task_runner=task_runner_for(prof)).serve(name=name, cron=cron, parameters=params)


def server(port: Annotated[int, typer.Option("--port", help="port of the API and UI")] = 4200,
           host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1") -> None:
    """Run a local Prefect server (UI, history) that every `v2v run` on this machine uses while it runs.

    Runs in the foreground; Ctrl-C stops it. Runs then skip the temporary server's start-up (6-13 s here)."""
    from flows.orchestrate import prefect_env, prefect_server

    console = _console()
    try:
        code = prefect_server.serve(host, port, env=prefect_env.server_env(), on_ready=lambda url: console.print(
            f"Prefect server ready: UI [cyan]{url.removesuffix('/api')}[/], API {url}; `v2v run` uses it "
            "while it runs (Ctrl-C stops it)"))
    except RuntimeError as exc:
        fail(_esc(exc), 1)
    raise typer.Exit(code)


def register(app: typer.Typer, store_app: typer.Typer, models_app: typer.Typer) -> None:
    store_app.command("ls")(store_ls)
    store_app.command("verify")(store_verify)
    store_app.command("gc")(store_gc)
    models_app.command("fetch")(models_fetch)
    models_app.command("list")(models_list)
    models_app.command("check")(models_check)
    app.command("schedule")(schedule)
    app.command("server")(server)
