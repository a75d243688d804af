"""Learned metric models for the ``evaluate`` stage: CLIP, DOVER (ONNX) and I3D for FVD (TorchScript).

All load from local files only (``HF_HUB_OFFLINE=1``, ``local_files_only=True``); nothing is downloaded.
Weights layout for the ``learned`` backend (every part optional, missing parts are skipped)::

    <weights>/clip/                 a transformers CLIPModel folder (config, weights, tokenizer, processor)
    <weights>/dover.onnx            DOVER exported by its convert_to_onnx.py (inputs aes_view, tech_view)
    <weights>/i3d_torchscript.pt    the StyleGAN-V I3D detector used for FVD
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages import metrics
from stages.base import MissingWeightsError, StageInputError

CLIP_DIR, DOVER_FILE, I3D_FILE = "clip", "dover.onnx", "i3d_torchscript.pt"


# ---- CLIP -------------------------------------------------------------------------------------------

@dataclass
class ClipModel:
    model: Any
    processor: Any
    device: str


def load_clip(path: str, device: str) -> ClipModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise MissingWeightsError(f"evaluate: {folder} is not a CLIPModel folder (no config.json)")
    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()
        processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    except OSError as exc:
        raise MissingWeightsError(f"evaluate: cannot load CLIP from {folder}: {exc}") from None
    return ClipModel(model, processor, device)


def _embedding(out: Any) -> torch.Tensor:
    # transformers 4 returns the projected tensor, 5 an output object whose pooler_output is projected.
    emb = out if isinstance(out, torch.Tensor) else out.pooler_output
    return torch.nn.functional.normalize(emb.float(), dim=-1)


@torch.no_grad()
def image_embeddings(clip: ClipModel, video: np.ndarray, batch: int) -> torch.Tensor:
    chunks = []
    for s in range(0, video.shape[0], batch):
        pix = clip.processor(images=list(video[s:s + batch]), return_tensors="pt")["pixel_values"]
        chunks.append(_embedding(clip.model.get_image_features(pixel_values=pix.to(clip.device))))
    return torch.cat(chunks)


@torch.no_grad()
def clip_scores(clip: ClipModel, video: np.ndarray, prompt: str, batch: int) -> np.ndarray:
    """Per frame: 100 * max(cos(text, frame), 0) (CLIPScore without the 2.5 rescaling)."""
    limit = getattr(clip.model.config.text_config, "max_position_embeddings", 77)
    tok = clip.processor(text=[prompt], return_tensors="pt", padding=True, truncation=True, max_length=limit)
    text = _embedding(clip.model.get_text_features(input_ids=tok["input_ids"].to(clip.device),
                                                   attention_mask=tok["attention_mask"].to(clip.device)))
    cos = image_embeddings(clip, video, batch) @ text[0]
    return (100.0 * cos.clamp(min=0)).cpu().numpy().astype(np.float32)


@torch.no_grad()
def clip_temporal(clip: ClipModel, video: np.ndarray, batch: int) -> np.ndarray:
    """Per pair: cosine similarity of consecutive frames' CLIP image embeddings."""
    emb = image_embeddings(clip, video, batch)
    return (emb[1:] * emb[:-1]).sum(-1).cpu().numpy().astype(np.float32)


# ---- DOVER (ONNX) -----------------------------------------------------------------------------------

@dataclass
class DoverModel:
    session: Any
    tech_clips: int


def load_dover(path: str, device: str) -> DoverModel:
    import onnxruntime as ort

    if not Path(path).is_file():
        raise MissingWeightsError(f"evaluate: no DOVER ONNX file at {path}")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else \
        ["CPUExecutionProvider"]
    providers = [p for p in providers if p in ort.get_available_providers()]
    session = ort.InferenceSession(path, providers=providers)
    names = [i.name for i in session.get_inputs()]
    if names[:2] != ["aes_view", "tech_view"]:
        raise StageInputError(f"evaluate: {path} has inputs {names}, expected ['aes_view', 'tech_view'] "
                              "(export it with DOVER's convert_to_onnx.py)")
    clips = session.get_inputs()[1].shape[0]
    return DoverModel(session, clips if isinstance(clips, int) and clips > 0 else 3)


def dover_scores(model: DoverModel, video: np.ndarray, seed: int) -> dict[str, float]:
    aes, tech = metrics.dover_views(video, model.tech_clips, seed)
    a, t = model.session.run(None, {"aes_view": aes, "tech_view": tech})[:2]
    return metrics.dover_fuse(float(np.mean(a)), float(np.mean(t)))


# ---- I3D (FVD) --------------------------------------------------------------------------------------

@dataclass
class I3DModel:
    detector: Any
    device: str


def load_i3d(path: str, device: str) -> I3DModel:
    if not Path(path).is_file():
        raise MissingWeightsError(f"evaluate: no I3D TorchScript file at {path}")
    return I3DModel(torch.jit.load(path, map_location=device).eval(), device)


@torch.no_grad()
def i3d_features(model: I3DModel, video: np.ndarray) -> np.ndarray:
    """StyleGAN-V convention: [1, 3, T, H, W] in [-1, 1], rescale=False, resize=True -> features."""
    x = torch.from_numpy(np.ascontiguousarray(video)).to(model.device).float()
    x = (x / 127.5 - 1.0).permute(3, 0, 1, 2)[None]
    feats = model.detector(x, rescale=False, resize=True, return_features=True)
    return feats.reshape(-1).float().cpu().numpy()


# ---- the bundle -------------------------------------------------------------------------------------

def load_bundle(path: str, device: str) -> dict[str, Any]:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise MissingWeightsError(f"evaluate: learned-metric weights folder {root} does not exist")
    out: dict[str, Any] = {"skipped": {}}
    parts = {"clip": (CLIP_DIR, load_clip), "dover": (DOVER_FILE, load_dover), "fvd": (I3D_FILE, load_i3d)}
    for key, (name, loader) in parts.items():
        if (root / name).exists():
            out[key] = loader(str(root / name), device)
        else:
            out["skipped"][key.upper() if key != "clip" else "CLIP"] = f"no {name} in {root}"
    if len(out) == 1:
        raise MissingWeightsError(f"evaluate: {root} holds none of {CLIP_DIR}/, {DOVER_FILE}, {I3D_FILE}")
    return out
