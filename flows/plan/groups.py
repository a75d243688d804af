"""Jobs that must run together: those sharing an artifact key (ten edits of one source share its stages)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from flows.plan.planner import JobPlan


def _run_keys(plan: JobPlan) -> list[str]:
    """The keys a plan computes (a cached key needs no computing: sharing one does not tie two jobs)."""
    return [sp.key for sp in plan.stages.values() if sp.key and sp.status == "run"]


def stream_groups(plans: Iterable[JobPlan], window: int = 256, settle: int = 32
                  ) -> Iterator[list[tuple[int, JobPlan]]]:
    """Groups of ``(catalog rank, plan)``, jobs sharing a key to compute in one group, formed over a bounded
    look-ahead: ``plans`` is pulled lazily, and the groups come oldest (by their first job) first.

    The oldest group is yielded once ``settle`` plans were pulled after its last job without joining it, or
    ``window`` plans are held (pulled and not yet yielded), or ``plans`` is exhausted. Jobs sharing a key are
    nearly always close in a catalog (ten edits of one source, one after the other), so they meet in one
    group. A key shared by jobs further apart lands in two groups: still correct (the store commits atomically;
    the later group finds the artifact cached, or computes it once more if both run at once), only not
    deduplicated."""
    if window < 1:
        raise ValueError("window must be at least 1")
    source = iter(plans)
    groups: dict[int, list[tuple[int, JobPlan]]] = {}  # id (its first rank) -> members; insertion = age order
    last: dict[int, int] = {}  # id -> the rank of its latest job
    owner: dict[str, int] = {}  # key to compute -> the open group computing it
    held = 0
    rank = 0
    exhausted = False
    while True:
        oldest = next(iter(groups), None)
        if oldest is not None and (exhausted or held >= window or rank - last[oldest] > settle):
            gid = oldest
            members = groups.pop(gid)
            del last[gid]
            held -= len(members)
            for _, plan in members:
                for key in _run_keys(plan):
                    if owner.get(key) == gid:
                        del owner[key]
            yield members
            continue
        if exhausted:
            return
        plan = next(source, None)
        if plan is None:
            exhausted = True
            continue
        keys = _run_keys(plan)
        joined = sorted({owner[k] for k in keys if k in owner})
        gid = joined[0] if joined else rank
        members = groups.setdefault(gid, [])
        for other in joined[1:]:  # the plan ties younger groups to the oldest one: merge them into it
            del last[other]
            for member in groups.pop(other):
                members.append(member)
                for key in _run_keys(member[1]):
                    owner[key] = gid
        members.append((rank, plan))
        if joined[1:]:
            members.sort(key=lambda m: m[0])
        for key in keys:
            owner[key] = gid
        last[gid] = rank
        held += 1
        rank += 1


def job_groups(plans: list[JobPlan]) -> list[list[JobPlan]]:
    """Plans partitioned so that no stage key is shared across groups, in catalog order.

    A group can then run as one unit (one Prefect task) without two units computing the same artifact."""
    everything = len(plans) + 1
    return [[plan for _, plan in group] for group in stream_groups(plans, window=everything, settle=everything)]
