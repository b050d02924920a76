"""Tests for bilalora.metrics (FADE, entropy, weight-free haze measures).

FADE and entropy are checked against the original FADE code's numbers on two of
the FADE release's test images committed in ``tests/assets/fade`` (licence and
provenance in its NOTICE.md), so they always run. The release's PNG image and the
BIQME image are not committed: their tests read the reference-data folder through
the ``shared_dir`` fixture and are skipped when it is absent. The other tests build
their images here.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scenes import textured_scene  # tests/ is on sys.path under pytest

from bilalora.errors import UserError
from bilalora.metrics import (
    METRICS,
    colourfulness,
    dark_channel_density,
    entropy,
    evaluate,
    fade,
    fade_details,
    haze_opacity,
    mean_brightness,
    register_metric,
)
from bilalora.metrics.fade import matlab_gray, matlab_round, matlab_uint8, to_uint8_rgb

FADE_IMAGES = ("test_image1.png", "test_image2.JPG", "test_image3.jpg")
#: The FADE release images committed with the tests, and the original code's numbers for them.
ASSETS = Path(__file__).resolve().parent / "assets" / "fade"
COMMITTED = ("test_image2.JPG", "test_image3.jpg")


# ----------------------------------------------------------------------------
# fixtures / helpers
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_dir() -> Path:
    """``shared/`` beside the repository (or $BILALORA_SHARED); skip when absent."""
    env = os.environ.get("BILALORA_SHARED")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared"
    if not (path / "metrics" / "reference_values.json").is_file():
        pytest.skip(f"shared metric data not found at {path}")
    return path


@pytest.fixture(scope="module")
def committed_reference() -> dict:
    with open(ASSETS / "reference.json", encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def reference(shared_dir: Path) -> dict:
    with open(shared_dir / "metrics" / "reference_values.json", encoding="utf-8") as handle:
        return json.load(handle)


def _load_rgb(path: Path) -> np.ndarray:
    PIL = pytest.importorskip("PIL.Image")
    with PIL.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _clear_scene(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    """A colourful textured fog-free float image in [0, 1] (dark channel close to 0)."""
    return textured_scene(h, w, seed, noise=0.05)


def _to_u8(img01: np.ndarray) -> np.ndarray:
    return matlab_uint8(255.0 * img01)


# ----------------------------------------------------------------------------
# MATLAB helpers
# ----------------------------------------------------------------------------


def test_matlab_round_half_away_from_zero():
    x = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999999999999994, 254.5, 2.4999999])
    assert matlab_round(x).tolist() == [1.0, 2.0, 3.0, -1.0, -3.0, 0.0, 255.0, 2.0]


def test_to_uint8_rgb_conversions():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = to_uint8_rgb(gray)
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 2], gray)
    # float: uint8(255*x), half away from zero and saturating
    f = np.array([[0.0, 0.5, 1.0, 1.2]])
    assert to_uint8_rgb(f)[0, :, 0].tolist() == [0, 128, 255, 255]
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    assert to_uint8_rgb(rgba).shape == (2, 2, 3)
    with pytest.raises(UserError):
        to_uint8_rgb(np.zeros((2, 2, 2), dtype=np.uint8))
    with pytest.raises(UserError):
        to_uint8_rgb(np.full((2, 2, 3), 300, dtype=np.int32))


def test_matlab_gray_weights():
    px = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], dtype=np.uint8)
    # 76.228..., 149.696..., 29.075..., 255.0
    assert matlab_gray(px)[0].tolist() == [76.0, 150.0, 29.0, 255.0]


# ----------------------------------------------------------------------------
# FADE against the original code
# ----------------------------------------------------------------------------


def test_fade_test_image1_reference(shared_dir, reference):
    ref = reference["fade"]["images"]["fade/testdata/test_image1.png"]
    img = _load_rgb(shared_dir / "metrics" / "fade" / "testdata" / "test_image1.png")
    assert list(img.shape[:2]) == ref["size_hw"]
    res = fade_details(img)
    assert abs(res.D - ref["D"]) < 1e-6
    assert abs(res.Df - ref["Df_mean"]) < 1e-5
    assert abs(res.Dff - ref["Dff_mean"]) < 1e-5
    assert res.n_patches == ref["n_patches"]
    assert res.n_nan_patches == ref["n_nan_patches"]
    np.testing.assert_allclose(res.log_features[0, 0], ref["log_features_patch_1_topleft"], rtol=0, atol=1e-7)
    lf = res.log_features.reshape(-1, 12)
    np.testing.assert_allclose(np.nanmean(lf, axis=0), ref["nanmean_log_features_f1_to_f12"], rtol=0, atol=1e-6)
    for key, value in ref["D_map_rc_1based"].items():
        r, c = (int(v) - 1 for v in key.strip("()").split(","))
        assert abs(res.D_map[r, c] - value) < 1e-7, key
    assert res.D_map.shape == (768 // 8, 576 // 8)
    # the public API gives the same numbers
    d, dmap = fade(img, return_map=True)
    assert d == res.D and np.array_equal(dmap, res.D_map, equal_nan=True)


@pytest.mark.parametrize("name", COMMITTED)
def test_fade_jpeg_reference(committed_reference, name):
    ref = committed_reference["fade"][name]
    img = _load_rgb(ASSETS / name)
    assert list(img.shape[:2]) == ref["size_hw"]
    res = fade_details(img)
    assert abs(res.D - ref["D"]) < 1e-5
    assert abs(res.Df - ref["Df_mean"]) < 1e-4
    assert abs(res.Dff - ref["Dff_mean"]) < 1e-4
    assert res.n_patches == ref["n_patches"]
    assert res.n_nan_patches == ref["n_nan_patches"]


def test_fade_float_input_matches_uint8(committed_reference):
    img = _load_rgb(ASSETS / "test_image2.JPG")
    d = fade(img.astype(np.float32) / 255.0)
    assert d == fade(img)
    assert abs(d - committed_reference["fade"]["test_image2.JPG"]["D"]) < 1e-5


def test_fade_speed():
    """0.48 MP in under 5 s of this process's CPU time (not wall time: the machine may be shared)."""
    img = _load_rgb(ASSETS / "test_image2.JPG")
    fade(img)  # warm caches
    start = time.process_time()
    fade(img)
    assert time.process_time() - start < 5.0


