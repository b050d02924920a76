"""Checks on the real photos in ../shared/data (skipped when the folder is absent)."""

from __future__ import annotations

import numpy as np
import torch

from bilalora import backbones
from bilalora.data import ImageFolder, split_half
from bilalora.pairs import match_pairs
from bilalora.padding import crop_to, pad_to_multiple


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


def test_shipped_model_runs_on_a_real_photo(shared_data):
    folder = ImageFolder(shared_data / "real_day", max_side=128)
    model = backbones.load(backbones.default_backbone()).eval()
    image = torch.from_numpy(np.ascontiguousarray(folder[0].transpose(2, 0, 1)))[None]
    padded, size = pad_to_multiple(image, 4)
    with torch.no_grad():
        out = crop_to(model(padded), size)
    assert out.shape == image.shape and torch.isfinite(out).all()
