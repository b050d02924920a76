"""PSNR/SSIM of a dehazer on hazy/clear pairs (pretraining's validation, benchmarks/pretrain_eval.py)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .data import center_square_crop
from .devices import autocast_factory
from .metrics.reference import psnr, ssim
from .padding import crop_to, pad_to_multiple
from .pairs import PairedFolder

__all__ = ["evaluate_pairs"]


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) float32 -> (1, 3, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]


@torch.no_grad()
def evaluate_pairs(
    model: nn.Module | None,
    val: PairedFolder,
    device: str = "cpu",
    crop: int = 0,
    max_pairs: int = 0,
    precision: str = "fp32",
    dehaze: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict:
    """Mean PSNR/SSIM of ``model`` (or of ``dehaze``) on validation pairs.

    Args:
        model: maps (1, 3, H, W) in [0, 1] to the same; ignored when ``dehaze`` is given.
            Put in eval mode for the evaluation and restored to its mode after.
        val: the pairs.
        device: torch device of ``model``.
        crop: evaluate centred squares of this side (0: whole images, reflect-padded to a multiple of 4).
        max_pairs: the first this many pairs only (0: all).
        precision: "fp32" or "bf16" (autocast).
        dehaze: a numpy dehazer ``(H, W, 3) float32 in [0, 1] -> (H, W, 3)`` (e.g. DCP) instead of the model.

    Returns:
        ``{"psnr": mean dB, "ssim": mean, "n": pairs, "crop": crop,
        "per_image": [{"name", "psnr", "ssim"}]}``.
    """
    count = len(val) if not max_pairs else min(max_pairs, len(val))
    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    rows = []
    try:
        for index in range(count):
            hazy, clear = val.full(index)
            if crop:
                hazy, clear = center_square_crop(hazy, crop), center_square_crop(clear, crop)
            if dehaze is not None:
                output = _to_tensor(np.asarray(dehaze(hazy), dtype=np.float32))
            else:
                x, size = pad_to_multiple(_to_tensor(hazy).to(device), 4)
                with autocast_factory(device, precision)():
                    output = crop_to(model(x), size).float().cpu()
            target = _to_tensor(clear)
            rows.append(
                {"name": val.pairs[index].hazy.name, "psnr": float(psnr(output, target)[0]),
                 "ssim": float(ssim(output, target)[0])}
            )
    finally:
        if was_training:
            model.train()
    return {
        "psnr": float(np.mean([r["psnr"] for r in rows])),
        "ssim": float(np.mean([r["ssim"] for r in rows])),
        "n": count,
        "crop": crop,
        "per_image": rows,
    }
