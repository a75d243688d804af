"""An artifact's structure against its metadata and commit record, without decoding any chunk: every metadata
file there and parsable, the arrays the record lists, every chunk file present (layout 2 stores all chunks,
so zarr would otherwise serve a missing one as its fill value), no symlink inside."""

from __future__ import annotations

import itertools
import json
import math
import posixpath
from typing import TYPE_CHECKING, Any

from storage import localfs

if TYPE_CHECKING:
    from storage.store import ArtifactRef, ArtifactStore


def _files(store: ArtifactStore, base: str) -> set[str]:
    if store.local:
        import os

        out = set()
        for top, _, files in os.walk(base, followlinks=False):
            for f in files:
                out.add(os.path.relpath(os.path.join(top, f), base).replace(os.sep, "/"))
        return out
    return {posixpath.relpath(p, base) for p in store.fs.find(base)}


def chunk_keys(meta: dict[str, Any]) -> list[str] | None:
    """The store keys of every chunk (or shard) of an array from its v3 metadata; None for an encoding this
    check does not know (then chunk presence is not checked)."""
    shape = meta.get("shape")
    grid = (meta.get("chunk_grid") or {}).get("configuration", {}).get("chunk_shape")
    enc = meta.get("chunk_key_encoding") or {}
    if not isinstance(shape, list) or not isinstance(grid, list) or len(grid) != len(shape):
        return None
    if any(s == 0 for s in shape):
        return []
    sep = (enc.get("configuration") or {}).get("separator", "/" if enc.get("name") == "default" else ".")
    counts = [math.ceil(s / c) for s, c in zip(shape, grid, strict=True)]
    keys = []
    for coords in itertools.product(*(range(n) for n in counts)):
        if enc.get("name") == "default":
            keys.append(sep.join(["c", *map(str, coords)]))
        elif enc.get("name") == "v2":
            keys.append(sep.join(map(str, coords)) or "0")
        else:
            return None
    return keys


def structure_problems(store: ArtifactStore, ref: ArtifactRef, record: dict[str, Any]) -> list[str]:
    """What is structurally wrong with a committed artifact ([] when nothing)."""
    base = store._p(ref.path)
    problems: list[str] = []
    if store.local:
        problems += [f"symlink inside the artifact: {p}" for p in localfs.links_below(base)]
    files = _files(store, base)

    def load(rel: str) -> dict[str, Any] | None:
        if rel not in files:
            problems.append(f"no {rel}")
            return None
        try:
            doc = json.loads(store.fs.cat_file(posixpath.join(base, rel)))
        except ValueError:
            problems.append(f"unreadable {rel} (truncated or corrupt)")
            return None
        if not isinstance(doc, dict):
            problems.append(f"unreadable {rel} (not a metadata document)")
            return None
        return doc

    group = load("zarr.json")
    if group is None:
        return problems
    consolidated = (group.get("consolidated_metadata") or {}).get("metadata")
    if not isinstance(consolidated, dict):
        return [*problems, "zarr.json has no consolidated metadata"]
    expected = set(record.get("checksums", {}))
    listed = {n for n, m in consolidated.items() if isinstance(m, dict) and m.get("node_type") == "array"}
    problems += [f"array {n!r} missing from the metadata" for n in sorted(expected - listed)]
    problems += [f"array {n!r} is not in the commit record" for n in sorted(listed - expected)]
    for name in sorted(expected & listed):
        meta = load(f"{name}/zarr.json")
        if meta is None:
            continue
        summary = consolidated[name]
        if any(meta.get(k) != summary.get(k) for k in ("shape", "data_type", "chunk_grid", "codecs")):
            problems.append(f"{name}/zarr.json disagrees with the group metadata")
        if int(record.get("layout", 1)) >= 2:
            keys = chunk_keys(summary)
            missing = [k for k in keys or [] if f"{name}/{k}" not in files]
            if missing:
                problems.append(f"missing chunk file(s) {name}/{missing[0]}" + (
                    f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return problems
