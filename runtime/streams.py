"""Frame sources (image folders, images, videos, cameras, stream URLs) and sinks. numpy + OpenCV.

    source = open_source("flight.mp4")          # or "frames/", "0" (camera 0), "rtsp://..."
    with open_sink("dehazed.mp4", source) as sink:
        report = process(source, sink, Dehazer("export/"))

Sinks write atomically: images go to a temporary name and are renamed into
place; a video is written to a temporary file and renamed when it is closed,
also after an interruption, so the frames already written are kept. An image
that cannot be read (:mod:`.decode`: truncated, empty, not an image, a header claiming
too many pixels, a directory or symlink loop named like an image) is skipped and
listed in :attr:`FrameSource.skipped` with the reason.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import cv2
import numpy as np

from bilalora.errors import UserError
from bilalora.images import IMAGE_SUFFIXES  # the one list of image suffixes (torch-free module)
from bilalora.io import publish, write_bytes_atomic

from .decode import UnreadableImage, check_entry, read_frame

__all__ = [
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "Frame",
    "FrameSource",
    "open_source",
    "ImageSink",
    "VideoSink",
    "open_sink",
    "StreamReport",
    "process",
]

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv")
_STREAM_PREFIXES = ("rtsp://", "rtmp://", "http://", "https://", "udp://", "tcp://")
_FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}


@dataclass
class Frame:
    """One frame: its index in the source, a name (file name or ``frame_000001``) and BGR uint8 pixels."""

    index: int
    name: str
    image: np.ndarray


@dataclass
class FrameSource:
    """Frames from somewhere, in order.

    Attributes:
        kind: "images", "image", "video", "camera" or "stream".
        spec: what the user gave.
        total: number of frames when known (None for cameras and streams).
        fps: frames per second of a video or camera (None for images).
        skipped: ``(name, reason)`` of every frame that could not be read.
    """

    kind: str
    spec: str
    total: Optional[int] = None
    fps: Optional[float] = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    _files: list[Path] = field(default_factory=list, repr=False)
    _capture: Any = field(default=None, repr=False)

    def __iter__(self) -> Iterator[Frame]:
        if self.kind in ("images", "image"):
            yield from self._iter_files()
        else:
            yield from self._iter_capture()

    def _iter_files(self) -> Iterator[Frame]:
        for index, path in enumerate(self._files):
            try:
                image = read_frame(path)
            except UnreadableImage as exc:
                self.skipped.append((path.name, exc.reason))
                continue
            yield Frame(index, path.name, image)

    def _iter_capture(self) -> Iterator[Frame]:
        index = 0
        try:
            while True:
                ok, image = self._capture.read()
                if not ok or image is None:
                    break
                yield Frame(index, f"frame_{index + 1:06d}", image)
                index += 1
        finally:
            self.close()

    def close(self) -> None:
        """Release a video or camera (idempotent)."""
        if self._capture is not None:
            self._capture.release()
            self._capture = None


def _open_capture(target: Any, spec: str, what: str) -> cv2.VideoCapture:
    capture = cv2.VideoCapture(target)
    if not capture.isOpened():
        raise UserError(f"--input {spec}: cannot open this {what} with OpenCV")
    return capture


def open_source(spec: str | os.PathLike) -> FrameSource:
    """A :class:`FrameSource` for a folder of images, an image, a video, a camera index or a stream URL."""
    text = str(spec)
    if text.isdigit():
        capture = _open_capture(int(text), text, "camera")
        fps = capture.get(cv2.CAP_PROP_FPS) or None
        return FrameSource("camera", text, None, fps, _capture=capture)
    if text.startswith(_STREAM_PREFIXES):
        capture = _open_capture(text, text, "stream")
        return FrameSource("stream", text, None, capture.get(cv2.CAP_PROP_FPS) or None, _capture=capture)
    path = Path(text)
    if path.is_symlink() and not path.exists():
        try:
            check_entry(path)
        except UnreadableImage as exc:
            raise UserError(f"--input {path}: {exc.reason}") from None
    if not path.exists():
        raise UserError(f"--input {path}: no such file or folder (a folder of images, an image, a video or a camera index)")
    if path.is_dir():
        # every entry named like an image is listed, files or not: a directory named x.png or a
        # symlink loop is then reported by name instead of dropped silently; hidden names
        # (".x.jpg": resource forks, temporary files of an atomic write) are not images
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise UserError(f"--input {path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return FrameSource("images", text, len(files), None, _files=files)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return FrameSource("image", text, 1, None, _files=[path])
    if suffix in VIDEO_SUFFIXES:
        capture = _open_capture(str(path), text, "video")
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        return FrameSource("video", text, count if count > 0 else None, capture.get(cv2.CAP_PROP_FPS) or None,
                           _capture=capture)  # fmt: skip
    raise UserError(f"--input {path}: unknown file type {suffix or '(none)'}; use images, a video or a camera index")


class ImageSink:
    """Write frames as image files in a folder (atomically), keeping the source's names.

    Args:
        folder: output folder (created).
        suffix: file type for frames without one (video frames): ".png" by default.
        jpeg_quality: quality of JPEG output.
        name: write every frame under this one file name (a single input image to ``out.png``).
    """

    def __init__(
        self, folder: str | os.PathLike, suffix: str = ".png", jpeg_quality: int = 95, name: Optional[str] = None
    ):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"--output {self.folder}: exists and is not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.suffix = suffix
        self.params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)]
        self.name = name
        self.written: list[Path] = []

    def write(self, frame: Frame, image: np.ndarray) -> Path:
        """Write ``image`` (uint8 BGR) under ``frame``'s name; returns the path."""
        name = self.name if self.name else frame.name if Path(frame.name).suffix.lower() in IMAGE_SUFFIXES else frame.name + self.suffix
        path = self.folder / name
        suffix = path.suffix.lower()
        ok, encoded = cv2.imencode(suffix, image, self.params if suffix in (".jpg", ".jpeg") else [])
        if not ok:
            raise UserError(f"--output: OpenCV cannot encode {path.name}")
        write_bytes_atomic(path, encoded.tobytes())
        self.written.append(path)
        return path

    def close(self) -> None:
        """Nothing to finish: every image is complete once written."""

    def __enter__(self) -> "ImageSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class VideoSink:
    """Write frames to a video file through a temporary file renamed into place on :meth:`close`.

    Args:
        path: output video (.mp4/.m4v/.mov: mp4v; .avi/.mkv: MJPG).
        fps: frame rate (the source's, else 25).
    """

    def __init__(self, path: str | os.PathLike, fps: Optional[float] = None):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in _FOURCC:
            raise UserError(f"--output {self.path}: write video as {', '.join(_FOURCC)}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps = float(fps) if fps and fps > 0 else 25.0
        self.fourcc = _FOURCC[suffix]
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=f".tmp{suffix}", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        self.writer: Optional[cv2.VideoWriter] = None
        self.size: Optional[tuple[int, int]] = None
        self.frames = 0

    def write(self, frame: Frame, image: np.ndarray) -> Path:
        """Append ``image`` (uint8 BGR or grey); every frame must have the first frame's size."""
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        elif image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
        height, width = image.shape[:2]
        if self.writer is None:
            self.size = (width, height)
            self.writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*self.fourcc), self.fps, self.size)
            if not self.writer.isOpened():
                raise UserError(f"--output {self.path}: OpenCV cannot write {self.fourcc} video here")
        elif (width, height) != self.size:
            raise UserError(f"{frame.name}: {width}x{height} differs from the video's {self.size[0]}x{self.size[1]}")
        self.writer.write(np.ascontiguousarray(image))
        self.frames += 1
        return self.path

    def close(self) -> None:
        """Finish the file and rename it into place (a video with no frames is not written)."""
        if self.writer is not None:
            self.writer.release()
            self.writer = None
            if self.frames:
                publish(self.tmp, self.path)
        if self.tmp.exists():
            self.tmp.unlink()

    def __enter__(self) -> "VideoSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_sink(output: str | os.PathLike, source: FrameSource) -> ImageSink | VideoSink:
    """A video sink when ``output`` has a video suffix, else an image folder.

    A single input image may also go to an image path (``--output out.png``): its folder
    is used and the frame takes that name.
    """
    path = Path(output)
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return VideoSink(path, source.fps)
    if suffix in IMAGE_SUFFIXES:
        if source.kind != "image":
            raise UserError(f"--output {path}: an image path takes one input image; give a folder or a video file")
        return ImageSink(path.parent, name=path.name)
    return ImageSink(path)


