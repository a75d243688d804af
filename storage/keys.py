"""Artifact keys: sha256 of canonical JSON, identical in every process.

The key covers the stage name, its code version, its resolved parameters, the backend name and its
weights digest, and the keys of the artifacts (or content digests of external arrays) it reads. Paths and
prompts never become file names; a prompt can only influence a key through the parameters' hash.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

KEY_SCHEMA = "v2v-key-2"  # 2: parameters enter a key only when its backend reads them


def _normalise(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"non-finite float {value!r} cannot enter an artifact key")
        # json writes floats with repr(), the shortest round-trip form: the same in every process.
        return 0.0 if value == 0 else value  # folds -0.0 into 0.0
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, Path):
        raise TypeError("file paths never enter artifact keys: hash the file's content instead")
    raise TypeError(f"cannot put {type(value).__name__} into an artifact key")


# One encoder for every key (json.dumps builds a new one per call when given options).
_ENCODE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_SCALARS = frozenset({str, int, bool, type(None)})


def _plain(value: Any) -> bool:
    """Whether the encoder alone writes ``value`` exactly as :func:`_normalise` then the encoder would: dicts
    with str keys, lists, tuples, and str, int, bool, None and finite floats other than -0.0, all of exactly
    those types (what ``model_dump(mode="json")`` gives). Anything else (numpy scalars, other mappings,
    subclasses, non-str keys, -0.0) takes the normalising path, so no key can differ between the two."""
    t = type(value)
    if t in _SCALARS:
        return True
    if t is float:
        return value - value == 0 and (value != 0 or math.copysign(1.0, value) > 0)
    if t is dict:
        for k, v in value.items():  # loops, not all(genexpr): this runs for every key of every job
            if type(k) is not str or (type(v) not in _SCALARS and not _plain(v)):
                return False
        return True
    if t is list or t is tuple:
        for v in value:
            if type(v) not in _SCALARS and not _plain(v):
                return False
        return True
    return False


def canonical_json(value: Any) -> str:
    return _ENCODE(value if _plain(value) else _normalise(value))


class KeyTemplate:
    """:func:`artifact_key` for one stage, code version, backend and weights digest, given the parameters'
    canonical JSON (computed once for many jobs) and the inputs. Sorted keys of the record: backend, inputs,
    params, schema, stage, version, weights, so the text is exactly what ``canonical_json(record)`` writes."""

    __slots__ = ("_head", "_tail")

    def __init__(self, stage: str, version: str, backend: str, weights_digest: str) -> None:
        # Each part is its own canonical JSON: the encoder writes a dict as its sorted "key":value pairs.
        self._head = '{"backend":' + canonical_json(backend) + ',"inputs":'
        self._tail = (',"schema":' + canonical_json(KEY_SCHEMA) + ',"stage":' + canonical_json(stage)
                      + ',"version":' + canonical_json(version) + ',"weights":' + canonical_json(weights_digest) + "}")

    def key(self, params_json: str, inputs: Mapping[str, str], *, plain: bool = False) -> str:
        """``plain``: the caller knows ``inputs`` is a dict of str (exactly) to str (the planner's)."""
        text = self._head + (_ENCODE(inputs) if plain else canonical_json(inputs)) + ',"params":' + params_json \
            + self._tail
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def artifact_key(
    stage: str,
    version: str,
    params: Mapping[str, Any],
    backend: str,
    weights_digest: str,
    inputs: Mapping[str, str],
) -> str:
    """sha256 of ``canonical_json({"schema", "stage", "version", "params", "backend", "weights", "inputs"})``
    (written by :class:`KeyTemplate`, part by part: the same text)."""
    return KeyTemplate(stage, version, backend, weights_digest).key(canonical_json(params), inputs)


def array_digest(array: np.ndarray) -> str:
    """Content digest of an array: dtype, shape and bytes (C order)."""
    arr = np.ascontiguousarray(array)
    h = hashlib.sha256()
    h.update(f"{arr.dtype.str}|{arr.shape}|".encode())
    if arr.size:
        h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def _digest_cache_path() -> Path:
    base = os.environ.get("V2V_DIGEST_CACHE") or os.environ.get("V2V_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "v2v")
    return Path(base) / "weights-digests.json"


def weights_digest(path: str | os.PathLike[str] | None) -> str:
    """sha256 over a weights file or folder (relative names + bytes); '' for no weights.

    Hashing a multi-GB folder takes seconds, so digests are memoised by (path, size, mtime) in the user's
    cache dir; a changed file changes its stat and is hashed again.
    """
    if not path:
        return ""
    root = Path(path).expanduser().resolve()
    if not root.exists():
        raise FileNotFoundError(f"weights not found: {root}")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    stamp = canonical_json([[str(p.relative_to(root.parent)), p.stat().st_size, p.stat().st_mtime_ns]
                            for p in files])
    cache_file = _digest_cache_path()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(str(root))
    if hit and hit.get("stamp") == stamp:
        return hit["digest"]
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root if root.is_dir() else root.parent)).encode() + b"\0")
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    digest = h.hexdigest()
    cache[str(root)] = {"stamp": stamp, "digest": digest}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only cache dir only costs a re-hash next time
    return digest
