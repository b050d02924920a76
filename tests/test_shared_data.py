"""Checks on the reference photos (the ``shared_data`` fixture; skipped when the folder is absent)."""

from __future__ import annotations

import numpy as np
import torch

from bilalora import backbones
from bilalora.data import split_half
from bilalora.images import ImageFolder
from bilalora.metrics import dark_channel_density
from bilalora.metrics.reference import psnr
from bilalora.padding import crop_to, pad_to_multiple
from bilalora.pairs import PairedFolder, match_pairs


def _run(model, image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    padded, size = pad_to_multiple(x, 4)
    with torch.no_grad():
        return crop_to(model(padded), size).clamp(0, 1)


def test_real_folders_decode_without_skips(shared_data):
    for name in ("real_day", "real_night"):
        folder = ImageFolder(shared_data / name, max_side=256)
        assert len(folder) >= 30 and not folder.skipped, folder.report_skipped()
        for image in folder.images:
            assert image.dtype == np.float32 and image.ndim == 3 and image.shape[2] == 3
            assert 0.0 <= image.min() and image.max() <= 1.0
        train, val = split_half(folder.paths, seed=0)
        assert abs(len(train) - len(val)) <= 1


def test_synthetic_pairs_match_by_name(shared_data):
    pairs, unmatched = match_pairs(shared_data / "synth_test")
    assert len(pairs) == 50 and not unmatched
    assert all(pair.hazy.name == pair.clear.name for pair in pairs)


def test_shipped_model_dehazes_real_and_synthetic_photos(shared_data):
    """The default weights must remove haze, not merely run: on 10 synth_test pairs (longer side 256) the
    output is at least 3 dB closer to the clear image than the hazy input, and on 6 real_day photos the
    dark-channel density (haze) drops for each one."""
    model = backbones.load(backbones.default_backbone()).eval()
    pairs = PairedFolder(shared_data / "synth_test", max_side=256, flag="--val")
    gains = []
    for index in range(0, len(pairs), 5):
        hazy, clear = pairs.full(index)
        target = torch.from_numpy(np.ascontiguousarray(clear.transpose(2, 0, 1)))[None]
        hazy_t = torch.from_numpy(np.ascontiguousarray(hazy.transpose(2, 0, 1)))[None]
        gains.append(float(psnr(_run(model, hazy), target)[0] - psnr(hazy_t, target)[0]))
    assert np.mean(gains) > 3.0, gains
    folder = ImageFolder(shared_data / "real_day", max_side=192)
    for image in folder.images[::11]:
        out = _run(model, image)[0].numpy().transpose(1, 2, 0)
        assert torch.isfinite(torch.from_numpy(out)).all()
        assert dark_channel_density(out) < dark_channel_density(image)
