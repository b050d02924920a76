"""Tests for bilalora.baselines.stretch: the per-channel and global grey 1-99 % contrast stretches."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from bilalora.baselines import STRETCHES, stretch_channels, stretch_global
from bilalora.errors import UserError


def _hazy(seed: int = 0, size: int = 64) -> np.ndarray:
    """A scene compressed into [0.4, 0.8] with a warm cast: I = 0.4 J + (0.5, 0.45, 0.35)."""
    rng = np.random.default_rng(seed)
    scene = rng.uniform(0, 1, (size, size, 3)).astype(np.float32)
    return (0.4 * scene + np.array([0.5, 0.45, 0.35], np.float32)).astype(np.float32)


def test_per_channel_stretch_maps_the_percentiles_to_0_and_1():
    image = _hazy()
    out = stretch_channels(image)
    assert out.dtype == np.float32 and out.shape == image.shape
    for c in range(3):
        lo, hi = np.percentile(out[..., c], [1, 99])
        assert lo == pytest.approx(0.0, abs=1e-3) and hi == pytest.approx(1.0, abs=1e-3)
        # affine inside the range: the order of pixels is kept
        inside = (out[..., c] > 0) & (out[..., c] < 1)
        assert np.corrcoef(out[..., c][inside], image[..., c][inside])[0, 1] > 0.9999


def test_per_channel_stretch_removes_a_cast_but_grey_keeps_it():
    image = _hazy()
    channels = stretch_channels(image).reshape(-1, 3).mean(0)
    grey = stretch_global(image).reshape(-1, 3).mean(0)
    assert np.ptp(channels) < 0.03  # the three channel means end up close together
    assert grey[0] > grey[1] > grey[2]  # the warm cast (R > G > B) survives the grey stretch


def test_grey_stretch_is_one_affine_map_for_all_channels():
    image = _hazy(1)
    out = stretch_global(image)
    luma = image @ np.array([0.299, 0.587, 0.114], np.float32)
    lo, hi = np.percentile(luma, [1, 99])
    expected = np.clip((image - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_uint8_and_float_inputs_agree_and_flat_images_stay():
    image = _hazy(2)
    as_u8 = np.round(image * 255).astype(np.uint8)
    np.testing.assert_allclose(stretch_channels(as_u8), stretch_channels(as_u8.astype(np.float32) / 255), atol=1e-6)
    flat = np.full((8, 8, 3), 0.6, np.float32)
    assert np.array_equal(stretch_channels(flat), flat) and np.array_equal(stretch_global(flat), flat)


@pytest.mark.parametrize("bad", [np.zeros((4, 4)), np.zeros((4, 4, 4)), np.zeros((0, 4, 3)), np.zeros((4, 4, 3), np.int32)])
def test_bad_images_are_user_errors(bad):
    with pytest.raises(UserError, match="contrast stretch"):
        stretch_channels(bad)


def test_bad_percentiles():
    with pytest.raises(UserError, match="percentiles"):
        stretch_global(_hazy(), low=60, high=40)


def test_named_for_bench_rows_and_torch_free():
    assert STRETCHES == {"stretch": stretch_channels, "stretch-global": stretch_global}
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np; from bilalora.baselines import stretch_channels\n"
        "assert stretch_channels(np.random.rand(8, 8, 3)).shape == (8, 8, 3)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, check=False).returncode == 0
