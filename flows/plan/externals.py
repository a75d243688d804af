"""A job's external inputs: a reference to its source clip, and its images (first frame, reference, sketch, shape).

Keys need only content digests. The source is never decoded here: its input is a ``stages.ingest.SourceRef``
(the files, and a streamed sha256 of their bytes), decoded by the worker that runs ingest. Images are small
and decoded on demand (for their pixel digest, then again when a stage that reads them is submitted); the plan
keeps neither frames nor images.

The fingerprint index (:mod:`flows.plan.fingerprints`) maps file stamps to those digests, so a warm plan
costs a ``stat`` per file. A stamp is (size, mtime, ctime, inode, sha256 of the first and last 64 KiB:
``storage.stamps``): a file replaced in place with its size and mtime restored (``cp -p``, ``rsync -t``,
``tar -x``) still moves its ctime, and a file up to 128 KiB (a frame, a mask, a tiny clip) is hashed whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from flows.plan.fingerprints import fingerprint, index_for
from stages.source_io import DecodeLimits
from storage.keys import array_digest
from storage.store import ArtifactStore

SOURCE_ARRAYS = ("source",)  # the source stage's external inputs
MASKS = "source_masks"  # not an input: whether the source reference has masks (ingest's provided_masks)
IMAGE_FIELDS = {"first_frame_image": "first_frame", "reference_image": "reference", "sketch_image": "sketch",
                "provided_shape": "shape"}


def decode_limits(limits: Any) -> DecodeLimits:
    """The profile's ``limits`` (a pydantic model, a mapping or DecodeLimits) as ingest's DecodeLimits."""
    if limits is None or isinstance(limits, DecodeLimits):
        return limits or DecodeLimits()
    data = limits.model_dump() if hasattr(limits, "model_dump") else dict(limits)
    return DecodeLimits(**data)


class JobExternals:
    """Digests now (from the index when possible); the source reference and the images on demand."""

    __slots__ = ("job", "ingest_params", "store", "limits", "_source", "_layout", "_digests")  # one per job plan

    def __init__(self, job: Any, ingest_params: Mapping[str, Any], store: ArtifactStore, limits: Any = None) -> None:
        self.job = job
        self.ingest_params = ingest_params  # read only (the planner's, shared by every job with the same)
        self.store = store
        self.limits = decode_limits(limits)
        self._source: Any = None  # the SourceRef, hashed
        self._layout: Any = None  # the SourceRef before hashing (its files and masks)
        self._digests: dict[str, str] = {}

    # ---- which externals this job can supply ------------------------------------------------------
    def names(self) -> set[str]:
        out = set(SOURCE_ARRAYS)
        for name, field in IMAGE_FIELDS.items():
            if getattr(self.job, field, None) is not None:
                out.add(name)
        return out

    def supplies(self, name: str) -> bool:
        """Whether the job really gives ``name``: an input, or ``source_masks`` (the source has masks)."""
        if name == MASKS:
            return bool(self._source_layout().has_masks)
        return name in self.names()

    # ---- source clip ---------------------------------------------------------------------------------
    def _source_layout(self) -> Any:
        if self._source is not None:  # the hashed reference has the same layout; the plan keeps one of them
            return self._source
        if self._layout is None:
            from stages.ingest import IngestParams, source_ref

            self._layout = source_ref(self.job.source, IngestParams(**self.ingest_params), self.job.masks,
                                      limits=self.limits, hashed=False)
        return self._layout

    def source_ref(self) -> Any:
        """The ingest stage's input: a ``SourceRef`` with its digest (hashed once, then from the index)."""
        if self._source is None:
            import dataclasses

            from stages.ingest import with_digest

            layout = self._source_layout()
            index = index_for(self.store)
            fp = fingerprint("source", layout.files(), list(layout.index))
            hit = index.get(fp)
            if hit and isinstance(hit.get("digest"), str) and isinstance(hit.get("content", ""), str):
                self._source = dataclasses.replace(layout, digest=hit["digest"], content=hit.get("content", ""))
            else:
                self._source = with_digest(layout)
                index.put(fp, {"digest": self._source.digest, "content": self._source.content})
            self._layout = None
        return self._source

    # ---- images ----------------------------------------------------------------------------------------
    def _image_path(self, name: str) -> Path:
        path = getattr(self.job, IMAGE_FIELDS[name])
        return path if isinstance(path, Path) else Path(path)

    def _load_image(self, name: str) -> np.ndarray:
        from stages.source_io import read_image

        return read_image(self._image_path(name), mask=name == "provided_shape", limits=self.limits)

    def digest(self, name: str) -> str:
        if name in SOURCE_ARRAYS:
            return str(self.source_ref().digest)
        if name not in self._digests:
            index = index_for(self.store)
            fp = fingerprint(name, [self._image_path(name)])
            hit = index.get(fp)
            if hit and isinstance(hit.get("digest"), str):
                self._digests[name] = hit["digest"]
            else:
                self._digests[name] = array_digest(self._load_image(name))
                index.put(fp, {"digest": self._digests[name]})
        return self._digests[name]

    def array(self, name: str) -> Any:
        """The source reference, or an image decoded now (not kept: the plan holds no arrays)."""
        if name in SOURCE_ARRAYS:
            return self.source_ref()
        arr = self._load_image(name)
        if self._digests.get(name) and array_digest(arr) != self._digests[name]:
            raise RuntimeError(f"{name}: the file changed while planning; run again")
        return arr

    def arrays(self, names: list[str]) -> dict[str, Any]:
        return {n: self.array(n) for n in names}
