"""``v2v report CATALOG``: an HTML page and a markdown summary of a catalog's jobs from the store.

Per job: its metrics (the ``evaluate`` artifact), the seconds each stage took (``compute_seconds`` in
every artifact's commit record, the time it took when it was computed, whether this run hit the cache or
not), cache hits when the job record says so, a thumbnail strip and the output video (WebM/VP9, which
every Chromium plays). Above them, the paper's table: one row per configuration, one column per metric,
FVD computed per configuration from the jobs' I3D features (output set vs source set).
"""

from __future__ import annotations

import html
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer  # module level: typer resolves the command's (string) annotations in these globals

from stages import DELIVERABLE, PIPELINE, available_stages, metrics
from storage.store import ArtifactNotFound, ArtifactRef, ArtifactStore, open_store

log = logging.getLogger("v2v.report")

# (key, header, format, higher is better) in the paper's order, then ours.
COLUMNS: list[tuple[str, str, str, bool]] = [
    ("dover", "DOVER", ".4f", True),
    ("fvd", "FVD", ".1f", False),
    ("warping_error", "Warp err.", ".5f", False),
    ("clip_temporal", "CLIP-T", ".4f", True),
    ("clip_score", "CLIP score", ".2f", True),
    ("shape_iou", "Shape IoU", ".3f", True),
    ("first_frame_psnr", "1st-frame PSNR", ".2f", True),
    ("first_frame_ssim", "1st-frame SSIM", ".4f", True),
    ("background_psnr", "Bkg. PSNR", ".2f", True),
    ("seconds", "Time (s)", ".1f", False),
]
# The stage whose output is the job's deliverable, from the stage declarations (never named here).
VIDEO_STAGE = next(name for name, st in available_stages().items() if DELIVERABLE in st.outputs)


@dataclass
class JobReport:
    job_id: str
    config: str = ""
    status: str = "not run"
    metrics: dict[str, float | None] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    cache: dict[str, bool | None] = field(default_factory=dict)  # stage -> hit (None: unknown)
    backends: dict[str, str] = field(default_factory=dict)
    fvd_features: np.ndarray | None = None
    fvd_source_features: np.ndarray | None = None
    video: str | None = None  # relative to the report folder
    strip: str | None = None
    error: str | None = None


# ---- collecting -------------------------------------------------------------------------------------

def summarise_metrics(arrays: Mapping[str, np.ndarray]) -> dict[str, float | None]:
    """One number per metric from an ``evaluate`` artifact (None where the metric was not computed)."""
    def mean(name: str, weights: str | None = None) -> float | None:
        if name not in arrays:
            return None
        return metrics.mean_or_none(arrays[name], arrays.get(weights) if weights else None)

    return {
        "dover": mean("dover_overall"),
        "warping_error": mean("warping_error"),
        "clip_temporal": mean("clip_temporal"),
        "clip_score": mean("clip_score"),
        "shape_iou": mean("shape_iou"),
        "first_frame_psnr": mean("first_frame_psnr"),
        "first_frame_ssim": mean("first_frame_ssim"),
        "background_psnr": mean("background_psnr", "background_fraction"),
    }


def _cache_flags(doc: Mapping[str, Any]) -> dict[str, bool | None]:
    """Cache hits from the job record: ``stages: {stage: {status}}``, ``{stage: status}`` or ``cached``."""
    out: dict[str, bool | None] = {}
    stages = doc.get("stages")
    if isinstance(stages, Mapping):
        for stage, value in stages.items():
            status = value.get("status") if isinstance(value, Mapping) else value
            out[stage] = None if status not in ("cached", "computed") else status == "cached"
    cached = doc.get("cached")
    if isinstance(cached, Mapping):
        out.update({s: bool(v) for s, v in cached.items()})
    elif isinstance(cached, list):
        out.update({s: True for s in cached})
    return out


