"""A run's lease on the store: every artifact it planned is protected from ``v2v store gc`` while it runs."""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import time
from collections.abc import Iterable, Iterator
from typing import Any

from flows.plan.planner import JobPlan
from storage.store import ArtifactRef, ArtifactStore


@contextlib.contextmanager
def run_lease(store: ArtifactStore, plans: Iterable[JobPlan] = ()) -> Iterator[Any]:
    """Hold a heartbeat lease naming planned artifacts (cached or to compute) for the run's duration: those of
    ``plans`` now, and those the scheduler adds (``lease.protect``) as it pulls streamed plans.

    A killed run's lease expires after its time-to-live, so gc never waits for ever; on a read-only store the
    lease is inactive and the run (which then only reads) goes on."""
    run_id = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
    with store.lease(run_id) as lease:
        lease.protect(sp.call.ref for plan in plans for sp in plan.stages.values() if sp.call is not None)
        yield lease


class ProtectedPlans:
    """The artifacts of the plans in flight, as a run's lease protects them: written once per batch of pulled
    plans, not per job, and counted, so a key that two jobs in flight share stays protected until both ended.
    Artifacts of ended jobs are released at the next batch (their manifests reference them by then)."""

    def __init__(self, lease: Any) -> None:
        self.lease = lease
        self.count: collections.Counter[str] = collections.Counter()
        self.refs: dict[str, ArtifactRef] = {}
        self.released: list[ArtifactRef] = []

    @staticmethod
    def _refs(plan: JobPlan) -> Iterator[ArtifactRef]:
        return (sp.call.ref for sp in plan.stages.values() if sp.call is not None)

    def protect(self, plans: Iterable[JobPlan]) -> None:
        """Protect these pulled plans' artifacts (before any of them is submitted)."""
        if self.lease is None:
            return
        refs = [ref for plan in plans for ref in self._refs(plan)]
        for ref in refs:
            self.count[ref.path] += 1
            self.refs[ref.path] = ref
        self.lease.protect(refs)
        gone = [r for r in self.released if not self.count[r.path]]
        if gone:
            self.lease.unprotect(gone)
        self.released = []

    def ended(self, plan: JobPlan) -> None:
        if self.lease is None:
            return
        for ref in self._refs(plan):
            self.count[ref.path] -= 1
            if not self.count[ref.path]:
                del self.count[ref.path]
                self.released.append(self.refs.pop(ref.path))
