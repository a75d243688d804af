"""ISA stages on the bear clip at 512² (CPU or GPU): seconds per stage and backend, and the mask IoU figures.

Runs ingest -> flow -> source_masks -> depth -> shape_mask -> motion -> depth_sim -> refine through their
``STAGE.run`` (stages whose modules are missing are skipped), the default backend of each plus the cheap
alternatives, and prints one table. IoU is against the IS-Net reference masks in tests/data/bear
(source masks: per frame, mean and last; edited shape: the elephant frame).

Learned backends run when their weights are found (``stages.models.find_weights``: ``isnet``, ``u2net``,
``raft-things`` in the weights cache) or given (``--raft PATH``, ``--u2net PATH``); without them RAFT and
U2-Net are timed with the parity fill rule's random weights (same cost, no IoU). ``--slow`` adds DeepFlow
and runs RAFT and the saliency backends on all frames instead of 2 pairs / the last frame (RAFT takes
~30 s per pair on 2 CPU cores, the saliency models 3-20 s per frame).

``--device cuda`` runs the learned backends on the GPU, on every frame, each timed after one warm-up call
(cuDNN autotuning, kernel loading) with its peak GPU memory; it adds the DPT depth (DPT-Large, random
weights unless ``--dpt FOLDER``) and the RFC-Net refinement (parity fill rule unless ``--rfc PATH``).

The depth ``dpt`` backend also runs on the reference's MiDaS ``dpt_swin2_large_384.pt`` (``--midas PATH``, else
the parity fill: same cost; ~1 GB written to a temporary folder), on 2 frames unless ``--slow``.

Run: .venv/bin/python bench/isa.py [--frames 16] [--slow] [--raft PATH] [--u2net PATH] [--midas PATH] [--threads N]
     python bench/isa.py --device cuda [--dpt FOLDER] [--rfc PATH]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages import available_stages  # noqa: E402
from stages.base import MissingWeightsError  # noqa: E402
from stages.flow import warp_backward  # noqa: E402
from stages.ingest import IngestParams, canvas_geometry, read_source, warp_to_canvas  # noqa: E402
from stages.models import find_weights  # noqa: E402

BEAR = ROOT / "tests" / "data" / "bear"
ROWS: list[tuple[str, str, float, int, str]] = []
DEVICE = "cpu"
LEARNED = False  # every learned backend on every frame, timed after a warm-up call


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def timed(stage: str, backend: str | None, arrays: dict[str, np.ndarray], n: int, note: str = "",
          weights: str | None = None, params: dict | None = None) -> dict[str, np.ndarray] | None:
    st = available_stages().get(stage)
    if st is None:
        ROWS.append((stage, backend or "-", float("nan"), n, "module missing: skipped"))
        return None
    be = st.backend(backend)
    missing = [k for k in st.used_inputs(be.name) if k not in arrays]
    if missing:
        ROWS.append((stage, be.name, float("nan"), n, f"skipped: no {missing}"))
        return None
    inputs = {k: arrays[k] for k in st.used_inputs(be.name)}
    gpu = DEVICE.startswith("cuda") and be.gpu
    warm = gpu or (LEARNED and be.load is not None)
    device = DEVICE if gpu else "cpu"
    if be.load is not None:
        # Load the model outside the timing (once per worker in the pipeline): time the compute only.
        from stages.base import load_model

        load_model(st, be, weights, device)
    if warm:
        st.run(inputs, params, be.name, weights, device)  # warm-up: cuDNN autotuning, kernel loading
    if gpu:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = st.run(inputs, params, be.name, weights, device)
    if gpu:
        torch.cuda.synchronize()
        note = f"{note + '; ' if note else ''}peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GB"
    ROWS.append((stage, be.name, time.perf_counter() - start, n, note))
    return out


def add_note(text: str) -> None:
    """Put ``text`` before the last row's note (keeping what ``timed`` wrote there, e.g. peak memory)."""
    ROWS[-1] = ROWS[-1][:4] + ("; ".join(filter(None, (text, ROWS[-1][4]))),)


def random_weights(name: str, folder: Path) -> str | None:
    """A weights file with the real keys and shapes, filled by the parity rule: for timing only."""
    try:
        import torch

        from stages.nets.fill import fill_from_keys
    except ImportError:
        return None
    keys = ROOT / "tests" / "data" / "parity" / f"{name}.keys.json"
    path = folder / f"{name}.pth"
    torch.save(fill_from_keys(keys), path)
    return str(path)


