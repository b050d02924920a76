"""Split fleet inputs into work items: batches of image files and keyframe-aligned video chunks. numpy + OpenCV.

Videos are cut where decoding can start afresh. :func:`scan_video` reads the
container's packets without decoding them (OpenCV's FFmpeg back end in raw mode,
``CAP_PROP_FORMAT=-1``) and notes which are keyframes
(``CAP_PROP_LRF_HAS_KEY_FRAME``); this also counts the frames exactly, where
``CAP_PROP_FRAME_COUNT`` is only the container's estimate. :func:`plan_chunks` joins
whole groups of pictures until a chunk holds at least ``chunk_frames`` frames, so
each chunk starts on a keyframe. A worker opens the video, seeks to the chunk's
first frame (``CAP_PROP_POS_FRAMES``; FFmpeg decodes from the keyframe at or
before it) and checks the position it lands on: decoding from a keyframe is
deterministic, so the chunk's frames are the frames a sequential read gives, and
the reassembled output equals a one-process ``bilalora run``.

When the back end cannot report keyframes (no FFmpeg, raw mode refused), or a group
of pictures is longer than ``4 * chunk_frames`` (one keyframe per minute is common
on drones), chunks are fixed frame ranges instead: still exact with FFmpeg's
seek-and-decode-forward, at the cost of decoding the frames between the keyframe and
the chunk start twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import cv2
import numpy as np

from bilalora.errors import UserError

from .streams import VIDEO_SUFFIXES, open_source

__all__ = [
    "VideoInfo",
    "scan_video",
    "plan_chunks",
    "iter_video_range",
    "list_images",
    "WorkItem",
    "frame_name",
]


def frame_name(index: int) -> str:
    """The name ``bilalora run`` gives frame ``index`` (0-based) of a video: ``frame_000001``."""
    return f"frame_{index + 1:06d}"


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The entries of ``folder`` that ``bilalora run`` reads as images, in its order (``open_source``'s list)."""
    return list(open_source(str(folder))._files)  # the same listing rule as a one-process run, by construction


@dataclass
class VideoInfo:
    """What :func:`scan_video` found: exact frame count, fps, size and keyframe indices (None: unknown)."""

    path: str
    frames: int
    fps: Optional[float]
    width: int
    height: int
    keyframes: Optional[list[int]] = None


def scan_video(path: str | os.PathLike) -> VideoInfo:
    """Count the frames of a video and find its keyframes without decoding (see the module docstring)."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise UserError(f"{path}: not a video ({', '.join(VIDEO_SUFFIXES)})")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise UserError(f"--input {path}: cannot open this video with OpenCV")
    fps = capture.get(cv2.CAP_PROP_FPS) or None
    width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    estimate = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    capture.release()
    keyframes: Optional[list[int]] = None
    count = 0
    prop = getattr(cv2, "CAP_PROP_LRF_HAS_KEY_FRAME", None)
    raw = None
    if prop is not None:
        try:
            raw = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_FORMAT, -1])
        except cv2.error:
            raw = None
    if raw is not None and raw.isOpened():
        keyframes = []
        while raw.grab():
            if raw.get(prop):
                keyframes.append(count)
            count += 1
        raw.release()
        if not keyframes or keyframes[0] != 0:
            keyframes = None  # packets that are not frames, or a stream that does not start on a keyframe
    if keyframes is None:
        count = _count_by_decoding(path) if estimate <= 0 else estimate
    if count <= 0:
        raise UserError(f"--input {path}: no frames could be read from this video")
    return VideoInfo(str(path), count, fps, width, height, keyframes)


def _count_by_decoding(path: Path) -> int:
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.grab():
        count += 1
    capture.release()
    return count


def plan_chunks(info: VideoInfo, chunk_frames: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` frame ranges covering the video in order (see the module docstring).

    Args:
        info: from :func:`scan_video`.
        chunk_frames: the least number of frames in a chunk (the last chunk may be shorter).
    """
    if chunk_frames < 1:
        raise UserError(f"--chunk-frames {chunk_frames}: use 1 or more")
    total = info.frames
    keys = [k for k in (info.keyframes or []) if 0 <= k < total]
    starts: list[int] = []
    if keys:
        starts = [0]
        for key in keys[1:]:
            if key - starts[-1] >= chunk_frames:
                starts.append(key)
    bounds = starts + [total]
    if not keys or any(b - a > 4 * chunk_frames for a, b in zip(bounds, bounds[1:])):
        starts = list(range(0, total, chunk_frames))  # fixed ranges: exact, decodes some frames twice
        bounds = starts + [total]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def iter_video_range(path: str | os.PathLike, start: int, stop: int) -> Iterator[np.ndarray]:
    """Frames ``start <= i < stop`` of a video as uint8 BGR arrays (fewer only when the file ends early).

    Raises UserError when OpenCV cannot seek to ``start`` exactly.
    """
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise UserError(f"{path}: cannot open this video with OpenCV")
    try:
        if start > 0:
            capture.set(cv2.CAP_PROP_POS_FRAMES, start)
            landed = int(round(capture.get(cv2.CAP_PROP_POS_FRAMES)))
            if landed != start:
                raise UserError(f"{path}: OpenCV seeks to frame {landed}, not {start}; use a larger --chunk-frames")
        for _ in range(stop - start):
            ok, image = capture.read()
            if not ok or image is None:
                break
            yield image
    finally:
        capture.release()


@dataclass
class WorkItem:
    """One task for a worker: some frames, one model, and where the dehazed frames go.

    Attributes:
        job: index of the job (input/output/model row) it belongs to.
        seq: position within the job (videos are reassembled in this order).
        model: export folder or model file; ``key`` is its :func:`~.manifest.model_key`.
        files: image files to read (an image batch), or empty for a video chunk.
        video, start, stop: the video and frame range of a chunk.
        out_folder: folder the worker writes images into, or None: frames go back to the
            driver, which appends them to the job's output video.
        out_name: file name for a single image written under another name (``-o out.png``).
    """

    job: int
    seq: int
    model: str
    key: str
    files: list[str] = field(default_factory=list)
    video: Optional[str] = None
    start: int = 0
    stop: int = 0
    out_folder: Optional[str] = None
    out_name: Optional[str] = None

    @property
    def frames(self) -> int:
        """Frames this item covers."""
        return len(self.files) if self.video is None else self.stop - self.start

    def output_names(self) -> list[str]:
        """File names the worker writes into ``out_folder`` (empty when frames go to a video)."""
        if self.out_folder is None:
            return []
        if self.out_name:
            return [self.out_name]
        if self.video is None:
            return [Path(f).name for f in self.files]
        return [frame_name(i) + ".png" for i in range(self.start, self.stop)]
