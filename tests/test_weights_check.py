"""``stages.models.check_weights``: a wrong or partial weights folder/file is named before any compute.

Good folders: the CIG parity fixture (``tests/data/cig-pipeline``, the published layout at tiny width) and the
tiny editor pipelines of ``test_edit``. Networks: files filled from the shipped signatures (the parity fill
rule), then broken one piece at a time.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_edit import tiny_weights  # noqa: F401  (the module's tiny editor pipelines)

from stages import available_stages
from stages.models import WEIGHT_CHECKS, check_weights
from stages.nets import signatures
from stages.nets.fill import fill_from_keys

CIG = Path(__file__).parent / "data" / "cig-pipeline"
SIGNATURES = Path(signatures.__file__).parent


def test_every_learned_backend_is_checked() -> None:
    learned = {(name, b) for name, stage in available_stages().items()
               for b, be in stage.backends.items() if be.needs_weights}
    assert learned and learned <= set(WEIGHT_CHECKS)
    assert check_weights("flow", "dis", "/anything") == []  # no weights, nothing to check


def test_signatures_ship_as_package_data() -> None:
    for name in ("raft", "u2net", "depthnet", "ctrl_adapter", "midas_dpt_swin2_large_384"):
        sig = signatures.signature(name)
        assert sig and all(isinstance(s, tuple) for s in sig.values()), name
    assert len(signatures.signature("ctrl_adapter")) == 1092


# ---- the CIG folder ---------------------------------------------------------------------------------

@pytest.fixture()
def cig_copy(tmp_path: Path) -> Path:
    """The fixture folder as links (cheap); a test replaces or removes what it breaks."""
    root = tmp_path / "cig"
    shutil.copytree(CIG, root, copy_function=os.symlink, ignore=shutil.ignore_patterns("inputs", "*.npz", "*.md"))
    return root


def test_the_published_cig_layout_passes() -> None:
    assert check_weights("generate", "i2vgenxl", str(CIG)) == []


@pytest.mark.parametrize(("remove", "named"), [
    ("i2vgenxl/vae", "missing folder i2vgenxl/vae/"),
    ("i2vgenxl/scheduler/scheduler_config.json", "missing i2vgenxl/scheduler/scheduler_config.json"),
    ("i2vgenxl/feature_extractor/preprocessor_config.json", "i2vgenxl/feature_extractor/preprocessor_config.json"),
    ("stable-diffusion-v1.5/tokenizer/merges.txt", "stable-diffusion-v1.5/tokenizer/vocab.json + merges.txt"),
    ("i2vgenxl/tokenizer/tokenizer_config.json", "missing i2vgenxl/tokenizer/tokenizer_config.json"),
    ("i2vgenxl/image_encoder/model.safetensors", "i2vgenxl/image_encoder/diffusion_pytorch_model.safetensors"),
    ("controlnet-depth/config.json", "missing controlnet-depth/config.json"),
    ("ctrl-adapter-i2vgenxl-depth", "missing folder ctrl-adapter-i2vgenxl-depth/"),
])
def test_a_missing_piece_is_named(cig_copy: Path, remove: str, named: str) -> None:
    target = cig_copy / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    problems = check_weights("generate", "i2vgenxl", str(cig_copy))
    assert len(problems) == 1 and named in problems[0], problems


def test_a_partial_download_is_named(cig_copy: Path) -> None:
    unet = cig_copy / "i2vgenxl" / "unet" / "diffusion_pytorch_model.safetensors"
    data = unet.read_bytes()
    unet.unlink()
    unet.write_bytes(data[: len(data) // 2])
    (problem,) = check_weights("generate", "i2vgenxl", str(cig_copy))
    assert "i2vgenxl/unet/diffusion_pytorch_model.safetensors is truncated" in problem


def test_a_wrong_adapter_tensor_is_named(cig_copy: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = cig_copy / "ctrl-adapter-i2vgenxl-depth" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    key = "mid_block_adapter.proj_in.weight"
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)
    del state["down_blocks_adapter.0.proj_out.bias"]
    path.unlink()
    save_file(state, path)
    problems = check_weights("generate", "i2vgenxl", str(cig_copy))
    assert any("down_blocks_adapter.0.proj_out.bias" in p and "missing" in p for p in problems), problems
    assert any(f"tensor {key} has shape [32, 65]" in p for p in problems), problems
    # The published width (no width keys in config.json) is checked against the shipped signature.
    config = json.loads((CIG / "ctrl-adapter-i2vgenxl-depth" / "config.json").read_text())
    for k in ("down_channels", "mid_channels", "attention_head_dim", "inner_heads"):
        config.pop(k)
    (cig_copy / "ctrl-adapter-i2vgenxl-depth" / "config.json").unlink()
    (cig_copy / "ctrl-adapter-i2vgenxl-depth" / "config.json").write_text(json.dumps(config))
    problems = check_weights("generate", "i2vgenxl", str(cig_copy))
    assert any("has shape" in p and "expected [320" in p for p in problems), problems


# ---- the editors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["instructpix2pix", "paint-by-example", "sd-inpaint", "sketch"])
def test_editor_folders(backend: str, tiny_weights: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    good = tiny_weights[backend]
    assert check_weights("edit", backend, str(good)) == []
    broken = tmp_path / backend
    shutil.copytree(good, broken, copy_function=os.symlink)
    (broken / "unet" / "config.json").unlink()
    shutil.rmtree(broken / "vae")
    problems = check_weights("edit", backend, str(broken))
    assert sorted(problems) == ["missing folder vae/", "missing unet/config.json"], problems
    (broken / "model_index.json").unlink()
    assert "model_index.json" in " ".join(check_weights("edit", backend, str(broken)))


def test_the_sketch_mirror_layout_needs_its_controlnet(tiny_weights: dict[str, Path]) -> None:  # noqa: F811
    (problem,) = check_weights("edit", "sketch", str(tiny_weights["sd-inpaint"]))
    assert "controlnet" in problem


# ---- network files ----------------------------------------------------------------------------------

def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def depthnet_state() -> dict[str, torch.Tensor]:
    return fill_from_keys(SIGNATURES / "depthnet.keys.json")


def test_network_file_keys_and_shapes(depthnet_state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    good = _save(depthnet_state, tmp_path / "50000.ckpt")
    assert check_weights("refine", "rfc-net", str(good)) == []
    wrapped = _save({"state_dict": depthnet_state}, tmp_path / "wrapped.ckpt")  # as training scripts save
    assert check_weights("refine", "rfc-net", str(wrapped)) == []
    key = next(iter(depthnet_state))
    bad = dict(depthnet_state, **{key: torch.zeros(3, 3)})
    (problem,) = check_weights("refine", "rfc-net", str(_save(bad, tmp_path / "bad.ckpt")))
    assert f"tensor {key} has shape [3, 3], expected {list(depthnet_state[key].shape)}" in problem
    # Another network's file where U2-Net's or MiDaS's is expected: both sides named.
    problems = check_weights("source_masks", "u2net", str(good))
    assert any("tensors missing" in p for p in problems) and any("unexpected" in p for p in problems)
    assert any("tensors missing" in p for p in check_weights("depth", "dpt", str(good)))
    # A partial download cannot be opened: said so, not a crash.
    data = good.read_bytes()
    partial = tmp_path / "partial.ckpt"
    partial.write_bytes(data[: len(data) // 3])
    (problem,) = check_weights("refine", "rfc-net", str(partial))
    assert "partial.ckpt cannot be read" in problem
    assert "is not a file" in check_weights("refine", "rfc-net", str(tmp_path))[0]


def test_raft_with_or_without_the_module_prefix(tmp_path: Path) -> None:
    state = fill_from_keys(SIGNATURES / "raft.keys.json")  # the published keys: "module." prefixed
    assert check_weights("flow", "raft", str(_save(state, tmp_path / "raft-things.pth"))) == []
    bare = {k.removeprefix("module."): v for k, v in state.items()}
    assert check_weights("flow", "raft", str(_save(bare, tmp_path / "bare.pth"))) == []
    del bare["fnet.conv1.weight"]
    (problem,) = check_weights("flow", "raft", str(_save(bare, tmp_path / "less.pth")))
    assert "1 of" in problem and "fnet.conv1.weight" in problem


def test_models_check_and_the_planner_refuse_a_partial_folder_before_any_compute(cig_copy: Path,
                                                                                 tmp_path: Path) -> None:
    import subprocess
    import sys

    from flows.config.catalog import build_catalog
    from flows.config.profiles import Profile
    from flows.plan.run_plan import prepare_catalog

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo), "V2V_PROFILE": ""}

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "flows.cli.main", "models", "check", "--weights",
                               f"i2vgenxl={cig_copy}"], env=env, capture_output=True, text=True, timeout=300)

    assert check().returncode == 0
    (cig_copy / "i2vgenxl" / "tokenizer" / "tokenizer_config.json").unlink()
    proc = check()
    assert proc.returncode == 1 and "tokenizer_config.json" in proc.stdout, proc.stdout + proc.stderr
    bear = Path(__file__).parent / "data" / "bear"
    cat = build_catalog([("row 1", {"id": "bear", "source": str(bear / "frames"), "masks": str(bear / "mask-00000.png"),
                                    "first_frame": str(bear / "edited-first-frame-elephant.png")})], base=tmp_path)
    prof = Profile(name="gpu", backends={"generate": "i2vgenxl"}, weights={"i2vgenxl": str(cig_copy)},
                   params={"ingest": {"n_frames": 2, "width": 64, "height": 64}})
    plan = prepare_catalog(cat, prof, str(tmp_path / "store"))[2][0]
    assert not plan.ok and "tokenizer_config.json" in (plan.error or ""), plan.error
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").glob("ingest/*"))
