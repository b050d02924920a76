"""Folders of unlabeled real hazy photos, decoded once and cut into training crops.

Conventions used throughout this module:

* An *image* is a ``numpy.ndarray`` of dtype ``float32``, shape ``(H, W, 3)``,
  channels in RGB order, values in ``[0, 1]``.
* A *batch* is a ``torch.Tensor`` of dtype ``float32``, shape ``(B, 3, S, S)``
  (``S`` the crop side), values in ``[0, 1]``.

Decoding (:func:`load_image`) applies the EXIF orientation, turns every Pillow
mode (gray, gray+alpha, RGBA, palette, CMYK, 16-bit gray) into RGB, keeps the
full precision of 16-bit PNG/TIFF files, and drops any alpha channel (the colour
values are kept as stored; they are *not* composited on a background, since a
dehazing network must see the scene's own colours). Files that cannot be decoded
(empty, truncated, not an image) raise :class:`ImageDecodeError`;
:class:`ImageFolder` skips them and reports them in one line.

Batching (:class:`CropBatches`) is a pure function of ``(seed, epoch, step)`` so
that a training run resumed from a checkpoint sees exactly the batches it would
have seen without the interruption.

Importing this module does not import torch; only the functions that return
tensors (:meth:`CropBatches.batch`, :func:`val_batches`) import it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bilalora.errors import UserError

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

#: File suffixes treated as images (compared lower-cased, so ``.JPG`` counts).
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})

_FOLDER_HINT = "pass a folder of hazy photos with --images"

# EXIF orientation tag and the numpy equivalent of PIL.ImageOps.exif_transpose.
_ORIENTATION_TAG = 0x0112


class ImageDecodeError(UserError):
    """A file with an image suffix that cannot be decoded (empty, truncated, not an image).

    Attributes:
        path: the file.
        reason: a short reason, e.g. ``"empty file"`` or ``"truncated or corrupt"``.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot decode image {self.path}: {reason}")


# --------------------------------------------------------------------------- listing


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """List the image files of ``folder``, sorted.

    A file counts when its suffix is in :data:`IMAGE_SUFFIXES` (any case). Hidden
    files and folders (name starting with ``.``, such as macOS ``._photo.jpg``
    resource forks) are ignored. Files are not opened here.

    Args:
        folder: the folder to list.
        recursive: also list the images of all subfolders.

    Raises:
        UserError: the folder does not exist, is not a folder, or holds no image.
    """
    root = Path(folder)
    if not root.exists():
        raise UserError(f"image folder {root} does not exist; {_FOLDER_HINT}")
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; {_FOLDER_HINT}")
    candidates = root.rglob("*") if recursive else root.iterdir()
    found = []
    for path in candidates:
        relative_parts = path.relative_to(root).parts
        if any(part.startswith(".") for part in relative_parts):
            continue
        if _is_image_file(path):
            found.append(path)
    if not found:
        raise UserError(f"no images (jpg, png, ...) in {root}; {_FOLDER_HINT}")
    return sorted(found)


