"""xarray views of the store: one job's artifacts as a single lazy Dataset on shared dims."""

from __future__ import annotations

from typing import Any

from storage.store import ArtifactRef, ArtifactStore, open_store


def open_artifact(store: ArtifactStore | str, stage: str, key: str) -> Any:
    store = store if isinstance(store, ArtifactStore) else open_store(store)
    return store.open(ArtifactRef(stage, key))


def open_job(store: ArtifactStore | str, job_id: str) -> Any:
    """Every artifact of one job merged into one lazy, dask-backed ``xarray.Dataset``.

    Array names are unique across stages, so the merge never overwrites; each variable keeps ``stage``
    and ``key`` attributes saying where it came from. Dims are shared (``frame``, ``y``, ``x`` ...).
    """
    import xarray as xr

    store = store if isinstance(store, ArtifactStore) else open_store(store)
    doc = store.job(job_id)
    parts = []
    for stage, key in doc["artifacts"].items():
        ds = store.open(ArtifactRef(stage, key))
        ds.attrs = {}
        parts.append(ds)
    merged = xr.merge(parts, compat="no_conflicts", join="exact", combine_attrs="drop_conflicts")
    merged.attrs.update({"job": job_id, "store": store.url,
                         "artifacts": {s: k for s, k in doc["artifacts"].items()}})
    return merged
