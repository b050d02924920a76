"""Switching between domain models (day / night, hazy / clear) frame by frame. numpy + OpenCV.

    from bilalora.runtime import Dehazer, ModelSwitch, LuminanceRule
    switch = ModelSwitch({"day": Dehazer("day/export"), "night": Dehazer("night/export")},
                         rule=LuminanceRule(threshold=0.22), hold=15)
    out = switch(frame)            # switch.active says which model ran

A *rule* maps a frame to a domain name; any callable works. The built-in rules
measure a downscaled copy of the frame, so they cost well under a millisecond:

* :class:`LuminanceRule`: mean luma (BT.601, [0, 1]) below ``threshold`` -> "night", else "day".
* :class:`HazeRule`: mean dark channel (min over colour, 15x15 minimum filter, He et al.)
  above ``threshold`` -> "haze", else "clear"; map "clear" to ``None`` to pass clear frames through.

The switch has hysteresis: a new domain must be seen for ``hold`` consecutive frames
before the model changes (the first frame decides at once), so a flickering scene
does not toggle models every frame.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Mapping, Optional

import cv2
import numpy as np

from bilalora.errors import UserError

from .frames import check_frame

__all__ = ["mean_luminance", "haze_density", "LuminanceRule", "HazeRule", "ModelSwitch"]

_PROBE_SIDE = 160


def _probe(frame: np.ndarray, color: str) -> np.ndarray:
    """A float32 (h, w, 3) RGB copy in [0, 1] whose longer side is at most 160 px."""
    check_frame(frame)
    image = frame if frame.ndim == 3 else frame[:, :, None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    image = image[:, :, :3]
    if color == "bgr":
        image = image[:, :, ::-1]
    scale = _PROBE_SIDE / max(image.shape[:2])
    if scale < 1:
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        image = cv2.resize(np.ascontiguousarray(image), size, interpolation=cv2.INTER_AREA)
    return image.astype(np.float32) / np.float32(255.0)


def mean_luminance(frame: np.ndarray, color: str = "bgr") -> float:
    """Mean BT.601 luma of a uint8 frame, in [0, 1]."""
    rgb = _probe(frame, color)
    return float((0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]).mean())


def haze_density(frame: np.ndarray, color: str = "bgr", window: int = 15) -> float:
    """Mean dark channel of a uint8 frame, in [0, 1] (higher: hazier; clear daylight scenes are near 0).

    The window is scaled with the probe so that it covers the same share of the frame as
    ``window`` pixels of a 600-pixel-wide image.
    """
    from bilalora.metrics.haze import dark_channel

    rgb = _probe(frame, color)
    side = max(1, round(window * max(rgb.shape[:2]) / 600))
    return float(dark_channel(rgb, side).mean())


class _ThresholdRule:
    """``names[1]`` when ``measure(frame, color)`` is above (or below) ``threshold``, else ``names[0]``."""

    def __init__(self, measure, threshold: float, above: bool, color: str, names: tuple[str, str], flag: str):
        if not 0.0 < threshold < 1.0:
            raise UserError(f"{flag} {threshold}: use a value between 0 and 1")
        self.measure, self.threshold, self.above = measure, float(threshold), above
        self.color, self.names = color, names

    def __call__(self, frame: np.ndarray) -> str:
        value = self.measure(frame, self.color)
        crossed = value > self.threshold if self.above else value < self.threshold
        return self.names[1] if crossed else self.names[0]


class LuminanceRule(_ThresholdRule):
    """"night" when the frame's mean luma is below ``threshold``, else "day"."""

    def __init__(self, threshold: float = 0.22, color: str = "bgr", names: tuple[str, str] = ("day", "night")):
        super().__init__(mean_luminance, threshold, False, color, names, "--night-below")


class HazeRule(_ThresholdRule):
    """"haze" when the frame's mean dark channel is above ``threshold``, else "clear"."""

    def __init__(self, threshold: float = 0.3, color: str = "bgr", names: tuple[str, str] = ("clear", "haze")):
        super().__init__(haze_density, threshold, True, color, names, "--haze-above")


Model = Optional[Callable[[np.ndarray], np.ndarray]]


class ModelSwitch:
    """Route each frame to the model of its domain, with hysteresis.

    Args:
        models: domain name -> a frame function (a :class:`~.dehazer.Dehazer`), or ``None``
            to pass that domain's frames through unchanged.
        rule: frame -> domain name (a key of ``models``).
        hold: consecutive frames a new domain must be seen before switching (>= 1).

    Attributes:
        active: the domain whose model ran on the last frame.
        switches: how many times the active model changed (the first choice is not counted).
        counts: frames run per domain.
    """

    def __init__(self, models: Mapping[str, Model], rule: Callable[[np.ndarray], str], hold: int = 15):
        if not models:
            raise UserError("ModelSwitch needs at least one model")
        if hold < 1:
            raise UserError(f"--hold {hold}: use 1 or more frames")
        self.models = dict(models)
        self.rule = rule
        self.hold = int(hold)
        self.active: Optional[str] = None
        self.switches = 0
        self.counts: Counter = Counter()
        self._candidate: Optional[str] = None
        self._streak = 0

    def choose(self, frame: np.ndarray) -> str:
        """Update the hysteresis with this frame and return the domain to run."""
        seen = self.rule(frame)
        if seen not in self.models:
            raise UserError(f"the switch rule returned {seen!r}, which is not one of {', '.join(self.models)}")
        if self.active is None:
            self.active = seen
        elif seen == self.active:
            self._candidate, self._streak = None, 0
        else:
            self._streak = self._streak + 1 if seen == self._candidate else 1
            self._candidate = seen
            if self._streak >= self.hold:
                self.active, self._candidate, self._streak = seen, None, 0
                self.switches += 1
        return self.active

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """Dehaze ``frame`` with the active domain's model (or pass it through)."""
        domain = self.choose(frame)
        self.counts[domain] += 1
        model = self.models[domain]
        return frame.copy() if model is None else model(frame)

    def describe(self) -> dict:
        """Counts per domain, switches and the active domain (JSON-ready)."""
        return {"active": self.active, "switches": self.switches, "frames": dict(self.counts), "hold": self.hold}

    def close(self) -> None:
        """Close every model that has a ``close`` method."""
        for model in self.models.values():
            if model is not None and hasattr(model, "close"):
                model.close()
