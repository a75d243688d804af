"""YAML catalogs read as a stream: checked whole at load, then composed one job at a time when iterated.

:func:`scan_yaml` runs over the file's parser events once, holding no node tree: every event goes through the
limits of :mod:`flows.config.safe_yaml` (depth, alias-expanded size, alias uses, recursive aliases), the job
items are counted and skipped, and ``defaults:`` (wherever it is in the file) is composed and returned.
:func:`yaml_rows` reads the file again and composes and constructs one job item at a time, with its line;
anchors stay known to later items, so an alias in job 500 to an anchor in job 1 works. ``defaults:`` may
refer to anchors above it in ``name:``/``description:``/``defaults:`` but not to anchors inside the jobs
(those are not composed at load).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from flows.config.safe_yaml import CONSTRUCT_ERRORS, BoundedLoader, UnsafeYaml

TOP_KEYS = ("jobs", "defaults", "name", "description")
SHAPE = "expected a list of jobs (or a mapping with 'jobs:')"


class YamlCatalogError(ValueError):
    """The YAML file as a whole is not a catalog (the message names the file)."""


class NotUtf8(ValueError):
    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


class _Utf8Text:
    """A binary file read as UTF-8 text in chunks, a bad byte reported at its offset in the file."""

    def __init__(self, fh: BinaryIO, name: str) -> None:
        self.fh, self.name, self.offset = fh, name, 0
        self.decoder = codecs.getincrementaldecoder("utf-8")()

    def read(self, size: int = -1) -> str:
        data = self.fh.read(size)
        pending = len(self.decoder.getstate()[0])  # bytes of a character split across chunks
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            raise NotUtf8(self.offset - pending + exc.start) from None
        self.offset += len(data)
        return text


def _guarded(path: Path, body: Any) -> Any:
    """Run ``body(loader)`` on a bounded loader over ``path``, whole-file problems as YamlCatalogError."""
    with open(path, "rb") as fh:
        loader = None
        try:
            loader = BoundedLoader(_Utf8Text(fh, str(path)), str(path))  # PyYAML's own reader reads at once
            return body(loader)
        except NotUtf8 as exc:
            raise YamlCatalogError(f"{path}: not UTF-8 text (byte {exc.offset}): is this a catalog?") from None
        except UnsafeYaml as exc:
            raise YamlCatalogError(str(exc)) from None
        except yaml.YAMLError as exc:
            raise YamlCatalogError(f"{path}: not valid YAML ({exc})") from None
        finally:
            if loader is not None:
                loader.dispose()


def scan_yaml(path: Path) -> tuple[int, dict[str, Any]]:
    """The number of job items and the ``defaults:`` mapping; raises YamlCatalogError for a file that is not a
    catalog (invalid, over the limits, wrong shape), having measured every event first."""
    return _guarded(path, lambda loader: _scan(loader, path))


def _scan(loader: BoundedLoader, path: Path) -> tuple[int, dict[str, Any]]:
    loader.get_event()  # stream start
    count, defaults, problem = 0, {}, None
    if loader.check_event(yaml.StreamEndEvent):
        problem = SHAPE
    else:
        loader.get_event()  # document start
        if loader.check_event(yaml.SequenceStartEvent):
            count = _count_items(loader)
        elif loader.check_event(yaml.MappingStartEvent):
            loader.get_event()
            keys: list[str] = []
            jobs = False
            while not loader.check_event(yaml.MappingEndEvent):
                name = _key(loader)
                keys.append(name)
                if name == "jobs" and loader.check_event(yaml.SequenceStartEvent) and not jobs:
                    jobs, count = True, _count_items(loader)
                elif name == "jobs":
                    problem = problem or ("'jobs' given twice" if jobs else SHAPE)
                    loader.skip()
                elif name in TOP_KEYS:  # composed: their anchors are known to what follows
                    value = _construct(loader, loader.compose())
                    if name == "defaults":
                        defaults = value or {}
                        if not isinstance(defaults, dict):
                            problem = problem or "'defaults' must be a mapping"
                else:
                    loader.skip()
            loader.get_event()
            unknown = sorted(set(keys) - set(TOP_KEYS))
            if unknown:  # the first problem reported, as before: unknown keys, then defaults, then jobs
                problem = f"unknown top-level keys {unknown} (expected jobs, defaults)"
            elif not jobs:
                problem = problem or SHAPE
        else:
            loader.skip()
            problem = SHAPE
        loader.get_event()  # document end
        if not loader.check_event(yaml.StreamEndEvent):
            raise YamlCatalogError(f"{path}: not valid YAML (expected a single document in the stream, but found "
                                   "another document)")
    if problem:
        raise YamlCatalogError(f"{path}: {problem}")
    return count, defaults


def _key(loader: BoundedLoader) -> str:
    """A top-level key as text (read past; a key that is not text is named so, and is unknown)."""
    if loader.check_event(yaml.ScalarEvent):
        return str(loader.get_event().value)
    if loader.check_event(yaml.AliasEvent):
        return f"*{loader.get_event().anchor}"
    loader.skip()
    return "(a key that is not text)"


def _count_items(loader: BoundedLoader) -> int:
    loader.get_event()
    count = 0
    while not loader.check_event(yaml.SequenceEndEvent):
        loader.skip()
        count += 1
    loader.get_event()
    return count


def _construct(loader: BoundedLoader, node: Any) -> Any:
    try:
        return loader.construct_document(node)
    except CONSTRUCT_ERRORS as exc:
        raise yaml.YAMLError(str(exc)) from None


def yaml_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for each job item, composed and constructed one at a time. A row that is not a mapping,
    or whose values cannot be constructed (a bad tag), comes as ``{"id": ..., "__bad__": message}``."""
    with open(path, "rb") as fh:
        loader = None
        try:
            loader = BoundedLoader(_Utf8Text(fh, str(path)), str(path))
            yield from _rows(loader, path)
        except (NotUtf8, UnsafeYaml, yaml.YAMLError) as exc:  # the file changed since it was loaded
            raise YamlCatalogError(f"{path}: changed while it was read? ({exc})") from None
        finally:
            if loader is not None:
                loader.dispose()


def _rows(loader: BoundedLoader, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    loader.get_event()
    loader.get_event()
    if loader.check_event(yaml.MappingStartEvent):
        loader.get_event()
        while not loader.check_event(yaml.MappingEndEvent):
            if getattr(loader.get_event(), "value", None) == "jobs":
                break
            loader.compose()  # defaults, name, description: their anchors may be used in the jobs
        else:
            return
    loader.get_event()  # the jobs' sequence start
    i = 0
    while not loader.check_event(yaml.SequenceEndEvent):
        where = f"{path} line {loader.peek_event().start_mark.line + 1}"
        node = loader.compose()
        try:
            row = loader.construct_document(node)
        except CONSTRUCT_ERRORS as exc:
            yield where, {"id": _node_id(node) or f"row-{i + 1}", "__bad__": f"not valid YAML ({exc})"}
        else:
            yield where, row if isinstance(row, dict) else {"id": f"row-{i + 1}",
                                                            "__bad__": "a job must be a mapping of fields"}
        i += 1
    # The rest of the file (keys after the jobs) was checked at load: not read again.


def _node_id(node: Any) -> str | None:
    """A job item's id scalar, read off its node (for a row whose other values failed to construct)."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == "id" and isinstance(value, yaml.ScalarNode):
                return str(value.value)
    return None
