"""Training crops and batches of unlabeled photos, and the train/validation split.

Conventions:

* An *image* is a ``numpy.ndarray`` of dtype ``float32``, shape ``(H, W, 3)``,
  channels in RGB order, values in ``[0, 1]`` (decoded by :mod:`bilalora.images`).
* A *batch* is a ``torch.Tensor`` of dtype ``float32``, shape ``(B, 3, S, S)``
  (``S`` the crop side), values in ``[0, 1]``.

Batching (:class:`CropBatches`) is a pure function of ``(seed, epoch, step)`` so
that a training run resumed from a checkpoint sees exactly the batches it would
have seen without the interruption.

Reading image files lives in :mod:`bilalora.images`; its names are re-exported
here (:data:`IMAGE_SUFFIXES`, :func:`list_images`, :func:`load_image`,
:func:`downsize`, :class:`ImageFolder`, :class:`ImageDecodeError`) for callers
written before the split. Importing this module does not import torch; only the
functions that return tensors (:meth:`CropBatches.batch`, :func:`val_batches`) import it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bilalora.errors import UserError
from bilalora.images import (  # re-exported: the reading side moved to bilalora.images
    IMAGE_SUFFIXES,
    ImageDecodeError,
    ImageFolder,
    downsize,
    list_images,
    load_image,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "IMAGE_SUFFIXES",
    "CropBatches",
    "HalfSplit",
    "ImageDecodeError",
    "ImageFolder",
    "augment",
    "center_square_crop",
    "downsize",
    "list_images",
    "load_image",
    "random_square_crop",
    "split_half",
    "val_batches",
]


# --------------------------------------------------------------------------- split


class HalfSplit(tuple):
    """``(train, val)`` lists of Path, with a ``warning`` attribute (None when the halves are disjoint).

    It unpacks like a plain pair: ``train, val = split_half(paths)``.
    """

    warning: str | None

    def __new__(cls, train: list[Path], val: list[Path], warning: str | None = None):
        self = super().__new__(cls, (train, val))
        self.warning = warning
        return self

    @property
    def train(self) -> list[Path]:
        return self[0]

    @property
    def val(self) -> list[Path]:
        return self[1]

    @property
    def shared(self) -> bool:
        """True when both halves hold the same single image (one-image folder)."""
        return self.warning is not None


def split_half(paths: Sequence[str | os.PathLike], seed: int = 0) -> HalfSplit:
    """Split image paths 50/50, deterministically for a given seed.

    The sorted paths are shuffled with ``np.random.default_rng(seed)``; the train
    half gets ``ceil(n / 2)`` of them, the validation half the rest; each half is
    returned sorted. With a single image both halves hold it and ``.warning`` says
    so (the bilevel objective then validates on its training image).

    Returns:
        :class:`HalfSplit` ``(train, val)``, two plain lists of Path.

    Raises:
        UserError: ``paths`` is empty.
    """
    ordered = sorted(Path(p) for p in paths)
    if not ordered:
        raise UserError("cannot split an empty list of images into train and validation halves")
    if len(ordered) == 1:
        warning = (
            f"only one image ({ordered[0].name}): it is used for both the train and the "
            "validation half; add more hazy photos for a meaningful validation"
        )
        return HalfSplit([ordered[0]], [ordered[0]], warning)
    order = np.random.default_rng(seed).permutation(len(ordered))
    n_train = math.ceil(len(ordered) / 2)
    train = sorted(ordered[i] for i in order[:n_train])
    val = sorted(ordered[i] for i in order[n_train:])
    return HalfSplit(train, val)


# --------------------------------------------------------------------------- crops


def _check_crop(crop: int) -> int:
    if int(crop) != crop or crop < 1:
        raise ValueError(f"crop must be a positive integer, got {crop!r}")
    return int(crop)


def _resize_square(patch: np.ndarray, crop: int) -> np.ndarray:
    """Resize a square ``(s, s, 3)`` patch to ``(crop, crop, 3)`` with cv2 INTER_CUBIC, clipped to [0, 1]."""
    if patch.shape[0] == crop and patch.shape[1] == crop:
        return np.array(patch, dtype=np.float32, copy=True)
    import cv2

    resized = cv2.resize(np.ascontiguousarray(patch, dtype=np.float32), (crop, crop), interpolation=cv2.INTER_CUBIC)
    return np.clip(resized, 0.0, 1.0).astype(np.float32, copy=False)


def random_square_crop(image: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop, resized up to ``crop`` when the image is smaller.

    A square of side ``s = min(H, W, crop)`` is cut at a uniformly random position;
    when ``s < crop`` it is resized to ``crop x crop`` (cv2 INTER_CUBIC, clipped).

    Args:
        image: ``(H, W, 3)`` float32 in ``[0, 1]``.
        crop: output side in pixels.
        rng: the generator that picks the position.

    Returns:
        A new ``float32`` array ``(crop, crop, 3)`` in ``[0, 1]``.
    """
    crop = _check_crop(crop)
    height, width = image.shape[:2]
    side = min(height, width, crop)
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    return _resize_square(image[top : top + side, left : left + side], crop)


