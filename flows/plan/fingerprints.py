"""The fingerprint index: file stamps -> content digests, so a warm plan costs a ``stat`` and no hashing.

A fingerprint is a sha256 of a job input's paths and stamps (size, mtime, ctime, inode and a partial hash:
``storage.stamps``), never of its content. Entries live in batch documents under ``index/fingerprints/`` in the
store, written every ``FLUSH_EVERY`` new entries and at exit (one fsync per batch, not per job).

Memory follows the batches in use, not the catalog: a process keeps a directory of 8-byte fingerprint
prefixes -> batch (12 bytes an entry, sorted numpy arrays) and the last ``CACHED_BATCHES`` batches it read.
A plan reads fingerprints in catalog order, the order a previous plan of that catalog wrote them in, so a
warm re-plan reads each batch about once more. A hit is always checked against the full fingerprint in its
batch; a batch gone since (merged by another planner) is a miss, which only costs a re-hash.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import posixpath
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from storage.stamps import file_stamp
from storage.store import ArtifactStore

log = logging.getLogger("v2v.plan")

INDEX_VERSION = 2  # 2: stamps with ctime, inode and a partial hash; sources keyed by their bytes
INDEX_DIR = "index/fingerprints"
FLUSH_EVERY = 512  # new entries per batch document
MAX_BATCHES = 32  # more small batch documents than this are packed into full ones when the index is read
CACHED_BATCHES = 8  # batch documents kept decoded (LRU): ~4,000 entries

_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode  # json.dumps's, built once

Entry = dict[str, Any]


def fingerprint(kind: str, paths: list[Path], extra: Any = None) -> str:
    """What identifies these files' content cheaply (never a digest of the content itself)."""
    record = [INDEX_VERSION, kind, extra, [[os.path.abspath(p), *file_stamp(p)] for p in paths]]
    # Names, numbers and hex digests only: plain JSON is canonical here (and 3x cheaper than canonical_json).
    return hashlib.sha256(_ENCODE(record).encode()).hexdigest()


def _prefix(fp: str) -> int:
    return int.from_bytes(hashlib.blake2b(fp.encode(), digest_size=8).digest(), "little")


