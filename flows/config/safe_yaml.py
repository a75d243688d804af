"""Untrusted YAML, parsed within bounds: size, nesting depth and the size of the tree once aliases expand.

PyYAML builds an alias as a reference to one object, so ``safe_load`` of a kilobyte "billion laughs" file is
itself quick; code that walks the result as a tree (merging defaults, validating, hashing parameters) then
visits 10^9 nodes and grows to gigabytes. Here every parser event is measured as it is read
(:class:`YamlBounds`: each anchor's expanded size and height recorded when its node ends, each alias counted
where it is used, nothing expanded), and the document is refused before any Python object is built from the
part that exceeds the limits. No node tree is needed for the check, so a catalog can be checked as a stream
of events and composed one job at a time (:mod:`flows.config.catalog_yaml`).
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

try:  # libyaml's parser when PyYAML was built with it: events at C speed
    from yaml.cyaml import CParser as _Parser
except ImportError:  # pragma: no cover - a PyYAML without libyaml
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Parser(Reader, Scanner, Parser):  # type: ignore[no-redef]
        def __init__(self, stream: Any) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)

# A 10,000-job catalog is ~3 MB and ~200,000 nodes; these leave room while a hostile file fails in milliseconds.
MAX_YAML_BYTES = 64 << 20
MAX_YAML_NODES = 2_000_000
MAX_YAML_ALIASES = 100_000
MAX_YAML_DEPTH = 64

# Errors that constructing a (well-formed) node can raise: a bad tag, an unhashable key, ``!!int x``.
CONSTRUCT_ERRORS = (yaml.YAMLError, ValueError, TypeError, OverflowError)


class UnsafeYaml(ValueError):
    """Invalid YAML, or YAML over the limits; the message names the file (``what``) and the limit."""


class YamlBounds:
    """Measures a stream of parser events against the limits above, raising :class:`UnsafeYaml` at the first
    event that breaks one. Memory: one frame per open collection and two numbers per anchor."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.stack: list[list[Any]] = []  # per open collection: [expanded size, height, anchor]
        self.anchors: dict[str, tuple[int, int]] = {}  # closed anchor -> (expanded size, height)
        self.aliases = 0

    @property
    def depth(self) -> int:
        """Collections open now (0 between top-level nodes)."""
        return len(self.stack)

    def feed(self, event: Any) -> None:
        kind = type(event)
        stack = self.stack
        if kind is yaml.ScalarEvent and event.anchor is None and 0 < len(stack) < MAX_YAML_DEPTH:
            parent = stack[-1]  # the common case, inlined: a plain scalar inside a collection
            parent[0] += 1
            parent[1] = parent[1] if parent[1] > 1 else 2
            if parent[0] > MAX_YAML_NODES:
                self._too_big()
        elif kind is yaml.ScalarEvent:
            self._level(1, event)
            self._anchor(event)
            self._closed(event.anchor, 1, 1)
        elif kind is yaml.MappingStartEvent or kind is yaml.SequenceStartEvent:
            self._level(1, event)
            self._anchor(event)
            self.stack.append([1, 1, event.anchor])
        elif kind is yaml.MappingEndEvent or kind is yaml.SequenceEndEvent:
            size, height, anchor = self.stack.pop()
            self._closed(anchor, size, height)
        elif kind is yaml.AliasEvent:
            self._alias(event)

    def _alias(self, event: Any) -> None:
        anchor = event.anchor
        if anchor not in self.anchors:
            if any(frame[2] == anchor for frame in self.stack):
                raise UnsafeYaml(f"{self.what}: a YAML alias refers to a node containing it (a recursive "
                                 "structure)")
            raise UnsafeYaml(f"{self.what}: not valid YAML (found undefined alias {anchor!r}{_at(event)})")
        self.aliases += 1
        if self.aliases > MAX_YAML_ALIASES:
            raise UnsafeYaml(f"{self.what}: more than {MAX_YAML_ALIASES:,} alias uses in the YAML; refused")
        size, height = self.anchors[anchor]
        self._level(height, event)
        self._add(size, height)

    def _level(self, height: int, event: Any) -> None:
        if len(self.stack) + height > MAX_YAML_DEPTH:  # an alias nests its anchor's whole height here
            raise UnsafeYaml(f"{self.what}: YAML nested too deeply (more than {MAX_YAML_DEPTH} levels)")

    def _anchor(self, event: Any) -> None:
        anchor = event.anchor
        if anchor is not None and (anchor in self.anchors or any(frame[2] == anchor for frame in self.stack)):
            raise UnsafeYaml(f"{self.what}: not valid YAML (found duplicate anchor {anchor!r}{_at(event)})")

    def _closed(self, anchor: str | None, size: int, height: int) -> None:
        if anchor is not None:
            self.anchors[anchor] = (size, height)
        self._add(size, height)

    def _add(self, size: int, height: int) -> None:
        if size > MAX_YAML_NODES:
            self._too_big()
        if self.stack:
            parent = self.stack[-1]
            parent[0] += size
            parent[1] = max(parent[1], height + 1)
            if parent[0] > MAX_YAML_NODES:  # checked as it grows: a bomb fails before its collection ends
                self._too_big()

    def _too_big(self) -> None:
        raise UnsafeYaml(f"{self.what}: YAML expands to more than {MAX_YAML_NODES:,} nodes ({self.aliases:,} alias "
                         "uses); refused before expanding it (an alias bomb?)")


def _at(event: Any) -> str:
    mark = event.start_mark
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


class BoundedLoader(_Parser, Composer, SafeConstructor, Resolver):  # type: ignore[misc]
    """A safe loader (libyaml's parser when available, PyYAML's own composer and safe constructor) whose every
    event passes through :class:`YamlBounds` first: nodes are composed only from events within the limits.
    ``stream``: text or a text file (read in chunks as events are pulled)."""

    def __init__(self, stream: Any, what: str) -> None:
        _Parser.__init__(self, stream)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self.bounds = YamlBounds(what)

    def get_event(self) -> Any:
        event = _Parser.get_event(self)
        self.bounds.feed(event)
        return event

    def compose(self) -> Any:
        """The next node (PyYAML's composer in Python: it pulls events through :meth:`get_event`; anchors of
        nodes composed before stay known to later aliases)."""
        return Composer.compose_node(self, None, None)

    def skip(self) -> None:
        """Read past the next node, measuring it, without composing it."""
        depth = self.bounds.depth
        self.get_event()
        while self.bounds.depth > depth:
            self.get_event()


def safe_yaml(text: str, what: str) -> tuple[Any, Any]:
    """Parse untrusted YAML into (data, root node) within the size, depth and expansion limits above; raises
    :class:`UnsafeYaml` (naming ``what``) for invalid or oversized YAML, before building any Python object."""
    if len(text) > MAX_YAML_BYTES:
        raise UnsafeYaml(f"{what}: {len(text) / 1e6:.0f} MB of YAML, more than the {MAX_YAML_BYTES >> 20} MiB a "
                         "catalog may have (split it, or use CSV/Parquet)")
    loader = BoundedLoader(text, what)
    try:
        try:
            node = Composer.get_single_node(loader)  # every event measured: refused before it is composed
        except yaml.YAMLError as exc:
            raise UnsafeYaml(f"{what}: not valid YAML ({exc})") from None
        if node is None:
            return None, None
        try:
            return loader.construct_document(node), node
        except CONSTRUCT_ERRORS as exc:
            raise UnsafeYaml(f"{what}: not valid YAML ({exc})") from None
    finally:
        loader.dispose()
