"""Pure metric functions (stages/metrics.py) against direct formulas on small synthetic arrays."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from stages import metrics


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3)).astype(np.uint8), (5, 5), 1.2)


# ---- PSNR / SSIM / IoU -------------------------------------------------------------------------------

def test_psnr_matches_formula_and_mask_selects_pixels() -> None:
    a = np.full((8, 8, 3), 100, np.uint8)
    b = a.copy()
    b[:4] = 110  # MSE over everything = 50
    assert metrics.psnr(a, b) == pytest.approx(10 * np.log10(255**2 / 50))
    top = np.zeros((8, 8), bool)
    top[:4] = True
    assert metrics.psnr(a, b, top) == pytest.approx(10 * np.log10(255**2 / 100))
    assert metrics.psnr(a, b, ~top) == metrics.PSNR_CAP_DB  # identical there: capped, not inf
    assert metrics.psnr(a, b, np.zeros((8, 8), bool)) == 0.0  # nothing measured: 0, not NaN


def _ssim_direct(x: np.ndarray, y: np.ndarray, sigma: float = 1.5, r: int = 5) -> float:
    """SSIM by its definition: explicit Gaussian-weighted statistics of every interior window."""
    g = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for c in range(x.shape[2]):
        a, b = x[..., c].astype(np.float64), y[..., c].astype(np.float64)
        for i in range(r, a.shape[0] - r):
            for j in range(r, a.shape[1] - r):
                pa, pb = a[i - r:i + r + 1, j - r:j + r + 1], b[i - r:i + r + 1, j - r:j + r + 1]
                ma, mb = (win * pa).sum(), (win * pb).sum()
                va, vb = (win * pa * pa).sum() - ma**2, (win * pb * pb).sum() - mb**2
                cov = (win * pa * pb).sum() - ma * mb
                vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_definition() -> None:
    x = _texture(20, 22, 1)
    rng = np.random.default_rng(2)
    y = np.clip(x.astype(int) + rng.integers(-40, 40, x.shape), 0, 255).astype(np.uint8)
    assert metrics.ssim(x, y) == pytest.approx(_ssim_direct(x, y), abs=1e-9)
    assert metrics.ssim(x, x) == pytest.approx(1.0)
    worse = np.clip(x.astype(int) + rng.integers(-90, 90, x.shape), 0, 255).astype(np.uint8)
    assert metrics.ssim(x, worse) < metrics.ssim(x, y) < 1.0


def test_iou_and_dilate() -> None:
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    assert metrics.iou(a, b) == 1.0  # both empty: they agree
    a[2:6, 2:6] = True
    assert metrics.iou(a, b) == 0.0
    b[4:8, 2:6] = True
    assert metrics.iou(a, b) == pytest.approx(8 / 24)
    grown = metrics.dilate(a, 2)
    assert grown[0, 3] and grown[3, 7] and not grown[0, 0] and grown.sum() > a.sum()


# ---- the edited object in the output ---------------------------------------------------------------

def test_track_by_appearance_follows_the_object_and_drops_what_is_not_shown() -> None:
    bg, skin = _texture(60, 80, 6), _texture(16, 20, 7) // 2 + 100
    mask0 = np.zeros((60, 80), bool)
    mask0[10:26, 8:28] = True
    reference = bg.copy()
    reference[mask0] = skin.reshape(-1, 3)
    video = np.stack([bg] * 4)
    truth = np.zeros((4, 60, 80), bool)
    for t in range(4):  # moves 7 px right and 3 px down per frame, partly out of view at the end
        y, x = 10 + 3 * t, 8 + 7 * t + (40 if t == 3 else 0)
        truth[t, y:y + 16, x:x + 20] = True
        video[t, y:y + 16, x:min(x + 20, 80)] = skin[:, : min(20, 80 - x)]
    masks = metrics.track_by_appearance(video, reference, mask0, search_px=64)
    assert 0 < truth[3].sum() < truth[0].sum()  # the last frame shows only part of it
    assert [metrics.iou(masks[t], truth[t]) for t in range(4)] == pytest.approx([1.0] * 4, abs=0.03)
    # Shown only through a smaller window (the old object's silhouette): the rest is not the object.
    cut = video.copy()
    cut[2, :, 28:] = bg[:, 28:]
    masks = metrics.track_by_appearance(cut, reference, mask0, search_px=32)
    assert metrics.iou(masks[2], truth[2]) == pytest.approx(6 / 20, abs=0.05)
    # Nothing like it anywhere: (almost) nothing found.
    assert metrics.track_by_appearance(np.stack([bg] * 2), reference, mask0)[1].mean() < 0.01


# ---- warping error -----------------------------------------------------------------------------------

def _translated_pair(dx: int, dy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    big = _texture(60, 60, 3)
    prev = big[10:50, 10:50]
    nxt = big[10 - dy:50 - dy, 10 - dx:50 - dx]  # content moves by (+dx, +dy)
    backward = np.zeros((40, 40, 2), np.float32)
    backward[..., 0], backward[..., 1] = -dx, -dy  # frame t+1 -> t
    return prev, nxt, backward, -backward


def test_warping_error_is_zero_with_the_true_flow_and_leaves_out_what_enters() -> None:
    prev, nxt, backward, forward = _translated_pair(3, 2)
    err, occluded = metrics.warping_error(prev, nxt, backward, forward)
    assert err < 1e-10
    # The strip that entered the view (3 columns, 2 rows) has no match in frame t.
    occ = metrics.occlusion_mask(backward, forward)
    assert occ[:, :3].all() and occ[:2].all() and not occ[5:, 5:].any()
    assert occluded == pytest.approx(occ.mean())
    wrong, _ = metrics.warping_error(prev, nxt, np.zeros_like(backward), np.zeros_like(forward))
    assert wrong > 1e-3


def test_occlusion_check_rejects_inconsistent_flow() -> None:
    prev, nxt, backward, _ = _translated_pair(2, 0)
    bad_forward = np.zeros_like(backward)
    bad_forward[..., 0] = 5.0  # does not bring pixels back: every match fails the round trip
    assert metrics.occlusion_mask(backward, bad_forward).all()
    err, occluded = metrics.warping_error(prev, nxt, backward, bad_forward)
    assert occluded == 1.0 and np.isfinite(err)  # falls back to all pixels, never NaN


# ---- Fréchet distance --------------------------------------------------------------------------------

def _sqrtm_denman_beavers(m: np.ndarray, iters: int = 60) -> np.ndarray:
    y, z = m.copy(), np.eye(len(m))
    for _ in range(iters):
        y, z = 0.5 * (y + np.linalg.inv(z)), 0.5 * (z + np.linalg.inv(y))
    return y


def _frechet_direct(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """The textbook formula with a general matrix square root of S1 S2 (scipy when installed)."""
    try:
        from scipy.linalg import sqrtm
    except ImportError:  # scipy is not a dependency: an independent iteration instead
        sqrtm = _sqrtm_denman_beavers
    root = np.real(sqrtm(s1 @ s2))
    assert np.allclose(root @ root, s1 @ s2, atol=1e-6 * np.abs(s1 @ s2).max())
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root))


def test_frechet_distance_matches_direct_formula_on_random_features() -> None:
    rng = np.random.default_rng(4)
    a = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12))
    b = rng.normal(0.3, 1.2, size=(250, 12)) @ rng.normal(size=(12, 12))
    stats_a, stats_b = metrics.feature_stats(a), metrics.feature_stats(b)
    expected = _frechet_direct(*stats_a, *stats_b)
    assert metrics.frechet_distance(*stats_a, *stats_b) == pytest.approx(expected, rel=1e-7)
    assert metrics.fvd(a, b) == pytest.approx(expected, rel=1e-7)
    assert metrics.fvd(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_with_fewer_videos_than_dimensions() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(6, 20)), rng.normal(1.0, 1.0, size=(7, 20))  # singular covariances
    (mu1, s1), (mu2, s2) = metrics.feature_stats(a), metrics.feature_stats(b)
    # Eigenvalues of S1 S2 (real, >= 0 for PSD factors) give Tr((S1 S2)^1/2) directly.
    tr = np.sum(np.sqrt(np.clip(np.real(np.linalg.eigvals(s1 @ s2)), 0, None)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
    assert metrics.fvd(a, b) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.fvd(a[:1], b)


# ---- DOVER views and fusion -------------------------------------------------------------------------

def test_dover_views_shapes_normalisation_and_fusion() -> None:
    video = np.stack([_texture(64, 80, s) for s in range(5)])
    aes, tech = metrics.dover_views(video, tech_clips=2, seed=0)
    assert aes.shape == (1, 3, 32, 224, 224) and tech.shape == (2, 3, 32, 224, 224)
    # Normalisation: a frame's channel mean maps through (v - mean) / std.
    raw = cv2.resize(video[0], (224, 224), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    expect = (raw[..., 0].mean() - metrics.DOVER_MEAN[0]) / metrics.DOVER_STD[0]
    assert aes[0, 0, 0].mean() == pytest.approx(expect, abs=0.05)
    again = metrics.dover_views(video, tech_clips=2, seed=0)[1]
    assert np.array_equal(tech, again)  # seeded fragments: deterministic
    mid = metrics.dover_fuse(aesthetic=-0.08285, technical=0.1107)
    assert mid == pytest.approx({"aesthetic": 0.5, "technical": 0.5, "overall": 0.5})
    better = metrics.dover_fuse(aesthetic=0.0, technical=0.2)
    assert all(better[k] > 0.5 for k in better)
