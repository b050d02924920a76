"""Dark channel prior dehazing (He, Sun, Tang, CVPR 2009 / TPAMI 2011) with
guided-filter refinement of the transmission (He, Sun, Tang, ECCV 2010 / TPAMI 2013).

numpy + OpenCV, no torch. Pipeline for a float RGB image I in [0, 1]:

1. dark channel: min over the channels, then a ``patch`` x ``patch`` minimum filter
   (pixels outside the image ignored);
2. atmospheric light A (per channel): among the ``max(1, floor(top_fraction*H*W))``
   pixels with the highest dark channel, the RGB value of the one with the highest
   intensity (mean of R, G, B) -- :func:`bilalora.metrics.haze.atmospheric_light`;
3. transmission ``t = 1 - omega * dark_channel(I / A)``;
4. refinement with a guided filter (box filter, windows clipped at the image border
   and normalised by the number of valid pixels, as in He's reference code), guided by
   the gray image ``0.299 R + 0.587 G + 0.114 B``;
5. ``J = (I - A) / max(t, t0) + A``, clipped to [0, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from ..errors import UserError
from ..images import as_rgb01
from ..metrics.haze import atmospheric_light, min_filter

__all__ = ["DCP", "DCPResult", "dark_channel", "dcp_estimate", "dehaze_dcp", "guided_filter"]


def dark_channel(image: np.ndarray, patch: int = 15) -> np.ndarray:
    """Dark channel of a float (H, W, 3) image: per-pixel channel minimum, then a
    ``patch`` x ``patch`` minimum filter (outside pixels ignored). Returns float32 (H, W).

    The window is clipped to ``2*max(H, W) - 1`` (which already covers the image).
    """
    if int(patch) != patch or patch < 1:
        raise UserError(f"DCP: patch must be a positive integer, got {patch!r}")
    img = np.asarray(image, dtype=np.float32)
    return min_filter(img.min(axis=2), int(patch)).astype(np.float32)


def _box_mean(x: np.ndarray, r: int, count: np.ndarray) -> np.ndarray:
    s = cv2.boxFilter(x, -1, (2 * r + 1, 2 * r + 1), normalize=False, borderType=cv2.BORDER_CONSTANT)
    return s / count


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int = 60, eps: float = 1e-3) -> np.ndarray:
    """Gray-guide guided filter (He et al. 2010), box windows of side ``2*radius+1``.

    Windows are clipped at the border and averaged over the valid pixels only.
    ``radius`` is clipped to ``max(H, W) - 1``. Both inputs are (H, W); returns float64.
    """
    guide = np.asarray(guide, dtype=np.float64)
    src = np.asarray(src, dtype=np.float64)
    if guide.shape != src.shape or guide.ndim != 2:
        raise UserError(f"guided filter: guide {guide.shape} and input {src.shape} must be equal 2-D shapes")
    if radius < 0 or eps <= 0:
        raise UserError(f"guided filter: need radius >= 0 and eps > 0, got {radius}, {eps}")
    r = int(min(radius, max(guide.shape) - 1))
    if r == 0:
        return src.copy()
    count = cv2.boxFilter(np.ones_like(guide), -1, (2 * r + 1, 2 * r + 1), normalize=False,
                          borderType=cv2.BORDER_CONSTANT)
    mean_i = _box_mean(guide, r, count)
    mean_p = _box_mean(src, r, count)
    cov_ip = _box_mean(guide * src, r, count) - mean_i * mean_p
    var_i = _box_mean(guide * guide, r, count) - mean_i * mean_i
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    return _box_mean(a, r, count) * guide + _box_mean(b, r, count)


@dataclass(frozen=True)
class DCPResult:
    """DCP output and intermediates.

    Attributes:
        image: dehazed float32 (H, W, 3) in [0, 1].
        transmission: refined transmission, float32 (H, W), clipped to [t0, 1].
        raw_transmission: transmission before refinement, float32 (H, W).
        airlight: float32 (3,) atmospheric light A.
    """

    image: np.ndarray
    transmission: np.ndarray
    raw_transmission: np.ndarray
    airlight: np.ndarray


def dcp_estimate(
    image: np.ndarray,
    patch: int = 15,
    omega: float = 0.95,
    t0: float = 0.1,
    top_fraction: float = 0.001,
    guided_radius: int = 60,
    guided_eps: float = 1e-3,
) -> DCPResult:
    """Run DCP and return the dehazed image with its transmission and airlight.

    Arguments as :func:`dehaze_dcp`.
    """
    if not 0.0 < t0 <= 1.0:
        raise UserError(f"DCP: t0 must be in (0, 1], got {t0}")
    if not 0.0 < top_fraction <= 1.0:
        raise UserError(f"DCP: top_fraction must be in (0, 1], got {top_fraction}")
    img = as_rgb01(image, "DCP")
    dark = dark_channel(img, patch)
    airlight = atmospheric_light(img, dark, top_fraction)
    airlight = np.maximum(airlight, 1e-3).astype(np.float32)  # a black image must not divide by 0
    t_raw = 1.0 - omega * dark_channel(img / airlight, patch)
    gray = 0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]
    t = guided_filter(gray, t_raw, guided_radius, guided_eps)
    t = np.clip(t, t0, 1.0).astype(np.float32)
    out = (img - airlight) / t[..., None] + airlight
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    return DCPResult(image=out, transmission=t, raw_transmission=t_raw.astype(np.float32), airlight=airlight)


def dehaze_dcp(
    image: np.ndarray,
    patch: int = 15,
    omega: float = 0.95,
    t0: float = 0.1,
    top_fraction: float = 0.001,
    guided_radius: int = 60,
    guided_eps: float = 1e-3,
) -> np.ndarray:
    """Dehaze one image with the dark channel prior.

    Args:
        image: float32 (H, W, 3) RGB in [0, 1] (uint8 is accepted and divided by 255;
            float values are clipped to [0, 1]).
        patch: side of the dark-channel minimum window (15 in the paper).
        omega: fraction of haze removed (0.95 keeps a little for depth perception).
        t0: lower bound of the transmission in the recovery step.
        top_fraction: fraction of brightest dark-channel pixels searched for A (0.1 %).
        guided_radius: guided-filter radius in pixels (60 as in He et al.), clipped to
            the image size.
        guided_eps: guided-filter regularisation (1e-3 for [0, 1] images).

    Returns:
        float32 (H, W, 3) RGB in [0, 1].
    """
    return dcp_estimate(image, patch, omega, t0, top_fraction, guided_radius, guided_eps).image


@dataclass
class DCP:
    """Callable DCP dehazer holding its parameters: ``DCP(patch=15)(image) -> image``.

    See :func:`dehaze_dcp` for the parameters and the input/output contract.
    """

    patch: int = 15
    omega: float = 0.95
    t0: float = 0.1
    top_fraction: float = 0.001
    guided_radius: int = 60
    guided_eps: float = 1e-3

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return dehaze_dcp(image, **asdict(self))

    def estimate(self, image: np.ndarray) -> DCPResult:
        """Like ``__call__`` but returns the :class:`DCPResult` with intermediates."""
        return dcp_estimate(image, **asdict(self))