@dataclass
class StreamReport:
    """What :func:`process` did (JSON-ready through :meth:`as_dict`)."""

    frames: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    latency_ms: list[float] = field(default_factory=list)
    error: Optional[str] = None

    def as_dict(self) -> dict[str, Any]:
        latency = np.asarray(self.latency_ms, dtype=np.float64)
        stats = None
        if latency.size:
            stats = {
                "mean": float(latency.mean()),
                "p50": float(np.percentile(latency, 50)),
                "p90": float(np.percentile(latency, 90)),
                "max": float(latency.max()),
            }
        return {
            "frames": self.frames,
            "skipped": [{"name": name, "reason": reason} for name, reason in self.skipped],
            "interrupted": self.interrupted,
            "error": self.error,
            "seconds": round(self.seconds, 3),
            "fps": (self.frames / self.seconds) if self.seconds > 0 else None,
            "latency_ms": stats,
        }


def process(
    source: FrameSource,
    sink: ImageSink | VideoSink,
    dehaze: Callable[[np.ndarray], np.ndarray],
    max_frames: int = 0,
    on_frame: Optional[Callable[[Frame, float], None]] = None,
    report: Optional[StreamReport] = None,
) -> StreamReport:
    """Run ``dehaze`` over ``source`` into ``sink``; Ctrl-C stops cleanly and keeps what was written.

    Args:
        source, sink: from :func:`open_source` / :func:`open_sink`; the sink is closed here.
        dehaze: uint8 frame -> uint8 frame (a :class:`~.dehazer.Dehazer` or :class:`~.switch.ModelSwitch`).
            A Dehazer whose export has a fixed batch N gets N frames at a time (``run_frames``;
            the latency of each is the batch's time over N); the frames buffered when Ctrl-C
            arrives are not written.
        max_frames: stop after this many frames (0: all).
        on_frame: called with each frame and its latency in ms (progress bars).
        report: the :class:`StreamReport` to fill in (a new one when None): the caller keeps
            the counts even when an error stops the run.
    """
    report = report if report is not None else StreamReport()
    started = time.perf_counter()
    batch = int(getattr(dehaze, "batch_size", 1) or 1) if hasattr(dehaze, "run_frames") else 1
    pending: list[Frame] = []

    def flush() -> None:
        tick = time.perf_counter()
        images = dehaze.run_frames([f.image for f in pending]) if batch > 1 else [dehaze(pending[0].image)]
        latency = 1000.0 * (time.perf_counter() - tick) / len(pending)
        for frame, image in zip(pending, images):
            sink.write(frame, image)
            report.frames += 1
            report.latency_ms.append(latency)
            if on_frame is not None:
                on_frame(frame, latency)
        pending.clear()

    try:
        for frame in source:
            if max_frames and report.frames + len(pending) >= max_frames:
                break
            pending.append(frame)
            if len(pending) >= batch:
                flush()
        if pending:
            flush()
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        source.close()
        sink.close()
        report.seconds = time.perf_counter() - started
        report.skipped = list(source.skipped)
    return report
