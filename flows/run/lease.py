"""A run's lease on the store: every artifact it planned is protected from ``v2v store gc`` while it runs."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterable, Iterator
from typing import Any

from flows.plan.planner import JobPlan
from storage.store import ArtifactStore


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
