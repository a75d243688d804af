"""The store as one worker process sees it: recent arrays kept in memory, artifact writes behind the compute.

Artifacts are immutable (content-addressed), so a copy from memory equals a read from the store. A stage
usually reads what the previous one wrote a moment ago in the same process: :class:`ArrayCache` spares
decoding it again. With ``write_later`` (in-process executors only: inline and Prefect's thread runner) the
commit runs on one background writer thread while the next stage computes; the arrays stay readable from
memory until it is committed, and ``flush`` waits for (and re-raises the errors of) the writes a job made.
Commits keep their order (one FIFO writer), so after a crash the store holds a prefix of the work, each
artifact complete or absent as always. Ray workers write synchronously: their consumers may be other
processes.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np

from storage.store import ArtifactRef, ArtifactStore


class CommitError(RuntimeError):
    """An artifact computed in this process could not be committed to the store."""


class ArrayCache:
    """Recently written or read artifact arrays of this process, up to a byte budget (LRU).

    Budget: ``$V2V_ARRAY_CACHE_MB`` (default 512; 0 disables).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.items: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self.names: dict[str, tuple[str, ...]] = {}  # key -> every array name of that artifact
        self.size = 0
        self.lock = threading.Lock()

    def get(self, key: str, name: str) -> np.ndarray | None:
        with self.lock:
            arr = self.items.get((key, name))
            if arr is None:
                return None
            self.items.move_to_end((key, name))
            return arr.copy()  # stages may write into their inputs

    def get_all(self, key: str) -> dict[str, np.ndarray] | None:
        """Every array of one artifact, when all of them are cached."""
        names = self.names.get(key)
        if names is None:
            return None
        hits = {n: self.get(key, n) for n in names}
        return hits if all(v is not None for v in hits.values()) else None  # type: ignore[return-value]

    def put_all(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        self.names[key] = tuple(arrays)
        for name, arr in arrays.items():
            self.put(key, name, arr)

    def drop(self, keys: Iterable[str]) -> None:
        """Forget these artifacts' arrays (no job in flight reads them any more)."""
        with self.lock:
            for key in keys:
                for name in self.names.pop(key, ()):
                    arr = self.items.pop((key, name), None)
                    if arr is not None:
                        self.size -= arr.nbytes

    def put(self, key: str, name: str, arr: np.ndarray) -> None:
        if arr.nbytes > self.max_bytes:
            return
        with self.lock:
            if (key, name) in self.items:
                return
            self.items[(key, name)] = arr.copy()
            self.size += arr.nbytes
            while self.size > self.max_bytes:
                _, old = self.items.popitem(last=False)
                self.size -= old.nbytes


ARRAYS = ArrayCache(int(float(os.environ.get("V2V_ARRAY_CACHE_MB", "512")) * 2**20))
# Uncommitted arrays held for the writer before write_later waits for it (backpressure).
PENDING_MAX_BYTES = int(float(os.environ.get("V2V_WRITE_BEHIND_MB", "1024")) * 2**20)


class _Pending(NamedTuple):
    """An artifact handed to the writer thread and not yet committed (or failed, until a flush reports it)."""

    future: cf.Future[Any]
    arrays: dict[str, np.ndarray]
    stage: str
    nbytes: int


class WorkerStore:
    """An :class:`ArtifactStore` reading through :data:`ARRAYS` and able to commit behind the compute."""

    def __init__(self, store: ArtifactStore) -> None:
        self._store = store
        self._writer: cf.ThreadPoolExecutor | None = None
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def __reduce__(self) -> tuple[Any, ...]:
        return self._store.__reduce__()

    def exists(self, ref: ArtifactRef) -> bool:
        return ref.key in self._pending or self._store.exists(ref)

    def read(self, ref: ArtifactRef, names: list[str] | None = None) -> dict[str, np.ndarray]:
        pending = self._pending.get(ref.key)
        if pending is not None:
            arrays = pending.arrays
            return {n: arrays[n].copy() for n in (names if names is not None else arrays)}
        if names is None:
            hits = ARRAYS.get_all(ref.key)
            if hits is not None:
                return hits
            out = self._store.read(ref)
            ARRAYS.put_all(ref.key, out)
            return out
        hits = {n: ARRAYS.get(ref.key, n) for n in names}
        if all(v is not None for v in hits.values()):
            return hits  # type: ignore[return-value]
        out = self._store.read(ref, names)
        for n, arr in out.items():
            ARRAYS.put(ref.key, n, arr)
        return out

    def attrs(self, ref: ArtifactRef) -> dict[str, Any]:
        self.flush([ref.key])  # the commit record exists once written
        return self._store.attrs(ref)

    def write(self, ref: ArtifactRef, arrays: Mapping[str, np.ndarray], *args: Any, **kwargs: Any) -> ArtifactRef:
        result = self._store.write(ref, arrays, *args, **kwargs)
        ARRAYS.put_all(ref.key, arrays)
        return result

    def write_later(self, ref: ArtifactRef, arrays: Mapping[str, np.ndarray], *args: Any, **kwargs: Any
                    ) -> ArtifactRef:
        """Commit on the writer thread; until then reads of ``ref`` come from ``arrays``."""
        held = dict(arrays)
        with self._lock:
            if ref.key in self._pending:
                return ref
            if self._writer is None:
                self._writer = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="v2v-writer")
            future = self._writer.submit(self._store.write, ref, held, *args, **kwargs)
            self._pending[ref.key] = _Pending(future, held, ref.stage, sum(a.nbytes for a in held.values()))
        future.add_done_callback(lambda f: self._done(ref.key, f))
        self._backpressure()
        return ref

    def _done(self, key: str, future: cf.Future[Any]) -> None:
        if future.exception() is None:  # failed writes stay pending until a flush reports them
            with self._lock:
                # Cached before it stops being pending: reads never fall through to the disk.
                ARRAYS.put_all(key, self._pending[key].arrays)
                del self._pending[key]

    def _backpressure(self) -> None:
        """Wait for the oldest commits while the unfinished ones hold more than ``PENDING_MAX_BYTES`` (failed
        ones, kept until a flush reports them, cannot be waited for)."""
        while True:
            with self._lock:
                queued = [p for p in self._pending.values() if not p.future.done()]
            if len(queued) <= 1 or sum(p.nbytes for p in queued) <= PENDING_MAX_BYTES:
                return
            cf.wait([queued[0].future])

    def flush(self, keys: Iterable[str] | None = None) -> None:
        """Wait for the given (default: all) pending commits; raise the first failure among them."""
        with self._lock:
            wanted = list(self._pending) if keys is None else [k for k in keys if k in self._pending]
            pending = [(k, self._pending[k]) for k in wanted]
        for key, item in pending:
            exc = item.future.exception()
            if exc is not None:
                with self._lock:
                    self._pending.pop(key, None)
                raise CommitError(f"store: the {item.stage} artifact {key[:12]} could not be committed: "
                                  f"{type(exc).__name__}: {exc}") from exc


_STORES: dict[tuple[str, str], WorkerStore] = {}
_STORES_LOCK = threading.Lock()


def store_for(url: str, options: dict[str, Any] | None = None) -> WorkerStore:
    """One store object per process and URL (workers reopen by URL).

    Locked: concurrent first calls (the first stage tasks of a run start together) must share one object,
    or a stage could look for an artifact in another object's pending writes and find it nowhere."""
    key = (url, repr(sorted((options or {}).items())))
    with _STORES_LOCK:
        if key not in _STORES:
            _STORES[key] = WorkerStore(ArtifactStore(url, **(options or {})))
        return _STORES[key]


def forget_arrays(keys: Iterable[str]) -> None:
    """Drop these artifacts from this process's array cache: the run has ended every job that reads them, so
    memory follows the jobs in flight rather than filling the cache's budget with finished work."""
    ARRAYS.drop(keys)


def flush_all() -> None:
    """Wait for everything written behind in this process (each job's own flush has reported its errors)."""
    for store in list(_STORES.values()):
        store.flush()
