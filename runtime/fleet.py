"""Plan a fleet run and put its results together, without Ray: jobs -> work items -> outputs and a record.

:func:`plan_job` turns one ``(input, output, model)`` job into :class:`~.chunks.WorkItem`
s (batches of image files, keyframe-aligned video chunks), leaving out what the
ledger says is already done when resuming. :class:`JobState` takes the workers'
results back: image files were written by the workers (atomically, through
:class:`~.streams.ImageSink`) and are entered in the ledger; frames bound for an
output video are appended in order through one :class:`~.streams.VideoSink`,
holding back chunks that arrive early. :mod:`bilalora.runtime.ray` does the
spreading; this module is what it spreads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from bilalora.errors import UserError

from .chunks import WorkItem, list_images, plan_chunks, scan_video
from .manifest import Job, Ledger, file_digest, input_stamp
from .streams import _STREAM_PREFIXES, IMAGE_SUFFIXES, VIDEO_SUFFIXES, Frame, VideoSink

__all__ = ["JobState", "plan_job", "folder_stamp"]


def folder_stamp(files: list[Path]) -> dict[str, int]:
    """One stamp for many inputs (a folder of images written to one video): total size, newest mtime, count."""
    stamps = [input_stamp(f) for f in files]
    return {"bytes": sum(s["bytes"] for s in stamps), "mtime_ns": max(s["mtime_ns"] for s in stamps), "files": len(files)}


@dataclass
class JobState:
    """One job while it runs: its plan, its ledger and (for a video output) the sink and the chunks held back.

    Attributes:
        kind: input kind: "images", "image" or "video".
        total: frames in the input; ``todo``: frames planned (the rest were done already).
        items: the work items, in order.
        done_outputs: output files skipped because the ledger says they are finished.
    """

    index: int
    job: Job
    model: str
    key: str
    kind: str
    total: int
    fps: Optional[float]
    items: list[WorkItem]
    ledger: Ledger
    video_out: Optional[Path] = None
    done_outputs: int = 0
    inputs: dict[str, Path] = field(default_factory=dict)  # output name -> input file (ledger stamps)
    frames: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    _sink: Optional[VideoSink] = field(default=None, repr=False)
    _held: dict[int, list] = field(default_factory=dict, repr=False)
    _next: int = 0

    @property
    def todo(self) -> int:
        return sum(item.frames for item in self.items)

    def accept(self, seq: int, outputs: list, images: list, skipped: list, frames: int) -> None:
        """Take one item's result: ledger entries for written files, frames for the video (in order)."""
        self.frames += frames
        self.skipped.extend((str(name), str(reason)) for name, reason in skipped)
        for name, size, sha256 in outputs:
            self.ledger.add(name, size, sha256, input_stamp(self.inputs[name]), self.key)
        if self.video_out is None:
            return
        self._held[seq] = images
        while self._next < len(self.items) and self.items[self._next].seq in self._held:
            for index, name, image in self._held.pop(self.items[self._next].seq):
                if self._sink is None:
                    self._sink = VideoSink(self.video_out, self.fps)
                self._sink.write(Frame(index, name, np.asarray(image)), np.asarray(image))
            self._next += 1

    def finish(self, complete: bool) -> None:
        """Close the output video (kept also when interrupted); enter it in the ledger when complete."""
        if self._sink is None:
            return
        self._sink.close()
        self._sink = None
        if complete and self.video_out.is_file():
            size, sha256 = file_digest(self.video_out)
            self.ledger.add(self.video_out.name, size, sha256, self._video_stamp(), self.key)

    def _video_stamp(self) -> dict[str, int]:
        sources = sorted(set(self.inputs.values()))
        return input_stamp(sources[0]) if len(sources) == 1 else folder_stamp(sources)

    def summary(self) -> dict[str, Any]:
        """JSON-ready: what this job was and what it did."""
        return {
            "input": self.job.input,
            "output": self.job.output,
            "model": self.model,
            "model_key": self.key,
            "kind": self.kind,
            "total": self.total,
            "frames": self.frames,
            "items": len(self.items),
            "resumed_outputs": self.done_outputs,
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
        }


