"""Content-addressed Zarr artifact store over fsspec, and its xarray views."""

from storage.errors import ArtifactDamaged, ArtifactNotFound, DocumentDamaged, StoreNotFound
from storage.keys import array_digest, artifact_key, canonical_json, weights_digest
from storage.leases import Lease
from storage.store import ArtifactRef, ArtifactStore, open_store
from storage.views import open_artifact, open_job

__all__ = [
    "ArtifactDamaged",
    "ArtifactNotFound",
    "ArtifactRef",
    "ArtifactStore",
    "DocumentDamaged",
    "Lease",
    "StoreNotFound",
    "array_digest",
    "artifact_key",
    "canonical_json",
    "open_artifact",
    "open_job",
    "open_store",
    "weights_digest",
]
