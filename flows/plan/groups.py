"""Jobs that must run together: those sharing an artifact key (ten edits of one source share its stages)."""

from __future__ import annotations

from flows.plan.planner import JobPlan


def job_groups(plans: list[JobPlan]) -> list[list[JobPlan]]:
    """Plans partitioned so that no stage key is shared across groups, in catalog order.

    A group can then run as one unit (one Prefect task) without two units computing the same artifact."""
    parent = list(range(len(plans)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, plan in enumerate(plans):
        for sp in plan.stages.values():
            if sp.key and sp.status == "run":
                j = owner.setdefault(sp.key, i)
                parent[find(i)] = find(j)
    groups: dict[int, list[JobPlan]] = {}
    for i, plan in enumerate(plans):
        groups.setdefault(find(i), []).append(plan)
    return list(groups.values())  # a group first seen at its first job: catalog order
