"""File stamps for fingerprint indexes that cannot go stale.

Size + mtime alone miss a file replaced in place with both kept (``cp -p``, ``rsync -t``, ``tar -x``). The
inode change time cannot be set from user space: any write, ``utime`` or rename-into-place moves it, so
(size, mtime, ctime, inode) notices all three. A hash of the first and last ``PARTIAL`` bytes adds a content
check for filesystems whose ctime is not to be trusted (some FUSE and network mounts) at the cost of reading
up to 128 KiB per file; ``"full"`` hashes every byte (bench/store.py measures the three).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePath
from typing import Any, Literal

PARTIAL = 64 * 1024
Content = Literal["none", "partial", "full"]


def _digest(path: str | os.PathLike[str], size: int, content: Content) -> str:
    if content == "none":
        return ""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if content == "full" or size <= 2 * PARTIAL:
            # Every byte to the end, in blocks; a small file (a frame, a mask) in one read: a buffered read
            # returns less than asked for only at the end.
            want = 2 * PARTIAL + 1
            while True:
                block = fh.read(want)
                h.update(block)
                if len(block) < want:
                    break
                want = 1 << 20
        else:
            h.update(fh.read(PARTIAL))
            fh.seek(size - PARTIAL)
            h.update(fh.read(PARTIAL))
    return h.hexdigest()


def file_stamp(path: str | os.PathLike[str], content: Content = "partial") -> list[Any]:
    """[name, size, mtime_ns, ctime_ns, inode, content digest ('' for "none")] of one file."""
    name = path.name if isinstance(path, PurePath) else Path(path).name  # no new Path per file: a warm plan stamps many
    st = os.stat(path)
    return [name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, _digest(path, st.st_size, content)]


def stamp(path: str | os.PathLike[str], content: Content = "partial") -> list[Any]:
    """A file's stamp, or a folder's: the stamps of its files (not recursive, sorted by name)."""
    p = Path(path)
    if p.is_file():
        return file_stamp(p, content)
    return [file_stamp(q, content) for q in sorted(p.iterdir()) if q.is_file()]
