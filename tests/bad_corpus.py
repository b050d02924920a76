"""A small generated corpus of bad image files beside a few good ones (shared by the run, adapt and bench tests).

    from bad_corpus import make_bad_corpus           # tests/ is on sys.path under pytest
    corpus = make_bad_corpus(tmp_path / "mixed")
    corpus["bad"]    # names every command must skip AND name (never process silently, never crash)
    corpus["good"]   # names every command must process (some after a conversion, see "converted")

What is in it, and why each file is where it is:

bad (cannot be decoded into the picture it claims to be):
    truncated.jpg   a 96x128 baseline JPEG cut after half of its bytes (no EOI marker): OpenCV
                    decodes it with a grey bottom half and only a libjpeg warning on stderr
    empty.png       zero bytes
    text.jpg        a text file with an image suffix
    huge_header.png a tiny PNG (well under 200 bytes) whose IHDR claims 40000x40000: over OpenCV's
                    pixel limit (``cv2.error`` from ``imread``), and a decompression bomb for PIL
    x.png           a directory named like an image
    loop.png        a symlink pointing to itself (ELOOP on open)

good (decodable; the readers convert them to 8-bit colour):
    photo_0.png, photo_1.jpg, photo_2.png   64x64 photo-like hazy scenes (3 channels, 8 bit)
    deep16.png      16-bit RGB PNG            -> 8 bit
    cmyk.jpg        CMYK JPEG (PIL-written)   -> RGB
    rgba.png        RGBA PNG                  -> alpha dropped (or kept by the runtime's sinks)
    palette.png     8-bit palette PNG         -> RGB
    grey.png        8-bit grey PNG            -> grey frame / repeated channels
    one.png         1x1 PNG                   (runtime edge-pads it; ``tiny`` for training crops)
    tiny8.png       8x8 PNG                   (same)

``tiny`` lists the good files smaller than 16 px on a side: a command that needs crops of a
given size (adapt, bench's PyTorch path) may refuse them, but must name them when it does.
``converted`` lists the good files that are not plain 8-bit 3-channel images.
``reasons`` maps each bad name to a short description of what is wrong with it.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

__all__ = ["make_bad_corpus", "photo_like"]


def photo_like(height: int = 64, width: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 (H, W, 3) RGB: a smooth sky-to-ground scene with texture, veiled by haze (photo-like statistics)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    ground = 0.35 + 0.25 * np.sin(xx / (5.0 + seed) + yy / 7.0) * np.cos(yy / 4.0)
    horizon = height * (0.4 + 0.1 * np.sin(xx / 11.0 + seed))
    sky = yy < horizon
    scene = np.empty((height, width, 3))
    scene[..., 0] = np.where(sky, 0.55 + 0.2 * yy / height, ground * 0.8)
    scene[..., 1] = np.where(sky, 0.65 + 0.1 * yy / height, ground * 1.0)
    scene[..., 2] = np.where(sky, 0.85, ground * 0.6)
    scene += 0.04 * rng.standard_normal((height, width, 3))
    transmission = np.clip(0.9 - 0.5 * yy / height, 0.3, 1.0)[..., None]
    hazy = scene * transmission + 0.85 * (1.0 - transmission)
    return (np.clip(hazy, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _huge_header_png(width: int = 40000, height: int = 40000) -> bytes:
    """A syntactically valid PNG (signature, IHDR, one IDAT, IEND) that claims ``width x height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096, 9)  # the first few scanlines' worth of zeros
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _pil_bytes(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def make_bad_corpus(folder: str | os.PathLike) -> dict:
    """Write the corpus into ``folder`` (created) and say which names are bad and which are good.

    Returns:
        ``{"bad": [names], "good": [names], "tiny": [names], "converted": [names],
        "reasons": {bad name: why}, "folder": Path}``; names are file names inside ``folder``,
        sorted. ``tiny`` and ``converted`` are subsets of ``good``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    good: list[str] = []
    tiny: list[str] = []
    converted: list[str] = []
    reasons: dict[str, str] = {}

    def write(name: str, data: bytes) -> None:
        (folder / name).write_bytes(data)

    # --- good
    for index, suffix in enumerate((".png", ".jpg", ".png")):
        rgb = photo_like(64, 64, seed=index)
        name = f"photo_{index}{suffix}"
        ok, encoded = cv2.imencode(suffix, rgb[:, :, ::-1].copy(), [cv2.IMWRITE_JPEG_QUALITY, 95] if suffix == ".jpg" else [])
        assert ok
        write(name, encoded.tobytes())
        good.append(name)
    base = photo_like(64, 64, seed=7)
    ok, encoded = cv2.imencode(".png", (base[:, :, ::-1].astype(np.uint16) * 257))
    assert ok
    write("deep16.png", encoded.tobytes())
    write("cmyk.jpg", _pil_bytes(Image.fromarray(base).convert("CMYK"), "JPEG", quality=95))
    rgba = np.concatenate([base, np.full((64, 64, 1), 200, np.uint8)], axis=2)
    write("rgba.png", _pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG"))
    write("palette.png", _pil_bytes(Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG"))
    write("grey.png", _pil_bytes(Image.fromarray(base).convert("L"), "PNG"))
    converted += ["deep16.png", "cmyk.jpg", "rgba.png", "palette.png", "grey.png"]
    write("one.png", _pil_bytes(Image.fromarray(base[:1, :1]), "PNG"))
    write("tiny8.png", _pil_bytes(Image.fromarray(base[:8, :8]), "PNG"))
    tiny += ["one.png", "tiny8.png"]
    good += converted + tiny

    # --- bad
    big = photo_like(96, 128, seed=3)
    jpeg = _pil_bytes(Image.fromarray(big), "JPEG", quality=95)
    write("truncated.jpg", jpeg[: len(jpeg) // 2])
    reasons["truncated.jpg"] = "JPEG cut after half of its bytes (bottom half missing)"
    write("empty.png", b"")
    reasons["empty.png"] = "zero bytes"
    write("text.jpg", b"this is not a JPEG, it is a note someone saved as text.jpg\n")
    reasons["text.jpg"] = "text with an image suffix"
    write("huge_header.png", _huge_header_png())
    reasons["huge_header.png"] = "PNG header claims 40000x40000 pixels"
    (folder / "x.png").mkdir(exist_ok=True)
    reasons["x.png"] = "a directory named like an image"
    loop = folder / "loop.png"
    if not loop.is_symlink():
        os.symlink("loop.png", loop)
    reasons["loop.png"] = "a symlink pointing to itself"

    return {
        "bad": sorted(reasons),
        "good": sorted(good),
        "tiny": sorted(tiny),
        "converted": sorted(converted),
        "reasons": reasons,
        "folder": folder,
    }