def center_square_crop(image: np.ndarray, crop: int) -> np.ndarray:
    """The centred square of side ``min(H, W, crop)``, resized to ``crop`` when smaller.

    Args:
        image: ``(H, W, 3)`` float32 in ``[0, 1]``.
        crop: output side in pixels.

    Returns:
        A new ``float32`` array ``(crop, crop, 3)`` in ``[0, 1]``.
    """
    crop = _check_crop(crop)
    height, width = image.shape[:2]
    side = min(height, width, crop)
    top = (height - side) // 2
    left = (width - side) // 2
    return _resize_square(image[top : top + side, left : left + side], crop)


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotate by ``k * 90`` degrees (k uniform in 0..3), then flip left-right with probability 1/2.

    Args:
        image: ``(H, W, C)`` array.
        rng: the generator that picks ``k`` and the flip.

    Returns:
        A contiguous copy, ``(H, W, C)`` for even k, ``(W, H, C)`` for odd k.
    """
    k = int(rng.integers(0, 4))
    flip = bool(rng.integers(0, 2))
    out = np.rot90(image, k=k, axes=(0, 1))
    if flip:
        out = np.flip(out, axis=1)
    return np.array(out, copy=True, order="C")


def _to_batch(crops: list[np.ndarray]) -> torch.Tensor:
    """Stack ``(S, S, 3)`` arrays into a ``(B, 3, S, S)`` float32 tensor."""
    import torch

    stacked = np.ascontiguousarray(np.stack(crops).transpose(0, 3, 1, 2), dtype=np.float32)
    return torch.from_numpy(stacked)


class CropBatches:
    """Deterministic, resumable batches of random augmented square crops.

    Epoch ``e`` visits the images in the order
    ``np.random.default_rng([seed, e]).permutation(n)``; step ``t`` takes entries
    ``t * batch_size`` to ``(t + 1) * batch_size`` of it (the last batch may be
    smaller). Image ``i``'s crop position, rotation and flip in epoch ``e`` come
    from ``np.random.default_rng([seed, e, i])``. Hence :meth:`batch` depends on
    ``(seed, epoch, step)`` only: a run resumed at (epoch, step) sees the same
    tensors as an uninterrupted run.

    The same class serves the validation half of the bilevel split: build a
    second instance on the validation images with a different seed (e.g.
    ``seed + 1``). For fixed, unaugmented validation batches use :func:`val_batches`.

    Args:
        images: ``float32`` arrays ``(H, W, 3)`` in ``[0, 1]`` (e.g. ``ImageFolder.images``).
        batch_size: crops per batch.
        crop: crop side in pixels.
        seed: non-negative integer.
    """

    def __init__(self, images: Sequence[np.ndarray], batch_size: int, crop: int, seed: int):
        if len(images) == 0:
            raise ValueError("CropBatches needs at least one image")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.images = list(images)
        self.batch_size = int(batch_size)
        self.crop = _check_crop(crop)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def steps_per_epoch(self) -> int:
        """``ceil(len(images) / batch_size)``."""
        return math.ceil(len(self.images) / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """The image indices in the order epoch ``epoch`` visits them."""
        if int(epoch) != epoch or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        return np.random.default_rng([self.seed, int(epoch)]).permutation(len(self.images))

    def sample(self, epoch: int, index: int) -> np.ndarray:
        """Image ``index``'s augmented crop in epoch ``epoch``: ``(crop, crop, 3)`` float32 in [0, 1]."""
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        return augment(random_square_crop(self.images[index], self.crop, rng), rng)

    def batch(self, epoch: int, step: int) -> torch.Tensor:
        """Batch ``step`` of epoch ``epoch``: float32 tensor ``(B, 3, crop, crop)`` in [0, 1].

        Raises:
            IndexError: ``step`` is outside ``0 .. steps_per_epoch - 1``.
        """
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside 0..{self.steps_per_epoch - 1}")
        chosen = self.order(epoch)[step * self.batch_size : (step + 1) * self.batch_size]
        return _to_batch([self.sample(epoch, int(i)) for i in chosen])

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        """Yield the batches of ``epoch`` from ``start_step`` on (for resuming mid-epoch)."""
        for step in range(start_step, self.steps_per_epoch):
            yield self.batch(epoch, step)


def val_batches(images: Sequence[np.ndarray], crop: int, batch_size: int) -> list[torch.Tensor]:
    """Fixed validation batches: centred square crops, no augmentation.

    Each image gives its centred square of side ``min(H, W, crop)``, resized to
    ``crop`` when smaller (see :func:`center_square_crop`); images keep their
    order and are grouped ``batch_size`` at a time (the last batch may be smaller).

    Args:
        images: ``float32`` arrays ``(H, W, 3)`` in ``[0, 1]``.
        crop: crop side in pixels.
        batch_size: crops per batch.

    Returns:
        float32 tensors ``(B, 3, crop, crop)`` in ``[0, 1]``.
    """
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    crops = [center_square_crop(image, crop) for image in images]
    return [_to_batch(crops[i : i + batch_size]) for i in range(0, len(crops), batch_size)]