def random_dpt(folder: Path) -> str:
    """A DPT-Large depth model (Intel/dpt-large, MiDaS v3 layout) with random weights: for timing only."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation

    torch.manual_seed(0)
    cfg = DPTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                    image_size=384, patch_size=16, backbone_out_indices=[5, 11, 17, 23],
                    neck_hidden_sizes=[256, 512, 1024, 1024], fusion_hidden_size=256, use_auxiliary_head=False)
    DPTForDepthEstimation(cfg).save_pretrained(folder / "dpt-large")
    return str(folder / "dpt-large")


def random_midas(folder: Path) -> str:
    """A ``dpt_swin2_large_384.pt`` with the real keys, filled by the parity rule (masks as constructed)."""
    import torch

    from stages.nets.fill import fill_from_keys
    from stages.nets.midas import GRIDS, MASKED, SIGNATURE, shifted_window_mask

    state = fill_from_keys(SIGNATURE)
    for key, grid in zip(MASKED, GRIDS, strict=False):
        state[key] = torch.from_numpy(shifted_window_mask(grid))
    torch.save(state, folder / "dpt_swin2_large_384.pt")
    return str(folder / "dpt_swin2_large_384.pt")


def cached_midas() -> str | None:
    try:
        return str(find_weights("midas") or "") or None
    except MissingWeightsError:  # no such entry in this checkout's model registry
        return None


def per_frame_iou(masks: np.ndarray, refs: np.ndarray) -> list[float]:
    return [iou(m, r) for m, r in zip(masks, refs, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--slow", action="store_true", help="also DeepFlow and saliency models on every frame")
    ap.add_argument("--raft", help="raft-things.pth (default: the weights cache, if present)")
    ap.add_argument("--u2net", help="u2net.pth (default: the weights cache, if present)")
    ap.add_argument("--threads", type=int, default=0, help="torch/OpenCV threads (0: library default)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: learned backends on the GPU, every frame")
    ap.add_argument("--learned", action="store_true", help="every learned backend (DPT and RFC-Net too) on every "
                    "frame, after a warm-up call (implied by --device cuda)")
    ap.add_argument("--dpt", help="a DPT / Depth Anything folder (with --learned; default: random DPT-Large)")
    ap.add_argument("--midas", help="MiDaS dpt_swin2_large_384.pt for the dpt depth backend (default: the "
                    "weights cache, else the parity fill: timing only); 2 frames unless --slow")
    ap.add_argument("--rfc", help="the RFC-Net depth refinement checkpoint (with --learned; default: random)")
    args = ap.parse_args()
    global DEVICE, LEARNED
    DEVICE = args.device
    gpu = DEVICE.startswith("cuda")
    if gpu:
        import torch

        if not torch.cuda.is_available():
            print(f"--device {DEVICE}: no CUDA GPU here; nothing to do")
            return
    LEARNED = args.learned or gpu
    if LEARNED:
        args.slow = True
    if args.threads:
        cv2.setNumThreads(args.threads)
        import torch

        torch.set_num_threads(args.threads)
    isnet_w = find_weights("isnet")
    raft_w = args.raft or find_weights("raft-things")
    u2net_w = args.u2net or find_weights("u2net")
    tmp = Path(tempfile.mkdtemp(prefix="v2v-bench-"))
    random_raft = random_u2net = False
    if not raft_w:
        raft_w, random_raft = random_weights("raft", tmp), True
    if not u2net_w:
        u2net_w, random_u2net = random_weights("u2net", tmp), True
    n = args.frames

    params = IngestParams(n_frames=n)
    clip = read_source(BEAR / "frames", params, masks=BEAR / "mask-00000.png")
    arrays = clip.arrays()
    out = timed("ingest", None, arrays, n)
    assert out is not None
    a: dict[str, np.ndarray] = {"frames": out["frames"], "provided_masks": out["provided_masks"]}
    geometry = canvas_geometry(clip.frames.shape[2], clip.frames.shape[1], params)
    refs = np.stack([warp_to_canvas(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) >= 128, geometry, is_mask=True)
                     for p in sorted((BEAR / "isnet-masks").glob("*.png"))[:n]])

    # flow: the default first (its output feeds everything below)
    flows = timed("flow", "dis", a, n - 1, "default")
    if flows is None:
        return
    a.update(flows)
    if args.slow and not LEARNED:  # DeepFlow: CPU-only, minutes per clip
        timed("flow", "deepflow", a, n - 1)
    if raft_w:  # ~30 s per 512² pair on 2 CPU cores: 2 pairs unless --slow
        sub = {"frames": a["frames"] if args.slow else a["frames"][:3]}
        note = "20 iters" + (", random weights: timing only" if random_raft else "")
        timed("flow", "raft", sub, len(sub["frames"]) - 1, note, weights=str(raft_w))

    # source masks
    plain = [a["provided_masks"][0]]
    start = time.perf_counter()
    for t, flow in enumerate(a["flows"]):
        plain.append(warp_backward(plain[t], flow) > 0.5)
    ious = per_frame_iou(np.stack(plain), refs)
    ROWS.append(("source_masks", "(plain warp)", time.perf_counter() - start, n,
                 f"IoU mean {np.mean(ious):.3f} last {ious[-1]:.3f} (baseline)"))
    masks = timed("source_masks", "track", a, n)
    if masks is not None:
        ious = per_frame_iou(masks["object_masks"], refs)
        ROWS[-1] = ROWS[-1][:4] + (f"IoU mean {np.mean(ious):.3f} last {ious[-1]:.3f}",)
        print("track IoU per frame:", " ".join(f"{v:.3f}" for v in ious))
        a.update(masks)
    for name, w in (("isnet", isnet_w), ("u2net", u2net_w)):
        if not w:
            ROWS.append(("source_masks", name, float("nan"), n, "no weights: skipped"))
            continue
        subset = a["frames"] if args.slow else a["frames"][-1:]
        got = timed("source_masks", name, {"frames": subset}, len(subset), weights=str(w))
        if name == "u2net" and random_u2net:
            add_note("random weights: timing only")
        elif got is not None:
            ious = per_frame_iou(got["object_masks"], refs[-len(subset):])
            ROWS[-1] = ROWS[-1][:4] + (f"IoU mean {np.mean(ious):.3f} (frames {n - len(subset)}..{n - 1})",)

    depth = timed("depth", None, a, n, "default")
    if depth is not None:
        a.update(depth)
    if LEARNED:
        dpt_w = args.dpt or random_dpt(tmp)
        timed("depth", "dpt", a, n, "" if args.dpt else "random DPT-Large: timing only", weights=dpt_w)
    midas_w = args.midas or cached_midas()
    sub = {"frames": a["frames"] if args.slow else a["frames"][:2]}
    timed("depth", "dpt", sub, len(sub["frames"]), "MiDaS dpt_swin2_large_384.pt, reference input 384²"
          + ("" if midas_w else ", random fill: timing only"), weights=midas_w or random_midas(tmp))

    # edited shape (the elephant edit)
    a["edited_frame"] = cv2.cvtColor(cv2.imread(str(BEAR / "edited-first-frame-elephant.png")),
                                     cv2.COLOR_BGR2RGB)
    ref_path = BEAR / "isnet-mask-edited-first-frame-elephant.png"
    ref_shape = cv2.imread(str(ref_path), cv2.IMREAD_GRAYSCALE) >= 128
    source_iou = iou(a["object_masks"][0], ref_shape) if "object_masks" in a else float("nan")
    shape = timed("shape_mask", "change", a, 1)
    if shape is not None:
        ROWS[-1] = ROWS[-1][:4] + (f"IoU {iou(shape['edited_shape'], ref_shape):.3f} "
                                   f"(source mask alone {source_iou:.3f})",)
        a.update(shape)
    for name, w in (("isnet", isnet_w), ("u2net", u2net_w)):
        if w:
            got = timed("shape_mask", name, a, 1, weights=str(w))
            if name == "u2net" and random_u2net:
                add_note("random weights: timing only")
            elif got is not None:
                ROWS[-1] = ROWS[-1][:4] + (f"IoU {iou(got['edited_shape'], ref_shape):.3f}",)
                if name == "isnet":
                    a.update(got)  # the better shape feeds motion, as in a profile with weights

    for stage in ("motion", "depth_sim", "refine"):
        got = timed(stage, None, a, n, "default")
        if got is not None:
            a.update(got)
    if LEARNED and "simulated_depth" in a:
        rfc_w = args.rfc or random_weights("depthnet", tmp)
        timed("refine", "rfc-net", a, n, "" if args.rfc else "random weights: timing only", weights=rfc_w)

    shutil.rmtree(tmp, ignore_errors=True)
    where = f"GPU {torch.cuda.get_device_name()} for the learned backends" if gpu else "CPU"
    print(f"\nISA stages, bear clip, {n} frames at 512x512, {where} (cv2 threads {cv2.getNumThreads()}); "
          "model loading excluded" + ("; GPU rows: the second call" if gpu else ""))
    print(f"{'stage':<13} {'backend':<13} {'seconds':>8} {'s/frame':>8}  notes")
    for stage, backend, sec, count, note in ROWS:
        per = sec / max(count, 1)
        print(f"{stage:<13} {backend:<13} {sec:8.2f} {per:8.3f}  {note}")


if __name__ == "__main__":
    main()
