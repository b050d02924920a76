"""One ``bilalora run``: models, the day/night and clear-frame switches, source, sink, record. No torch.

    session = RunSession(RunOptions(input="frames/", output=Path("out/"), model=Path("export/")))
    report = session.run(on_frame=lambda frame, ms: ...)     # frames written; Ctrl-C keeps them
    path = session.write_record()                             # out/run.json
    session.close()

The command line (``bilalora run``) is a thin layer over this: it prints what
:meth:`RunSession.describe_models` and the report say and exits 130 when the run was
interrupted. Refusals happen before any frame is read: an output that would overwrite
the input (same folder, same file) unless ``overwrite``; bad flags; a model that cannot
be opened (one line each, :class:`~bilalora.errors.UserError`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from bilalora.errors import UserError

from .dehazer import Dehazer
from .streams import IMAGE_SUFFIXES, VIDEO_SUFFIXES, Frame, StreamReport, open_sink, open_source, process
from .switch import HazeRule, LuminanceRule, ModelSwitch

__all__ = ["RECORD_NAME", "RunOptions", "RunSession", "record_path", "check_not_in_place", "build_switch"]

RECORD_NAME = "run.json"


@dataclass
class RunOptions:
    """What ``bilalora run`` was asked to do (the command's flags)."""

    input: str
    output: Path
    model: Path
    night_model: Optional[Path] = None
    night_below: float = 0.22
    skip_clear: bool = False
    haze_above: float = 0.3
    hold: int = 15
    prefer: str = "auto"
    precision: str = "auto"
    providers: Optional[Sequence[str]] = None
    tile: Optional[int] = None
    overlap: int = 32
    threads: int = 0
    max_frames: int = 0
    overwrite: bool = False
    verify: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def dehazer_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~.dehazer.Dehazer` (shared by both models of a day/night pair)."""
        return dict(providers=list(self.providers) if self.providers else None, prefer=self.prefer,
                    precision=self.precision, tile=self.tile, overlap=self.overlap, threads=self.threads,
                    verify=self.verify)  # fmt: skip


def record_path(output: str | Path) -> Path:
    """Where the JSON record goes: inside an output folder, else ``<output stem>.run.json`` beside the file."""
    output = Path(output)
    if output.suffix.lower() in VIDEO_SUFFIXES + IMAGE_SUFFIXES:
        return output.with_name(f"{output.stem}.{RECORD_NAME}")
    return output / RECORD_NAME


def check_not_in_place(input_spec: str, output: str | Path, overwrite: bool = False) -> None:
    """Refuse (UserError) an output that would replace the input's own files, unless ``overwrite``.

    ``-i DIR -o DIR`` writes each result under its source's name in the same folder;
    ``-i a.jpg -o a.jpg`` (or ``-o .`` beside it) and ``-i v.mp4 -o v.mp4`` replace the source.
    """
    source, output = Path(str(input_spec)), Path(output)
    if overwrite or not source.exists():
        return
    if source.is_dir():
        clash = output.exists() and output.resolve() == source.resolve()
        target = output
    else:
        target = output if output.suffix.lower() in VIDEO_SUFFIXES + IMAGE_SUFFIXES else output / source.name
        clash = target.resolve() == source.resolve()
    if clash:
        raise UserError(
            f"--output {output}: would overwrite the input's own files ({target}); write elsewhere, or pass --overwrite"
        )


def build_switch(dehazers: Sequence[Dehazer], options: RunOptions) -> Callable:
    """The frame function: one model, or day/night by mean luma, optionally passing clear frames through."""
    dehaze: Callable = dehazers[0]
    if len(dehazers) > 1:
        dehaze = ModelSwitch({"day": dehazers[0], "night": dehazers[1]}, LuminanceRule(options.night_below),
                             hold=options.hold)  # fmt: skip
    if options.skip_clear:
        dehaze = ModelSwitch({"clear": None, "haze": dehaze}, HazeRule(options.haze_above), hold=options.hold)
    return dehaze


class RunSession:
    """Models, switch, source and sink of one run, opened in that order (models first: their errors come first).

    Args:
        options: the run's :class:`RunOptions`.
        on_note: called with each line about a backend passed over or failing (printed by the CLI).
    """

    def __init__(self, options: RunOptions, on_note: Optional[Callable[[str], None]] = None):
        if options.max_frames < 0:
            raise UserError(f"--max-frames {options.max_frames}: use 0 (all) or more")
        check_not_in_place(options.input, options.output, options.overwrite)
        self.options = options
        self.dehazers: list[Dehazer] = []
        try:
            kwargs = options.dehazer_options()
            self.dehazers.append(Dehazer(options.model, on_note=on_note, **kwargs))
            if options.night_model is not None:
                self.dehazers.append(Dehazer(options.night_model, on_note=on_note, **kwargs))
            self.dehaze = build_switch(self.dehazers, options)
            self.source = open_source(options.input)
            self.sink = open_sink(options.output, self.source)
        except BaseException:
            self.close()
            raise
        self.report: Optional[StreamReport] = None

    def describe_models(self) -> list[dict[str, Any]]:
        """:meth:`~.dehazer.Dehazer.describe` of each model (day first)."""
        return [d.describe() for d in self.dehazers]

    @property
    def total(self) -> Optional[int]:
        """Frames expected (None for cameras and streams), after ``max_frames``."""
        total, limit = self.source.total, self.options.max_frames
        return total if not limit else min(limit, total or limit)

    def run(self, on_frame: Optional[Callable[[Frame, float], None]] = None) -> StreamReport:
        """Process every frame into the sink (closed at the end); Ctrl-C stops and keeps what was written.

        An error that stops the run (a video frame of another size, a backend with nothing left
        to fall back to) is kept in the report's ``error`` and raised again; :meth:`write_record`
        still records what was done.
        """
        from .backends import first_line

        self.report = StreamReport()
        try:
            process(self.source, self.sink, self.dehaze, max_frames=self.options.max_frames, on_frame=on_frame,
                    report=self.report)  # fmt: skip
        except Exception as exc:
            self.report.error = first_line(exc)
            raise
        return self.report

    def record(self) -> dict[str, Any]:
        """The run.json record (JSON-ready)."""
        report = self.report or StreamReport()
        source = self.source
        return {
            "command": "run",
            "input": {"spec": self.options.input, "kind": source.kind, "total": source.total, "fps": source.fps},
            "output": str(self.options.output),
            "options": {"prefer": self.options.prefer, "precision": self.options.precision,
                        "verify": self.options.verify, "overwrite": self.options.overwrite,
                        "tile": self.options.tile, "max_frames": self.options.max_frames, **self.options.extra},
            "models": self.describe_models(),
            "switch": self.dehaze.describe() if isinstance(self.dehaze, ModelSwitch) else None,
            **report.as_dict(),
        }  # fmt: skip

    def write_record(self) -> Path:
        """Write :meth:`record` atomically beside the output; returns its path."""
        from bilalora.io import write_json

        return write_json(record_path(self.options.output), self.record())

    def close(self) -> None:
        """Release the models (idempotent)."""
        for dehazer in self.dehazers:
            dehazer.close()

    def __enter__(self) -> "RunSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