# ----------------------------------------------------------------------------
# FADE on generated images
# ----------------------------------------------------------------------------


def test_fade_hazy_is_higher_than_clear():
    clear = _clear_scene()
    hazy = clear * 0.4 + 1.0 * (1.0 - 0.4)
    c_u8, h_u8 = _to_u8(clear), _to_u8(hazy)
    d_clear, d_hazy = fade(c_u8), fade(h_u8)
    assert np.isfinite(d_clear) and np.isfinite(d_hazy)
    assert d_hazy > d_clear
    assert dark_channel_density(h_u8) > dark_channel_density(c_u8)
    assert haze_opacity(h_u8) > haze_opacity(c_u8)
    assert colourfulness(h_u8) < colourfulness(c_u8)


def test_fade_grayscale_input_is_replicated():
    rgb = _to_u8(_clear_scene())
    gray = matlab_gray(rgb).astype(np.uint8)
    d_gray = fade(gray)
    d_rep = fade(np.repeat(gray[..., None], 3, axis=2))
    assert np.isfinite(d_gray) and d_gray == d_rep


def test_fade_tiny_image_is_nan():
    d, dmap = fade(np.full((7, 20, 3), 128, dtype=np.uint8), return_map=True)
    assert math.isnan(d) and dmap.shape == (0, 2)
    assert math.isnan(fade(np.zeros((5, 5, 3), dtype=np.uint8)))


def test_fade_single_patch_and_crop():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    d, dmap = fade(img, return_map=True)
    assert np.isfinite(d) and dmap.shape == (1, 1)
    # rows/columns beyond a multiple of 8 are ignored
    big = rng.integers(0, 256, size=(37, 45, 3), dtype=np.uint8)
    assert fade(big) == fade(big[:32, :40])


def test_fade_black_patches_are_skipped():
    img = _to_u8(_clear_scene())
    img[:, :32] = 0  # black border, as some dehazed outputs have
    res = fade_details(img)
    assert res.n_nan_patches > 0 and np.isfinite(res.D)
    assert np.all(np.isnan(res.D_map[:, :3]))
    assert math.isnan(fade(np.zeros((16, 16, 3), dtype=np.uint8)))


def test_fade_map_layout():
    """D_map[r, c] is the patch at rows 8r..8r+7, columns 8c..8c+7 (non-square grid)."""
    img = _to_u8(_clear_scene(48, 64))
    img[8:16, 24:32] = 0  # one black patch at (r, c) = (1, 3): cv is 0/0 at its centre
    res = fade_details(img)
    assert res.D_map.shape == (6, 8) and res.log_features.shape == (6, 8, 12)
    assert np.argwhere(np.isnan(res.D_map)).tolist() == [[1, 3]]
    assert res.n_nan_patches == 1


