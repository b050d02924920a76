"""``bilalora run``: dehaze images, a video, a camera or a stream with an exported model (torch-free).

Thin over :mod:`bilalora.runtime`: pick the model (the newest adapt run's export
when ``--model`` is not given), open the source and the sink, run with a progress
bar, print a summary and write a JSON record beside the output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from bilalora.errors import UserError

from bilalora.parsing import parse_list

from .common import console, err_console, progress_bar, user_errors

RECORD_NAME = "run.json"


def _default_model() -> Path:
    from bilalora.runs import adapt_root, latest_adapter_run

    run = latest_adapter_run()
    if run is None or not (run / "export").is_dir():
        where = f"{run}/export" if run is not None else f"{adapt_root()}/<run>/export"
        raise UserError(
            f"no --model given and no export at {where}: run `bilalora export --merge` first, or pass --model"
        )
    return run / "export"


def _record_path(output: Path) -> Path:
    """Where the JSON record goes: inside an output folder, else ``<output stem>.run.json`` beside it."""
    from bilalora.runtime.streams import IMAGE_SUFFIXES, VIDEO_SUFFIXES

    if output.suffix.lower() in VIDEO_SUFFIXES + IMAGE_SUFFIXES:
        return output.with_name(f"{output.stem}.{RECORD_NAME}")
    return output / RECORD_NAME


@user_errors
def run_command(
    input: str = typer.Option(..., "--input", "-i", help="Folder of images, an image, a video, a camera index or a stream URL."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder (images), a video file (.mp4/.avi/...) or, for one image, an image file."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Export folder (model.json), .onnx or .engine (default: the newest runs/adapt/<run>/export)."),
    night_model: Optional[Path] = typer.Option(None, "--night-model", help="A second model for dark frames (switches by mean luma)."),
    night_below: float = typer.Option(0.22, "--night-below", help="Mean luma (0-1) under which a frame counts as night."),
    skip_clear: bool = typer.Option(False, "--skip-clear", help="Pass frames with little haze through unchanged."),
    haze_above: float = typer.Option(0.3, "--haze-above", help="Mean dark channel (0-1) above which a frame counts as hazy."),
    hold: int = typer.Option(15, "--hold", help="Frames a new domain must persist before the model switches."),
    prefer: str = typer.Option("auto", "--prefer", help="auto (engine if TensorRT can load it, else ONNX) | engine | onnx."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16: which ONNX graph of an export folder."),
    providers: Optional[str] = typer.Option(None, "--providers", help="onnxruntime providers, comma-separated (default: TensorRT, CUDA, CPU as available)."),
    tile: Optional[int] = typer.Option(None, "--tile", help="Run frames in tiles of at most this side (pixels)."),
    overlap: int = typer.Option(32, "--overlap", help="Overlap of neighbouring tiles (pixels)."),
    threads: int = typer.Option(0, "--threads", help="onnxruntime CPU threads (0: its default)."),
    max_frames: int = typer.Option(0, "--max-frames", help="Stop after this many frames (0: all)."),
) -> None:  # fmt: skip
    """Dehaze frames with an exported model: folders, images, videos, cameras, streams. No torch needed."""
    from bilalora.io import write_json
    from bilalora.runtime import Dehazer, HazeRule, LuminanceRule, ModelSwitch
    from bilalora.runtime.streams import open_sink, open_source, process

    if max_frames < 0:
        raise UserError(f"--max-frames {max_frames}: use 0 (all) or more")
    chosen = model if model is not None else _default_model()
    if model is None:
        console.print(f"model: {escape(str(chosen))} (newest adapt run; --model to choose)", soft_wrap=True)
    provider_list = parse_list(providers)
    options = dict(providers=provider_list, prefer=prefer, precision=precision, tile=tile, overlap=overlap,
                   threads=threads)  # fmt: skip
    dehazers = [Dehazer(chosen, **options)]
    dehaze = dehazers[0]
    if night_model is not None:
        dehazers.append(Dehazer(night_model, **options))
        dehaze = ModelSwitch({"day": dehazers[0], "night": dehazers[1]}, LuminanceRule(night_below), hold=hold)
    if skip_clear:
        dehaze = ModelSwitch({"clear": None, "haze": dehaze}, HazeRule(haze_above), hold=hold)
    for dehazer in dehazers:
        info = dehazer.describe()
        console.print(
            f"[bold]{escape(Path(info['file']).name)}[/]: {info['backend']} on {escape(info['device'])}",
            soft_wrap=True,
        )
        for note in info["notes"]:
            err_console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)

    source = open_source(input)
    sink = open_sink(output, source)
    total = source.total if not max_frames else min(max_frames, source.total or max_frames)
    with progress_bar() as progress:
        task = progress.add_task("run", total=total, status="")

        def on_frame(frame, latency: float) -> None:
            progress.update(task, advance=1, status=f"{latency:.1f} ms  {escape(frame.name)}")

        report = process(source, sink, dehaze, max_frames=max_frames, on_frame=on_frame)
    for dehazer in dehazers:
        dehazer.close()

    summary = report.as_dict()
    record = {
        "command": "run",
        "input": {"spec": input, "kind": source.kind, "total": source.total, "fps": source.fps},
        "output": str(output),
        "models": [d.describe() for d in dehazers],
        "switch": dehaze.describe() if isinstance(dehaze, ModelSwitch) else None,
        **summary,
    }
    record_path = write_json(_record_path(output), record)
    latency = summary["latency_ms"]
    timing = f", {latency['p50']:.1f} ms per frame (p50), {summary['fps']:.1f} FPS" if latency else ""
    console.print(f"[bold]run:[/] {report.frames} frame(s) -> {escape(str(output))}{timing}", soft_wrap=True)
    for name, reason in report.skipped:
        err_console.print(f"[yellow]skipped[/] {escape(name)}: {escape(reason)}", soft_wrap=True)
    if report.interrupted:
        err_console.print("[yellow]interrupted[/]: the frames written so far are kept")
    console.print(f"record: {escape(str(record_path))}", soft_wrap=True)
    if report.frames == 0:
        raise UserError(f"--input {input}: no frame could be read")
