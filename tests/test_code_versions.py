"""A forgotten version bump cannot serve stale artifacts.

``tests/data/code_versions.json`` records, per stage and per backend, the code version and a digest of the
code behind it (the stage module and the ``stages`` modules it imports; for a backend, the modules its
function and loader import lazily, such as ``stages.nets.cig``), docstrings and comments stripped. When the
code changes, the version must change too; then re-record on purpose:

    .venv/bin/python tests/test_code_versions.py --record

A pure refactor that changes no output may be re-recorded without a bump: that is the deliberate decision the
test asks for.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import sys
from pathlib import Path
from typing import Any

RECORD = Path(__file__).parent / "data" / "code_versions.json"
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stages import available_stages  # noqa: E402


def _module_file(name: str) -> Path | None:
    """The source file of a ``stages`` module (no import needed), None for other names."""
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _stripped(tree: ast.AST) -> str:
    """The code without docstrings (comments never reach the AST)."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


def _imports(tree: ast.AST, *, top_level_only: bool) -> set[str]:
    """``stages.*`` modules imported (at module level only, or anywhere)."""
    nodes = tree.body if top_level_only else list(ast.walk(tree))  # type: ignore[attr-defined]
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stages"):
            out.add(node.module)
            for alias in node.names:  # `from stages import metrics` imports a module too
                if _module_file(f"{node.module}.{alias.name}"):
                    out.add(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("stages"))
    return {m for m in out if m not in ("stages", "stages.base") and _module_file(m)}


def _closure(roots: set[str], exclude: set[str] | None = None, *, top_level_only: bool = False) -> dict[str, str]:
    """Module -> stripped code, for ``roots`` and the ``stages`` modules they import (transitively)."""
    exclude = exclude or set()
    seen: dict[str, str] = {}
    todo = sorted(roots)
    while todo:
        name = todo.pop()
        if name in seen or name in exclude:
            continue
        path = _module_file(name)
        if path is None:
            continue
        tree = ast.parse(path.read_text())
        seen[name] = _stripped(ast.parse(path.read_text()))
        todo.extend(_imports(tree, top_level_only=top_level_only) - set(seen))
    return seen


def _digest(codes: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(codes):
        h.update(name.encode() + b"\0" + codes[name].encode() + b"\0")
    return h.hexdigest()[:16]


def _lazy_modules(fn: Any) -> set[str]:
    try:
        tree = ast.parse(inspect.getsource(fn).strip() if not inspect.getsource(fn).startswith(" ")
                         else "if True:\n" + inspect.getsource(fn))
    except (OSError, TypeError, SyntaxError):
        return set()
    return _imports(tree, top_level_only=False)


def current() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, stage in available_stages().items():
        # The stage: its module and what it imports at module level. Lazy imports (a network runner) belong
        # to the backends that make them.
        stage_codes = _closure({f"stages.{name}"}, top_level_only=True)
        backends = {}
        for bname, be in stage.backends.items():
            lazy = set().union(*(_lazy_modules(f) for f in (be.fn, be.load) if f is not None))
            codes = _closure(lazy, exclude=set(stage_codes))
            backends[bname] = {"version": be.version, "digest": _digest(codes) if codes else "",
                               "modules": sorted(codes)}
        out[name] = {"version": stage.version, "digest": _digest(stage_codes), "modules": sorted(stage_codes),
                     "backends": backends}
    return out


def test_code_changes_come_with_a_version_bump() -> None:
    recorded = json.loads(RECORD.read_text())
    now = current()
    problems = []
    for name, cur in now.items():
        old = recorded.get(name)
        if old is None:
            problems.append(f"stage {name}: not recorded")
            continue
        entries = [(f"stage {name}", cur, old)] + [
            (f"backend {name}.{b}", cb, old.get("backends", {}).get(b)) for b, cb in cur["backends"].items()]
        for label, c, o in entries:
            if o is None:
                problems.append(f"{label}: not recorded")
            elif c["digest"] != o["digest"] and c["version"] == o["version"]:
                problems.append(f"{label}: code changed ({', '.join(c['modules'])}) but its version is still "
                                f"{c['version']!r}: bump it (or, for a change that alters no output, re-record)")
            elif c["digest"] != o["digest"] or c["version"] != o["version"]:
                problems.append(f"{label}: version {o['version']!r} -> {c['version']!r}: re-record")
    assert not problems, "\n".join(problems) + "\n(re-record: .venv/bin/python tests/test_code_versions.py --record)"


def test_the_digest_ignores_docstrings_and_comments() -> None:
    a = "def f(x):\n    '''Doc.'''\n    # why\n    return x + 1\n"
    b = "def f(x):\n    return x + 1  # other words\n"
    c = "def f(x):\n    return x + 2\n"
    assert _stripped(ast.parse(a)) == _stripped(ast.parse(b)) != _stripped(ast.parse(c))


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        raise SystemExit("usage: python tests/test_code_versions.py --record")
    RECORD.write_text(json.dumps(current(), indent=1, sort_keys=True) + "\n")
    print(f"recorded {RECORD}")
