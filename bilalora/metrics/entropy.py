"""Image entropy as used in dehazing papers (MATLAB ``entropy``), docs/metrics.md.

Default mode ``"gray"`` is ``entropy(rgb2gray(I))``: MATLAB gray (weights
0.298936021293775 / 0.587043074451121 / 0.114020904255103, rounded half away
from zero), 256-bin histogram of the 8-bit values, zero bins dropped,
``E = -sum(p * log2(p))``. Mode ``"rgb"`` is MATLAB ``entropy(I)`` on the colour
array itself, which pools all 3*H*W values into one histogram (some public
evaluation scripts do this; it gives larger numbers, e.g. 7.5748 vs 7.5064 on
FADE's test_image1). **Higher is better** (more information / detail), range
0..8 bits. numpy only.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError
from .fade import matlab_gray, to_uint8_rgb

__all__ = ["entropy", "histogram_entropy"]


def histogram_entropy(values_uint8: np.ndarray) -> float:
    """Shannon entropy (log2) of the 256-bin histogram of uint8 ``values_uint8`` (any shape).

    Returns 0.0 for a constant array and NaN for an empty one.
    """
    v = np.asarray(values_uint8)
    if v.size == 0:
        return float("nan")
    counts = np.bincount(v.astype(np.uint8, copy=False).ravel(), minlength=256)
    counts = counts[counts > 0]
    p = counts / v.size
    return float(-np.sum(p * np.log2(p)))


def entropy(image: np.ndarray, mode: str = "gray") -> float:
    """MATLAB-style image entropy in bits (0..8). **Higher is better.**

    Args:
        image: ``uint8`` (H, W, 3) RGB 0..255, or (H, W) gray (used as is, already a
            gray image), or float in [0, 1] (converted with MATLAB ``uint8(255*x)``:
            round half away from zero, clip). Extra channels (alpha) are dropped.
        mode: ``"gray"`` (default): ``entropy(rgb2gray(I))``. ``"rgb"``: MATLAB
            ``entropy(I)`` on the colour array, pooling the three channels into one
            histogram. For a gray input both modes give the same value.

    Returns:
        The entropy as a float (0.0 for a constant image, NaN for an empty one).
    """
    if mode not in ("gray", "rgb"):
        raise UserError(f"entropy: mode must be 'gray' or 'rgb', got {mode!r}")
    arr = np.asarray(image)
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 1):
        gray = to_uint8_rgb(arr, "entropy input")[..., 0]
        return histogram_entropy(gray)
    rgb = to_uint8_rgb(arr, "entropy input")
    if mode == "rgb":
        return histogram_entropy(rgb)
    return histogram_entropy(matlab_gray(rgb).astype(np.uint8))
