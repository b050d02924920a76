"""Synthetic images made by the tests (no external data)."""

from __future__ import annotations

import numpy as np


def textured_scene(h: int = 96, w: int = 128, seed: int = 0, noise: float = 0.05) -> np.ndarray:
    """A colourful textured fog-free float64 image (H, W, 3) in [0, 1] whose dark channel is close
    to 0 almost everywhere (one channel low at every pixel), so the dark channel prior holds."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    hue = (xx / 23.0 + yy / 31.0 + 0.3 * np.sin(xx / 7.0) * np.cos(yy / 5.0)) % 1.0
    val = 0.55 + 0.4 * np.sin(xx / 3.0 + yy / 4.0) ** 2
    channels = []
    for offset in (0.0, 1.0 / 3.0, 2.0 / 3.0):
        d = np.abs(((hue + offset) % 1.0) - 0.5) * 2.0
        channels.append(np.clip(1.5 - 6.0 * np.abs(d - 0.5), 0.0, 1.0))
    img = np.stack(channels, axis=-1) * val[..., None] + noise * rng.random((h, w, 3))
    return np.clip(img, 0.0, 1.0)