def test_metrics_module_does_not_import_torch():
    code = (
        "import sys; import bilalora.metrics, bilalora.metrics.fade, bilalora.metrics.entropy, "
        "bilalora.metrics.haze; print('torch' in sys.modules)"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------
# entropy
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", COMMITTED)
def test_entropy_reference(committed_reference, name):
    img = _load_rgb(ASSETS / name)
    assert abs(entropy(img) - committed_reference["entropy_matlab_style"][name]) < 1e-4
    pooled = committed_reference["entropy_of_rgb_array_pooled_channels"][name]
    assert abs(entropy(img, mode="rgb") - pooled) < 1e-4


def test_entropy_png_reference(shared_dir, reference):
    ref = reference["entropy_matlab_style"]
    img = _load_rgb(shared_dir / "metrics" / "fade" / "testdata" / "test_image1.png")
    assert abs(entropy(img) - ref["fade/testdata/test_image1.png"]) < 1e-4
    pooled = ref["entropy_of_rgb_array_pooled_channels"]["fade/testdata/test_image1.png"]
    assert abs(entropy(img, mode="rgb") - pooled) < 1e-4


def test_entropy_biqme_im2_reference(shared_dir, reference):
    path = shared_dir / "metrics" / "biqme" / "testdata" / "im2.png"
    if not path.is_file():
        pytest.skip("im2.png not present")
    ref = reference["entropy_matlab_style"]["biqme/testdata/im2.png"]
    assert abs(entropy(_load_rgb(path)) - ref) < 1e-8


def test_entropy_constant_and_uniform():
    assert entropy(np.full((10, 10, 3), 77, dtype=np.uint8)) == 0.0
    assert entropy(np.zeros((4, 4), dtype=np.uint8)) == 0.0
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert abs(entropy(ramp) - 8.0) < 1e-12
    two = np.array([[0, 255]], dtype=np.uint8)
    assert abs(entropy(two) - 1.0) < 1e-12
    with pytest.raises(UserError):
        entropy(ramp, mode="bogus")


# ----------------------------------------------------------------------------
# weight-free haze measures and the registry
# ----------------------------------------------------------------------------


def test_dark_channel_density_values():
    white = np.ones((20, 20, 3), dtype=np.float32)
    assert dark_channel_density(white) == 1.0
    img = np.full((20, 20, 3), 200, dtype=np.uint8)
    img[10, 10, 1] = 0  # one dark pixel darkens a 15x15 neighbourhood
    dark = dark_channel_density(img)
    n_zero = min(20, 10 + 8) - max(0, 10 - 7)  # rows/cols within reach: 3..17 -> 15
    expected = (400 - n_zero * n_zero) * (200 / 255) / 400
    assert abs(dark - expected) < 1e-12
    assert dark_channel_density(img, window=1) == pytest.approx((399 * 200 / 255) / 400)


def test_colourfulness_and_brightness():
    gray = np.full((8, 8, 3), 90, dtype=np.uint8)
    assert colourfulness(gray) == 0.0
    assert mean_brightness(gray) == pytest.approx(90 / 255)
    red = np.zeros((4, 4, 3), dtype=np.uint8)
    red[..., 0] = 255
    # rg = 255, yb = 127.5 everywhere, no spread
    assert colourfulness(red) == pytest.approx(0.3 * math.hypot(255, 127.5))


def test_registry_and_evaluate():
    for name in ("fade", "entropy", "dcd", "colourfulness", "brightness"):
        fn, direction = METRICS[name]
        assert callable(fn) and direction in ("lower", "higher", "none")
    assert METRICS["fade"][1] == "lower" and METRICS["entropy"][1] == "higher"
    assert METRICS["dcd"][1] == "lower" and METRICS["colourfulness"][1] == "higher"
    img = _to_u8(_clear_scene(32, 40))
    out = evaluate(img, ["entropy", "fade", "dcd"])
    assert list(out) == ["entropy", "fade", "dcd"]
    assert out["fade"] == fade(img) and out["entropy"] == entropy(img)
    assert set(evaluate(img)) == set(METRICS)
    with pytest.raises(UserError):
        evaluate(img, ["nope"])
    register_metric("test_mean", lambda im: float(np.mean(im)), "none")
    try:
        assert evaluate(img, ["test_mean"])["test_mean"] == pytest.approx(float(np.mean(img)))
        with pytest.raises(UserError):
            register_metric("test_mean", lambda im: 0.0, "none")
        with pytest.raises(UserError):
            register_metric("test_other", lambda im: 0.0, "sideways")
    finally:
        METRICS.pop("test_mean", None)
