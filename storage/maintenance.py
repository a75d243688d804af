"""Store upkeep: ``verify`` (find damage; ``repair`` quarantines it) and ``gc`` (safe beside runs)."""

from storage.gc import GcReport, gc, referenced
from storage.verify import Finding, VerifyReport, verify

__all__ = ["Finding", "GcReport", "VerifyReport", "gc", "referenced", "verify"]
