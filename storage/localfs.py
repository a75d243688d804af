"""Local-filesystem helpers that never follow a symlink: a store is self-contained, and a link inside it (an
artifact folder, ``.tmp``) is damage to report, never a way out of the store for gc or repair."""

from __future__ import annotations

import os
import shutil
import stat
import sys

ABSENT, DIR, FILE, LINK, OTHER = "absent", "dir", "file", "link", "other"


def kind(path: str) -> str:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return ABSENT
    except NotADirectoryError:  # a parent is a file
        return ABSENT
    if stat.S_ISLNK(mode):
        return LINK
    if stat.S_ISDIR(mode):
        return DIR
    return FILE if stat.S_ISREG(mode) else OTHER


def entries(path: str, *, follow: bool = False) -> list[tuple[str, str]]:
    """(name, kind) of a folder's entries, sorted; [] when it is absent or not a real folder (``follow``: or a
    link to one; only for the store's root, which may be a link)."""
    if kind(path) != DIR and not (follow and os.path.isdir(path)):
        return []
    out = []
    with os.scandir(path) as it:
        for e in it:
            if e.is_symlink():
                k = LINK
            elif e.is_dir(follow_symlinks=False):
                k = DIR
            elif e.is_file(follow_symlinks=False):
                k = FILE
            else:
                k = OTHER
            out.append((e.name, k))
    return sorted(out)


def links_below(path: str) -> list[str]:
    """Relative paths of every symlink inside a real folder (os.walk does not descend into links)."""
    found = []
    for top, dirs, files in os.walk(path, followlinks=False):
        for name in dirs + files:
            if os.path.islink(os.path.join(top, name)):
                found.append(os.path.relpath(os.path.join(top, name), path))
    return sorted(found)


def purge(path: str) -> None:
    """Remove a file, a link (the link, not its target) or a folder tree (links inside are unlinked, not
    followed: shutil.rmtree's fd-based walk)."""
    k = kind(path)
    if k == ABSENT:
        return
    if k == DIR:
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=lambda f, p, e: _gone_is_fine(f, p, (type(e), e, None)))
        else:
            shutil.rmtree(path, onerror=_gone_is_fine)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _gone_is_fine(func: object, path: str, exc_info: tuple[type[BaseException], BaseException, object]) -> None:
    if not isinstance(exc_info[1], FileNotFoundError):  # two purges of one trash entry race harmlessly
        raise exc_info[1]


def mtime(path: str) -> float | None:
    try:
        return os.lstat(path).st_mtime
    except FileNotFoundError:
        return None