# --------------------------------------------------------------------------- decoding


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) to an ``(H, W, C)`` array, like ``exif_transpose``."""
    if orientation == 2:
        return array[:, ::-1]
    if orientation == 3:
        return array[::-1, ::-1]
    if orientation == 4:
        return array[::-1]
    if orientation == 5:
        return array.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(array, k=-1)
    if orientation == 7:
        return array.transpose(1, 0, 2)[::-1, ::-1]
    if orientation == 8:
        return np.rot90(array, k=1)
    return array


def _exif_orientation(img) -> int:
    try:
        return int(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - malformed EXIF: keep the stored orientation
        return 1


def _is_16bit_color(img) -> bool:
    """Whether Pillow is about to reduce a 16-bit-per-channel colour file to 8 bits."""
    if img.mode not in ("RGB", "RGBA"):
        return False
    for tile in getattr(img, "tile", None) or ():
        args = tile[3] if len(tile) > 3 else None
        rawmode = args[0] if isinstance(args, tuple) and args else args
        if isinstance(rawmode, str) and "16" in rawmode:
            return True
    tags = getattr(img, "tag_v2", None)  # TIFF
    if tags is not None:
        bits = tags.get(258)
        bits = bits if isinstance(bits, tuple) else (bits,)
        return any(b == 16 for b in bits)
    return False


def _read_16bit_color(path: Path, orientation: int) -> np.ndarray:
    """Read a 16-bit colour PNG/TIFF with OpenCV; returns float32 RGB in [0, 1]."""
    import cv2

    raw = np.fromfile(str(path), dtype=np.uint8)  # works for non-ASCII paths too
    array = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)
    if array is None or array.ndim != 3 or array.shape[2] < 3:
        raise ImageDecodeError(path, "16-bit colour image OpenCV cannot read")
    rgb = array[:, :, 2::-1]  # BGR(A) -> RGB, alpha dropped
    if array.dtype.kind == "f":
        scale = 1.0
    else:
        scale = float(np.iinfo(array.dtype).max)
    rgb = _orient(rgb, orientation)
    return np.clip(np.ascontiguousarray(rgb, dtype=np.float32) / np.float32(scale), 0.0, 1.0)


def _to_rgb_float(img) -> np.ndarray:
    """Convert an (already oriented) Pillow image of any mode to float32 RGB in [0, 1]."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit gray (Pillow may label a 16-bit PNG "I" with values 0..65535).
        gray = np.asarray(img).astype(np.float32) / np.float32(65535.0)
        return np.repeat(np.clip(gray, 0.0, 1.0)[:, :, None], 3, axis=2)
    if mode == "F":
        gray = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("L", "LA", "1"):
        gray = np.asarray(img.convert("L"), dtype=np.float32) / np.float32(255.0)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("P", "PA"):
        img = img.convert("RGBA")  # palette may carry transparency; alpha dropped below
    elif mode not in ("RGB", "RGBA", "RGBa"):
        img = img.convert("RGB")  # CMYK, YCbCr, ...
    rgb = np.asarray(img, dtype=np.uint8)[:, :, :3]
    return rgb.astype(np.float32) / np.float32(255.0)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Decode one image file to float32 RGB.

    The EXIF orientation is applied; gray images are repeated to three channels;
    alpha channels are dropped (not composited); CMYK and palette images are
    converted; 16-bit gray and 16-bit colour PNG/TIFF keep their precision
    (value / 65535). The whole file is decoded, so truncated files are detected
    (this relies on ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` being ``False``, its
    default; do not change it).

    Args:
        path: the image file.

    Returns:
        ``float32`` array of shape ``(H, W, 3)`` (after orientation), RGB, in ``[0, 1]``.

    Raises:
        ImageDecodeError: the file is missing, empty, truncated, corrupt, not an
            image, or of a mode that cannot be converted to RGB.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageDecodeError(path, "empty file")
    except OSError as err:
        raise ImageDecodeError(path, f"cannot read file ({err.strerror or err})") from err
    try:
        with Image.open(path) as img:
            sixteen_bit_color = _is_16bit_color(img)  # before load(), which clears img.tile
            img.load()  # force a full decode: truncation shows up here
            orientation = _exif_orientation(img)
            if sixteen_bit_color:
                return _read_16bit_color(path, orientation)
            try:
                oriented = ImageOps.exif_transpose(img)
            except Exception:  # noqa: BLE001 - malformed EXIF: keep the stored orientation
                oriented = img
            return np.ascontiguousarray(_to_rgb_float(oriented))
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as err:
        raise ImageDecodeError(path, "not an image file") from err
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(path, "too many pixels (possible decompression bomb)") from err
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImageDecodeError(path, f"truncated or corrupt: {reason}") from err


def downsize(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """Shrink ``image`` (H, W, 3) so that max(H, W) <= max_side (cv2 INTER_AREA), clipped to [0, 1]
    (area averaging in float32 can land a hair above 1)."""
    height, width = image.shape[:2]
    if max_side is None or max(height, width) <= max_side:
        return image
    import cv2

    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(np.clip(resized, 0.0, 1.0), dtype=np.float32)


# --------------------------------------------------------------------------- folder


class ImageFolder:
    """All decodable images of a folder, decoded once into memory.

    ``folder[i]`` is a read-only ``float32`` array ``(H, W, 3)``, RGB, in ``[0, 1]``
    (copy it before modifying it). Memory is about ``12 * H * W`` bytes per image;
    pass ``max_side`` to bound it for large photos.

    Args:
        folder: the folder of images (see :func:`list_images`).
        recursive: include subfolders.
        max_side: when given, images whose longer side exceeds it are downsized
            (aspect kept, cv2 ``INTER_AREA``) so that ``max(H, W) == max_side``.

    Attributes:
        folder: the folder, as a Path.
        paths: the files that decoded, sorted; ``paths[i]`` belongs to ``self[i]``.
        skipped: ``(path, reason)`` for each file that did not decode.

    Raises:
        UserError: the folder is missing or holds no image file, or no file decodes.
    """

    def __init__(self, folder: str | os.PathLike, recursive: bool = False, max_side: int | None = None):
        if max_side is not None and int(max_side) < 1:
            raise UserError(f"max_side must be a positive number of pixels, got {max_side}")
        self.folder = Path(folder)
        self.recursive = recursive
        self.max_side = None if max_side is None else int(max_side)
        self.paths: list[Path] = []
        self.skipped: list[tuple[Path, str]] = []
        self._images: list[np.ndarray] = []
        for path in list_images(self.folder, recursive=recursive):
            try:
                image = downsize(load_image(path), self.max_side)
            except ImageDecodeError as err:
                self.skipped.append((path, err.reason))
                continue
            image.flags.writeable = False
            self.paths.append(path)
            self._images.append(image)
        if not self._images:
            raise UserError(
                f"no decodable images in {self.folder} ({len(self.skipped)} file(s) skipped: "
                f"{self._skipped_names()}); {_FOLDER_HINT}"
            )

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> np.ndarray:
        return self._images[index]

    @property
    def images(self) -> list[np.ndarray]:
        """The decoded images, in the order of :attr:`paths` (read-only arrays)."""
        return list(self._images)

    def _name(self, path: Path) -> str:
        try:
            return path.relative_to(self.folder).as_posix()
        except ValueError:
            return str(path)

    def _skipped_names(self, limit: int = 10) -> str:
        parts = [f"{self._name(p)} ({reason})" for p, reason in self.skipped[:limit]]
        if len(self.skipped) > limit:
            parts.append(f"and {len(self.skipped) - limit} more")
        return ", ".join(parts)

    def report_skipped(self) -> str | None:
        """One line naming the files that could not be decoded, or None when none was skipped."""
        if not self.skipped:
            return None
        total = len(self.skipped) + len(self.paths)
        return f"skipped {len(self.skipped)} of {total} image file(s) in {self.folder}: {self._skipped_names()}"

    def summary(self) -> dict:
        """A JSON-ready description of the folder.

        Keys: ``folder``, ``recursive``, ``max_side``, ``n_images``, ``n_skipped``,
        ``skipped`` (names relative to the folder), ``skipped_reasons`` (name ->
        reason), ``min_hw`` / ``max_hw`` (elementwise smallest / largest
        ``[H, W]`` over the stored, possibly downsized, images).
        """
        heights = [image.shape[0] for image in self._images]
        widths = [image.shape[1] for image in self._images]
        return {
            "folder": str(self.folder),
            "recursive": self.recursive,
            "max_side": self.max_side,
            "n_images": len(self._images),
            "n_skipped": len(self.skipped),
            "skipped": [self._name(p) for p, _ in self.skipped],
            "skipped_reasons": {self._name(p): reason for p, reason in self.skipped},
            "min_hw": [min(heights), min(widths)],
            "max_hw": [max(heights), max(widths)],
        }


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
