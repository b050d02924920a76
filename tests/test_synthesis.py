"""Haze synthesis (atmospheric scattering model) and the clear-photo source built on it."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from bilalora.errors import UserError
from bilalora.pairs import ClearFolder
from bilalora.synthesis import (
    HazeParams,
    HazeRanges,
    apply_haze,
    depth_from_image,
    sample_haze,
    smooth_field,
    synthesize,
    synthetic_depth,
)


def _scene(size=48, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.uniform(0, 1, (size, size, 3)).astype(np.float32), (5, 5), 0)


def test_smooth_field_range_and_determinism():
    a = smooth_field((40, 60), np.random.default_rng(3))
    b = smooth_field((40, 60), np.random.default_rng(3))
    assert a.shape == (40, 60) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert a.min() == pytest.approx(0.0) and a.max() == pytest.approx(1.0)


def test_synthetic_depth_is_far_at_the_top():
    tops, bottoms = [], []
    for seed in range(20):
        depth = synthetic_depth((64, 64), np.random.default_rng(seed))
        assert depth.dtype == np.float32 and depth.min() >= 0 and depth.max() <= 1
        tops.append(depth[:8].mean())
        bottoms.append(depth[-8:].mean())
    assert np.mean(tops) > np.mean(bottoms) + 0.3


def test_synthetic_depth_window_follows_the_photo():
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    bottom_crop = synthetic_depth((32, 32), rng_a, window=(0.75, 0.0, 0.25, 0.25))
    top_crop = synthetic_depth((32, 32), rng_b, window=(0.0, 0.0, 0.25, 0.25))
    assert bottom_crop.mean() < top_crop.mean()


def test_apply_haze_matches_the_formula():
    clear = _scene()
    depth = np.linspace(0, 1, 48, dtype=np.float32)[:, None].repeat(48, 1)
    params = HazeParams(beta=1.5, airlight=(0.9, 0.85, 0.7))
    hazy, t = apply_haze(clear, depth, params)
    expected_t = np.exp(-1.5 * depth)
    np.testing.assert_allclose(t, expected_t, rtol=1e-5)
    expected = clear * expected_t[..., None] + np.array([0.9, 0.85, 0.7]) * (1 - expected_t[..., None])
    np.testing.assert_allclose(hazy, expected, atol=1e-5)


def test_apply_haze_limits():
    clear = _scene()
    near = np.zeros((48, 48), np.float32)
    hazy, _ = apply_haze(clear, near, HazeParams(beta=2.0, airlight=(1, 1, 1)))
    np.testing.assert_allclose(hazy, clear, atol=1e-6)  # d = 0: t = 1
    far = np.ones((48, 48), np.float32)
    hazy, _ = apply_haze(clear, far, HazeParams(beta=50.0, airlight=(0.8, 0.7, 0.6)), t_min=0.0)
    np.testing.assert_allclose(hazy, np.broadcast_to([0.8, 0.7, 0.6], hazy.shape), atol=1e-4)


def test_apply_haze_rejects_bad_shapes():
    with pytest.raises(UserError, match="depth map"):
        apply_haze(_scene(), np.zeros((10, 10), np.float32), HazeParams(beta=1.0, airlight=(1, 1, 1)))


def test_sample_haze_covers_colours_and_nonhomogeneous():
    draws = [sample_haze(np.random.default_rng(seed)) for seed in range(200)]
    kinds = {d.kind for d in draws}
    assert kinds == {"grey", "yellow", "blue"}
    for d in draws:
        lo, hi = HazeRanges().beta
        assert lo <= d.beta <= hi
        r, g, b = d.airlight
        if d.kind == "yellow":
            assert r >= g >= b
    assert 0.2 < np.mean([d.nonhomogeneous for d in draws]) < 0.5


def test_nonhomogeneous_haze_varies_transmission():
    depth = np.full((64, 64), 0.8, np.float32)
    _, t_flat = apply_haze(_scene(64), depth, HazeParams(beta=1.5, airlight=(1, 1, 1)))
    _, t_patchy = apply_haze(_scene(64), depth, HazeParams(beta=1.5, airlight=(1, 1, 1), nonhomogeneous=True))
    assert t_flat.std() < 1e-6 and t_patchy.std() > 0.02


def test_synthesize_is_deterministic_and_hazier():
    clear = _scene()
    a, pa = synthesize(clear, np.random.default_rng(7))
    b, pb = synthesize(clear, np.random.default_rng(7))
    assert np.array_equal(a, b) and pa == pb
    assert a.shape == clear.shape and a.dtype == np.float32
    assert np.abs(np.diff(a, axis=1)).mean() < np.abs(np.diff(clear, axis=1)).mean()  # lower local contrast


def test_depth_from_image_normalises():
    raw = np.stack([np.linspace(0.2, 0.6, 16, dtype=np.float32)[None].repeat(8, 0)] * 3, -1)
    depth = depth_from_image(raw)
    assert depth.shape == (8, 16) and depth.min() == 0 and depth.max() == pytest.approx(1.0)


def test_clear_folder_with_depth(tmp_path):
    rgb, depth_dir = tmp_path / "rgb", tmp_path / "depth"
    rgb.mkdir()
    depth_dir.mkdir()
    for i in range(3):
        cv2.imwrite(str(rgb / f"c{i}.png"), (_scene(80, i) * 255).astype(np.uint8))
    cv2.imwrite(str(depth_dir / "c0.png"), np.tile(np.linspace(255, 0, 80).astype(np.uint8)[:, None], (1, 80)))
    folder = ClearFolder(tmp_path)
    assert len(folder) == 3 and folder.n_with_depth == 1
    hazy, clear = folder.sample(0, 32, np.random.default_rng(0))
    assert hazy.shape == clear.shape == (32, 32, 3)
    assert hazy.dtype == clear.dtype == np.float32
    assert 0 <= hazy.min() and hazy.max() <= 1
    again = folder.sample(0, 32, np.random.default_rng(0))
    assert np.array_equal(hazy, again[0])
    summary = folder.summary()
    assert summary["n_with_depth"] == 1 and summary["n_images"] == 3


def test_clear_folder_errors(tmp_path):
    with pytest.raises(UserError, match="--clear .*does not exist"):
        ClearFolder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="--clear .*no images"):
        ClearFolder(tmp_path / "empty")
