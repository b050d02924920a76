"""How long each stage runs, which images each level sees, and the crops of every step.

Schedule. A run is counted in optimiser steps of ``batch`` crops, not in epochs:
a camera folder of 30-100 frames split three ways leaves 10-40 train images,
one or two batches per epoch, so an epoch-based search of 5 epochs would take
5-10 steps. The config's preset (:func:`bilalora.adapt.config.resolve_preset`:
``paper`` on an accelerator, ``cpu`` on the CPU unless ``schedule`` names one)
fills the batch, crop, image size and stage lengths the caller left unset. The
``cpu`` preset gives 20 search steps of 80. Under ``paper``,
:func:`resolve_schedule` gives each stage the paper's epochs (5 search, 30 in
all) but at least :data:`MIN_SEARCH_STEPS` search and :data:`MIN_TOTAL_STEPS`
total steps, about what the paper's schedule gives on its 500 images (batch 24:
55 search and 275 fine-tune steps). Explicit ``steps`` / ``search_steps`` (or
``epochs`` / ``search_epochs``) override either preset.

Crops. :class:`StepCrops` is an endless, deterministic stream of augmented
random square crops: crop slot ``j = step * batch + b`` belongs to pass
``p = j // n`` over the ``n`` images, which visits them in the order
``default_rng([seed, p]).permutation(n)``, and image ``i``'s crop position,
rotation and flip in pass ``p`` come from ``default_rng([seed, p, i])``. A small
folder hence gives several different crops of each image per step, each image
is used equally often, and batch ``step`` is a pure function of
``(seed, step)``: a resumed run sees exactly the batches of an uninterrupted one.

Batches are built on the host directly in channels-last layout (an NHWC array
viewed as NCHW, no transpose copy), optionally in pinned memory, so the device
copy can be ``non_blocking`` and the model (channels-last) needs no conversion.

Split. :func:`split_images` keeps a held-out test split that neither level
sees (``test_fraction``, at least one image when the folder has three or
more), then halves the rest into train (lower level, LoRA) and validation
(upper level, gates).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import augment, center_square_crop, random_square_crop, split_half
from ..errors import UserError
from .config import AdaptConfig, resolve_preset

__all__ = [
    "MIN_SEARCH_STEPS",
    "MIN_TOTAL_STEPS",
    "Schedule",
    "Split",
    "StepCrops",
    "eval_batches",
    "image_subset",
    "resolve_schedule",
    "split_images",
]

MIN_SEARCH_STEPS = 55
MIN_TOTAL_STEPS = 330
DEFAULT_SEARCH_EPOCHS = 5
DEFAULT_EPOCHS = 30


@dataclass(frozen=True)
class Schedule:
    """The stages of a run: ``stages`` is ``((name, steps), ...)`` in order."""

    stages: tuple[tuple[str, int], ...]
    n_train: int
    batch: int

    @property
    def total_steps(self) -> int:
        return sum(steps for _, steps in self.stages)

    def steps(self, stage: str) -> int:
        return dict(self.stages).get(stage, 0)

    def describe(self) -> str:
        """One line: steps per stage, passes over the train images, crops per image."""
        per_image = self.batch / self.n_train
        parts = [f"{name} {steps} steps ({steps * per_image:.1f} crops per train image)" for name, steps in self.stages]
        return (f"schedule: {', then '.join(parts)}; batch {self.batch} from {self.n_train} train image(s)")

    def as_dict(self) -> dict:
        return {name: steps for name, steps in self.stages}


def resolve_schedule(config: AdaptConfig, n_train: int, device: str = "cpu") -> Schedule:
    """Stage lengths in steps for ``config`` on ``n_train`` train images (see the module docstring).

    Args:
        config: the run's settings; one not yet resolved takes its preset for ``device``
            first (:func:`~bilalora.adapt.config.resolve_preset`; ``schedule="paper"`` for the paper's).
        n_train: train images (the lower level's half of the split).
        device: the run's device, deciding ``schedule="auto"`` (ignored for a resolved config).

    Raises:
        UserError: the search would be longer than the whole run.
    """
    config = resolve_preset(config, device)
    per_epoch = math.ceil(n_train / config.batch)
    total = _stage_steps(config.steps, config.epochs, per_epoch, DEFAULT_EPOCHS, MIN_TOTAL_STEPS)
    if not config.searches:
        return Schedule((("finetune", total),), n_train, config.batch)
    search = _stage_steps(config.search_steps, config.search_epochs, per_epoch, DEFAULT_SEARCH_EPOCHS,
                          MIN_SEARCH_STEPS)
    if search > total:
        raise UserError(
            f"the search ({search} steps) is longer than the whole run ({total} steps): raise --steps/--epochs "
            "or lower --search-steps/--search-epochs"
        )
    return Schedule((("search", search), ("finetune", total - search)), n_train, config.batch)


def _to_channels_last(crops: list[np.ndarray], pin: bool) -> torch.Tensor:
    """Stack ``(S, S, 3)`` float32 crops into a ``(B, 3, S, S)`` tensor with channels-last strides."""
    stacked = torch.from_numpy(np.ascontiguousarray(np.stack(crops), dtype=np.float32))
    if pin:
        stacked = stacked.pin_memory()
    return stacked.permute(0, 3, 1, 2)


class StepCrops:
    """Deterministic, endless batches of augmented random square crops (see the module docstring).

    Args:
        images: ``float32`` arrays ``(H, W, 3)`` in ``[0, 1]``.
        batch_size: crops per batch.
        crop: crop side in pixels.
        seed: non-negative integer.
        pin: put batches in pinned host memory (for ``non_blocking`` copies to CUDA).
    """

    def __init__(self, images: Sequence[np.ndarray], batch_size: int, crop: int, seed: int, pin: bool = False):
        if len(images) == 0:
            raise ValueError("StepCrops needs at least one image")
        if batch_size < 1 or seed < 0 or crop < 1:
            raise ValueError(f"bad batch_size {batch_size}, crop {crop} or seed {seed}")
        self.images = list(images)
        self.batch_size = int(batch_size)
        self.crop = int(crop)
        self.seed = int(seed)
        self.pin = pin

    def slot(self, index: int) -> tuple[int, int]:
        """(pass, image index) of crop slot ``index``."""
        n = len(self.images)
        pass_index, position = divmod(int(index), n)
        order = np.random.default_rng([self.seed, pass_index]).permutation(n)
        return pass_index, int(order[position])

    def sample(self, pass_index: int, image: int) -> np.ndarray:
        """Image ``image``'s augmented crop in pass ``pass_index``: ``(crop, crop, 3)`` float32 in [0, 1]."""
        rng = np.random.default_rng([self.seed, int(pass_index), int(image)])
        return augment(random_square_crop(self.images[image], self.crop, rng), rng)

    def batch(self, step: int) -> torch.Tensor:
        """Batch ``step`` (>= 0): float32 ``(batch, 3, crop, crop)`` in [0, 1], channels-last strides."""
        if step < 0:
            raise IndexError(f"step {step} < 0")
        first = int(step) * self.batch_size
        crops = [self.sample(*self.slot(j)) for j in range(first, first + self.batch_size)]
        return _to_channels_last(crops, self.pin)


def eval_batches(images: Sequence[np.ndarray], crop: int, batch_size: int, pin: bool = False) -> list[torch.Tensor]:
    """Fixed evaluation batches: each image's centred square crop (no augmentation), channels-last.

    Returns:
        float32 tensors ``(B, 3, crop, crop)`` in [0, 1]; images in order, ``batch_size`` at a time.
    """
    crops = [center_square_crop(image, crop) for image in images]
    return [_to_channels_last(crops[i : i + batch_size], pin) for i in range(0, len(crops), batch_size)]


@dataclass
class Split:
    """The run's images: ``train`` (LoRA), ``val`` (gates), ``test`` (neither; held out), as Paths."""

    train: list[Path]
    val: list[Path]
    test: list[Path]
    warnings: list[str]

    def record(self, root: Path, seed: int, test_fraction: float) -> dict:
        """The ``split.json`` record: paths relative to ``images_root`` (absolute), so it reads anywhere."""
        root = Path(os.path.abspath(root))

        def rel(paths: list[Path]) -> list[str]:
            return [Path(os.path.abspath(p)).relative_to(root).as_posix() for p in paths]

        return {"seed": seed, "test_fraction": test_fraction, "images_root": str(root),
                "train": rel(self.train), "val": rel(self.val), "test": rel(self.test),
                "warning": "; ".join(self.warnings) or None}

    @classmethod
    def from_record(cls, record: dict, root: Path) -> Split:
        """Paths of a :meth:`record` resolved against ``root`` (the images folder given now)."""
        return cls(*[[Path(root) / name for name in record.get(key) or []] for key in ("train", "val", "test")],
                   warnings=[record["warning"]] if record.get("warning") else [])


def split_images(paths: Sequence[Path], seed: int, test_fraction: float) -> Split:
    """Hold out ``test_fraction`` of the images (at least one when there are three or more), halve the rest.

    Deterministic for a given seed and set of paths (sorted first).
    """
    ordered = sorted(Path(p) for p in paths)
    if not ordered:
        raise UserError("cannot split an empty list of images")
    warnings = []
    n_test = 0
    if test_fraction > 0:
        if len(ordered) >= 3:
            n_test = min(max(1, round(test_fraction * len(ordered))), len(ordered) - 2)
        else:
            warnings.append(f"only {len(ordered)} image(s): no held-out test image is kept (add more photos)")
    order = np.random.default_rng([seed, 1]).permutation(len(ordered))
    test = sorted(ordered[i] for i in order[:n_test])
    rest = [ordered[i] for i in order[n_test:]]
    halves = split_half(rest, seed)
    if halves.warning:
        warnings.append(halves.warning)
    return Split(list(halves.train), list(halves.val), test, warnings)


def image_subset(paths: list[Path], by_path: dict[Path, np.ndarray], what: str) -> list[np.ndarray]:
    """The decoded images of ``paths``; a UserError names the first one that is gone."""
    try:
        return [by_path[p] for p in paths]
    except KeyError as missing:
        raise UserError(f"cannot resume: {what} image {missing.args[0]} of the interrupted run is gone from the "
                        "folder (or unreadable now)") from None


def _stage_steps(steps, epochs, per_epoch: int, default_epochs: int, floor: int) -> int:
    """Steps of a stage: ``steps`` when given, else ``epochs`` passes, else the default epochs with a floor."""
    if steps is not None:
        return steps
    if epochs is not None:
        return epochs * per_epoch
    return max(default_epochs * per_epoch, floor)
