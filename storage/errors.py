"""What the store raises. Damage has its own types, so callers can quarantine and recompute instead of failing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from storage.store import ArtifactRef


class ArtifactNotFound(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ArtifactDamaged(ArtifactNotFound):
    """An artifact is there but cannot be trusted: a checksum mismatch, a missing chunk, shard, metadata file or
    commit marker, a symlinked folder... ``what`` says which, in a few words.

    A subclass of :class:`ArtifactNotFound`, so code that only knows "absent" treats it as absent (recompute);
    code that knows better quarantines it first (:meth:`storage.ArtifactStore.quarantine`)."""

    def __init__(self, ref: ArtifactRef, what: str) -> None:
        super().__init__(f"damaged artifact {ref.path}: {what}")
        self.ref = ref
        self.what = what

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (Ray, Prefect results) with its fields
        return (type(self), (self.ref, self.what))


class DocumentDamaged(ValueError):
    """A small JSON document of the store (job manifest, index entry, lease) is truncated or not what it should
    be. A ValueError, as json's own error was before."""

    def __init__(self, relpath: str, what: str) -> None:
        super().__init__(f"damaged store document {relpath}: {what}")
        self.relpath = relpath
        self.what = what

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.relpath, self.what))


class StoreNotFound(FileNotFoundError):
    """No store at this URL (maintenance commands never create one)."""

    def __init__(self, url: str) -> None:
        super().__init__(f"no store at {url}")
        self.url = url

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.url,))
