"""Content-addressed Zarr artifact store over fsspec, and its xarray views."""

from storage.keys import array_digest, artifact_key, canonical_json, weights_digest
from storage.store import ArtifactNotFound, ArtifactRef, ArtifactStore, open_store
from storage.views import open_artifact, open_job

__all__ = [
    "ArtifactNotFound",
    "ArtifactRef",
    "ArtifactStore",
    "array_digest",
    "artifact_key",
    "canonical_json",
    "open_artifact",
    "open_job",
    "open_store",
    "weights_digest",
]
