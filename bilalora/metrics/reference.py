"""Full-reference image quality in torch: PSNR and SSIM of outputs against ground truth.

Used to validate pretraining on paired data and by ``benchmarks/pretrain_eval.py``
(docs/metrics.md). Unlike the rest of :mod:`bilalora.metrics` this module needs
torch; the package does not import it, so the no-reference metrics stay torch-free.

Both take float tensors ``(N, 3, H, W)`` in ``[0, 1]`` (the output is clamped to
``[0, 1]`` first, the target is used as given) and return one value per image, ``(N,)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim"]


def psnr(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, ``10 log10(1 / MSE)``, of (N, 3, H, W) tensors in [0, 1]. Returns (N,).

    The MSE is floored at 1e-10, so identical images give 100 dB rather than infinity.
    """
    mse = (output.clamp(0, 1).float() - target.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


def gaussian_window(size: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
    """Normalised 2-D Gaussian kernel, shape (1, 1, size, size), summing to 1."""
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of (N, 3, H, W) tensors in [0, 1]. Returns (N,).

    11x11 Gaussian window (sigma 1.5; the largest odd size that fits when a side is
    below 11), valid region only, K1 = 0.01, K2 = 0.03, computed per channel and
    averaged over channels and positions (output clamped).
    """
    x = output.clamp(0, 1).float()
    y = target.float()
    channels = x.shape[1]
    side = min(x.shape[-2:])
    size = 11 if side >= 11 else max(1, side if side % 2 else side - 1)
    window = gaussian_window(size=size, device=x.device).expand(channels, 1, size, size)
    c1, c2 = 0.01**2, 0.03**2
    mu_x = F.conv2d(x, window, groups=channels)
    mu_y = F.conv2d(y, window, groups=channels)
    sxx = F.conv2d(x * x, window, groups=channels) - mu_x**2
    syy = F.conv2d(y * y, window, groups=channels) - mu_y**2
    sxy = F.conv2d(x * y, window, groups=channels) - mu_x * mu_y
    score = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return score.flatten(1).mean(1)
