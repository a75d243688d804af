"""A job's external arrays (source clip, first frame, reference, sketch, shape), loaded lazily.

Keys need only the arrays' content digests. A fingerprint index in the store maps (path, size, mtime,
parameters) to those digests, so planning a cached job decodes nothing: ``v2v plan`` and cached re-runs cost a
few ``stat`` calls per job. The arrays themselves are decoded only when a stage that reads them must run.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from storage.keys import array_digest, canonical_json
from storage.store import ArtifactStore

SOURCE_ARRAYS = ("source_frames", "source_frame_index", "source_masks")
IMAGE_FIELDS = {"first_frame_image": "first_frame", "reference_image": "reference", "sketch_image": "sketch",
                "provided_shape": "shape"}
INDEX_VERSION = 1


def _stat_list(path: Path) -> list[Any]:
    """What identifies a file or folder's content cheaply: names, sizes and mtimes."""
    if path.is_file():
        st = path.stat()
        return [path.name, st.st_size, st.st_mtime_ns]
    entries = []
    for p in sorted(path.iterdir()):
        if p.is_file():
            st = p.stat()
            entries.append([p.name, st.st_size, st.st_mtime_ns])
    return entries


def fingerprint(kind: str, paths: list[Path | None], params: Any = None) -> str:
    record = {"v": INDEX_VERSION, "kind": kind, "params": params,
              "paths": [[str(p.resolve()), _stat_list(p)] if p is not None and p.exists() else None for p in paths]}
    return hashlib.sha256(canonical_json(record).encode()).hexdigest()


def _davis_annotations(source: Path) -> Path | None:
    parts = source.parts
    if "JPEGImages" not in parts:
        return None
    i = parts.index("JPEGImages")
    ann = Path(*parts[:i], "Annotations", *parts[i + 1:])
    return ann if ann.is_dir() else None


def read_image(path: Path, *, mask: bool = False) -> np.ndarray:
    """uint8 RGB, or a bool mask (grey >= 128); clear errors name the file."""
    from PIL import Image, UnidentifiedImageError

    from stages.base import StageInputError

    try:
        with Image.open(path) as im:
            im.load()
            if mask:
                return np.asarray(im.convert("L")) >= 128
            return np.ascontiguousarray(np.asarray(im.convert("RGB")))
    except FileNotFoundError:
        raise StageInputError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise StageInputError(f"{path}: unreadable or corrupt image ({exc})") from None


class JobExternals:
    """Digests now (from the index when possible), arrays on demand."""

    def __init__(self, job: Any, ingest_params: dict[str, Any], store: ArtifactStore) -> None:
        self.job = job
        self.ingest_params = ingest_params
        self.store = store
        self._arrays: dict[str, np.ndarray] = {}
        self._digests: dict[str, str] = {}
        self.has_masks: bool | None = None
        self.decoded = False

    # ---- which externals this job can supply ------------------------------------------------------
    def names(self) -> set[str]:
        out = set(SOURCE_ARRAYS)
        for name, field in IMAGE_FIELDS.items():
            if getattr(self.job, field, None) is not None:
                out.add(name)
        return out

    def supplies(self, name: str) -> bool:
        """Whether the job really gives ``name`` (an optional source array such as masks: non-empty)."""
        if name == "source_masks":
            if self.has_masks is None:
                self.source_digests()
            return bool(self.has_masks)
        return name in self.names()

    # ---- source clip ---------------------------------------------------------------------------------
    def _source_fingerprint(self) -> str:
        src = Path(self.job.source)
        masks = Path(self.job.masks) if self.job.masks else _davis_annotations(src)
        return fingerprint("source", [src, masks], self.ingest_params)

    def _decode_source(self) -> None:
        from stages.ingest import IngestParams, read_source

        clip = read_source(self.job.source, IngestParams(**self.ingest_params), masks=self.job.masks)
        arrays = clip.arrays()
        self._arrays.update(arrays)
        self._digests.update({n: array_digest(a) for n, a in arrays.items()})
        self.has_masks = bool(arrays["source_masks"].size)
        self.decoded = True
        self.store.put_json(f"index/source/{self._source_fingerprint()}.json",
                            {"digests": {n: self._digests[n] for n in SOURCE_ARRAYS}, "has_masks": self.has_masks,
                             "source": str(self.job.source)})

    def source_digests(self) -> dict[str, str]:
        if not all(n in self._digests for n in SOURCE_ARRAYS):
            doc = self.store.get_json(f"index/source/{self._source_fingerprint()}.json")
            if doc and set(doc.get("digests", {})) >= set(SOURCE_ARRAYS):
                self._digests.update(doc["digests"])
                self.has_masks = bool(doc.get("has_masks"))
            else:
                self._decode_source()
        return {n: self._digests[n] for n in SOURCE_ARRAYS}

    # ---- images ----------------------------------------------------------------------------------------
    def _image_path(self, name: str) -> Path:
        return Path(getattr(self.job, IMAGE_FIELDS[name]))

    def _load_image(self, name: str) -> np.ndarray:
        arr = read_image(self._image_path(name), mask=name == "provided_shape")
        self._arrays[name] = arr
        self._digests[name] = array_digest(arr)
        self.store.put_json(f"index/image/{fingerprint(name, [self._image_path(name)])}.json",
                            {"digest": self._digests[name]})
        return arr

    def digest(self, name: str) -> str:
        if name in SOURCE_ARRAYS:
            return self.source_digests()[name]
        if name not in self._digests:
            doc = self.store.get_json(f"index/image/{fingerprint(name, [self._image_path(name)])}.json")
            if doc and doc.get("digest"):
                self._digests[name] = doc["digest"]
            else:
                self._load_image(name)
        return self._digests[name]

    def array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            if name in SOURCE_ARRAYS:
                self._decode_source()
            else:
                self._load_image(name)
            if self._digests.get(name) and array_digest(self._arrays[name]) != self._digests[name]:
                raise RuntimeError(f"{name}: the file changed while planning; run again")
        return self._arrays[name]

    def arrays(self, names: list[str]) -> dict[str, np.ndarray]:
        return {n: self.array(n) for n in names}


def clear_index(store: ArtifactStore) -> None:
    """Forget every fingerprint (the next plan decodes sources again)."""
    for sub in ("source", "image"):
        path = os.path.join(store.root, "index", sub) if store.local else f"{store.root}/index/{sub}"
        if store.fs.exists(path):
            store.fs.rm(path, recursive=True)
