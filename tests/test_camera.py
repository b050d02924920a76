"""Camera artifacts on training inputs (bilalora.camera) and their switch in the pretraining mixture."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from bilalora.camera import CameraArtifacts, apply_camera_artifacts
from bilalora.errors import UserError

NONE = CameraArtifacts(p_grain=0.0, p_jpeg=0.0)


def _flat(size=64, level=0.8) -> np.ndarray:
    return np.full((size, size, 3), level, np.float32)


def _local_std(image: np.ndarray) -> float:
    mean = cv2.blur(image, (9, 9))
    return float(np.sqrt(np.maximum(cv2.blur(image * image, (9, 9)) - mean * mean, 0)).mean())


def test_quantises_to_8_bits_and_keeps_shape_and_range():
    image = np.random.default_rng(0).uniform(0, 1, (33, 47, 3)).astype(np.float32)
    out, draw = apply_camera_artifacts(image, np.random.default_rng(1), NONE)
    assert out.shape == image.shape and out.dtype == np.float32
    assert draw == {"grain_std": 0.0, "grain_blur": 0.0, "jpeg_quality": 0}
    np.testing.assert_allclose(out * 255, np.rint(out * 255), atol=1e-4)  # on the 8-bit grid
    assert np.abs(out - image).max() <= 0.5 / 255 + 1e-6


def test_grain_has_the_drawn_std_and_is_correlated_when_blurred():
    only_grain = CameraArtifacts(p_grain=1.0, grain_std=(0.01, 0.01), grain_blur=(1.0, 1.0), p_jpeg=0.0)
    out, draw = apply_camera_artifacts(_flat(128, 0.5), np.random.default_rng(2), only_grain)
    noise = out - 0.5
    assert draw["grain_std"] == pytest.approx(0.01) and draw["jpeg_quality"] == 0
    assert noise.std() == pytest.approx(0.01, rel=0.15)
    luma = noise.mean(axis=2)
    neighbour = np.corrcoef(luma[:, :-1].ravel(), luma[:, 1:].ravel())[0, 1]
    assert neighbour > 0.4  # white noise would give about 0
    white = CameraArtifacts(p_grain=1.0, grain_std=(0.01, 0.01), grain_blur=(0.0, 0.0), p_jpeg=0.0)
    luma_white = (apply_camera_artifacts(_flat(128, 0.5), np.random.default_rng(2), white)[0] - 0.5).mean(axis=2)
    assert abs(np.corrcoef(luma_white[:, :-1].ravel(), luma_white[:, 1:].ravel())[0, 1]) < 0.1


def test_jpeg_adds_block_error_that_falls_with_quality():
    image = cv2.GaussianBlur(np.random.default_rng(3).uniform(0, 1, (96, 96, 3)).astype(np.float32), (0, 0), 2.0)
    errors = []
    for quality in (20, 90):
        jpeg = CameraArtifacts(p_grain=0.0, p_jpeg=1.0, jpeg_quality=(quality, quality))
        out, draw = apply_camera_artifacts(image, np.random.default_rng(4), jpeg)
        assert draw["jpeg_quality"] == quality
        errors.append(float(np.abs(out - image).mean()))
    assert errors[0] > 2 * errors[1] > 0


def test_same_seed_same_sample_and_flat_input_gets_texture():
    artifacts = CameraArtifacts(p_grain=1.0, p_jpeg=1.0)
    a, draw_a = apply_camera_artifacts(_flat(), np.random.default_rng(5), artifacts)
    b, draw_b = apply_camera_artifacts(_flat(), np.random.default_rng(5), artifacts)
    assert np.array_equal(a, b) and draw_a == draw_b
    assert _local_std(a) > 0.001 > _local_std(_flat())


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"p_grain": 1.5}, "p_grain"),
        ({"grain_std": (0.02, 0.01)}, "grain_std"),
        ({"jpeg_quality": (0, 50)}, "jpeg_quality"),
    ],
)
def test_check_names_the_bad_field(bad, message):
    with pytest.raises(UserError, match=message):
        CameraArtifacts(**bad).check()


def test_rejects_a_grey_image():
    with pytest.raises(UserError, match="HxWx3"):
        apply_camera_artifacts(np.zeros((8, 8), np.float32), np.random.default_rng(0))


def test_uneven_airlight_drifts_only_under_haze():
    from bilalora.synthesis import HazeParams, apply_haze

    clear = np.zeros((64, 64, 3), np.float32)
    depth = np.linspace(0, 1, 64, dtype=np.float32)[:, None].repeat(64, 1)  # near at the top, far at the bottom
    even, t = apply_haze(clear, depth, HazeParams(beta=3.0, airlight=(0.8, 0.8, 0.8), field_seed=9))
    uneven, _ = apply_haze(
        clear, depth, HazeParams(beta=3.0, airlight=(0.8, 0.8, 0.8), field_seed=9, airlight_unevenness=0.05)
    )
    difference = np.abs(uneven - even).max(axis=2)
    assert difference[t > 0.99].max() < 1e-3  # no haze, no airlight
    far = difference[t < 0.1]
    assert far.max() > 0.02 and far.max() <= 0.05 * 0.8 + 1e-5


def test_sample_haze_draws_unevenness_only_when_asked():
    from bilalora.synthesis import HazeRanges, sample_haze

    assert sample_haze(np.random.default_rng(0)).airlight_unevenness == 0.0
    # the default ranges draw nothing extra, so an old seed gives the old sample
    plain = sample_haze(np.random.default_rng(0), HazeRanges())
    assert plain == sample_haze(np.random.default_rng(0))
    drawn = sample_haze(np.random.default_rng(0), HazeRanges(airlight_unevenness=(0.01, 0.04)))
    assert 0.01 <= drawn.airlight_unevenness <= 0.04


def test_mixture_switch_leaves_clear_side_and_old_samples_alone(tmp_path):
    from bilalora.mixture import TrainMixture
    from bilalora.pairs import PairedFolder
    from tests.test_pretrain import make_pairs

    pairs = PairedFolder(make_pairs(tmp_path / "pairs", count=3))
    plain = TrainMixture(pairs, None, None, batch=4, crop=32, seed=3)
    again = TrainMixture(pairs, None, None, batch=4, crop=32, seed=3, artifacts=False)
    with_artifacts = TrainMixture(pairs, None, None, batch=4, crop=32, seed=3, artifacts=True)
    hazy, clear = plain.batch_at(2)
    hazy_again, _ = again.batch_at(2)
    hazy_art, clear_art = with_artifacts.batch_at(2)
    assert torch.equal(hazy, hazy_again)
    assert torch.equal(clear, clear_art)  # same crops, same targets
    assert not torch.equal(hazy, hazy_art)
    assert torch.allclose(hazy_art * 255, torch.round(hazy_art * 255), atol=1e-3)
    summary = with_artifacts.summary()
    assert summary["camera_artifacts"]["p_jpeg"] == 0.7 and plain.summary()["camera_artifacts"] is None