def collect_job(store: ArtifactStore, job_id: str) -> JobReport:
    rep = JobReport(job_id)
    try:
        doc = store.job(job_id)
    except ArtifactNotFound:
        return rep
    rep.status = str(doc.get("status") or "done")
    rep.error = doc.get("error")
    rep.cache = _cache_flags(doc)
    for stage, key in (doc.get("artifacts") or {}).items():
        ref = ArtifactRef(stage, key)
        try:
            attrs = store.attrs(ref)
        except ArtifactNotFound:
            rep.cache.setdefault(stage, None)
            continue
        rep.stage_seconds[stage] = float(attrs.get("compute_seconds") or 0.0)
        rep.backends[stage] = str(attrs.get("backend", ""))
        if stage == "evaluate":
            arrays = store.read(ref)
            rep.metrics = summarise_metrics(arrays)
            rep.fvd_features = arrays.get("fvd_features")
            rep.fvd_source_features = arrays.get("fvd_source_features")
    order = {s: i for i, s in enumerate((*PIPELINE, "evaluate"))}
    rep.stage_seconds = dict(sorted(rep.stage_seconds.items(), key=lambda kv: order.get(kv[0], len(order))))
    inference = [s for s in rep.stage_seconds if s != "evaluate"]
    rep.metrics["seconds"] = sum(rep.stage_seconds[s] for s in inference) if inference else None
    return rep


def default_configs(reports: list[JobReport], modes: Mapping[str, str | None]) -> dict[str, str]:
    """Name each job's configuration by what varies across the jobs: backends (and the edit mode)."""
    stages = sorted({s for r in reports for s in r.backends})
    varying = [s for s in stages if len({r.backends.get(s) for r in reports if r.backends}) > 1]
    shown = varying or ([VIDEO_STAGE] if any(VIDEO_STAGE in r.backends for r in reports) else [])
    vary_mode = len({modes.get(r.job_id) for r in reports}) > 1
    out = {}
    for r in reports:
        parts = [f"{s}={r.backends[s]}" if s in varying else r.backends[s] for s in shown if s in r.backends]
        if vary_mode and modes.get(r.job_id):
            parts.append(f"mode={modes[r.job_id]}")
        out[r.job_id] = ", ".join(parts) or "(not run)"
    return out


def aggregate(reports: list[JobReport]) -> list[dict[str, Any]]:
    """The paper's table: one row per configuration (mean over its jobs), FVD over its job set."""
    rows = []
    reports = [r for r in reports if r.status != "not run"]
    for config in dict.fromkeys(r.config for r in reports):
        group = [r for r in reports if r.config == config]
        row: dict[str, Any] = {"config": config, "jobs": len(group)}
        for key, *_ in COLUMNS:
            vals = [r.metrics.get(key) for r in group if r.metrics.get(key) is not None]
            row[key] = float(np.mean(vals)) if vals else None
        outs = [r.fvd_features for r in group if r.fvd_features is not None]
        srcs = [r.fvd_source_features for r in group if r.fvd_source_features is not None]
        enough = len(outs) >= 2 and len(srcs) >= 2
        row["fvd"] = metrics.fvd(np.stack(outs), np.stack(srcs)) if enough else None
        rows.append(row)
    return rows


# ---- media ------------------------------------------------------------------------------------------

