"""The evaluate stage on small synthetic clips: metrics rank good and bad outputs, learned metrics load
from local files only (tiny random CLIP, a scripted I3D stand-in, a hand-built DOVER ONNX graph)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from flows.plan.calls import make_call
from flows.run.execute import execute
from stages import base
from stages.evaluate import STAGE, EvaluateParams
from storage.store import ArtifactStore

N, H, W = 6, 64, 64


def _texture(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    noise = cv2.GaussianBlur(rng.integers(0, 256, (*size, 3)).astype(np.uint8), (0, 0), 1.5)
    return cv2.normalize(noise, None, 0, 255, cv2.NORM_MINMAX)  # full contrast: DIS needs gradients


def _clip() -> dict[str, np.ndarray]:
    """Camera pans 2 px/frame over a texture; the old object (O_t) is a box, the new shape S_t a wider box
    moving with it; the 'perfect' output shows a textured red object exactly on S_t over the source."""
    rng = np.random.default_rng(0)
    tex = _texture(rng, (H + 4, W + 2 * N))
    frames = np.stack([tex[2:2 + H, 2 * t:2 * t + W] for t in range(N)])
    shape = np.zeros((N, H, W), bool)
    obj = np.zeros((N, H, W), bool)
    for t in range(N):
        shape[t, 20:44, 8 + 3 * t:36 + 3 * t] = True
        obj[t, 24:40, 12 + 3 * t:28 + 3 * t] = True
    # The new object: a reddish texture that moves rigidly with its box (so flow can follow it).
    skin = _texture(rng, (24, 28)) // 2
    skin[..., 0] += 120
    video = frames.copy()
    for t in range(N):
        video[t, 20:44, 8 + 3 * t:36 + 3 * t] = skin
    paste = np.stack([cv2.dilate(s.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0 for s in shape])
    return {"video": video, "frames": frames, "edited_frame": video[0].copy(), "shape_masks": shape,
            "paste_masks": paste, "object_masks": obj}


def _run(arrays: dict[str, np.ndarray], **params: object) -> dict[str, np.ndarray]:
    return STAGE.run(arrays, params)


def test_good_output_scores_better_than_naive_ones() -> None:
    arrays = _clip()
    good = _run(arrays)
    assert set(good) == {"warping_error", "occluded_fraction", "shape_iou", "first_frame_psnr",
                         "first_frame_ssim", "background_psnr", "background_fraction"}
    assert good["first_frame_psnr"] == pytest.approx(100.0) and good["first_frame_ssim"] == pytest.approx(1.0)
    assert good["shape_iou"].min() > 0.8
    assert (good["background_psnr"] == 100.0).all()  # background untouched
    # Repeating the edited first frame: static object, frozen background.
    frozen = _run({**arrays, "video": np.repeat(arrays["video"][:1], N, axis=0)})
    assert frozen["first_frame_psnr"] == pytest.approx(100.0)
    assert frozen["shape_iou"][-1] < good["shape_iou"][-1] - 0.2
    assert frozen["background_psnr"][1:].max() < 40.0
    # Per-frame flicker: same geometry, noisy colours.
    rng = np.random.default_rng(1)
    noisy = np.clip(arrays["video"].astype(int) + rng.integers(-25, 26, arrays["video"].shape), 0, 255)
    flicker = _run({**arrays, "video": noisy.astype(np.uint8)})
    assert flicker["warping_error"].mean() > 3 * good["warping_error"].mean()
    assert flicker["first_frame_ssim"] < 0.9 and flicker["background_psnr"].max() < 35.0
    for out in (good, frozen, flicker):
        assert all(np.isfinite(v).all() for v in out.values())


def test_empty_masks_give_finite_values() -> None:
    arrays = _clip()
    empty = np.zeros((N, H, W), bool)
    out = _run({**arrays, "shape_masks": empty, "paste_masks": empty, "object_masks": empty})
    assert all(np.isfinite(v).all() for v in out.values())
    assert (out["shape_iou"] == 1.0).all()  # nothing to track, nothing simulated: they agree
    assert (out["background_fraction"] == 1.0).all()
    full = np.ones((N, H, W), bool)
    out = _run({**arrays, "paste_masks": full})
    assert (out["background_fraction"] == 0.0).all() and np.isfinite(out["background_psnr"]).all()


def test_bad_inputs_are_reported() -> None:
    arrays = _clip()
    with pytest.raises(base.StageInputError, match="edited_frame"):
        _run({**arrays, "edited_frame": arrays["edited_frame"][:32]})
    with pytest.raises(base.StageInputError, match="source frames"):
        _run({**arrays, "frames": arrays["frames"][:3]})
    with pytest.raises(base.StageInputError, match="needs weights"):
        _run(arrays, flow_backend="raft")


def test_cached_in_the_store_with_timings(tmp_path: Path) -> None:
    arrays = _clip()
    store = ArtifactStore(tmp_path / "store")
    call = make_call(STAGE, inputs=arrays, params={"shape_tracker": "flow"})
    first = execute(call, store, externals=arrays)
    again = execute(call, store, externals=arrays)
    assert not first.cached and again.cached
    stored = store.read(call.ref)
    assert stored["first_frame_psnr"].shape == () and stored["warping_error"].shape == (N - 1,)
    assert store.attrs(call.ref)["compute_seconds"] > 0
    other = make_call(STAGE, inputs=arrays, params={"shape_tracker": "flow", "prompt": "a red box"})
    assert other.key == call.key  # the metrics backend reads no prompt
    clip = {"shape_tracker": "flow"}
    assert make_call(STAGE, backend="clip", inputs=arrays, params={**clip, "prompt": "a red box"}).key != \
        make_call(STAGE, backend="clip", inputs=arrays, params=clip).key  # the CLIP prompt is part of its key


# ---- learned metrics -----------------------------------------------------------------------------

def _tiny_clip(folder: Path) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in letters:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(folder)
    return folder


def _tiny_i3d(path: Path) -> Path:
    import torch

    class FakeI3D(torch.nn.Module):  # the StyleGAN-V detector's calling convention
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(3, 5)

        def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = True,
                    return_features: bool = True) -> torch.Tensor:
            if rescale:
                x = x * 2 - 1
            if resize:
                x = torch.nn.functional.interpolate(x, size=(4, 8, 8), mode="trilinear", align_corners=False)
            return self.proj(x.mean(dim=(2, 3, 4)))

    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(FakeI3D()), str(path))
    return path


def _field(num: int, value: int | str | bytes) -> bytes:
    """One protobuf field (varint or length-delimited): enough to write a small ONNX graph by hand."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n >> 7 else 0))
            n >>= 7
            if not n:
                return bytes(out)
    if isinstance(value, int):
        return varint(num << 3) + varint(value)
    data = value.encode() if isinstance(value, str) else value
    return varint(num << 3 | 2) + varint(len(data)) + data


