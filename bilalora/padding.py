"""Pad an image batch to a multiple of the network's stride and crop it back.

DEA-Net downsamples twice, so H and W must be multiples of 4. Pads are added on
the bottom and right with reflection (replicate where the image is too small to
reflect), and :func:`crop_to` removes them from the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pad_to_multiple", "crop_to", "padded_size"]


def padded_size(height: int, width: int, multiple: int = 4) -> tuple[int, int]:
    """The smallest (H', W') >= (H, W) with both multiples of ``multiple``."""
    return (-(-height // multiple) * multiple, -(-width // multiple) * multiple)


def pad_to_multiple(images: torch.Tensor, multiple: int = 4) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad (N, C, H, W) on the bottom/right so H and W divide by ``multiple``.

    Returns the padded (N, C, H', W') tensor and the original (H, W) for :func:`crop_to`.
    """
    if images.dim() != 4:
        raise ValueError(f"expected an (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    height, width = images.shape[-2:]
    target_h, target_w = padded_size(height, width, multiple)
    pad_h, pad_w = target_h - height, target_w - width
    if pad_h == 0 and pad_w == 0:
        return images, (height, width)
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(images, (0, pad_w, 0, pad_h), mode=mode), (height, width)


def crop_to(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop (N, C, H', W') back to the (H, W) returned by :func:`pad_to_multiple`."""
    height, width = size
    return images[..., :height, :width]
