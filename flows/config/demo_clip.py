"""The demo's second clip: a small synthetic video made on the spot (no download, no data files).

A red ball rolls over a textured floor while the camera pans; its masks (exact: the clip is drawn) and an
edited first frame (a taller green cone in place of the ball, so the shape changes) sit next to it.
``python -m flows.config.demo_clip [FOLDER]`` writes ``clip.mp4``, ``masks/00000.png ...`` (one per frame),
``mask-00000.png`` (frame 0 only) and ``edited-first-frame.png``; files already there are kept, so the
clip's pixels, and with them every key downstream, stay the same from one demo to the next.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

SIZE = 256
FRAMES = 24
FPS = 12
PAN = 2  # px per frame: the camera pans slowly, so the background moves too
DEFAULT_FOLDER = Path(__file__).resolve().parents[2] / "catalogs" / "generated" / "rolling-ball"


def _floor(rng: np.random.Generator) -> np.ndarray:
    """A textured floor (so optical flow has something to hold on to) under a plain wall."""
    width = SIZE + PAN * FRAMES
    noise = rng.integers(0, 255, (SIZE // 8, width // 8, 3), dtype=np.uint8)
    texture = cv2.resize(noise, (width, SIZE), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    base = np.zeros((SIZE, width, 3), np.float32)
    base[: SIZE // 3] = (180, 190, 200)  # wall
    base[SIZE // 3:] = (120, 100, 80)  # floor
    img = base * 0.75 + texture * 0.25
    return np.clip(img, 0, 255).astype(np.uint8)


def _ball_centre(t: int, variant: int = 0) -> tuple[int, int]:
    x = int(round(40 + t * (SIZE - 90) / (FRAMES - 1)))
    y = int(round(SIZE * (0.62 + 0.02 * (variant % 7)) + 6 * np.sin(t / 3.0 + variant)))
    return x, y


def frames_and_masks(variant: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The clip and the ball's exact mask in every frame (a synthetic clip knows its ground truth).

    ``variant`` > 0 gives other floors and paths (the benchmark's many distinct clips)."""
    rng = np.random.default_rng(7 + variant)
    floor = _floor(rng)
    frames, masks = [], []
    for t in range(FRAMES):
        img = np.ascontiguousarray(floor[:, PAN * t: PAN * t + SIZE])
        cx, cy = _ball_centre(t, variant)
        cv2.ellipse(img, (cx, cy + 22), (26, 6), 0, 0, 360, (60, 50, 40), -1, cv2.LINE_AA)  # shadow
        cv2.circle(img, (cx, cy), 22, (200, 30, 30), -1, cv2.LINE_AA)
        cv2.circle(img, (cx - 7, cy - 7), 6, (250, 150, 150), -1, cv2.LINE_AA)  # highlight
        frames.append(img)
        mask = np.zeros((SIZE, SIZE), np.uint8)
        cv2.circle(mask, (cx, cy), 22, 255, -1)
        masks.append(mask)
    return np.stack(frames), np.stack(masks)


def edited_first_frame(frame0: np.ndarray, mask0: np.ndarray, variant: int = 0) -> np.ndarray:
    """The ball painted out (inpainted floor) and a taller green cone standing in its place."""
    img = cv2.inpaint(frame0, cv2.dilate(mask0, np.ones((9, 9), np.uint8)), 5, cv2.INPAINT_TELEA)
    cx, cy = _ball_centre(0, variant)
    cone = np.array([[cx - 22, cy + 22], [cx + 22, cy + 22], [cx, cy - 48]], np.int32)
    cv2.fillConvexPoly(img, cone, (40, 170, 60), cv2.LINE_AA)
    cv2.line(img, (cx - 4, cy - 30), (cx - 14, cy + 16), (120, 220, 120), 3, cv2.LINE_AA)  # highlight
    return img


def write_mp4(frames: np.ndarray, path: Path, fps: int = FPS) -> None:
    import av

    tmp = path.with_name(f".{path.name}.tmp.mp4")
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "16", "preset": "medium", "threads": "1"}  # one thread: same bytes every time
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        out.mux(stream.encode(None))
    tmp.replace(path)


def _write_png(img: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    cv2.imwrite(str(tmp), img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    tmp.replace(path)


def make_demo_clip(folder: str | Path = DEFAULT_FOLDER, *, force: bool = False, variant: int = 0
                   ) -> dict[str, Path]:
    """Write the clip, its frame-0 mask and the edited first frame (kept if already there)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"clip": folder / "clip.mp4", "mask": folder / "mask-00000.png", "masks": folder / "masks",
             "first_frame": folder / "edited-first-frame.png"}
    if not force and all(p.exists() for p in paths.values()) and len(list(paths["masks"].glob("*.png"))) == FRAMES:
        return paths
    frames, masks = frames_and_masks(variant)
    write_mp4(frames, paths["clip"])
    _write_png(masks[0], paths["mask"])
    paths["masks"].mkdir(exist_ok=True)
    for t, m in enumerate(masks):
        _write_png(m, paths["masks"] / f"{t:05d}.png")
    _write_png(edited_first_frame(frames[0], masks[0], variant), paths["first_frame"])
    return paths


if __name__ == "__main__":
    for name, p in make_demo_clip(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_FOLDER).items():
        print(f"{name}: {p}")
