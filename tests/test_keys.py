from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from storage.keys import array_digest, artifact_key, canonical_json, weights_digest

BASE = dict(stage="flow", version="1", params={"preset": "medium", "alpha": 0.1, "levels": [3, 2]},
            backend="dis", weights_digest="", inputs={"frames": "ab" * 32})


def test_key_is_sha256_of_canonical_json() -> None:
    key = artifact_key(**BASE)
    assert len(key) == 64 and int(key, 16) >= 0
    assert canonical_json({"b": 1.0, "a": [1, 2]}) == '{"a":[1,2],"b":1.0}'


def test_dict_order_does_not_matter() -> None:
    reordered = dict(BASE, params={"levels": [3, 2], "alpha": 0.1, "preset": "medium"})
    assert artifact_key(**reordered) == artifact_key(**BASE)


@pytest.mark.parametrize(
    "change",
    [
        {"stage": "depth"},
        {"version": "2"},
        {"params": {"preset": "medium", "alpha": 0.1000001, "levels": [3, 2]}},
        {"params": {"preset": "medium", "alpha": 0.1, "levels": [2, 3]}},
        {"backend": "deepflow"},
        {"weights_digest": "00" * 32},
        {"inputs": {"frames": "cd" * 32}},
    ],
)
def test_any_change_gives_a_new_key(change: dict) -> None:
    assert artifact_key(**{**BASE, **change}) != artifact_key(**BASE)


def test_same_key_in_another_process() -> None:
    code = (
        "import json,sys; from storage.keys import artifact_key; "
        "print(artifact_key(**json.loads(sys.argv[1])))"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(BASE)], capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert out.stdout.strip() == artifact_key(**BASE)


def test_non_finite_floats_and_paths_are_refused() -> None:
    with pytest.raises(ValueError):
        artifact_key(**{**BASE, "params": {"x": float("nan")}})
    with pytest.raises(TypeError):
        artifact_key(**{**BASE, "params": {"x": Path("/tmp/a.png")}})


def test_array_digest_sees_dtype_shape_and_content() -> None:
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert array_digest(a) == array_digest(a.copy())
    assert array_digest(a) != array_digest(a.reshape(4, 3))
    assert array_digest(a) != array_digest(a.astype(np.int16))
    b = a.copy()
    b[2, 3] ^= 1
    assert array_digest(a) != array_digest(b)
    assert array_digest(np.asfortranarray(a)) == array_digest(a)


def test_weights_digest_follows_content(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "w.bin").write_bytes(b"\x00" * 100)
    first = weights_digest(folder)
    assert first == weights_digest(folder)  # memoised, same answer
    (folder / "w.bin").write_bytes(b"\x01" * 100)
    assert weights_digest(folder) != first
    assert weights_digest(None) == ""
    with pytest.raises(FileNotFoundError):
        weights_digest(tmp_path / "missing.pth")