def _input_kind(spec: str) -> tuple[str, Path]:
    if spec.isdigit() or spec.startswith(_STREAM_PREFIXES):
        raise UserError(f"--input {spec}: --ray runs files (images, folders, videos); run cameras and streams without --ray")
    path = Path(spec)
    if not path.exists():
        raise UserError(f"--input {path}: no such file or folder (a folder of images, an image or a video)")
    if path.is_dir():
        return "images", path
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image", path
    if suffix in VIDEO_SUFFIXES:
        return "video", path
    raise UserError(f"--input {path}: unknown file type {suffix or '(none)'}; use images, a folder of images or a video")


def plan_job(
    index: int,
    job: Job,
    model: str,
    key: str,
    batch: int = 8,
    chunk_frames: int = 32,
    resume: bool = False,
    overwrite: bool = False,
) -> JobState:
    """The work items of one job (see the module docstring).

    Args:
        index: the job's number in the run.
        job: input, output (folder, image file or video file) and model.
        model, key: the model to use and its :func:`~.manifest.model_key`.
        batch: image files per work item.
        chunk_frames: least frames per video chunk (:func:`~.chunks.plan_chunks`).
        resume: leave out outputs the ledger lists as finished and unchanged.
        overwrite: allow an output that replaces the input's own files (refused otherwise, as in ``run``).
    """
    from .session import check_not_in_place

    if batch < 1:
        raise UserError(f"--batch {batch}: use 1 or more")
    kind, path = _input_kind(job.input)
    check_not_in_place(job.input, job.output, overwrite)
    path = path.absolute()  # workers on other nodes get paths, not this process's working folder
    output = Path(job.output).absolute()
    out_suffix = output.suffix.lower()
    to_video = out_suffix in VIDEO_SUFFIXES
    if out_suffix in IMAGE_SUFFIXES and kind != "image":
        raise UserError(f"--output {output}: an image path takes one input image; give a folder or a video file")
    if output.exists() and not to_video and out_suffix not in IMAGE_SUFFIXES and not output.is_dir():
        raise UserError(f"--output {output}: exists and is not a folder")
    folder = output.parent if (to_video or out_suffix in IMAGE_SUFFIXES) else output
    state = JobState(index, job, model, key, kind, 0, None, [], Ledger(folder), output if to_video else None)

    if kind == "video":
        info = scan_video(path)
        state.total, state.fps = info.frames, info.fps
        chunks = plan_chunks(info, chunk_frames)
        if to_video:
            state.inputs[output.name] = path
            if resume and state.ledger.all_done([output.name], input_stamp(path), key):
                state.done_outputs = 1
                return state
        for seq, (start, stop) in enumerate(chunks):
            item = WorkItem(index, seq, model, key, video=str(path), start=start, stop=stop,
                            out_folder=None if to_video else str(folder))  # fmt: skip
            names = item.output_names()
            for name in names:
                state.inputs[name] = path
            if resume and names and state.ledger.all_done(names, input_stamp(path), key):
                state.done_outputs += len(names)
                continue
            state.items.append(item)
        return state

    files = list_images(path) if kind == "images" else [path]
    if not files:
        raise UserError(f"--input {path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    state.total = len(files)
    if to_video:
        state.inputs = {f.name: f for f in files}
        if resume and state.ledger.all_done([output.name], folder_stamp(files), key):
            state.done_outputs = 1
            return state
        todo = files
    else:
        out_name = output.name if out_suffix in IMAGE_SUFFIXES else None
        state.inputs = {out_name or f.name: f for f in files}
        todo = [f for f in files if not (resume and state.ledger.done(out_name or f.name, input_stamp(f), key))]
        state.done_outputs = len(files) - len(todo)
    for seq, start in enumerate(range(0, len(todo), batch)):
        state.items.append(WorkItem(index, seq, model, key, files=[str(f) for f in todo[start : start + batch]],
                                    out_folder=None if to_video else str(folder),
                                    out_name=output.name if out_suffix in IMAGE_SUFFIXES else None))  # fmt: skip
    return state