def write_webm(video: np.ndarray, path: Path, fps: int = 8) -> Path:
    import av

    n, h, w = video.shape[:3]
    with av.open(str(path), "w", format="webm") as out:
        stream = out.add_stream("libvpx-vp9", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
        stream.options = {"crf": "32", "b": "0", "deadline": "realtime", "cpu-used": "8"}
        for f in video:
            even = np.ascontiguousarray(f[: h - h % 2, : w - w % 2])
            frame = av.VideoFrame.from_ndarray(even, format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def write_strip(video: np.ndarray, path: Path, count: int = 8, height: int = 72) -> Path:
    import cv2
    from PIL import Image

    idx = np.unique(np.linspace(0, len(video) - 1, min(count, len(video))).round().astype(int))
    w = max(1, round(video.shape[2] * height / video.shape[1]))
    thumbs = [cv2.resize(video[i], (w, height), interpolation=cv2.INTER_AREA) for i in idx]
    Image.fromarray(np.concatenate(thumbs, axis=1)).save(path, quality=85)
    return path


def _media(store: ArtifactStore, rep: JobReport, doc_artifacts: Mapping[str, str], media: Path) -> None:
    key = doc_artifacts.get(VIDEO_STAGE)
    if not key:
        return
    try:
        video = store.read(ArtifactRef(VIDEO_STAGE, key), [DELIVERABLE])[DELIVERABLE]
    except (ArtifactNotFound, KeyError):
        return
    rep.video = f"media/{write_webm(video, media / f'{rep.job_id}.webm').name}"
    rep.strip = f"media/{write_strip(video, media / f'{rep.job_id}-strip.jpg').name}"


# ---- rendering --------------------------------------------------------------------------------------

def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _best(rows: list[dict[str, Any]], key: str, higher: bool) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if len(vals) < 2:
        return None
    return max(vals) if higher else min(vals)


def render_markdown(title: str, table: list[dict[str, Any]], reports: list[JobReport]) -> str:
    arrows = [f"{h} {'↑' if hi else '↓'}" for _, h, _, hi in COLUMNS]
    head = "| Configuration | Jobs | " + " | ".join(arrows) + " |"
    lines = [f"# {title}", "", head, "|" + "---|" * (len(COLUMNS) + 2)]
    for row in table:
        cells = [_fmt(row.get(k), spec) for k, _, spec, _ in COLUMNS]
        lines.append(f"| {row['config']} | {row['jobs']} | " + " | ".join(cells) + " |")
    lines += ["", "## Jobs", "", "| Job | Configuration | Status | " + " | ".join(h for _, h, _, _ in COLUMNS)
              + " | Stages (s, cache) |", "|" + "---|" * (len(COLUMNS) + 4)]
    for r in reports:
        cells = [_fmt(r.metrics.get(k), spec) for k, _, spec, _ in COLUMNS]
        lines.append(f"| {r.job_id} | {r.config} | {r.status} | " + " | ".join(cells)
                     + f" | {_stages_text(r)} |")
    lines += ["", "FVD is computed per configuration (needs I3D features of at least 2 jobs); '—' = not "
              "measured (no weights configured, or the job has not run)."]
    return "\n".join(lines) + "\n"


def _stages_text(r: JobReport) -> str:
    parts = []
    for stage, sec in r.stage_seconds.items():
        hit = r.cache.get(stage)
        parts.append(f"{stage} {sec:.2f}" + ("" if hit is None else " (cached)" if hit else " (run)"))
    return ", ".join(parts) or "—"


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;
margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;vertical-align:top}
th{background:#f3f3f3}td.l,th.l{text-align:left}td.best{font-weight:bold}.stages{font-size:85%;
text-align:left;white-space:nowrap}img.strip{height:72px}video{height:144px}.broken{outline:3px solid red}
.note{color:#666;font-size:90%}"""
# Marks every image/video once it has really loaded (data-ok) or failed (class broken): visible to readers
# and checkable by a headless browser.
JS = """document.querySelectorAll('img.media').forEach(function(e){function ok(){e.dataset.ok=
e.naturalWidth>0?'1':'0'}if(e.complete)ok();e.addEventListener('load',ok);e.addEventListener('error',
function(){e.classList.add('broken')})});document.querySelectorAll('video.media').forEach(function(e){
if(e.readyState>=2)e.dataset.ok='1';e.addEventListener('loadeddata',function(){e.dataset.ok='1'});
e.addEventListener('error',function(){e.classList.add('broken')},true)});"""


def render_html(title: str, table: list[dict[str, Any]], reports: list[JobReport]) -> str:
    esc = html.escape
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
           f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>", "<h2>Summary</h2>",
           "<table id='summary'><tr><th class='l'>Configuration</th><th>Jobs</th>"]
    out += [f"<th>{esc(h)} {'↑' if hi else '↓'}</th>" for _, h, _, hi in COLUMNS] + ["</tr>"]
    for row in table:
        cells = []
        for key, _, spec, higher in COLUMNS:
            best = _best(table, key, higher)
            cls = " class='best'" if best is not None and row.get(key) == best else ""
            cells.append(f"<td{cls}>{_fmt(row.get(key), spec)}</td>")
        out.append(f"<tr><td class='l'>{esc(row['config'])}</td><td>{row['jobs']}</td>{''.join(cells)}</tr>")
    out += ["</table><p class='note'>FVD per configuration from I3D features (outputs vs sources, at least "
            "2 jobs); '—' = not measured (no weights configured, or the job has not run). Time = sum of "
            "the stages' compute seconds (evaluate excluded).</p>", "<h2>Jobs</h2>",
            "<table id='jobs'><tr><th class='l'>Job</th><th class='l'>Configuration</th><th>Status</th>"]
    out += [f"<th>{esc(h)}</th>" for _, h, _, _ in COLUMNS]
    out += ["<th class='l'>Stages (s)</th><th class='l'>Frames</th><th class='l'>Output</th></tr>"]
    for r in reports:
        cells = "".join(f"<td>{_fmt(r.metrics.get(k), spec)}</td>" for k, _, spec, _ in COLUMNS)
        strip = (f"<img class='media strip' src='{esc(r.strip)}' alt='frames of {esc(r.job_id)}'>"
                 if r.strip else "—")
        video = (f"<video class='media' src='{esc(r.video)}' controls muted loop preload='auto'></video>"
                 if r.video else "—")
        status = esc(r.status) + (f"<br><span class='note'>{esc(r.error)}</span>" if r.error else "")
        out.append(f"<tr id='job-{esc(r.job_id)}'><td class='l'>{esc(r.job_id)}</td><td class='l'>"
                   f"{esc(r.config)}</td><td>{status}</td>{cells}<td class='stages'>"
                   f"{esc(_stages_text(r)).replace(', ', '<br>')}</td><td>{strip}</td><td>{video}</td></tr>")
    out += ["</table>", f"<script>{JS}</script></body></html>"]
    return "\n".join(out)


# ---- entry points -----------------------------------------------------------------------------------

def write_report(store: ArtifactStore | str | os.PathLike[str] | None, catalog: Any,
                 out_dir: str | os.PathLike[str],
                 configs: Mapping[str, str] | Callable[[JobReport], str] | None = None,
                 title: str | None = None) -> Path:
    """Write ``index.html`` (+ ``summary.md`` and ``media/``) for the catalog's jobs; returns the HTML path.

    ``catalog``: a catalog file, a ``flows.catalog.Catalog`` or a list of job ids. ``configs`` names each
    job's configuration (mapping or function); default: the backends that differ across the jobs.
    """
    st = store if isinstance(store, ArtifactStore) else open_store(store)
    ids, modes, name = _catalog_jobs(catalog)
    out = Path(out_dir).expanduser()
    media = out / "media"
    media.mkdir(parents=True, exist_ok=True)
    reports = []
    for job_id in ids:
        rep = collect_job(st, job_id)
        if rep.status != "not run":
            _media(st, rep, st.job(job_id).get("artifacts") or {}, media)
        reports.append(rep)
    names = default_configs(reports, modes)
    for rep in reports:
        if callable(configs):
            rep.config = configs(rep)
        else:
            rep.config = (configs or {}).get(rep.job_id) or names[rep.job_id]
    table = aggregate(reports)
    title = title or f"v2v report: {name}"
    (out / "summary.md").write_text(render_markdown(title, table, reports))
    page = out / "index.html"
    page.write_text(render_html(title, table, reports))
    return page


def _catalog_jobs(catalog: Any) -> tuple[list[str], dict[str, str | None], str]:
    if isinstance(catalog, (list, tuple)):
        return [str(j) for j in catalog], {}, "jobs"
    from flows.config.catalog import Catalog, load_catalog

    cat = catalog if isinstance(catalog, Catalog) else load_catalog(catalog)
    for err in cat.errors:
        log.warning("report: %s", err)
    return [j.id for j in cat.jobs], {j.id: j.mode for j in cat.jobs}, cat.name


def register(app: Any) -> None:
    """Add ``report`` to the typer ``app``."""

    @app.command("report")
    def report(
        catalog: Annotated[Path, typer.Argument(help="catalog file (YAML, CSV or Parquet)")],
        store: Annotated[str | None, typer.Option("--store", help="store URL (default $V2V_STORE)")] = None,
        out: Annotated[Path | None, typer.Option("--out", "-o", help="folder (default out/report-NAME)")
                       ] = None,
    ) -> None:
        """Write an HTML report (metrics, timings, media) and a markdown summary of a catalog's jobs."""
        target = out or Path("out") / f"report-{catalog.stem}"
        page = write_report(store, catalog, target)
        typer.echo(f"wrote {page} and {page.with_name('summary.md')}")
