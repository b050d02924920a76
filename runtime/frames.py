"""Frames in and out of an exported model: colour order, padding, tiling. numpy only.

A *frame* is what camera software holds: ``uint8`` ``(H, W, 3)`` (BGR, OpenCV's
order, or RGB), ``(H, W, 4)`` (BGRA/RGBA; alpha is passed through) or ``(H, W)``
grey. The exported graph takes ``float32`` ``(N, 3, H, W)`` RGB in [0, 1] with H
and W multiples of the model's pad multiple (model.json ``input``), and returns
the same layout clamped to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "COLOR_ORDERS",
    "check_frame",
    "frame_to_rgb01",
    "rgb01_to_frame",
    "pad_to_multiple",
    "Tile",
    "plan_tiles",
    "blend_window",
]

COLOR_ORDERS = ("bgr", "rgb")


def check_frame(frame: np.ndarray) -> None:
    """Raise ValueError unless ``frame`` is uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) with H, W >= 1."""
    if not isinstance(frame, np.ndarray):
        raise ValueError(f"a frame must be a numpy array, got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise ValueError(f"a frame must be uint8, got {frame.dtype}")
    if frame.ndim == 3 and frame.shape[2] not in (1, 3, 4) or frame.ndim not in (2, 3):
        raise ValueError(f"a frame must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {frame.shape}")
    if frame.shape[0] < 1 or frame.shape[1] < 1:
        raise ValueError(f"empty frame {frame.shape}")


def frame_to_rgb01(frame: np.ndarray, color: str = "bgr") -> np.ndarray:
    """uint8 frame -> float32 (3, H, W) RGB in [0, 1] (grey is repeated over the channels).

    Args:
        frame: uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); ``color`` gives the order
            of the three colour channels (alpha, if any, is ignored here).
        color: "bgr" (OpenCV) or "rgb".
    """
    check_frame(frame)
    if frame.ndim == 2 or frame.shape[2] == 1:
        grey = frame.reshape(frame.shape[0], frame.shape[1])
        rgb = np.repeat(grey[None], 3, axis=0)
    else:
        channels = frame[:, :, :3]
        if color == "bgr":
            channels = channels[:, :, ::-1]
        rgb = channels.transpose(2, 0, 1)
    return np.ascontiguousarray(rgb, dtype=np.float32) / np.float32(255.0)


def rgb01_to_frame(rgb: np.ndarray, like: np.ndarray, color: str = "bgr") -> np.ndarray:
    """float32 (3, H, W) RGB in [0, 1] -> a uint8 frame shaped and ordered like ``like``.

    Grey frames get the luma (BT.601) of the output; a 4-channel frame keeps its alpha.
    Values are rounded to nearest and clipped to [0, 255].
    """
    values = np.clip(rgb, 0.0, 1.0) * np.float32(255.0)
    if like.ndim == 2 or like.shape[2] == 1:
        luma = 0.299 * values[0] + 0.587 * values[1] + 0.114 * values[2]
        out = np.rint(luma).astype(np.uint8)
        return out.reshape(like.shape)
    hwc = values.transpose(1, 2, 0)
    if color == "bgr":
        hwc = hwc[:, :, ::-1]
    out = np.rint(hwc).astype(np.uint8)
    if like.shape[2] == 4:
        out = np.concatenate([out, like[:, :, 3:4]], axis=2)
    return np.ascontiguousarray(out)


def pad_to_multiple(x: np.ndarray, multiple: int, mode: str = "reflect") -> np.ndarray:
    """Pad (..., H, W) at the bottom and right up to multiples of ``multiple``.

    ``reflect`` mirrors without repeating the edge (as torch's reflect padding);
    it falls back to ``edge`` where the image is too small to reflect.
    """
    height, width = x.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if not pad_h and not pad_w:
        return x
    spec = [(0, 0)] * (x.ndim - 2) + [(0, pad_h), (0, pad_w)]
    if mode == "reflect" and pad_h < height and pad_w < width:
        return np.pad(x, spec, mode="reflect")
    return np.pad(x, spec, mode="edge")


@dataclass(frozen=True)
class Tile:
    """One tile of a frame: the window ``[top:top+height, left:left+width]``."""

    top: int
    left: int
    height: int
    width: int


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def plan_tiles(height: int, width: int, tile_h: int, tile_w: int, overlap: int) -> list[Tile]:
    """Windows of at most ``tile_h x tile_w`` covering an ``height x width`` frame.

    Neighbouring windows overlap by at least ``overlap`` pixels (the last window
    of a row or column is moved back to end at the border). A side no longer
    than the tile is one window of the frame's own size.
    """
    if tile_h < 1 or tile_w < 1:
        raise ValueError(f"tile size must be positive, got {tile_h}x{tile_w}")
    if not 0 <= overlap < min(tile_h, tile_w):
        raise ValueError(f"overlap must be in [0, tile side), got {overlap} for {tile_h}x{tile_w}")
    rows = _starts(height, tile_h, overlap)
    cols = _starts(width, tile_w, overlap)
    return [Tile(top, left, min(tile_h, height), min(tile_w, width)) for top in rows for left in cols]


def blend_window(height: int, width: int, overlap: int) -> np.ndarray:
    """(height, width) float32 weights: 1 inside, a linear ramp over ``overlap`` pixels at the edges.

    Summing weighted tiles and dividing by the summed weights gives seamless joins;
    the ramp never reaches 0, so every pixel has positive total weight.
    """
    def ramp(length: int) -> np.ndarray:
        weights = np.ones(length, dtype=np.float32)
        span = min(overlap, length // 2)
        if span > 0:
            edge = (np.arange(span, dtype=np.float32) + 1.0) / (span + 1.0)
            weights[:span] = edge
            weights[length - span :] = edge[::-1]
        return weights

    return np.outer(ramp(height), ramp(width)).astype(np.float32)
