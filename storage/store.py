"""The content-addressed artifact store: one Zarr v3 group per artifact, over any fsspec URL.

Layout under the root URL::

    <stage>/<key[:2]>/<key>/            one artifact (Zarr v3 group, consolidated metadata)
    <stage>/<key[:2]>/<key>/v2v.commit  written last: the artifact is complete (its record: checksums, params)
    .tmp/<key>.<uuid>/                  local filesystems only: a write in progress
    .trash/                             local: deletes in progress (renamed here, then removed)
    .quarantine/<name>[.json]           damaged artifacts and documents moved aside, with a note saying why
    .leases/<run>.json                  what running runs use: gc keeps it (storage.leases)
    jobs/<job id>.json                  which artifact each stage of a job uses (for views and gc)
    index/<name>/<id>.json              small lookup documents (e.g. source file fingerprint -> key)

An artifact is visible only once complete. On a local filesystem it is written under ``.tmp`` and renamed
into place (atomic, and the loser of a race simply drops its copy); on object stores the commit marker is
written last and readers ignore groups without it. Content is deterministic for a key, so two writers of
one key leave one valid artifact either way.

Nothing on disk is trusted: :meth:`ArtifactStore.read` checks every array against the checksum recorded at
commit, and a damaged artifact raises :class:`ArtifactDamaged` (``quarantine`` moves it aside). Inside the root
nothing is a symlink (the root itself may be one); a link where the store keeps its own folders is damage,
never followed. The root is created by the first write, never by opening or inspecting a store.
"""

from __future__ import annotations

import json
import os
import posixpath
import stat
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from storage import localfs
from storage.documents import Documents
from storage.errors import ArtifactDamaged, ArtifactNotFound, DocumentDamaged, StoreNotFound
from storage.keys import array_digest
from storage.names import COMMIT, INDEX, JOBS, LEASES, QUARANTINE, RESERVED, TMP, TRASH
from storage.safekeeping import Safekeeping

__all__ = ["COMMIT", "INDEX", "JOBS", "LEASES", "QUARANTINE", "TMP", "TRASH", "ArtifactDamaged", "ArtifactNotFound",
           "ArtifactRef", "ArtifactStore", "DocumentDamaged", "StoreNotFound", "open_store"]

DEFAULT_STORE = "./v2v-store"
# 2: a crc32c per chunk and every chunk stored (an absent chunk file is damage, never an all-fill chunk).
LAYOUT = 2
# Leading dims chunked one entry per chunk (a frame, a flow pair); anything else is one chunk.
FRAME_DIMS = frozenset({"frame", "pair", "mask_frame"})
# What zarr, numcodecs and json raise on damaged bytes or metadata (zarr's own errors are ValueErrors). Not
# PermissionError or network errors: those are not damage and must not get a good artifact quarantined.
DAMAGE_ERRORS = (ValueError, RuntimeError, KeyError, IndexError, TypeError, EOFError, FileNotFoundError,
                 NotADirectoryError, IsADirectoryError, UnicodeDecodeError)

# We rely on zarr-python's consolidated metadata to open artifacts without listing (object stores).
warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")


_ZARR_CONFIGURED: list[bool] = []


def _zarr() -> Any:
    """zarr, configured once per process for whole-artifact reads and writes.

    zarr-python encodes, decodes and stores chunks in batches of ``codec_pipeline.batch_size`` (default 1:
    one asyncio round trip per chunk). An artifact is written and read whole, so one batch per array
    (bench/store.py: about 1.4x faster on 16-frame arrays)."""
    import zarr

    if not _ZARR_CONFIGURED:
        zarr.config.set({"codec_pipeline.batch_size": 64})
        _ZARR_CONFIGURED.append(True)
    return zarr


@dataclass(frozen=True)
class ArtifactRef:
    """A small, picklable reference to a stored artifact (what Prefect persists)."""

    stage: str
    key: str

    @property
    def path(self) -> str:
        return f"{self.stage}/{self.key[:2]}/{self.key}"


def _library_versions() -> dict[str, str]:
    import numcodecs
    import zarr

    return {"numpy": np.__version__, "zarr": zarr.__version__, "numcodecs": numcodecs.__version__}


