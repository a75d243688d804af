"""Moving things aside without ever following a link: quarantine (kept for inspection, never served) and
atomic deletes (renamed into ``.trash``, then removed: a killed delete leaves nothing half in place, and the
next gc or verify finishes it)."""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from typing import TYPE_CHECKING, Any

from storage import localfs
from storage.errors import ArtifactDamaged
from storage.names import COMMIT, QUARANTINE, TRASH

if TYPE_CHECKING:
    from storage.store import ArtifactRef


def _stamp() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.{uuid.uuid4().hex[:8]}"


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Safekeeping:
    """Mixed into :class:`storage.store.ArtifactStore`."""

    fs: Any
    root: str
    local: bool
    url: str

    if TYPE_CHECKING:  # provided by ArtifactStore
        def _p(self, *parts: str) -> str: ...
        def presence(self, ref: ArtifactRef) -> tuple[bool, str | None]: ...

    # ---- the store's own folders ---------------------------------------------------------------------
    def _own_dir(self, *parts: str) -> str:
        """``root/parts...`` as real folders, created as needed. A symlink (or file) where one should be is
        moved into quarantine first: the store never writes through a link."""
        os.makedirs(self.root, exist_ok=True)
        path = self.root
        for i, part in enumerate(parts):
            path = posixpath.join(path, part)
            k = localfs.kind(path)
            if k == localfs.DIR:
                continue
            if k != localfs.ABSENT:
                rel = "/".join(parts[: i + 1])
                self._move_aside(path, rel, f"a {k} where the store keeps its folder {rel}")
            try:
                os.mkdir(path)
            except FileExistsError:
                if localfs.kind(path) != localfs.DIR:
                    raise
        return path

    def _move_aside(self, path: str, rel: str, reason: str) -> str | None:
        if rel == QUARANTINE:  # cannot be quarantined into itself: a link only points elsewhere, drop it
            if localfs.kind(path) == localfs.LINK:
                localfs.purge(path)
                return None
            os.rename(path, f"{path}.displaced.{_stamp()}")
            return None
        return self._quarantine_path(path, f"{rel.replace('/', '~')}.{_stamp()}",
                                     {"kind": "store folder", "path": rel, "reason": reason, "when": _now_iso()})

    def _quarantine_path(self, path: str, name: str, note: dict[str, Any]) -> str | None:
        """Rename ``path`` (a folder, file or link: never its target) into quarantine with a note beside it."""
        dest = posixpath.join(self._own_dir(QUARANTINE), name)
        with open(f"{dest}.json", "w") as fh:  # first: an entry never lacks its reason
            json.dump(note, fh, indent=1, sort_keys=True)
        try:
            os.rename(path, dest)
        except FileNotFoundError:  # someone else moved or deleted it first
            os.unlink(f"{dest}.json")
            return None
        return name

    # ---- quarantine ----------------------------------------------------------------------------------
    def quarantine(self, ref: ArtifactRef, reason: str) -> str | None:
        """Move a damaged artifact aside, atomically on a local store: it is never served again (``exists``
        says no, a fresh write of the same ref works) and is kept, with ``reason``, for inspection
        (:meth:`quarantined`). Returns the quarantine entry's name, or None when nothing was there."""
        note = {"kind": "artifact", "path": ref.path, "stage": ref.stage, "key": ref.key, "reason": reason,
                "when": _now_iso()}
        name = f"{ref.stage}.{ref.key}.{_stamp()}"
        if not self.local:
            return self._quarantine_remote(self._p(ref.path), name, note)
        for rel in (ref.stage, f"{ref.stage}/{ref.key[:2]}"):
            if localfs.kind(self._p(rel)) == localfs.LINK:  # move the link itself, never what it points to
                return self._quarantine_path(self._p(rel), f"{rel.replace('/', '~')}.{_stamp()}",
                                             {**note, "path": rel, "reason": f"symlinked folder ({reason})"})
        if localfs.kind(self._p(ref.path)) == localfs.ABSENT:
            return None
        return self._quarantine_path(self._p(ref.path), name, note)

    def quarantine_document(self, relpath: str, reason: str) -> str | None:
        """Move a damaged JSON document (job manifest, index entry, lease) aside, like :meth:`quarantine`."""
        note = {"kind": "document", "path": relpath, "reason": reason, "when": _now_iso()}
        name = f"doc.{relpath.replace('/', '~')}.{_stamp()}"
        if not self.local:
            return self._quarantine_remote(self._p(relpath), name, note)
        return self._quarantine_path(self._p(relpath), name, note)

    def _quarantine_remote(self, path: str, name: str, note: dict[str, Any]) -> str | None:
        """Object stores cannot rename: the marker goes first (never served again), then a copy and delete."""
        if not self.fs.exists(path):
            return None
        dest = self._p(QUARANTINE, name)
        marker = posixpath.join(path, COMMIT)
        if self.fs.isdir(path) and self.fs.exists(marker):
            note["commit_marker"] = self.fs.cat_file(marker).decode("utf-8", "replace")
            self.fs.rm_file(marker)
        self.fs.pipe_file(f"{dest}.json", json.dumps(note, indent=1, sort_keys=True).encode())
        self.fs.mv(path, dest, recursive=True)
        return name

    def quarantined(self) -> list[dict[str, Any]]:
        """Everything in quarantine: ``name``, ``path`` (where it was), ``reason``, ``when``, ``kind``."""
        qdir = self._p(QUARANTINE)
        if self.local:
            names = [n for n, _ in localfs.entries(qdir) if not n.endswith(".json")]
        else:
            try:
                names = sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(qdir, detail=False))
            except FileNotFoundError:
                names = []
            names = [n for n in names if not n.endswith(".json")]
        out = []
        for name in names:
            try:
                note = json.loads(self.fs.cat_file(posixpath.join(qdir, f"{name}.json")))
            except (OSError, ValueError):
                note = {"reason": "unknown (no readable note)"}
            out.append({**(note if isinstance(note, dict) else {}), "name": name})
        return out

    def _displace(self, ref: ArtifactRef, reason: str) -> None:
        """Clear a damaged folder out of a write's way (local). It is staged in quarantine and checked there:
        a concurrent writer of the same key may have renamed a complete copy in meanwhile, which goes back."""
        final = self._p(ref.path)
        _, damage = self.presence(ref)
        name = f"{ref.stage}.{ref.key}.{_stamp()}"
        staged = self._quarantine_path(final, name, {"kind": "artifact", "path": ref.path, "stage": ref.stage,
                                                     "key": ref.key, "reason": f"{damage or 'damaged'}; {reason}",
                                                     "when": _now_iso()})
        if staged is None:
            return
        path = self._p(QUARANTINE, staged)
        if localfs.kind(path) == localfs.DIR and all(
                localfs.kind(posixpath.join(path, f)) == localfs.FILE and os.path.getsize(posixpath.join(path, f))
                for f in (COMMIT, "zarr.json")):
            try:
                os.rename(path, final)  # it was the other writer's complete artifact
            except OSError:
                localfs.purge(path)  # and yet another copy is in place: identical, drop this one
            os.unlink(f"{path}.json")

    # ---- atomic deletes ------------------------------------------------------------------------------
    def _to_trash(self, path: str) -> str | None:
        """Rename into ``.trash`` (local): gone from its place in one step. None when it was not there."""
        dest = posixpath.join(self._own_dir(TRASH), f"{posixpath.basename(path)}.{uuid.uuid4().hex}")
        try:
            os.rename(path, dest)
        except FileNotFoundError:
            return None
        return dest

    def delete(self, ref: ArtifactRef) -> None:
        """Remove an artifact. Local: renamed into ``.trash`` (atomic), then removed without following links;
        object stores: the commit marker first, so a reader never takes a half-deleted artifact as complete."""
        path = self._p(ref.path)
        if self.local:
            for rel in (ref.stage, f"{ref.stage}/{ref.key[:2]}"):
                if localfs.kind(self._p(rel)) == localfs.LINK:
                    raise ArtifactDamaged(ref, f"{rel} is a symlink: not followed (quarantine it instead)")
            if localfs.kind(path) == localfs.ABSENT:
                return
            dest = self._to_trash(path)
            if dest is not None:
                localfs.purge(dest)
            return
        if self.fs.exists(path):
            if self.fs.exists(posixpath.join(path, COMMIT)):
                self.fs.rm_file(posixpath.join(path, COMMIT))
            self.fs.rm(path, recursive=True)

    def finish_trash(self) -> int:
        """Finish deletes a killed process left in ``.trash``; returns how many entries were removed."""
        trash = self._p(TRASH)
        if not self.local or localfs.kind(trash) != localfs.DIR:
            return 0
        done = 0
        for name, _ in localfs.entries(trash):
            localfs.purge(posixpath.join(trash, name))
            done += 1
        return done
