"""No-reference image-quality and haze metrics for dehazing (numpy only, no torch).

Every metric takes one image: ``uint8`` (H, W, 3) RGB 0..255 (preferred), (H, W)
gray (copied to three channels), or float in [0, 1] (converted with MATLAB
``uint8(255*x)``), and returns a float.

:data:`METRICS` maps a name to ``(function, direction)`` where direction is
``"lower"`` or ``"higher"`` (which way is better) or ``"none"`` (informative
only). :func:`evaluate` computes several at once; :func:`register_metric` adds one
(e.g. BIQME or MUSIQ, which live elsewhere because they need model files or torch).

Full-reference PSNR/SSIM against ground truth are in :mod:`bilalora.metrics.reference`
(torch; not imported here, so this package stays torch-free).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from ..errors import UserError
from .entropy import entropy
from .fade import FadeResult, fade, fade_details, to_uint8_rgb
from .haze import (
    average_gradient,
    colourfulness,
    dark_channel,
    dark_channel_density,
    haze_opacity,
    mean_brightness,
)

__all__ = [
    "DIRECTIONS",
    "METRICS",
    "FadeResult",
    "average_gradient",
    "colourfulness",
    "dark_channel",
    "dark_channel_density",
    "entropy",
    "evaluate",
    "fade",
    "fade_details",
    "haze_opacity",
    "mean_brightness",
    "register_metric",
]

#: Allowed values for a metric's direction.
DIRECTIONS = ("lower", "higher", "none")

MetricFn = Callable[[np.ndarray], float]

#: name -> (function(image) -> float, direction in DIRECTIONS)
METRICS: dict[str, tuple[MetricFn, str]] = {
    "fade": (fade, "lower"),
    "entropy": (entropy, "higher"),
    "dcd": (dark_channel_density, "lower"),
    "haze_opacity": (haze_opacity, "lower"),
    "colourfulness": (colourfulness, "higher"),
    "ag": (average_gradient, "higher"),
    "brightness": (mean_brightness, "none"),
}


def register_metric(name: str, fn: MetricFn, direction: str, *, overwrite: bool = False) -> None:
    """Add ``fn`` (image -> float) to :data:`METRICS` under ``name``.

    Raises:
        UserError: for an unknown direction, or an existing name without ``overwrite``.
    """
    if direction not in DIRECTIONS:
        raise UserError(f"metric {name!r}: direction must be one of {DIRECTIONS}, got {direction!r}")
    if name in METRICS and not overwrite:
        raise UserError(f"metric {name!r} is already registered")
    METRICS[name] = (fn, direction)


def evaluate(image_uint8_rgb: np.ndarray, names: Iterable[str] | None = None) -> dict[str, float]:
    """Compute the named metrics (all of :data:`METRICS` when ``names`` is None).

    Args:
        image_uint8_rgb: ``uint8`` (H, W, 3) RGB (gray or float [0, 1] also accepted,
            converted once with MATLAB ``uint8(255*x)``).
        names: metric names, in the order wanted in the result.

    Returns:
        ``{name: float}`` in the requested order (NaN where a metric is undefined,
        e.g. FADE of an image smaller than 8x8).

    Raises:
        UserError: for an unknown metric name.
    """
    selected = list(METRICS) if names is None else [names] if isinstance(names, str) else list(names)
    unknown = [n for n in selected if n not in METRICS]
    if unknown:
        raise UserError(f"unknown metric(s) {', '.join(unknown)}; available: {', '.join(METRICS)}")
    rgb = to_uint8_rgb(image_uint8_rgb, "evaluate input")
    return {n: float(METRICS[n][0](rgb)) for n in selected}
