"""Store upkeep: verify checksums, collect garbage."""

from __future__ import annotations

import posixpath
import time
from dataclasses import dataclass, field

from storage.keys import array_digest
from storage.store import TMP, ArtifactRef, ArtifactStore


@dataclass
class VerifyReport:
    checked: int = 0
    damaged: list[tuple[ArtifactRef, str]] = field(default_factory=list)


def verify(store: ArtifactStore) -> VerifyReport:
    """Re-read every committed artifact and compare each array with its recorded checksum."""
    report = VerifyReport()
    for ref, _ in store.iter_artifacts():
        report.checked += 1
        try:
            expected = store.commit_record(ref)["checksums"]
            arrays = store.read(ref)
        except Exception as exc:  # unreadable chunk, missing metadata: all damage to report
            report.damaged.append((ref, f"unreadable: {exc}"))
            continue
        missing = sorted(set(expected) - set(arrays))
        if missing:
            report.damaged.append((ref, f"missing arrays {missing}"))
        for name, digest in expected.items():
            if name in arrays and array_digest(arrays[name]) != digest:
                report.damaged.append((ref, f"checksum mismatch in {name!r}"))
    return report


@dataclass
class GcReport:
    removed_temp: list[str] = field(default_factory=list)
    removed_incomplete: list[ArtifactRef] = field(default_factory=list)
    removed_unreferenced: list[ArtifactRef] = field(default_factory=list)


def referenced(store: ArtifactStore) -> set[ArtifactRef]:
    refs: set[ArtifactRef] = set()
    for job_id in store.jobs():
        for stage, key in store.job(job_id)["artifacts"].items():
            refs.add(ArtifactRef(stage, key))
    return refs


def gc(store: ArtifactStore, *, keep_unreferenced: bool = False, min_age_s: float = 3600.0,
       dry_run: bool = False) -> GcReport:
    """Remove write leftovers older than ``min_age_s`` (younger ones may be writes in progress),
    uncommitted artifact folders, and (unless ``keep_unreferenced``) artifacts no job refers to."""
    report = GcReport()
    now = time.time()

    def old_enough(path: str) -> bool:
        try:
            info = store.fs.info(path)
        except FileNotFoundError:
            return False
        mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
        if hasattr(mtime, "timestamp"):
            mtime = mtime.timestamp()
        return mtime is None or now - float(mtime) >= min_age_s

    for path in store._ls_dirs(posixpath.join(store.root, TMP)):
        if old_enough(path):
            report.removed_temp.append(path)
            if not dry_run:
                store.fs.rm(path, recursive=True)
    keep = referenced(store)
    for ref, complete in store.iter_artifacts(include_incomplete=True):
        if not complete:
            if old_enough(posixpath.join(store.root, ref.path)):
                report.removed_incomplete.append(ref)
                if not dry_run:
                    store.delete(ref)
        elif not keep_unreferenced and ref not in keep:
            report.removed_unreferenced.append(ref)
            if not dry_run:
                store.delete(ref)
    return report
