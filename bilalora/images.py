"""Image files: listing, decoding to float RGB, downsizing, and folders decoded once.

Conventions used throughout the project:

* An *image* is a ``numpy.ndarray`` of dtype ``float32``, shape ``(H, W, 3)``,
  channels in RGB order, values in ``[0, 1]``.

Decoding (:func:`load_image`) applies the EXIF orientation, turns every Pillow
mode (gray, gray+alpha, RGBA, palette, CMYK, 16-bit gray) into RGB, keeps the
full precision of 16-bit PNG/TIFF files, and drops any alpha channel (the colour
values are kept as stored; they are *not* composited on a background, since a
dehazing network must see the scene's own colours). Files that cannot be decoded
(empty, truncated, not an image) raise :class:`ImageDecodeError`;
:class:`ImageFolder` skips them and reports them in one line.

This module is torch-free and light (numpy, Pillow, OpenCV imported lazily), so
the torch-free runtime may use it; a test imports it in a subprocess where
``import torch`` fails. Training crops and batches live in :mod:`bilalora.data`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bilalora.errors import UserError

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageDecodeError",
    "ImageFolder",
    "as_rgb01",
    "downsize",
    "is_image_path",
    "list_images",
    "load_image",
]

#: File suffixes treated as images, lower-case (compared lower-cased, so ``.JPG`` counts).
#: A tuple, so that it concatenates with other suffix tuples and joins in messages in a fixed order.
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

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


def as_rgb01(image: np.ndarray, what: str = "image") -> np.ndarray:
    """An in-memory RGB image as ``float32`` ``(H, W, 3)`` in ``[0, 1]``.

    ``uint8`` is divided by 255; float is clipped to [0, 1] (NaN -> 0, +inf -> 1, -inf -> 0).

    Args:
        image: ``(H, W, 3)`` ``uint8`` or float array.
        what: who asks, named in errors (e.g. ``"DCP"``).

    Raises:
        UserError: not ``(H, W, 3)``, empty, or neither ``uint8`` nor float.
    """
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise UserError(f"{what}: expected an HxWx3 RGB image, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise UserError(f"{what}: empty image of shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    if not np.issubdtype(arr.dtype, np.floating):
        raise UserError(f"{what}: expected float32 in [0, 1] or uint8, got dtype {arr.dtype}")
    out = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(out, 0.0, 1.0)


# --------------------------------------------------------------------------- listing


def is_image_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an image by its suffix (any case) and is not hidden (``.name``).

    The file is not opened nor even looked up: use it on names (e.g. output paths).
    """
    path = Path(path)
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _is_image_file(path: Path) -> bool:
    return is_image_path(path) and path.is_file()


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
    """Shrink ``image`` (H, W, C) so that max(H, W) <= max_side (cv2 INTER_AREA, aspect kept).

    ``uint8`` stays ``uint8``; float comes back ``float32`` clipped to [0, 1] (area averaging
    in float32 can land a hair above 1). An image already small enough is returned as it is.
    """
    height, width = image.shape[:2]
    if max_side is None or max(height, width) <= max_side:
        return image
    import cv2

    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    if image.dtype == np.uint8:
        return np.ascontiguousarray(resized)
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
