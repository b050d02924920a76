"""Contrast stretches: the trivial post-processes every dehazing result must be compared with.

Haze lifts the black level and compresses the range of a photo; "auto levels"
undoes much of that without any model. Two variants, both numpy only:

* :func:`stretch_channels` -- per-channel percentile stretch: each of R, G, B is mapped
  affinely so that its ``low`` percentile goes to 0 and its ``high`` percentile to 1
  (default 1 % and 99 %), then clipped. It also removes a colour cast, since each channel
  is stretched on its own (like Photoshop's per-channel auto levels).
* :func:`stretch_global` -- global grey stretch: one affine map, from the percentiles of the
  luma ``Y = 0.299 R + 0.587 G + 0.114 B``, applied to all three channels; it keeps the
  colour balance of the input (hue ratios are unchanged up to clipping).

Both take an RGB image ``(H, W, 3)``, ``uint8`` (0..255) or float in ``[0, 1]``, and return
``float32`` ``(H, W, 3)`` in ``[0, 1]``. A channel (or luma) whose percentile range is below
``1/255`` is left as it is (a flat image has no contrast to stretch; dividing by a tiny range
would only amplify noise). :data:`STRETCHES` names them for benchmark rows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import UserError
from ..images import as_rgb01

__all__ = ["MIN_RANGE", "STRETCHES", "stretch_channels", "stretch_global"]

#: Percentile ranges below this (one 8-bit level) are not stretched.
MIN_RANGE = 1.0 / 255.0

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _check_percentiles(low: float, high: float) -> None:
    if not 0.0 <= low < high <= 100.0:
        raise UserError(f"contrast stretch: need 0 <= low < high <= 100 percentiles, got {low} and {high}")


def _affine(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi - lo < MIN_RANGE:
        return values
    return (values - np.float32(lo)) / np.float32(hi - lo)


def stretch_channels(image: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Per-channel percentile stretch (auto levels): channel c -> (c - P_low(c)) / (P_high(c) - P_low(c)).

    Args:
        image: RGB ``(H, W, 3)``, ``uint8`` or float in [0, 1].
        low, high: the percentiles mapped to 0 and 1 (0 <= low < high <= 100).

    Returns:
        ``float32`` ``(H, W, 3)`` in [0, 1].
    """
    _check_percentiles(low, high)
    rgb = as_rgb01(image, "contrast stretch")
    flat = rgb.reshape(-1, 3)
    lo, hi = np.percentile(flat, [low, high], axis=0)
    out = np.stack([_affine(rgb[..., c], float(lo[c]), float(hi[c])) for c in range(3)], axis=-1)
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


def stretch_global(image: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Global grey stretch: every channel -> (c - P_low(Y)) / (P_high(Y) - P_low(Y)), Y the luma.

    Args:
        image: RGB ``(H, W, 3)``, ``uint8`` or float in [0, 1].
        low, high: the luma percentiles mapped to 0 and 1 (0 <= low < high <= 100).

    Returns:
        ``float32`` ``(H, W, 3)`` in [0, 1].
    """
    _check_percentiles(low, high)
    rgb = as_rgb01(image, "contrast stretch")
    luma = rgb @ _LUMA
    lo, hi = np.percentile(luma, [low, high])
    out = _affine(rgb, float(lo), float(hi))
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


#: Benchmark-row name -> stretch (default 1-99 % percentiles).
STRETCHES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "stretch": stretch_channels,
    "stretch-global": stretch_global,
}
