"""Untrusted YAML, parsed within bounds: size, nesting depth and the size of the tree once aliases expand.

PyYAML builds an alias as a reference to one object, so ``safe_load`` of a kilobyte "billion laughs" file is
itself quick; code that walks the result as a tree (merging defaults, validating, hashing parameters) then
visits 10^9 nodes and grows to gigabytes. Here the document is composed into nodes first and measured with
memoisation (every alias counted where it is used, nothing expanded), and refused before any Python object is
built when it exceeds the limits. libyaml itself stops at 1000 nesting levels.
"""

from __future__ import annotations

from typing import Any

# A 10,000-job catalog is ~3 MB and ~200,000 nodes; these leave room while a hostile file fails in milliseconds.
MAX_YAML_BYTES = 64 << 20
MAX_YAML_NODES = 2_000_000
MAX_YAML_ALIASES = 100_000
MAX_YAML_DEPTH = 64


class UnsafeYaml(ValueError):
    """Invalid YAML, or YAML over the limits; the message names the file (``what``) and the limit."""


def safe_yaml(text: str, what: str) -> tuple[Any, Any]:
    """Parse untrusted YAML into (data, root node) within the size, depth and expansion limits above; raises
    :class:`UnsafeYaml` (naming ``what``) for invalid or oversized YAML, before building any Python object."""
    import yaml

    if len(text) > MAX_YAML_BYTES:
        raise UnsafeYaml(f"{what}: {len(text) / 1e6:.0f} MB of YAML, more than the {MAX_YAML_BYTES >> 20} MiB a "
                         "catalog may have (split it, or use CSV/Parquet)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    try:
        try:
            node = loader.get_single_node()  # nodes only: an alias is a reference here, nothing is copied yet
        except RecursionError:
            raise UnsafeYaml(f"{what}: YAML nested too deeply (more than {MAX_YAML_DEPTH} levels)") from None
        except yaml.YAMLError as exc:
            raise UnsafeYaml(f"{what}: not valid YAML ({exc})") from None
        if node is None:
            return None, None
        _check_expansion(node, what)
        try:
            return loader.construct_document(node), node
        except yaml.YAMLError as exc:
            raise UnsafeYaml(f"{what}: not valid YAML ({exc})") from None
    finally:
        loader.dispose()


def _check_expansion(root: Any, what: str) -> None:
    """Refuse YAML whose tree, with every alias expanded where it is used, is too deep or too large (counted
    per distinct node with memoisation, so the check itself never expands anything)."""
    import yaml

    sizes: dict[int, int] = {}
    aliases = 0
    # Iterative post-order walk: (node, depth, children pushed?); a node on the current path again is a cycle.
    on_path: set[int] = set()
    stack: list[tuple[Any, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, expanded = stack.pop()
        key = id(node)
        if isinstance(node, yaml.MappingNode):
            kids = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            kids = list(node.value)
        else:
            kids = []
        if expanded:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(k)] for k in kids)
            if sizes[key] > MAX_YAML_NODES:
                raise UnsafeYaml(f"{what}: YAML expands to more than {MAX_YAML_NODES:,} nodes ({aliases:,} alias "
                                 "uses); refused before expanding it (an alias bomb?)")
            continue
        if key in sizes:  # a node used again: an alias
            aliases += 1
            if aliases > MAX_YAML_ALIASES:
                raise UnsafeYaml(f"{what}: more than {MAX_YAML_ALIASES:,} alias uses in the YAML; refused")
            continue
        if key in on_path:
            raise UnsafeYaml(f"{what}: a YAML alias refers to a node containing it (a recursive structure)")
        if depth > MAX_YAML_DEPTH:
            raise UnsafeYaml(f"{what}: YAML nested too deeply (more than {MAX_YAML_DEPTH} levels)")
        on_path.add(key)
        stack.append((node, depth, True))
        stack.extend((k, depth + 1, False) for k in kids)
