"""State-dict signatures of the published network checkpoints, and reading a weights file's tensor shapes
without loading its values (for ``stages.models.check_weights``, before any compute).

``<name>.keys.json`` lists ``[key, shape, dtype]`` in registration order, exactly as the published file stores
its keys (copied from the parity fixtures): ``raft`` (raft-things.pth, ``module.`` prefix), ``u2net``
(u2net.pth), ``depthnet`` (StableV2V's 50000.ckpt), ``ctrl_adapter`` (Ctrl-Adapter ``i2vgenxl_depth``) and
``midas_dpt_swin2_large_384`` (MiDaS ``dpt_swin2_large_384.pt``).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
Shapes = dict[str, tuple[int, ...]]
# Wrappers training scripts put around a state dict.
_WRAPPERS = ("state_dict", "model", "module", "model_state_dict")


class UnreadableWeights(ValueError):
    """The file is not a readable checkpoint (truncated download, wrong format); the message says why."""


@cache
def signature(name: str) -> Shapes | None:
    """``key -> shape`` of ``<name>.keys.json``, or None if that signature is not shipped."""
    path = HERE / f"{name}.keys.json"
    if not path.is_file():
        return None
    return {str(k): tuple(int(n) for n in shape) for k, shape, _dtype in json.loads(path.read_text())}


def safetensors_shapes(path: Path) -> Shapes:
    """Tensor shapes from a ``.safetensors`` header (a few kB read); a file shorter than its header says is
    reported as truncated."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise UnreadableWeights(f"{path.name} is {size} bytes: not a safetensors file (truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise UnreadableWeights(f"{path.name}: bad safetensors header (truncated or not safetensors)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UnreadableWeights(f"{path.name}: bad safetensors header (not safetensors?)") from None
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise UnreadableWeights(f"{path.name} is truncated: {size:,} bytes, its header needs {8 + n + end:,} "
                                "(a partial download?)")
    return {k: tuple(int(d) for d in v["shape"]) for k, v in header.items()}


def torch_shapes(path: Path) -> Shapes:
    """Tensor shapes of a torch checkpoint (``.pth``/``.pt``/``.ckpt``/``.bin``): memory-mapped and
    ``weights_only`` (nothing is executed, values are not read), unwrapped from ``state_dict``-like keys."""
    import torch

    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # a legacy (non-zip) file cannot be memory-mapped: read it plainly
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnreadableWeights(f"{path.name} cannot be read as a torch checkpoint (truncated download?): "
                                f"{first[:200]}") from None
    return _state_shapes(obj)


def _state_shapes(obj: Any) -> Shapes:
    for _ in range(2):  # e.g. {"state_dict": {...}} or {"model": {"state_dict": ...}}
        if isinstance(obj, Mapping) and not any(hasattr(v, "shape") for v in obj.values()):
            inner = next((obj[w] for w in _WRAPPERS if isinstance(obj.get(w), Mapping)), None)
            if inner is not None:
                obj = inner
    if not isinstance(obj, Mapping):
        raise UnreadableWeights(f"holds a {type(obj).__name__}, not a state dict")
    return {str(k): tuple(v.shape) for k, v in obj.items() if hasattr(v, "shape")}


def file_shapes(path: Path) -> Shapes:
    return safetensors_shapes(path) if path.suffix == ".safetensors" else torch_shapes(path)


def compare(found: Shapes, expected: Shapes, label: str, strip_prefix: str = "", limit: int = 5) -> list[str]:
    """Problems of ``found`` against ``expected`` (missing keys, unexpected keys, wrong shapes), each named;
    ``strip_prefix`` is removed from both sides first (``module.`` of DataParallel checkpoints)."""
    norm = lambda d: {k.removeprefix(strip_prefix): v for k, v in d.items()}  # noqa: E731
    found, expected = norm(found), norm(expected)
    problems: list[str] = []

    def some(keys: list[str]) -> str:
        more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    missing = [k for k in expected if k not in found]
    if missing:
        problems.append(f"{label}: {len(missing)} of {len(expected)} tensors missing: {some(missing)}")
    extra = [k for k in found if k not in expected]
    if extra:
        problems.append(f"{label}: {len(extra)} unexpected tensors (another network?): {some(extra)}")
    wrong = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    for k in wrong[:limit]:
        problems.append(f"{label}: tensor {k} has shape {list(found[k])}, expected {list(expected[k])}")
    if len(wrong) > limit:
        problems.append(f"{label}: {len(wrong) - limit} more tensors with a wrong shape")
    return problems
