"""Tests for the dark-channel-prior baseline (bilalora.baselines.dcp), on synthetic scenes."""

from __future__ import annotations

import numpy as np
import pytest
from scenes import textured_scene  # tests/ is on sys.path under pytest

from bilalora.baselines import DCP, dcp_estimate, dehaze_dcp, guided_filter
from bilalora.baselines.dcp import dark_channel
from bilalora.errors import UserError

A_TRUE = 0.9
T_TRUE = 0.5


def _clear_scene(h: int = 128, w: int = 160, seed: int = 0) -> np.ndarray:
    """Textured float32 scene in [0, 1] with a grey "sky" band equal to the airlight at the top."""
    img = textured_scene(h, w, seed, noise=0.03)
    img[: h // 5] = A_TRUE
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _haze(clear: np.ndarray, t: float = T_TRUE, a: float = A_TRUE) -> np.ndarray:
    return (clear * t + a * (1.0 - t)).astype(np.float32)


def _psnr(x: np.ndarray, ref: np.ndarray) -> float:
    mse = float(np.mean((x.astype(np.float64) - ref.astype(np.float64)) ** 2))
    return 10.0 * np.log10(1.0 / mse)


def test_dcp_recovers_synthetic_scene():
    clear = _clear_scene()
    hazy = _haze(clear)
    out = dehaze_dcp(hazy)
    assert out.shape == hazy.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    gain = _psnr(out, clear) - _psnr(hazy, clear)
    assert gain >= 5.0, gain


def test_dcp_intermediates():
    clear = _clear_scene(seed=3)
    res = dcp_estimate(_haze(clear))
    np.testing.assert_allclose(res.airlight, [A_TRUE] * 3, atol=0.02)
    assert res.transmission.shape == clear.shape[:2]
    assert res.transmission.min() >= 0.1 and res.transmission.max() <= 1.0
    # below the sky the refined transmission is close to the true constant 0.5
    below = res.transmission[clear.shape[0] // 4 :]
    assert abs(float(np.median(below)) - T_TRUE) < 0.1


def test_dcp_class_matches_function():
    hazy = _haze(_clear_scene(64, 80, seed=1))
    model = DCP(patch=7, guided_radius=20)
    np.testing.assert_array_equal(model(hazy), dehaze_dcp(hazy, patch=7, guided_radius=20))
    assert model.estimate(hazy).image.shape == hazy.shape


def test_dcp_tiny_and_uint8_images():
    rng = np.random.default_rng(2)
    tiny = rng.random((10, 12, 3)).astype(np.float32)
    out = dehaze_dcp(tiny)  # patch 15 and radius 60 exceed the image
    assert out.shape == (10, 12, 3) and np.all(np.isfinite(out))
    assert out.min() >= 0.0 and out.max() <= 1.0
    one = dehaze_dcp(np.full((1, 1, 3), 0.5, dtype=np.float32))
    assert one.shape == (1, 1, 3) and np.all(np.isfinite(one))
    u8 = (tiny * 255).astype(np.uint8)
    assert dehaze_dcp(u8).dtype == np.float32
    black = dehaze_dcp(np.zeros((16, 16, 3), dtype=np.float32))
    assert np.all(np.isfinite(black)) and black.max() <= 1.0


def test_dcp_rejects_bad_input():
    with pytest.raises(UserError):
        dehaze_dcp(np.zeros((8, 8), dtype=np.float32))
    with pytest.raises(UserError):
        dehaze_dcp(np.zeros((8, 8, 3), dtype=np.float32), t0=0.0)


def test_dark_channel_and_guided_filter():
    img = np.ones((20, 20, 3), dtype=np.float32)
    img[5, 5, 2] = 0.0
    dark = dark_channel(img, 5)
    assert dark[3:8, 3:8].max() == 0.0 and dark[0, 0] == 1.0 and dark[8, 8] == 1.0
    # a constant input passes through; an edge in the guide is preserved
    guide = np.zeros((30, 30))
    guide[:, 15:] = 1.0
    const = np.full((30, 30), 0.3)
    np.testing.assert_allclose(guided_filter(guide, const, 8, 1e-3), 0.3, atol=1e-9)
    filtered = guided_filter(guide, guide, 8, 1e-4)
    assert filtered[:, :14].max() < 0.05 and filtered[:, 16:].min() > 0.95
