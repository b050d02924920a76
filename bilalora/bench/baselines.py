"""Classical rows beside the networks: what a method without learning achieves on the same images.

* ``dcp``: the dark channel prior (He et al.) on the hazy input (``--dcp``).
* ``base+stretch``: the base network's output followed by a per-channel contrast
  stretch (each channel's 1st-99th percentiles mapped to 0-255), i.e. auto-levels.
* ``base+stretch-global``: the same with one pair of percentiles over all channels
  (keeps the colour balance, stretches contrast only).

An adapted network that does not beat ``base+stretch`` on held-out images gains
nothing a one-line post-process would not give; the bench shows both so that
every report answers that question. The stretch functions live in
:mod:`bilalora.baselines.stretch` (numpy, torch-free).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["STRETCH_ROWS", "dcp_row", "stretch_rows"]

#: Row name -> the stretch it applies to the base's output.
STRETCH_ROWS = ("base+stretch", "base+stretch-global")


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """float [0, 1] or uint8 (H, W, 3) -> uint8, rounded and clipped."""
    if image.dtype == np.uint8:
        return image
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def dcp_row() -> Callable[[np.ndarray], np.ndarray]:
    """uint8 (H, W, 3) RGB hazy input -> uint8 RGB dehazed by the dark channel prior."""
    from bilalora.baselines.dcp import dehaze_dcp

    return lambda image: _to_uint8(dehaze_dcp(image))


def stretch_rows(source: str = "base") -> dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """``{row: (source row, uint8 RGB -> uint8 RGB)}`` for the two contrast-stretch rows of ``source``."""
    from bilalora.baselines.stretch import stretch_channels, stretch_global

    return {
        f"{source}+stretch": (source, lambda image: _to_uint8(stretch_channels(image))),
        f"{source}+stretch-global": (source, lambda image: _to_uint8(stretch_global(image))),
    }
