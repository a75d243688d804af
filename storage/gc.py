"""``gc``: remove write leftovers, marker-less folders and artifacts no job refers to, safely beside runs.

Safe beside a run: artifacts protected by a live lease (:mod:`storage.leases`) are kept, and each delete
re-reads the leases under the lease lock first. Safe if killed: each delete is a rename into ``.trash`` (the
artifact is gone from its place in one step), then a removal the next gc or verify finishes. Never follows a
symlink: linked folders (``.tmp``, a stage, an artifact) are skipped and reported, for ``verify --repair``.
Nothing younger than ``min_age_s`` is removed (a write in progress; an artifact a run just committed).
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from storage import localfs
from storage.errors import ArtifactNotFound, DocumentDamaged
from storage.leases import LeaseBook, store_lock, young_unreadable
from storage.names import COMMIT, INDEX, JOBS, LEASES, QUARANTINE, RESERVED, TMP
from storage.store import ArtifactRef, ArtifactStore


@dataclass
class GcReport:
    removed_temp: list[str] = field(default_factory=list)
    removed_incomplete: list[ArtifactRef] = field(default_factory=list)
    removed_unreferenced: list[ArtifactRef] = field(default_factory=list)
    kept_leased: list[ArtifactRef] = field(default_factory=list)  # unreferenced, but a live run uses them
    removed_leases: list[str] = field(default_factory=list)  # dead runs' leases (no heartbeat within their ttl)
    removed_quarantine: list[str] = field(default_factory=list)  # only with purge_quarantine_s
    finished_trash: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why): links, damage, unreadable docs


def _referenced(store: ArtifactStore) -> tuple[set[ArtifactRef], list[str]]:
    refs: set[ArtifactRef] = set()
    unreadable = []
    for job_id in store.jobs():
        try:
            doc = store.job(job_id)
        except DocumentDamaged as exc:
            unreadable.append(exc.relpath)
            continue
        except ArtifactNotFound:
            continue
        refs.update(ArtifactRef(stage, key) for stage, key in doc["artifacts"].items())
    return refs, unreadable


def referenced(store: ArtifactStore) -> set[ArtifactRef]:
    """Every artifact a readable job manifest refers to."""
    return _referenced(store)[0]


def _info_time(info: dict[str, Any]) -> float | None:
    t = info.get("mtime") or info.get("LastModified") or info.get("created")
    return t.timestamp() if hasattr(t, "timestamp") else (None if t is None else float(t))


def newest_mtime(store: ArtifactStore, path: str) -> float | None:
    """When ``path`` last changed: its lstat mtime (local); on object stores, where folders have no times,
    the newest time of the objects under it. None when there is nothing (or no time) to tell."""
    if store.local:
        return localfs.mtime(path)
    try:
        info = store.fs.info(path)
    except FileNotFoundError:
        return None
    if info.get("type") != "directory":
        return _info_time(info)
    times = [t for t in (_info_time(i) for i in store.fs.find(path, detail=True).values()) if t is not None]
    return max(times) if times else None


def _artifacts(store: ArtifactStore, report: GcReport) -> Iterator[tuple[ArtifactRef, str]]:
    """(ref, state): "ok", "incomplete" (no commit marker), "damaged"; links are reported, never entered."""
    if not store.local:
        for ref, ok in store.iter_artifacts(include_incomplete=True):
            yield ref, "ok" if ok else "incomplete"
        return
    for stage, k in localfs.entries(store.root, follow=True):
        if stage in RESERVED or stage.startswith("."):
            continue
        if k == localfs.LINK:
            report.skipped.append((stage, "symlinked stage folder: not followed"))
        if k != localfs.DIR:
            continue
        for prefix, pk in localfs.entries(store._p(stage)):
            if pk == localfs.LINK:
                report.skipped.append((f"{stage}/{prefix}", "symlinked prefix folder: not followed"))
            if pk != localfs.DIR:
                continue
            for key, ak in localfs.entries(store._p(stage, prefix)):
                ref = ArtifactRef(stage, key)
                if ak == localfs.LINK or key[:2] != prefix:
                    report.skipped.append((f"{stage}/{prefix}/{key}", "symlinked or misplaced artifact folder: "
                                           "not followed (verify --repair quarantines it)"))
                    continue
                if ak != localfs.DIR:
                    continue
                _, damage = store.presence(ref)
                if damage is None:
                    yield ref, "ok"
                elif localfs.kind(store._p(ref.path, COMMIT)) == localfs.ABSENT:
                    yield ref, "incomplete"
                else:
                    report.skipped.append((ref.path, f"damaged ({damage}): verify --repair quarantines it"))


def gc(store: ArtifactStore, *, keep_unreferenced: bool = False, min_age_s: float = 3600.0,
       dry_run: bool = False, purge_quarantine_s: float | None = None) -> GcReport:
    """Remove write leftovers and marker-less folders older than ``min_age_s``, dead runs' leases and (unless
    ``keep_unreferenced``) artifacts committed over ``min_age_s`` ago that no job refers to and no live lease
    protects; with ``purge_quarantine_s``, quarantine entries older than that (kept otherwise, for inspection).
    Raises :class:`storage.StoreNotFound` for a store that is not there."""
    store.require()
    report = GcReport()
    now = time.time()
    if not dry_run:
        report.finished_trash = store.finish_trash()
    book = LeaseBook(store)
    for info in book.read():
        if not info.alive(now):
            report.removed_leases.append(info.run)
            if not dry_run:
                _drop_dead_lease(store, book, info.run)
    protected = book.protected(now)
    held = young_unreadable(store, book, now)
    keep, bad_manifests = _referenced(store)
    report.skipped += [(p, "unreadable lease: no artifact removed") for p in held]
    report.skipped += [(p, "unreadable job manifest: no unreferenced artifact removed (verify --repair)")
                       for p in bad_manifests]

    def old(path: str) -> bool:
        m = newest_mtime(store, path)
        return m is not None and now - m >= min_age_s

    leased_keys = {p.rsplit("/", 1)[-1] for p in protected}
    for rel in _temp_entries(store, report):
        if posixpath.basename(rel).split(".")[0] not in leased_keys and old(store._p(rel)):
            report.removed_temp.append(store._p(rel))
            if not dry_run:
                _remove(store, store._p(rel))
    for ref, state in list(_artifacts(store, report)):
        if ref.path in protected:
            if state == "ok" and ref not in keep:
                report.kept_leased.append(ref)
            continue
        if held:
            continue
        if state == "incomplete":
            if old(store._p(ref.path)) and (dry_run or _delete_unleased(store, book, ref, report)):
                report.removed_incomplete.append(ref)
        elif (state == "ok" and not keep_unreferenced and not bad_manifests and ref not in keep
              and old(store._p(ref.path, COMMIT)) and (dry_run or _delete_unleased(store, book, ref, report))):
            report.removed_unreferenced.append(ref)
    if purge_quarantine_s is not None:
        _purge_quarantine(store, now - purge_quarantine_s, report, dry_run)
    return report


def _purge_quarantine(store: ArtifactStore, before: float, report: GcReport, dry_run: bool) -> None:
    for entry in store.quarantined():
        path = store._p(QUARANTINE, entry["name"])
        when = newest_mtime(store, f"{path}.json") or newest_mtime(store, path)
        if when is None or when > before:
            continue
        report.removed_quarantine.append(entry["name"])
        if dry_run:
            continue
        _remove(store, path)
        try:
            store.fs.rm_file(f"{path}.json")
        except FileNotFoundError:
            pass


def _temp_entries(store: ArtifactStore, report: GcReport) -> list[str]:
    """Relpaths of write leftovers: ``.tmp`` entries and documents' ``*.tmp`` files (never inside a link)."""
    out: list[str] = []
    if store.local:
        k = localfs.kind(store._p(TMP))
        if k not in (localfs.DIR, localfs.ABSENT):
            report.skipped.append((TMP, f"{TMP} is a {k}: not followed (verify --repair moves it aside)"))
        out += [f"{TMP}/{n}" for n, _ in localfs.entries(store._p(TMP))]
        dirs = [JOBS, LEASES] + [f"{INDEX}/{n}" for n, k in localfs.entries(store._p(INDEX)) if k == localfs.DIR]
        out += [f"{d}/{n}" for d in dirs for n, k in localfs.entries(store._p(d)) if k == localfs.FILE
                and n.endswith(".tmp")]
    else:
        try:
            out += [posixpath.relpath(p, store.root) for p in store.fs.ls(store._p(TMP), detail=False)]
        except FileNotFoundError:
            pass
    return out


def _remove(store: ArtifactStore, path: str) -> None:
    if store.local:
        dest = store._to_trash(path)
        if dest is not None:
            localfs.purge(dest)
    else:
        store.fs.rm(path, recursive=True)


def _delete_unleased(store: ArtifactStore, book: LeaseBook, ref: ArtifactRef, report: GcReport) -> bool:
    """Delete unless a lease protects ``ref`` now: leases are re-read under the exclusive lease lock, and the
    artifact leaves its place (rename into .trash) before the lock is released."""
    with store_lock(store, exclusive=True):
        if ref.path in book.protected():
            report.kept_leased.append(ref)
            return False
        if not store.local:
            store.delete(ref)
            return True
        dest = store._to_trash(store._p(ref.path))
    if dest is not None:
        localfs.purge(dest)
    return True


def _drop_dead_lease(store: ArtifactStore, book: LeaseBook, run: str) -> None:
    with store_lock(store, exclusive=True):
        if any(i.run == run and i.alive() for i in book.read()):
            return  # it came back to life (a heartbeat just now)
        try:
            store.fs.rm_file(store._p(LEASES, f"{run}.json"))
        except FileNotFoundError:
            pass
