"""Leases: what a running run uses, so that gc beside it deletes none of it.

A run takes a lease when it starts and protects every artifact it plans (cached or to compute) *before* it
checks whether they exist; gc keeps every artifact of a live lease::

    with store.lease(run_id) as lease:
        lease.protect(planned_refs)
        ...run...

The lease is a document ``.leases/<run>.json`` with a heartbeat timestamp, refreshed by a daemon thread every
``heartbeat_s``. A run that dies (even by SIGKILL) stops refreshing it: after ``ttl_s`` without a heartbeat gc
ignores the lease and removes it. On a local store, protecting and gc's deletes are ordered by a lock file
(``.leases/.lock``: shared for protect, exclusive around each delete, which re-reads the leases first), so an
artifact is either protected before gc looks at it or already gone when the run checks for it (and then
recomputed). Object stores have no locks: there a delete racing a protect within milliseconds is possible.
On a read-only store the lease is inactive (nothing can delete there either) and the run goes on.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from storage import localfs
from storage.names import LEASES

if TYPE_CHECKING:
    from storage.store import ArtifactRef, ArtifactStore

LEASE_TTL_S = float(os.environ.get("V2V_LEASE_TTL_S", "600"))
LOCK = ".lock"
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


@contextlib.contextmanager
def store_lock(store: ArtifactStore, *, exclusive: bool) -> Iterator[None]:
    """The lease lock of a local store (a no-op on object stores)."""
    if not store.local:
        yield
        return
    import fcntl

    path = posixpath.join(store._own_dir(LEASES), LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


@dataclass(frozen=True)
class LeaseInfo:
    """One lease document as gc sees it."""

    run: str
    refs: frozenset[str]  # ArtifactRef.path of each protected artifact
    heartbeat: float
    ttl_s: float
    pid: int = 0
    host: str = ""
    started: float = 0.0

    def alive(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) - self.heartbeat <= self.ttl_s


class Lease:
    """Protects artifacts of one run from gc while the run lives; see the module docstring."""

    def __init__(self, store: ArtifactStore, run_id: str | None = None, *, ttl_s: float | None = None,
                 heartbeat_s: float | None = None) -> None:
        from storage.documents import _safe_name

        self.store = store
        self.run_id = _safe_name(run_id or f"run-{uuid.uuid4().hex[:12]}")
        self.ttl_s = float(ttl_s if ttl_s is not None else LEASE_TTL_S)
        self.heartbeat_s = float(heartbeat_s) if heartbeat_s is not None else self.ttl_s / 4
        self.relpath = f"{LEASES}/{self.run_id}.json"
        self.refs: set[str] = set()
        self.started = time.time()
        self.active = True  # False on a read-only store
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Lease:
        self.refresh()
        if self.active and self.heartbeat_s > 0:
            self._thread = threading.Thread(target=self._beat, name=f"v2v-lease-{self.run_id}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def protect(self, refs: Iterable[ArtifactRef]) -> None:
        """Add artifacts (written at once: they are protected when this returns)."""
        with self._lock:
            new = {r.path for r in refs} - self.refs
            if not new:
                return
            self.refs |= new
        self.refresh()

    def unprotect(self, refs: Iterable[ArtifactRef]) -> None:
        """Stop protecting artifacts (a finished job's: its manifest references them now)."""
        with self._lock:
            gone = {r.path for r in refs} & self.refs
            if not gone:
                return
            self.refs -= gone
        self.refresh()

    def refresh(self) -> None:
        """Write the lease with a fresh heartbeat."""
        if not self.active:
            return
        with self._lock:
            doc: dict[str, Any] = {"run": self.run_id, "pid": os.getpid(), "host": socket.gethostname(),
                                   "started": self.started, "heartbeat": time.time(), "ttl_s": self.ttl_s,
                                   "refs": sorted(self.refs)}
            try:
                with store_lock(self.store, exclusive=False):
                    self.store.put_json(self.relpath, doc)
            except OSError as exc:
                if exc.errno not in _READ_ONLY:
                    raise
                self.active = False  # a read-only store: nothing can delete there either

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.refresh()
            except Exception:  # a full disk must not kill the run from this thread; the next beat retries
                continue

    def release(self) -> None:
        """Stop the heartbeat and remove the lease (gc may then delete what no job refers to)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.active:
            with contextlib.suppress(FileNotFoundError, OSError):
                self.store.fs.rm_file(self.store._p(self.relpath))


def parse_lease(doc: Any) -> LeaseInfo | None:
    """A lease document as :class:`LeaseInfo`, or None when it is not one."""
    try:
        return LeaseInfo(run=str(doc["run"]), refs=frozenset(str(r) for r in doc["refs"]),
                         heartbeat=float(doc["heartbeat"]), ttl_s=float(doc["ttl_s"]), pid=int(doc.get("pid", 0)),
                         host=str(doc.get("host", "")), started=float(doc.get("started", 0.0)))
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class LeaseBook:
    """The store's leases, re-read cheaply (a document is parsed again only when its stat changed)."""

    store: ArtifactStore
    _cache: dict[str, tuple[Any, LeaseInfo | None]] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)  # relpaths of lease documents that are not leases

    def read(self) -> list[LeaseInfo]:
        out, self.unreadable = [], []
        names = self.store.list_json(LEASES)
        for name in names:
            relpath = f"{LEASES}/{name}.json"
            stamp = self._stamp(relpath)
            hit = self._cache.get(relpath)
            if hit is None or hit[0] != stamp or stamp is None:
                info = parse_lease(self.store.get_json(relpath, on_damage="ignore"))
                self._cache[relpath] = hit = (stamp, info)
            if hit[1] is None:
                self.unreadable.append(relpath)
            else:
                out.append(hit[1])
        return out

    def _stamp(self, relpath: str) -> Any:
        if not self.store.local:
            return None  # no cheap stat worth trusting: always re-read
        try:
            st = os.lstat(self.store._p(relpath))
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def protected(self, now: float | None = None) -> set[str]:
        """Paths of every artifact a live lease protects."""
        return {p for info in self.read() if info.alive(now) for p in info.refs}


def leases(store: ArtifactStore) -> list[LeaseInfo]:
    """Every readable lease of the store, live or dead."""
    return LeaseBook(store).read()


def young_unreadable(store: ArtifactStore, book: LeaseBook, now: float) -> list[str]:
    """Unreadable lease documents young enough to belong to a live run: gc then deletes no artifact."""
    out = []
    for relpath in book.unreadable:
        m = localfs.mtime(store._p(relpath)) if store.local else None
        if m is None or now - m <= LEASE_TTL_S:
            out.append(relpath)
    return out
