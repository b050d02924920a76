"""Read one image file into a frame, or say in a few words why it cannot be read. numpy, OpenCV, Pillow; no torch.

    from bilalora.runtime.decode import read_frame, UnreadableImage
    try:
        frame = read_frame("photo.jpg")         # uint8 (H, W), (H, W, 3) BGR or (H, W, 4) BGRA
    except UnreadableImage as exc:
        print(exc.reason)                        # "truncated JPEG (no end-of-image marker)"

What is refused, and how it is found (cheap checks first, the file is read once):

* not a regular file: a directory named like an image, a symlink loop or a dangling link;
* an empty file;
* a header claiming more than :data:`MAX_PIXELS` pixels (read by Pillow, which only parses the
  header at open): decoding it would need gigabytes, and OpenCV refuses over 2^30 pixels with
  an exception that used to stop a whole batch;
* a file OpenCV cannot decode (text named ``.jpg``, corrupt data, a PNG cut short: libpng fails);
* a JPEG with no end-of-image marker after its last scan, checked before decoding: depending on
  the call and the OpenCV build, libjpeg decodes the part that is there, fills the rest with
  grey and only prints "Premature end of JPEG file" on stderr (``cv2.imread`` does so here).
  Entropy-coded JPEG data cannot contain the ``FF D9`` marker: every ``FF`` byte in it is
  followed by ``00`` or a restart marker, so the check has no false alarms on whole files.

Colour handling follows OpenCV's ``IMREAD_UNCHANGED``: grey stays grey, alpha is kept, 16-bit
images are scaled to 8 bit (``v // 257``); CMYK JPEGs and palette PNGs come back as BGR.
"""

from __future__ import annotations

import errno
import io
import os
import warnings
from pathlib import Path

import cv2
import numpy as np

__all__ = ["MAX_PIXELS", "UnreadableImage", "read_frame", "check_entry"]

#: Largest image accepted (pixels): Pillow's decompression-bomb limit, about 179 megapixels
#: (above any camera's resolution; a 30000x30000 frame would need 2.7 GB before inference).
MAX_PIXELS = 2 * 89_478_485


class UnreadableImage(Exception):
    """An image file that cannot be turned into a frame; ``reason`` says why in a few words."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{Path(path).name}: {reason}")
        self.path = Path(path)
        self.reason = reason


def check_entry(path: str | os.PathLike) -> None:
    """Raise :class:`UnreadableImage` unless ``path`` is (or links to) a regular, readable file."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnreadableImage(path, "symlink loop") from None
        if path.is_symlink():
            raise UnreadableImage(path, "dangling symlink") from None
        raise UnreadableImage(path, f"cannot open ({exc.strerror or exc})") from None
    import stat

    if stat.S_ISDIR(mode):
        raise UnreadableImage(path, "a directory, not an image file")
    if not stat.S_ISREG(mode):
        raise UnreadableImage(path, "not a regular file")


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header, without decoding pixels; None when Pillow does not know the format."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return int(image.size[0]), int(image.size[1])
    except Image.DecompressionBombError as exc:
        raise _TooLarge(str(exc)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        return None


class _TooLarge(Exception):
    pass


def _jpeg_complete(data: bytes) -> bool:
    """True when a JPEG stream has an end-of-image marker after its last start-of-scan."""
    last_scan = data.rfind(b"\xff\xda")
    return last_scan >= 0 and data.find(b"\xff\xd9", last_scan) > 0


def read_frame(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode ``path`` into a uint8 frame: (H, W) grey, (H, W, 3) BGR or (H, W, 4) BGRA.

    Raises:
        UnreadableImage: see the module docstring for every case.
    """
    path = Path(path)
    check_entry(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UnreadableImage(path, f"cannot read ({exc.strerror or exc})") from None
    if not data:
        raise UnreadableImage(path, "empty file")
    try:
        size = _header_size(data)
    except _TooLarge as exc:
        import re

        found = re.search(r"\((\d+) pixels\)", str(exc))
        claimed = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise UnreadableImage(path, f"header claims {claimed} (over {max_pixels:,}); not decoded") from None
    if size is not None and size[0] * size[1] > max_pixels:
        raise UnreadableImage(
            path, f"header claims {size[0]}x{size[1]} pixels (over {max_pixels:,}); not decoded"
        )
    if data[:2] == b"\xff\xd8" and not _jpeg_complete(data):
        raise UnreadableImage(path, "truncated JPEG (no end-of-image marker; its bottom would be grey)")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "cv2.error"
        raise UnreadableImage(path, f"OpenCV cannot decode it ({first[:80]})") from None
    if image is None:
        kind = "not an image" if size is None else "corrupt or truncated"
        raise UnreadableImage(path, f"{kind} (OpenCV cannot decode it)")
    if image.dtype == np.uint16:
        image = (image // 257).astype(np.uint8)
    if image.dtype != np.uint8:
        raise UnreadableImage(path, f"unsupported pixel type {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    return image
