"""Pretraining batches: matched pairs mixed with synthesised pairs, a pure function of (seed, step).

Sample ``i`` of step ``s`` is drawn with ``numpy.random.default_rng([seed, s, i])``
(source, image, crop, haze, rotation, flip), so a batch is a pure function of
``(seed, step)``: a resumed run sees exactly the data an uninterrupted run would,
and batches can be prepared ahead in threads (:func:`bilalora.prefetch.prefetched`)
without changing them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch

from .camera import CameraArtifacts, apply_camera_artifacts
from .errors import UserError
from .pairs import ClearFolder, PairedFolder
from .prefetch import prefetched

__all__ = ["AIRLIGHT_UNEVENNESS", "TrainMixture", "resolve_synth_ratio"]

AIRLIGHT_UNEVENNESS = (0.0, 0.04)
"""Relative airlight drift of synthesised haze when camera artifacts are on (``--artifacts``)."""


def resolve_synth_ratio(has_pairs: bool, has_clear: bool, synth_ratio: float | None) -> float:
    """The share of synthesised samples, checked against the sources given.

    The one place that checks the training sources (the CLI calls it before decoding
    any folder, :class:`TrainMixture` when built from folders).

    Args:
        has_pairs: matched pairs (``--pairs``) are given.
        has_clear: clear photos to synthesise from (``--clear``) are given.
        synth_ratio: requested share in [0, 1], or None for the default: 0 with pairs
            only, 1 with clear photos only, 0.5 with both.

    Raises:
        UserError: no source, a ratio outside [0, 1], or a ratio that needs a missing source.
    """
    if not has_pairs and not has_clear:
        raise UserError("no training data: give --pairs DIR (hazy/ + clear/) and/or --clear DIR --synthesize")
    if synth_ratio is None:
        return 1.0 if not has_pairs else (0.0 if not has_clear else 0.5)
    if not 0.0 <= synth_ratio <= 1.0:
        raise UserError(f"--synth-ratio must be in [0, 1], got {synth_ratio}")
    if synth_ratio > 0 and not has_clear:
        raise UserError(f"--synth-ratio {synth_ratio} needs --clear DIR --synthesize")
    if synth_ratio < 1 and not has_pairs:
        raise UserError(f"--synth-ratio {synth_ratio} needs --pairs DIR for the paired part")
    return float(synth_ratio)


class TrainMixture:
    """Batches mixing matched pairs and synthesised pairs.

    Args:
        pairs: matched pairs or None.
        clear: clear photos to synthesise from, or None.
        synth_ratio: probability of a synthesised sample (None: see :func:`resolve_synth_ratio`).
        batch: samples per step.
        crop: crop side in pixels.
        seed: data seed.
        artifacts: give every hazy input what a real photo carries and the scattering
            model lacks (:mod:`bilalora.camera`: grain, 8-bit quantisation, JPEG), and
            synthesised haze an uneven airlight (:data:`AIRLIGHT_UNEVENNESS`); the clear
            side is untouched. Off: the samples of earlier releases, bit for bit.
    """

    def __init__(
        self,
        pairs: PairedFolder | None,
        clear: ClearFolder | None,
        synth_ratio: float | None,
        batch: int,
        crop: int,
        seed: int,
        artifacts: bool = False,
    ):
        self.synth_ratio = resolve_synth_ratio(pairs is not None, clear is not None, synth_ratio)
        self.pairs, self.clear = pairs, clear
        self.batch, self.crop, self.seed = batch, crop, seed
        self.artifacts = CameraArtifacts() if artifacts else None
        if self.artifacts is not None:
            self.artifacts.check()
        self.haze_ranges = (
            replace(clear.ranges, airlight_unevenness=AIRLIGHT_UNEVENNESS) if artifacts and clear is not None else None
        )

    def sample(self, step: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``index`` of ``step``: (hazy, clear) float32 (crop, crop, 3) in [0, 1]."""
        rng = np.random.default_rng([self.seed, int(step), int(index)])
        if rng.uniform() < self.synth_ratio:
            hazy, clear = self.clear.sample(int(rng.integers(len(self.clear))), self.crop, rng, self.haze_ranges)
        else:
            hazy, clear = self.pairs.sample(int(rng.integers(len(self.pairs))), self.crop, rng)
        if self.artifacts is not None:
            hazy, _ = apply_camera_artifacts(hazy, rng, self.artifacts)
        return hazy, clear

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch of ``step``: (hazy, clear) float32 tensors (B, 3, crop, crop) in [0, 1]."""
        samples = [self.sample(step, i) for i in range(self.batch)]
        hazy = np.stack([s[0] for s in samples]).transpose(0, 3, 1, 2)
        clear = np.stack([s[1] for s in samples]).transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(hazy)), torch.from_numpy(np.ascontiguousarray(clear))

    def iterate(self, start: int, stop: int, workers: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(step, hazy, clear)`` for ``start <= step < stop``, prepared ``workers`` steps ahead."""
        for step, (hazy, clear) in prefetched(self.batch_at, range(start, stop), workers=workers):
            yield step, hazy, clear

    def summary(self) -> dict:
        """JSON-ready description of the mixture."""
        return {
            "synth_ratio": self.synth_ratio,
            "camera_artifacts": self.artifacts.as_dict() if self.artifacts is not None else None,
            "airlight_unevenness": list(self.haze_ranges.airlight_unevenness) if self.haze_ranges is not None else None,
            "pairs": self.pairs.summary() if self.pairs is not None else None,
            "synthesized_from": self.clear.summary() if self.clear is not None else None,
        }
