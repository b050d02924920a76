"""Weight-free haze / contrast measures (docs/metrics.md). numpy only.

All functions take one image: ``uint8`` (H, W, 3) RGB 0..255, (H, W) gray
(copied to three channels), or float in [0, 1] (converted with MATLAB
``uint8(255*x)`` first, so every metric sees the same 8-bit image).

| function | what | better |
| --- | --- | --- |
| :func:`dark_channel_density` | mean of He et al.'s dark channel (15x15) | lower |
| :func:`haze_opacity` | mean estimated haze opacity ``1 - t`` (DCP, omega 0.95) | lower |
| :func:`colourfulness` | Hasler-Suesstrunk colourfulness | higher |
| :func:`average_gradient` | average gradient of the gray image | higher |
| :func:`mean_brightness` | mean gray level in [0, 1] | none (informative) |

None of these has a standard; the docstrings state the choices made.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError
from .fade import matlab_gray, to_uint8_rgb

__all__ = [
    "atmospheric_light",
    "average_gradient",
    "colourfulness",
    "dark_channel",
    "dark_channel_density",
    "haze_opacity",
    "mean_brightness",
    "min_filter",
]


def _check_window(window: int) -> int:
    if int(window) != window or window < 1:
        raise UserError(f"dark channel window must be a positive integer, got {window!r}")
    return int(window)


def min_filter(a: np.ndarray, window: int) -> np.ndarray:
    """Square ``window`` x ``window`` minimum filter of a 2-D float array.

    Pixels outside the image are ignored (equivalent to replicate padding for a
    minimum); the window may exceed the image. For an even window the extra
    sample lies below/right of the centre.
    """
    import cv2

    window = _check_window(window)
    out = np.array(a, dtype=np.float64)
    window = min(window, 2 * max(out.shape) - 1)  # a larger window already covers the whole image
    if window == 1:
        return out
    lo = (window - 1) // 2
    # erosion = minimum filter; an infinite constant border ignores outside pixels
    kernel = np.ones((window, window), dtype=np.uint8)
    return cv2.erode(out, kernel, anchor=(lo, lo), borderType=cv2.BORDER_CONSTANT, borderValue=float("inf"))


def dark_channel(rgb01: np.ndarray, window: int = 15) -> np.ndarray:
    """He et al.'s dark channel of a float (H, W, 3) array: per-pixel min over the
    channels, then a ``window`` x ``window`` minimum filter. Returns (H, W) float64."""
    rgb01 = np.asarray(rgb01, dtype=np.float64)
    return min_filter(rgb01.min(axis=2), window)


def _rgb01(image: np.ndarray, name: str) -> np.ndarray:
    return to_uint8_rgb(image, name).astype(np.float64) / 255.0


def dark_channel_density(image: np.ndarray, window: int = 15) -> float:
    """Mean of the dark channel (He, Sun, Tang 2009), in [0, 1]. **Lower is better** (less haze).

    ``dark(x) = min over the window around x of min_c I_c / 255``, window 15x15 by
    default (border: pixels outside the image ignored). Input: see module docstring.
    Returns NaN for an empty image.
    """
    rgb = _rgb01(image, "dark_channel_density input")
    if rgb.size == 0:
        return float("nan")
    return float(dark_channel(rgb, window).mean())


def atmospheric_light(rgb01: np.ndarray, dark: np.ndarray, top_fraction: float = 0.001) -> np.ndarray:
    """Atmospheric light A (3,) from a float (H, W, 3) image and its dark channel.

    Among the ``max(1, floor(top_fraction * H * W))`` pixels with the highest dark
    channel (ties broken by raster order), take the one with the highest intensity
    (mean of R, G, B; first one on ties) and return its RGB value.
    """
    rgb01 = np.asarray(rgb01, dtype=np.float64)
    flat_dark = np.asarray(dark, dtype=np.float64).ravel()
    n = flat_dark.size
    if n == 0:
        raise UserError("atmospheric light: empty image")
    k = max(1, int(np.floor(top_fraction * n)))
    top = np.argsort(-flat_dark, kind="stable")[:k]
    pixels = rgb01.reshape(-1, 3)[top]
    return pixels[int(np.argmax(pixels.mean(axis=1)))].copy()


def haze_opacity(image: np.ndarray, window: int = 15, omega: float = 0.95, top_fraction: float = 0.001) -> float:
    """Mean estimated haze opacity ``mean(1 - t)`` of the dark channel prior, in [0, 1].
    **Lower is better.**

    ``t(x) = 1 - omega * min over the window of min_c I_c / A_c`` (window 15x15,
    omega 0.95, no refinement), with A from :func:`atmospheric_light` (brightest of the
    top 0.1 % dark-channel pixels); A components are floored at 1/255 so a black image
    gives a finite value. Input: see module docstring. NaN for an empty image.
    """
    rgb = _rgb01(image, "haze_opacity input")
    if rgb.size == 0:
        return float("nan")
    dark = dark_channel(rgb, window)
    a = np.maximum(atmospheric_light(rgb, dark, top_fraction), 1.0 / 255.0)
    normed_dark = dark_channel(rgb / a, window)
    return float(np.mean(omega * normed_dark))


def colourfulness(image: np.ndarray) -> float:
    """Hasler-Suesstrunk colourfulness of the whole image (0..255 scale, typically 0..~150).
    **Higher is better** (haze washes colours out).

    ``rg = R - G``, ``yb = 0.5 (R + G) - B``;
    ``CF = sqrt(std(rg)^2 + std(yb)^2) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2)`` with sample
    std (N - 1), as FADE's feature f15 (docs/metrics.md). Gray images give 0. NaN for an empty image; a
    single pixel uses std = 0 (MATLAB semantics).
    """
    rgb = to_uint8_rgb(image, "colourfulness input").astype(np.float64)
    if rgb.size == 0:
        return float("nan")
    r, g, b = rgb[..., 0].ravel(), rgb[..., 1].ravel(), rgb[..., 2].ravel()
    rg = r - g
    yb = 0.5 * (r + g) - b
    ddof = 1 if rg.size > 1 else 0
    return float(
        np.sqrt(np.var(rg, ddof=ddof) + np.var(yb, ddof=ddof)) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    )


def average_gradient(image: np.ndarray) -> float:
    """Average gradient (AG) of the MATLAB gray image, 0..255 units. **Higher is better**
    (more visible detail).

    Variant used: forward differences ``gx = I[i, j+1] - I[i, j]``,
    ``gy = I[i+1, j] - I[i, j]`` on the rounded MATLAB gray image, and
    ``AG = mean over the (H-1) x (W-1) top-left pixels of sqrt((gx^2 + gy^2) / 2)``.
    NaN when H or W < 2.
    """
    gray = matlab_gray(to_uint8_rgb(image, "average_gradient input"))
    if gray.shape[0] < 2 or gray.shape[1] < 2:
        return float("nan")
    gx = np.diff(gray, axis=1)[:-1, :]
    gy = np.diff(gray, axis=0)[:, :-1]
    return float(np.mean(np.sqrt((gx * gx + gy * gy) / 2.0)))


def mean_brightness(image: np.ndarray) -> float:
    """Mean of the MATLAB gray image divided by 255, in [0, 1]. No better direction
    (reported to spot over-darkened or washed-out outputs). NaN for an empty image."""
    gray = matlab_gray(to_uint8_rgb(image, "mean_brightness input"))
    if gray.size == 0:
        return float("nan")
    return float(gray.mean() / 255.0)