class FingerprintIndex:
    """fingerprint -> entry for one store: a prefix directory and a few decoded batches in memory."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self.lock = threading.Lock()
        self.loaded = False
        self.names: list[str] = []  # batch ordinal -> document name
        self.prefixes = np.zeros(0, np.uint64)  # sorted
        self.owners = np.zeros(0, np.int32)  # batch ordinal of each prefix
        self.unsorted: list[tuple[int, int]] = []  # (prefix, ordinal) added since the arrays were last sorted
        self.batches: OrderedDict[int, dict[str, Entry]] = OrderedDict()
        self.pending: dict[str, Entry] = {}

    def __len__(self) -> int:
        with self.lock:
            self._load()
            return len(self.prefixes) + len(self.unsorted) + len(self.pending)

    def get(self, fp: str) -> Entry | None:
        with self.lock:
            self._load()
            if fp in self.pending:
                return self.pending[fp]
            for ordinal in self._owners(_prefix(fp)):
                entry = self._batch(ordinal).get(fp)
                if entry is not None:
                    return entry
            return None

    def put(self, fp: str, entry: Entry) -> None:
        with self.lock:
            self._load()
            self.pending[fp] = entry
            full = len(self.pending) >= FLUSH_EVERY
        if full:
            self.flush()

    def flush(self) -> None:
        with self.lock:
            batch, self.pending = self.pending, {}
            if not batch:
                return
            name = self._write(batch)
            if name is not None:
                self._add(name, batch)

    # ---- internals (under the lock) -------------------------------------------------------------------
    def _write(self, entries: dict[str, Entry]) -> str | None:
        name = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}"
        try:
            self.store.put_json(f"{INDEX_DIR}/{name}.json", {"v": INDEX_VERSION, "entries": entries})
        except Exception as exc:  # a read-only store, say: the index is a cache, so only the next plan pays
            log.debug("fingerprint index not written (%s)", exc)
            return None
        return name

    def _add(self, name: str, entries: dict[str, Entry]) -> None:
        """Index a batch document (its entries stay decoded while it is among the recent ones)."""
        ordinal = len(self.names)
        self.names.append(name)
        self.unsorted.extend((_prefix(fp), ordinal) for fp in entries)
        self._cache(ordinal, entries)

    def _cache(self, ordinal: int, entries: dict[str, Entry]) -> None:
        self.batches[ordinal] = entries
        self.batches.move_to_end(ordinal)
        while len(self.batches) > CACHED_BATCHES:
            self.batches.popitem(last=False)

    def _owners(self, prefix: int) -> list[int]:
        """The batches that may hold a fingerprint with this prefix, newest first."""
        if self.unsorted:
            pairs = np.array(self.unsorted, dtype=np.uint64).reshape(-1, 2)
            prefixes = np.concatenate([self.prefixes, pairs[:, 0]])
            owners = np.concatenate([self.owners, pairs[:, 1].astype(np.int32)])
            order = np.argsort(prefixes, kind="stable")
            self.prefixes, self.owners, self.unsorted = prefixes[order], owners[order], []
        key = np.uint64(prefix)
        lo = int(np.searchsorted(self.prefixes, key, "left"))
        hi = int(np.searchsorted(self.prefixes, key, "right"))
        return sorted({int(o) for o in self.owners[lo:hi]}, reverse=True)

    def _batch(self, ordinal: int) -> dict[str, Entry]:
        entries = self.batches.get(ordinal)
        if entries is None:
            entries = self._read(self.names[ordinal]) or {}
            self._cache(ordinal, entries)
        else:
            self.batches.move_to_end(ordinal)
        return entries

    def _read(self, name: str) -> dict[str, Entry] | None:
        try:
            doc = self.store.get_json(f"{INDEX_DIR}/{name}.json", on_damage="quarantine")
        except Exception as exc:  # damaged and not even movable aside (read-only): rebuilt as needed
            log.debug("fingerprint index batch %s skipped (%s)", name, exc)
            return None
        if isinstance(doc, dict) and doc.get("v") == INDEX_VERSION and isinstance(doc.get("entries"), dict):
            return doc["entries"]
        return None

    def _load(self) -> None:
        """Read every batch once for its fingerprints' prefixes (the entries are dropped, not kept)."""
        if self.loaded:
            return
        self.loaded = True
        small: list[tuple[str, dict[str, Entry]]] = []
        for name in sorted(self.store.list_json(INDEX_DIR)):
            entries = self._read(name)
            if entries is None:
                continue
            if len(entries) < FLUSH_EVERY // 2:
                small.append((name, entries))
            self._add(name, entries)
        if len(small) > MAX_BATCHES:
            self._pack(small)

    def _pack(self, small: list[tuple[str, dict[str, Entry]]]) -> None:
        """Many small batches (many short plans) packed into full ones, in the order they were written; a
        planner racing this one loses nothing it wrote after the listing."""
        packed: dict[str, Entry] = {}
        try:
            for _, entries in small:
                packed.update(entries)
                if len(packed) >= FLUSH_EVERY:
                    self._publish(packed)
                    packed = {}
            if packed:
                self._publish(packed)
            for name, _ in small:
                try:
                    self.store.fs.rm_file(posixpath.join(self.store.root, INDEX_DIR, f"{name}.json"))
                except FileNotFoundError:
                    pass
        except Exception as exc:
            log.debug("fingerprint index not packed (%s)", exc)

    def _publish(self, entries: dict[str, Entry]) -> None:
        name = self._write(entries)
        if name is None:
            raise OSError("the fingerprint index cannot be written")
        self._add(name, entries)


_INDEXES: dict[str, FingerprintIndex] = {}
_INDEXES_LOCK = threading.Lock()


def index_for(store: ArtifactStore) -> FingerprintIndex:
    with _INDEXES_LOCK:
        if store.url not in _INDEXES:
            _INDEXES[store.url] = FingerprintIndex(store)
        return _INDEXES[store.url]


def forget_indexes() -> None:
    """Drop this process's indexes (the next lookup reads the store again, as a new process would)."""
    with _INDEXES_LOCK:
        _INDEXES.clear()


@atexit.register
def flush_indexes() -> None:
    """Write every index's pending entries (planning calls it at the end of a catalog; exit does too)."""
    for index in list(_INDEXES.values()):
        index.flush()