def _file_problem(path: str, label: str) -> str | None:
    """Why a file the store needs is unusable (absent, a link, empty), or None."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return f"no {label}"
    if not stat.S_ISREG(st.st_mode):
        return f"{label} is a symlink" if stat.S_ISLNK(st.st_mode) else f"{label} is not a file"
    return f"empty {label}" if st.st_size == 0 else None


def _check_array_meta(path: str, name: str, shape: tuple[int, ...]) -> None:
    """An array's own zarr.json (a local file of a few hundred bytes) is there and agrees on the shape."""
    with open(path, "rb") as fh:
        meta = json.loads(fh.read())
    if not isinstance(meta, dict) or tuple(meta.get("shape", ())) != tuple(shape):
        raise ValueError(f"{name}/zarr.json disagrees with the group metadata")


class ArtifactStore(Safekeeping, Documents):
    def __init__(self, url: str | os.PathLike[str] = DEFAULT_STORE, **storage_options: Any) -> None:
        url = os.fspath(url)
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.root = os.path.abspath(root) if self.local else root.rstrip("/")
        self.url = self.root if self.local else url.rstrip("/")
        self.storage_options = storage_options

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable for Ray workers: reopen by URL
        return (_reopen, (self.url, self.storage_options))

    # ---- the store itself ----------------------------------------------------------------------------
    def present(self) -> bool:
        """Whether anything is stored at the URL (a local root folder, objects under a prefix)."""
        return os.path.isdir(self.root) if self.local else bool(self.fs.exists(self.root))

    def require(self) -> None:
        """Raise :class:`StoreNotFound` unless the store exists (inspection never creates one)."""
        if not self.present():
            raise StoreNotFound(self.url)

    # ---- paths -------------------------------------------------------------------------------------
    def _p(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _zarr_store(self, path: str, read_only: bool) -> Any:
        from zarr.storage import FsspecStore, LocalStore

        if self.local:
            return LocalStore(path, read_only=read_only)
        return FsspecStore.from_url(f"{self.fs.unstrip_protocol(path)}", read_only=read_only,
                                    storage_options=self.storage_options or None)

    # ---- artifacts ---------------------------------------------------------------------------------
    def presence(self, ref: ArtifactRef) -> tuple[bool, str | None]:
        """Cheap (a few ``lstat`` calls, one ``info`` on object stores): (something is there, why it is
        damaged or None). A marker-less folder is damage on a local store (complete writes are renamed in);
        on an object store it may be a write in progress, so it counts as absent."""
        if not self.local:
            try:
                info = self.fs.info(self._p(ref.path, COMMIT))
            except FileNotFoundError:
                return False, None
            return True, ("empty commit marker" if info.get("size") == 0 else None)
        for parts, label in (((ref.stage,), "stage"), ((ref.stage, ref.key[:2]), "prefix")):
            k = localfs.kind(self._p(*parts))
            if k == localfs.LINK:
                return True, f"its {label} folder is a symlink"
            if k == localfs.ABSENT:  # nothing below it either: one lstat for a stage never run (a new catalog)
                return False, None
        final = self._p(ref.path)
        k = localfs.kind(final)
        if k == localfs.ABSENT:
            return False, None
        if k != localfs.DIR:
            return True, "the artifact folder is a symlink" if k == localfs.LINK else "not a folder"
        return True, (_file_problem(posixpath.join(final, COMMIT), f"commit marker ({COMMIT})")
                      or _file_problem(posixpath.join(final, "zarr.json"), "group metadata (zarr.json)"))

    def exists(self, ref: ArtifactRef) -> bool:
        """Committed and not damaged in any cheap-to-see way; full checksums are checked on read."""
        there, damage = self.presence(ref)
        return there and damage is None

    def commit_record(self, ref: ArtifactRef) -> dict[str, Any]:
        there, damage = self.presence(ref)
        if not there:
            raise ArtifactNotFound(f"no complete artifact {ref.path} in {self.url}")
        if damage:
            raise ArtifactDamaged(ref, damage)
        try:
            record = json.loads(self.fs.cat_file(self._p(ref.path, COMMIT)))
        except FileNotFoundError:
            raise ArtifactNotFound(f"no complete artifact {ref.path} in {self.url}") from None
        except ValueError:
            raise ArtifactDamaged(ref, "unreadable commit marker (truncated or corrupt)") from None
        if (not isinstance(record, dict) or not isinstance(record.get("checksums"), dict)
                or record.get("key", ref.key) != ref.key or record.get("stage", ref.stage) != ref.stage):
            raise ArtifactDamaged(ref, "the commit marker does not describe this artifact")
        return record

    def write(
        self,
        ref: ArtifactRef,
        arrays: Mapping[str, np.ndarray],
        dims: Mapping[str, tuple[str, ...]],
        attrs: Mapping[str, Any],
        *,
        chunk_axis0: bool = True,
    ) -> ArtifactRef:
        """Write one complete artifact; returns at once if it already exists. A damaged folder in the way (an
        earlier crash, a killed delete) is quarantined and replaced."""
        if self.exists(ref):
            return ref
        checksums = {name: array_digest(a) for name, a in arrays.items()}
        record = {
            **attrs,
            "stage": ref.stage,
            "key": ref.key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "library_versions": _library_versions(),
            "checksums": checksums,
            "layout": LAYOUT,
        }
        final = self._p(ref.path)
        if self.local:
            target = posixpath.join(self._own_dir(TMP), f"{ref.key}.{uuid.uuid4().hex}")
        else:
            target = final
            if self.fs.exists(final):
                self.fs.rm(final, recursive=True)  # an earlier writer's uncommitted leftovers
        self._write_group(target, arrays, dims, record, chunk_axis0)
        self.fs.pipe_file(posixpath.join(target, COMMIT), json.dumps(record, sort_keys=True).encode())
        if self.local:
            self._own_dir(ref.stage, ref.key[:2])
            self._commit_local(ref, target, final)
        return ref

    def _commit_local(self, ref: ArtifactRef, target: str, final: str) -> None:
        for attempt in range(2):
            try:
                os.rename(target, final)
                return
            except OSError:
                if self.exists(ref):  # someone else committed the same key first: theirs is identical
                    localfs.purge(target)
                    return
                if attempt or localfs.kind(final) == localfs.ABSENT:
                    localfs.purge(target)
                    raise
                self._displace(ref, "in the way of a fresh write")

    def _write_group(self, path: str, arrays: Mapping[str, np.ndarray], dims: Mapping[str, tuple[str, ...]],
                     attrs: Mapping[str, Any], chunk_axis0: bool) -> None:
        zarr = _zarr()
        from zarr.codecs import BloscCodec, Crc32cCodec

        store = self._zarr_store(path, read_only=False)
        # Attributes go in with the group: each later update would rewrite its zarr.json.
        group = zarr.create_group(store=store, overwrite=True, zarr_format=3,
                                  attributes=json.loads(json.dumps(attrs)))
        for name, data in arrays.items():
            data = np.asarray(data, order="C")  # keeps 0-d arrays 0-d (ascontiguousarray makes them 1-d)
            if len(dims[name]) != data.ndim:
                raise ValueError(f"array {name!r}: dims {dims[name]} do not match shape {data.shape}")
            per_frame = chunk_axis0 and data.ndim >= 3 and dims[name][0] in FRAME_DIMS
            chunks = (1, *data.shape[1:]) if per_frame else data.shape
            arr = group.create_array(
                name,
                shape=data.shape,
                dtype=data.dtype,
                chunks=tuple(max(1, c) for c in chunks),
                # One shard (one file or object) per array holding its per-frame chunks: readers still
                # fetch single frames, writers create one file instead of one per frame.
                shards=tuple(max(1, c) for c in data.shape) if per_frame else None,
                # zstd level 1 + byte shuffle: measured (bench/store.py) as fast as lz4 to read, 3x faster
                # to write than level 3 and within 1 % of its size on frames and flows. crc32c: a lazy read
                # (xarray views) of a damaged chunk fails instead of decoding garbage.
                compressors=[BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"), Crc32cCodec()],
                dimension_names=dims[name],
                fill_value=0,
                # All-zero chunks are stored too: then a missing chunk file is always damage (zarr would
                # otherwise serve the fill value for it without a word).
                config={"write_empty_chunks": True},
            )
            if data.size:
                arr[...] = data
        zarr.consolidate_metadata(store)

    def open(self, ref: ArtifactRef) -> Any:
        """The artifact as a lazy, dask-backed ``xarray.Dataset``. Lazy, so checksums of whole arrays cannot be
        checked here: the metadata and every chunk file's presence are, and (layout 2) each chunk's crc32c
        as it is decoded."""
        import xarray as xr

        from storage.integrity import structure_problems

        record = self.commit_record(ref)
        problems = structure_problems(self, ref, record)
        if problems:
            raise ArtifactDamaged(ref, problems[0])
        try:
            ds = xr.open_zarr(self._zarr_store(self._p(ref.path), read_only=True), consolidated=True,
                              zarr_format=3)
        except DAMAGE_ERRORS as exc:
            raise ArtifactDamaged(ref, f"unreadable metadata ({type(exc).__name__}: {exc})") from exc
        for name in ds.data_vars:
            ds[name].attrs.update({"stage": ref.stage, "key": ref.key})
        ds.attrs.update({"stage": record["stage"], "key": ref.key})
        return ds

    def read(self, ref: ArtifactRef, names: list[str] | None = None, *, verify: bool = True
             ) -> dict[str, np.ndarray]:
        """Load arrays eagerly as numpy, each checked against the sha256 recorded at commit (``verify``).

        Raises :class:`ArtifactDamaged` for a mismatch (a flipped byte, a missing chunk served as zeros), an
        undecodable chunk, missing or unreadable metadata, a marker-less or symlinked folder."""
        zarr = _zarr()
        expected = self.commit_record(ref)["checksums"]
        wanted = list(expected) if names is None else list(names)
        unknown = [n for n in wanted if n not in expected]
        if unknown:
            raise ArtifactNotFound(f"artifact {ref.path} has no array(s) {unknown} (it has {sorted(expected)})")
        try:
            group = zarr.open_group(store=self._zarr_store(self._p(ref.path), read_only=True), mode="r",
                                    zarr_format=3, use_consolidated=True)
        except DAMAGE_ERRORS as exc:
            raise ArtifactDamaged(ref, f"unreadable metadata ({type(exc).__name__}: {exc})") from exc
        out: dict[str, np.ndarray] = {}
        for name in wanted:
            try:
                arr = group[name]
                if self.local:  # consolidated metadata spares reading it, but a deleted one is damage too
                    _check_array_meta(self._p(ref.path, name, "zarr.json"), name, arr.shape)
                data = arr[...] if arr.size else np.zeros(arr.shape, dtype=arr.dtype)
            except DAMAGE_ERRORS as exc:
                raise ArtifactDamaged(ref, f"array {name!r} unreadable ({type(exc).__name__}: {exc})") from exc
            if verify and array_digest(data) != expected[name]:
                raise ArtifactDamaged(ref, f"checksum mismatch in {name!r}")
            out[name] = data
        return out

    def attrs(self, ref: ArtifactRef) -> dict[str, Any]:
        return self.commit_record(ref)

    def iter_artifacts(self, include_incomplete: bool = False) -> Iterator[tuple[ArtifactRef, bool]]:
        """Every artifact folder with whether it is committed (and not visibly damaged). Symlinked stage or
        prefix folders are not entered; a symlinked artifact folder counts as incomplete."""
        for stage_dir in self._ls_dirs(self.root):
            stage = posixpath.basename(stage_dir)
            if stage in RESERVED or stage.startswith("."):
                continue
            for prefix_dir in self._ls_dirs(stage_dir):
                for art_dir in self._ls_dirs(prefix_dir, links=include_incomplete):
                    ref = ArtifactRef(stage, posixpath.basename(art_dir))
                    ok = self.exists(ref)
                    if ok or include_incomplete:
                        yield ref, ok

    def _ls_dirs(self, path: str, links: bool = False) -> list[str]:
        if self.local:
            keep = (localfs.DIR, localfs.LINK) if links else (localfs.DIR,)
            return [posixpath.join(path, n) for n, k in localfs.entries(path, follow=path == self.root) if k in keep]
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/") for e in entries if e["type"] == "directory")

    def lease(self, run_id: str | None = None, *, ttl_s: float | None = None, heartbeat_s: float | None = None
              ) -> Any:
        """A :class:`storage.leases.Lease` for one run: what it protects, gc keeps (see that module)."""
        from storage.leases import Lease

        return Lease(self, run_id, ttl_s=ttl_s, heartbeat_s=heartbeat_s)


def _reopen(url: str, storage_options: dict[str, Any]) -> ArtifactStore:
    return ArtifactStore(url, **storage_options)


def open_store(url: str | os.PathLike[str] | None = None) -> ArtifactStore:
    """The store at ``url``, else ``$V2V_STORE``, else ``./v2v-store``. Opening creates nothing: the first
    write creates the root; ``require()`` says whether a store is there."""
    return ArtifactStore(url or os.environ.get("V2V_STORE") or DEFAULT_STORE)
