"""The store's small JSON documents (job manifests, index entries, leases): written atomically, and a damaged
one is reported as :class:`DocumentDamaged`, never parsed into nonsense."""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from storage import localfs
from storage.errors import ArtifactNotFound, DocumentDamaged
from storage.names import JOBS

if TYPE_CHECKING:
    from storage.store import ArtifactRef


class Documents:
    """Mixed into :class:`storage.store.ArtifactStore`."""

    fs: Any
    local: bool
    url: str

    if TYPE_CHECKING:  # provided by ArtifactStore and Safekeeping
        def _p(self, *parts: str) -> str: ...
        def _own_dir(self, *parts: str) -> str: ...
        def quarantine_document(self, relpath: str, reason: str) -> str | None: ...

    # ---- small JSON documents (job manifests, indexes, leases) ------------------------------------
    def put_json(self, relpath: str, obj: Any) -> None:
        data = json.dumps(obj, sort_keys=True, indent=1).encode()
        path = self._p(relpath)
        if self.local:
            self._own_dir(*[p for p in posixpath.dirname(relpath).split("/") if p])
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())  # the rename must never publish an empty file after a power cut
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)  # single-object writes are atomic on object stores

    def get_json(self, relpath: str, *, on_damage: Literal["raise", "quarantine", "ignore"] = "raise"
                 ) -> Any | None:
        """A document, or None when there is none. A truncated or non-JSON one raises
        :class:`DocumentDamaged` (``on_damage="raise"``), or is moved aside (``"quarantine"``: for caches such
        as the fingerprint index, which are simply rebuilt) or skipped (``"ignore"``), returning None."""
        try:
            raw = self.fs.cat_file(self._p(relpath))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except IsADirectoryError:
            what = "a folder, not a document"
        else:
            try:
                return json.loads(raw)
            except ValueError:  # JSONDecodeError and UnicodeDecodeError both
                what = "truncated or not JSON"
        if on_damage == "raise":
            raise DocumentDamaged(relpath, what)
        if on_damage == "quarantine":
            self.quarantine_document(relpath, what)
        return None

    def list_json(self, reldir: str) -> list[str]:
        if self.local:
            return [n[:-5] for n, k in localfs.entries(self._p(reldir)) if n.endswith(".json") and k == localfs.FILE]
        try:
            names = self.fs.ls(self._p(reldir), detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(n)[:-5] for n in names if n.endswith(".json"))

    # ---- jobs ----------------------------------------------------------------------------------------
    def record_job(self, job_id: str, refs: Mapping[str, ArtifactRef], extra: Mapping[str, Any] | None = None
                   ) -> None:
        doc = {"job": job_id, "artifacts": {s: r.key for s, r in refs.items()}, **(extra or {})}
        self.put_json(f"{JOBS}/{_safe_name(job_id)}.json", doc)

    def job(self, job_id: str) -> dict[str, Any]:
        """A job's manifest; :class:`DocumentDamaged` when it is truncated or malformed; ArtifactNotFound naming
        the jobs the store has when there is none (a listing: see :meth:`find_job`)."""
        doc = self.find_job(job_id)
        if doc is None:
            known = ", ".join(self.jobs()) or "none"
            raise ArtifactNotFound(f"no job {job_id!r} in {self.url} (known jobs: {known})")
        return doc

    def find_job(self, job_id: str) -> dict[str, Any] | None:
        """A job's manifest or None, without listing the others (planning asks this of every new job)."""
        relpath = f"{JOBS}/{_safe_name(job_id)}.json"
        doc = self.get_json(relpath)
        if doc is None:
            return None
        arts = doc.get("artifacts") if isinstance(doc, dict) else None
        if not isinstance(arts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in arts.items()):
            raise DocumentDamaged(relpath, "not a job manifest (no 'artifacts' mapping of stage to key)")
        return doc

    def jobs(self) -> list[str]:
        return self.list_json(JOBS)


def _safe_name(job_id: str) -> str:
    if not job_id or "/" in job_id or job_id.startswith(".") or len(job_id) > 200:
        raise ValueError(f"invalid job id {job_id!r}: use letters, digits, '-', '_' and '.'")
    return job_id