def _tiny_dover(path: Path, clips: int = 2) -> Path:
    """An ONNX model with DOVER's interface whose 'scores' are the mean of each normalised view."""
    def info(name: str, dims: list[int]) -> bytes:
        shape = b"".join(_field(1, _field(1, d)) for d in dims)
        return _field(1, name) + _field(2, _field(1, _field(1, 1) + _field(2, shape)))

    def mean(inp: str, out: str) -> bytes:
        axes = _field(1, "axes") + b"".join(_field(8, a) for a in (1, 2, 3, 4)) + _field(20, 7)
        keep = _field(1, "keepdims") + _field(3, 0) + _field(20, 2)
        return _field(1, inp) + _field(2, out) + _field(4, "ReduceMean") + _field(5, axes) + _field(5, keep)

    graph = (_field(1, mean("aes_view", "aesthetic")) + _field(1, mean("tech_view", "technical"))
             + _field(2, "dover") + _field(11, info("aes_view", [1, 3, 32, 224, 224]))
             + _field(11, info("tech_view", [clips, 3, 32, 224, 224]))
             + _field(12, info("aesthetic", [1])) + _field(12, info("technical", [clips])))
    path.write_bytes(_field(1, 7) + _field(8, _field(1, "") + _field(2, 13)) + _field(7, graph))
    return path


def test_clip_backend_scores_and_temporal_consistency(tmp_path: Path) -> None:
    folder = _tiny_clip(tmp_path / "clip")
    arrays = _clip()
    params = EvaluateParams(prompt="a red box", shape_tracker="flow")
    out = STAGE.run(arrays, params, backend="clip", weights=str(folder))
    assert out["clip_score"].shape == (N,) and out["clip_temporal"].shape == (N - 1,)
    assert ((out["clip_score"] >= 0) & (out["clip_score"] <= 100)).all()
    frozen = STAGE.run({**arrays, "video": np.repeat(arrays["video"][:1], N, axis=0)}, params,
                       backend="clip", weights=str(folder))
    assert frozen["clip_temporal"] == pytest.approx(np.ones(N - 1), abs=1e-5)  # same frame: cosine 1
    assert (out["clip_temporal"] < 1 - 1e-4).any()
    assert frozen["clip_score"] == pytest.approx(np.full(N, out["clip_score"][0]), abs=1e-3)
    held = [k for k in base.loaded_models() if k[0] == "evaluate" and k[1] == "clip"]
    assert len(held) == 1  # loaded once for both calls
    assert "dover_overall" not in out and "fvd_features" not in out


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated upstream; I3D ships as one
def test_learned_bundle_computes_dover_and_fvd_features(tmp_path: Path) -> None:
    from stages import metrics

    bundle = tmp_path / "metric-models"
    bundle.mkdir()
    _tiny_i3d(bundle / "i3d_torchscript.pt")
    _tiny_dover(bundle / "dover.onnx", clips=2)
    arrays = _clip()
    out = STAGE.run(arrays, {"shape_tracker": "flow"}, backend="learned", weights=str(bundle))
    assert "clip_score" not in out  # no clip/ in the bundle: skipped
    aes, tech = metrics.dover_views(arrays["video"], tech_clips=2, seed=0)
    expect = metrics.dover_fuse(float(aes.mean()), float(tech.mean()))
    for k in ("overall", "technical", "aesthetic"):
        assert float(out[f"dover_{k}"]) == pytest.approx(expect[k], rel=1e-4)
    assert out["fvd_features"].shape == (5,) and not np.allclose(out["fvd_features"],
                                                                 out["fvd_source_features"])
    # Constant grey video -> features of a constant [-1, 1] input: checks the value convention.
    import torch

    grey = np.full((N, H, W, 3), 51, np.uint8)
    feats = STAGE.run({**arrays, "video": grey}, {"shape_tracker": "flow"}, backend="learned",
                      weights=str(bundle))["fvd_features"]
    det = torch.jit.load(str(bundle / "i3d_torchscript.pt"))
    ref = det.proj(torch.full((1, 3), 51 / 127.5 - 1.0)).detach().numpy()[0]
    assert feats == pytest.approx(ref, abs=1e-5)


def test_learned_backends_need_weights(tmp_path: Path) -> None:
    arrays = _clip()
    with pytest.raises(base.MissingWeightsError, match="needs weights"):
        STAGE.run(arrays, backend="clip")
    with pytest.raises(base.MissingWeightsError, match="holds none"):
        (tmp_path / "empty").mkdir()
        STAGE.run(arrays, backend="learned", weights=str(tmp_path / "empty"))
