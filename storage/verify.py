"""``verify``: find every kind of damage in a store, and with ``repair`` move it aside.

What it checks: each artifact folder (commit marker present and readable, metadata files present, parsable and
consistent, every chunk file present, no symlink, every array decoded and matching its recorded sha256), the
store's own folders (``.tmp``, ``jobs``... a symlink or file there is damage, never followed), stray temporary
folders and files older than ``min_age_s`` (younger ones may be writes in progress), job manifests, index
entries and leases (truncated or malformed). Deletes a killed gc left in ``.trash`` are finished first.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from storage import localfs
from storage.errors import ArtifactDamaged, ArtifactNotFound, DocumentDamaged
from storage.gc import newest_mtime
from storage.integrity import structure_problems
from storage.leases import LOCK, parse_lease
from storage.names import COMMIT, INDEX, JOBS, LEASES, QUARANTINE, RESERVED, TMP, TRASH
from storage.store import ArtifactRef, ArtifactStore

# Finding kinds
ARTIFACT, INCOMPLETE, SYMLINK, STRAY, TEMP = "artifact", "incomplete", "symlink", "stray", "temp"
MANIFEST, INDEX_ENTRY, LEASE, UNFINISHED = "manifest", "index", "lease", "trash"


@dataclass(frozen=True)
class Finding:
    """One problem: ``path`` relative to the store root (``ref.path`` for artifacts), ``repaired`` says what
    ``repair`` did (None: nothing, or not asked)."""

    kind: str
    path: str
    what: str
    ref: ArtifactRef | None = None
    repaired: str | None = None


@dataclass
class VerifyReport:
    checked: int = 0  # artifacts read in full
    documents: int = 0  # JSON documents parsed
    findings: list[Finding] = field(default_factory=list)
    finished_trash: int = 0  # deletes a killed process left, finished
    quarantined: list[dict[str, Any]] = field(default_factory=list)  # the quarantine, after this run

    @property
    def clean(self) -> bool:
        return not self.findings

    @property
    def damaged(self) -> list[tuple[Finding, str]]:
        """(finding, what) pairs: a finding has ``.path`` as an ArtifactRef has."""
        return [(f, f.what) for f in self.findings]


def verify(store: ArtifactStore, *, repair: bool = False, min_age_s: float = 3600.0, data: bool = True
           ) -> VerifyReport:
    """Check the whole store (``data``: decode every array and compare its checksum; else structure only).
    Raises :class:`storage.StoreNotFound` for a store that is not there (and creates nothing)."""
    store.require()
    return _Verifier(store, repair, min_age_s, data).run()


class _Verifier:
    def __init__(self, store: ArtifactStore, repair: bool, min_age_s: float, data: bool) -> None:
        self.store, self.repair, self.min_age_s, self.data = store, repair, min_age_s, data
        self.report = VerifyReport()
        self.now = time.time()

    def add(self, kind: str, path: str, what: str, ref: ArtifactRef | None = None,
            fix: Callable[[], str | None] | None = None) -> None:
        repaired = None
        if self.repair and fix is not None:
            try:
                repaired = fix() or "already gone"
            except OSError as exc:
                repaired = f"repair failed: {exc}"
        self.report.findings.append(Finding(kind, path, what, ref, repaired))

    # ---- repairs -----------------------------------------------------------------------------------
    def _quarantine(self, ref: ArtifactRef, what: str) -> Callable[[], str | None]:
        return lambda: _said("quarantined as", self.store.quarantine(ref, what))

    def _quarantine_doc(self, rel: str, what: str) -> Callable[[], str | None]:
        return lambda: _said("quarantined as", self.store.quarantine_document(rel, what))

    def _aside(self, rel: str, what: str) -> Callable[[], str | None]:
        return lambda: _said("quarantined as", self.store._move_aside(self.store._p(rel), rel, what)) or "removed link"

    def _remove(self, rel: str) -> Callable[[], str | None]:
        def fix() -> str:
            dest = self.store._to_trash(self.store._p(rel))
            if dest is not None:
                localfs.purge(dest)
            return "removed"
        return fix

    # ---- the walk ------------------------------------------------------------------------------------
    def run(self) -> VerifyReport:
        st = self.store
        try:
            self.report.finished_trash = st.finish_trash()
        except OSError as exc:
            self.add(UNFINISHED, TRASH, f"could not finish the deletes left in {TRASH}: {exc}")
        if st.local:
            self._local_top()
            self._local_artifacts()
        else:
            self._remote_artifacts()
        self._documents()
        self.report.quarantined = st.quarantined()
        return self.report

    def _old(self, path: str) -> bool:
        m = localfs.mtime(path)
        return m is not None and self.now - m >= self.min_age_s

    def _local_top(self) -> None:
        st = self.store
        for name, k in localfs.entries(st.root, follow=True):
            if name in RESERVED and k != localfs.DIR:
                what = f"{name} is a {k}, not the store's own folder (not followed)"
                self.add(SYMLINK if k == localfs.LINK else STRAY, name, what, fix=self._aside(name, what))
            elif not name.startswith(".") and name not in RESERVED and k == localfs.LINK:
                what = "symlinked stage folder (not followed)"
                self.add(SYMLINK, name, what, fix=self._aside(name, what))
        for name, k in localfs.entries(st._p(TMP)):
            rel = f"{TMP}/{name}"
            if k == localfs.LINK:
                self.add(SYMLINK, rel, "symlink in .tmp (not followed)", fix=self._remove(rel))
            elif self._old(st._p(rel)):
                self.add(TEMP, rel, "leftover of an interrupted write", fix=self._remove(rel))

    def _local_artifacts(self) -> None:
        st = self.store
        for stage, k in localfs.entries(st.root, follow=True):
            if k != localfs.DIR or stage in RESERVED or stage.startswith("."):
                continue
            for prefix, pk in localfs.entries(st._p(stage)):
                rel = f"{stage}/{prefix}"
                if pk != localfs.DIR:
                    what = "symlinked prefix folder (not followed)" if pk == localfs.LINK else f"stray {pk}"
                    self.add(SYMLINK if pk == localfs.LINK else STRAY, rel, what, fix=self._aside(rel, what))
                    continue
                for key, ak in localfs.entries(st._p(rel)):
                    ref = ArtifactRef(stage, key)
                    if key[:2] != prefix:
                        what = f"misplaced: {key} is not under its prefix {key[:2]}"
                        self.add(STRAY, f"{rel}/{key}", what, fix=self._aside(f"{rel}/{key}", what))
                    elif ak == localfs.LINK:
                        what = "symlinked artifact folder (not followed)"
                        self.add(SYMLINK, ref.path, what, ref, self._quarantine(ref, what))
                    elif ak != localfs.DIR:
                        what = f"a {ak} where an artifact folder should be"
                        self.add(STRAY, ref.path, what, ref, self._quarantine(ref, what))
                    else:
                        self._artifact(ref)

    def _remote_artifacts(self) -> None:
        for ref, complete in self.store.iter_artifacts(include_incomplete=True):
            if complete:
                self._artifact(ref)
                continue
            mtime = newest_mtime(self.store, self.store._p(ref.path))
            if mtime is not None and self.now - mtime >= self.min_age_s:
                what = f"no commit marker ({COMMIT}): an interrupted write or delete"
                self.add(INCOMPLETE, ref.path, what, ref, self._quarantine(ref, what))

    def _artifact(self, ref: ArtifactRef) -> None:
        st = self.store
        _, damage = st.presence(ref)
        if damage:
            kind = INCOMPLETE if damage.startswith("no commit marker") else ARTIFACT
            self.add(kind, ref.path, damage, ref, self._quarantine(ref, damage))
            return
        try:
            record = st.commit_record(ref)
            problems = structure_problems(st, ref, record)
            if not problems and self.data:
                st.read(ref)
        except ArtifactDamaged as exc:
            problems = [exc.what]
        except ArtifactNotFound:  # removed meanwhile (a concurrent gc)
            return
        self.report.checked += 1
        if problems:
            what = "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
            self.add(ARTIFACT, ref.path, what, ref, self._quarantine(ref, what))

    # ---- documents -----------------------------------------------------------------------------------
    def _docs(self, reldir: str) -> Iterator[tuple[str, str]]:
        """(relpath, kind) of the entries of a document folder."""
        st = self.store
        if st.local:
            for name, k in localfs.entries(st._p(reldir)):
                yield f"{reldir}/{name}", k
            return
        try:
            for e in st.fs.ls(st._p(reldir), detail=True):
                name = posixpath.basename(e["name"].rstrip("/"))
                yield f"{reldir}/{name}", localfs.DIR if e["type"] == "directory" else localfs.FILE
        except FileNotFoundError:
            return

    def _documents(self) -> None:
        folders = [(JOBS, MANIFEST)] + [(rel, INDEX_ENTRY) for rel, k in self._docs(INDEX) if k == localfs.DIR]
        folders.append((LEASES, LEASE))
        for reldir, kind in folders:
            for rel, k in self._docs(reldir):
                name = posixpath.basename(rel)
                if k == localfs.LINK:
                    what = "symlinked document (not followed)"
                    self.add(SYMLINK, rel, what, fix=self._quarantine_doc(rel, what))
                elif k == localfs.FILE and name.endswith(".tmp"):
                    if not self.store.local or self._old(self.store._p(rel)):
                        self.add(TEMP, rel, "leftover of an interrupted document write", fix=self._remove_doc(rel))
                elif k == localfs.FILE and name.endswith(".json"):
                    self._document(rel, kind)
                elif kind == LEASE and name == LOCK:
                    continue

    def _remove_doc(self, rel: str) -> Callable[[], str | None]:
        if self.store.local:
            return self._remove(rel)
        return lambda: (self.store.fs.rm_file(self.store._p(rel)), "removed")[1]

    def _document(self, rel: str, kind: str) -> None:
        st = self.store
        self.report.documents += 1
        try:
            doc = st.get_json(rel)
            if kind == MANIFEST:
                st.job(posixpath.basename(rel)[:-5])
            elif kind == LEASE and parse_lease(doc) is None:
                raise DocumentDamaged(rel, "not a lease (run, refs, heartbeat, ttl_s)")
            elif kind == INDEX_ENTRY and not isinstance(doc, dict):
                raise DocumentDamaged(rel, "not an index entry")
        except DocumentDamaged as exc:
            what = exc.what
        except ArtifactNotFound:
            return  # removed meanwhile
        else:
            return
        self.add(kind, rel, what, fix=self._quarantine_doc(rel, what))


def _said(prefix: str, name: str | None) -> str | None:
    return f"{prefix} {QUARANTINE}/{name}" if name else None
