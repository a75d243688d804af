"""Deterministic weight fill (tests/data/parity/README.md, section A).

Builds a state dict from a ``<name>.keys.json`` signature alone: each tensor is drawn from its own CPU
generator seeded with the crc32 of its key, so the order of keys does not matter and anybody can rebuild
the exact weights the parity fixtures were produced with. Benchmarks use it for real-size random weights.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence

import torch

Entry = Sequence  # [key, shape, dtype] as stored in keys.json


def read_keys(path: str | os.PathLike[str]) -> list[tuple[str, list[int], str]]:
    """Entries ``(key, shape, dtype)`` of a keys.json file, in registration order."""
    with open(path, encoding="utf-8") as fh:
        return [(str(k), [int(n) for n in shape], str(dt)) for k, shape, dt in json.load(fh)]


def raft_aliases(keys: Iterable[str]) -> dict[str, str]:
    """RAFT registers one BatchNorm twice (``norm3`` = ``downsample.1``): both get the downsample values."""
    return {k: k.replace(".norm3.", ".downsample.1.") for k in keys if ".norm3." in k}


def fill_value(key: str, shape: Sequence[int], dtype: str) -> torch.Tensor:
    """The tensor the rule assigns to ``key`` (no alias handling)."""
    if dtype != "float32":
        return torch.zeros(tuple(shape), dtype=getattr(torch, dtype))
    g = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
    x = torch.randn(tuple(shape), generator=g, dtype=torch.float64)
    # Computed in float64, first matching case wins, then rounded to float32.
    if key.endswith("running_var"):
        v = 1.0 + 0.1 * x.abs()
    elif key.endswith("running_mean"):
        v = 0.1 * x
    elif len(shape) >= 2:
        v = x * (1.0 / math.sqrt(math.prod(shape[1:])))
    elif len(shape) == 1 and key.endswith(".weight"):
        v = 0.1 * x + 1.0
    else:
        v = 0.1 * x
    return v.to(torch.float32)


def fill_state_dict(entries: Iterable[Entry],
                    aliases: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """State dict for ``entries``; an aliased key gets the value generated for its source key."""
    aliases = aliases or {}
    out: dict[str, torch.Tensor] = {}
    for key, shape, dtype in entries:
        out[key] = fill_value(aliases.get(key, key), shape, dtype)
    return out


def fill_from_keys(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Fill a keys.json file, applying the RAFT alias rule where it has ``norm3`` keys."""
    entries = read_keys(path)
    return fill_state_dict(entries, raft_aliases(k for k, _, _ in entries))


def checksum_mismatches(state: Mapping[str, torch.Tensor],
                        checks: Mapping[str, Sequence[float]]) -> list[str]:
    """Keys whose ``[sum, sum_of_abs, first_element]`` differ from ``fill_checks.json``'s (empty: all good).

    Sums are float64 over the float32 values; they are compared to a relative 1e-9 (summation order),
    the first element exactly.
    """
    bad = sorted(set(checks) ^ set(state))
    for key in sorted(set(checks) & set(state)):
        total, total_abs, first = checks[key]
        t = state[key].double().flatten()
        got = (t.sum().item(), t.abs().sum().item(), t[0].item() if t.numel() else 0.0)
        if not (math.isclose(got[0], total, rel_tol=1e-9, abs_tol=1e-9)
                and math.isclose(got[1], total_abs, rel_tol=1e-9, abs_tol=1e-9) and got[2] == first):
            bad.append(key)
    return bad
