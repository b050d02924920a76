"""Contrast stretch (auto-levels): the trivial post-process a dehazing network must beat. numpy only.

Haze lifts the black level and compresses contrast; mapping an image's low and
high percentiles to 0 and 255 undoes much of that without any model. Two forms:

* :func:`stretch_channels`: each channel's own ``low``-``high`` percentiles
  (per-channel auto-levels; also corrects a colour cast of the airlight);
* :func:`stretch_global`: one pair of percentiles of the grey level (Rec. 601
  luma) applied to all channels (contrast only, colour balance kept).
"""

from __future__ import annotations

import numpy as np

__all__ = ["stretch_channels", "stretch_global"]

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


def _as_float(image: np.ndarray) -> tuple[np.ndarray, bool]:
    """(H, W, 3) uint8 or float in [0, 1] -> float64 in [0, 1], and whether the input was uint8."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0, True
    return image.astype(np.float64), False


def _back(image: np.ndarray, was_uint8: bool) -> np.ndarray:
    image = np.clip(image, 0.0, 1.0)
    return (image * 255.0 + 0.5).astype(np.uint8) if was_uint8 else image.astype(np.float32)


def _check(low: float, high: float) -> None:
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {low}, {high}")


def stretch_channels(image: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Map each channel's ``low``/``high`` percentiles to 0/1 (clipped).

    Args:
        image: (H, W, 3) RGB, uint8 or float in [0, 1].
        low, high: percentiles (0-100) mapped to black and white.

    Returns:
        the stretched image, same shape; uint8 for uint8 input, else float32 in [0, 1].
        A channel whose two percentiles coincide (flat) is left unchanged.
    """
    _check(low, high)
    x, was_uint8 = _as_float(image)
    lo, hi = np.percentile(x.reshape(-1, 3), [low, high], axis=0)
    span = hi - lo
    flat = span <= 1e-6
    out = np.where(flat, x, (x - lo) / np.where(flat, 1.0, span))
    return _back(out, was_uint8)


def stretch_global(image: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Map the grey level's ``low``/``high`` percentiles to 0/1 on all channels alike (clipped).

    Args:
        image: (H, W, 3) RGB, uint8 or float in [0, 1].
        low, high: percentiles (0-100) of the luma ``0.299 R + 0.587 G + 0.114 B``.

    Returns:
        the stretched image, same shape and type rules as :func:`stretch_channels`; a flat image is unchanged.
    """
    _check(low, high)
    x, was_uint8 = _as_float(image)
    lo, hi = np.percentile(x @ _LUMA, [low, high])
    if hi - lo <= 1e-6:
        return _back(x, was_uint8)
    return _back((x - lo) / (hi - lo), was_uint8)
