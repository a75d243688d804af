"""The content-addressed artifact store: one Zarr v3 group per artifact, over any fsspec URL.

Layout under the root URL::

    <stage>/<key[:2]>/<key>/            one artifact (Zarr v3 group, consolidated metadata)
    <stage>/<key[:2]>/<key>/v2v.commit  written last: the artifact is complete
    .tmp/<key>.<uuid>/                  local filesystems only: a write in progress
    jobs/<job id>.json                  which artifact each stage of a job uses (for views and gc)
    index/<name>/<id>.json              small lookup documents (e.g. source file fingerprint -> key)

An artifact is visible only once complete. On a local filesystem it is written under ``.tmp`` and renamed
into place (atomic, and the loser of a race simply drops its copy); on object stores the commit marker is
written last and readers ignore groups without it. Content is deterministic for a key, so two writers of
one key leave one valid artifact either way.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from storage.keys import array_digest

COMMIT = "v2v.commit"
TMP = ".tmp"
DEFAULT_STORE = "./v2v-store"
# Leading dims chunked one entry per chunk (a frame, a flow pair); anything else is one chunk.
FRAME_DIMS = frozenset({"frame", "pair", "mask_frame"})

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


class ArtifactNotFound(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


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


class ArtifactStore:
    def __init__(self, url: str | os.PathLike[str] = DEFAULT_STORE, **storage_options: Any) -> None:
        url = os.fspath(url)
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.root = os.path.abspath(root) if self.local else root.rstrip("/")
        self.url = self.root if self.local else url.rstrip("/")
        self.storage_options = storage_options
        if self.local:
            os.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable for Ray workers: reopen by URL
        return (_reopen, (self.url, self.storage_options))

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
    def exists(self, ref: ArtifactRef) -> bool:
        return self.fs.exists(self._p(ref.path, COMMIT))

    def commit_record(self, ref: ArtifactRef) -> dict[str, Any]:
        try:
            return json.loads(self.fs.cat_file(self._p(ref.path, COMMIT)))
        except FileNotFoundError:
            raise ArtifactNotFound(f"no complete artifact {ref.path} in {self.url}") from None

    def write(
        self,
        ref: ArtifactRef,
        arrays: Mapping[str, np.ndarray],
        dims: Mapping[str, tuple[str, ...]],
        attrs: Mapping[str, Any],
        *,
        chunk_axis0: bool = True,
    ) -> ArtifactRef:
        """Write one complete artifact; returns at once if it already exists."""
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
        }
        final = self._p(ref.path)
        target = self._p(TMP, f"{ref.key}.{uuid.uuid4().hex}") if self.local else final
        if not self.local and self.fs.exists(final):
            self.fs.rm(final, recursive=True)  # an earlier writer's uncommitted leftovers
        self._write_group(target, arrays, dims, record, chunk_axis0)
        self.fs.pipe_file(posixpath.join(target, COMMIT), json.dumps(record, sort_keys=True).encode())
        if self.local:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            try:
                os.rename(target, final)
            except OSError:
                # Someone else committed the same key first: theirs is identical, drop ours.
                self.fs.rm(target, recursive=True)
                if not self.exists(ref):
                    raise
        return ref

    def _write_group(self, path: str, arrays: Mapping[str, np.ndarray], dims: Mapping[str, tuple[str, ...]],
                     attrs: Mapping[str, Any], chunk_axis0: bool) -> None:
        zarr = _zarr()
        from zarr.codecs import BloscCodec

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
                # to write than level 3 and within 1 % of its size on frames and flows.
                compressors=[BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")],
                dimension_names=dims[name],
                fill_value=0,
            )
            if data.size:
                arr[...] = data
        zarr.consolidate_metadata(store)

    def open(self, ref: ArtifactRef) -> Any:
        """The artifact as a lazy, dask-backed ``xarray.Dataset``."""
        import xarray as xr

        record = self.commit_record(ref)
        ds = xr.open_zarr(self._zarr_store(self._p(ref.path), read_only=True), consolidated=True,
                          zarr_format=3)
        for name in ds.data_vars:
            ds[name].attrs.update({"stage": ref.stage, "key": ref.key})
        ds.attrs.update({"stage": record["stage"], "key": ref.key})
        return ds

    def read(self, ref: ArtifactRef, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Load arrays eagerly as numpy."""
        zarr = _zarr()
        self.commit_record(ref)
        group = zarr.open_group(store=self._zarr_store(self._p(ref.path), read_only=True), mode="r",
                                zarr_format=3, use_consolidated=True)
        wanted = names if names is not None else [n for n, _ in group.arrays()]
        out: dict[str, np.ndarray] = {}
        for name in wanted:
            arr = group[name]
            out[name] = arr[...] if arr.size else np.zeros(arr.shape, dtype=arr.dtype)
        return out

    def attrs(self, ref: ArtifactRef) -> dict[str, Any]:
        return self.commit_record(ref)

    def delete(self, ref: ArtifactRef) -> None:
        path = self._p(ref.path)
        if self.fs.exists(path):
            # Drop the marker first so a concurrent reader never sees a half-deleted artifact as complete.
            if self.fs.exists(posixpath.join(path, COMMIT)):
                self.fs.rm_file(posixpath.join(path, COMMIT))
            self.fs.rm(path, recursive=True)

    def iter_artifacts(self, include_incomplete: bool = False) -> Iterator[tuple[ArtifactRef, bool]]:
        """Every artifact folder with whether it is committed."""
        for stage_dir in self._ls_dirs(self.root):
            stage = posixpath.basename(stage_dir)
            if stage in (TMP, "jobs", "index") or stage.startswith("."):
                continue
            for prefix_dir in self._ls_dirs(stage_dir):
                for art_dir in self._ls_dirs(prefix_dir):
                    ref = ArtifactRef(stage, posixpath.basename(art_dir))
                    ok = self.exists(ref)
                    if ok or include_incomplete:
                        yield ref, ok

    def _ls_dirs(self, path: str) -> list[str]:
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/") for e in entries if e["type"] == "directory")

    # ---- small JSON documents (job manifests, indexes) --------------------------------------------
    def put_json(self, relpath: str, obj: Any) -> None:
        data = json.dumps(obj, sort_keys=True, indent=1).encode()
        path = self._p(relpath)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)  # single-object writes are atomic on object stores

    def get_json(self, relpath: str) -> Any | None:
        try:
            return json.loads(self.fs.cat_file(self._p(relpath)))
        except FileNotFoundError:
            return None

    def list_json(self, reldir: str) -> list[str]:
        try:
            names = self.fs.ls(self._p(reldir), detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(n)[:-5] for n in names if n.endswith(".json"))

    # ---- jobs ----------------------------------------------------------------------------------------
    def record_job(self, job_id: str, refs: Mapping[str, ArtifactRef], extra: Mapping[str, Any] | None = None
                   ) -> None:
        doc = {"job": job_id, "artifacts": {s: r.key for s, r in refs.items()}, **(extra or {})}
        self.put_json(f"jobs/{_safe_name(job_id)}.json", doc)

    def job(self, job_id: str) -> dict[str, Any]:
        doc = self.get_json(f"jobs/{_safe_name(job_id)}.json")
        if doc is None:
            known = ", ".join(self.jobs()) or "none"
            raise ArtifactNotFound(f"no job {job_id!r} in {self.url} (known jobs: {known})")
        return doc

    def jobs(self) -> list[str]:
        return self.list_json("jobs")


def _safe_name(job_id: str) -> str:
    if not job_id or "/" in job_id or job_id.startswith(".") or len(job_id) > 200:
        raise ValueError(f"invalid job id {job_id!r}: use letters, digits, '-', '_' and '.'")
    return job_id


def _reopen(url: str, storage_options: dict[str, Any]) -> ArtifactStore:
    return ArtifactStore(url, **storage_options)


def open_store(url: str | os.PathLike[str] | None = None) -> ArtifactStore:
    """The store at ``url``, else ``$V2V_STORE``, else ``./v2v-store``."""
    return ArtifactStore(url or os.environ.get("V2V_STORE") or DEFAULT_STORE)
