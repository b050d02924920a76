"""``bilalora bench``: the adapted model against the unadapted one (cost, latency per backend, quality).

Thin over :func:`bilalora.bench.run_bench`: parse the flags, draw progress bars,
print the latency table (Ultralytics style: status, size, ms, FPS per format)
and the quality table, and say where bench.json went.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from bilalora.parsing import parse_hw, parse_list

from .common import console, err_console, progress_bar, resolve_device, user_errors

_ARROWS = {"lower": "↓", "higher": "↑", "none": ""}


def _split(value: Optional[str]) -> list[str]:
    return parse_list(value) or []


def _events(progress):
    from bilalora.bench.pipeline import BenchEvents

    class _Events(BenchEvents):
        task = None

        def info(self, message: str) -> None:
            console.print(Text(message, style="dim"), soft_wrap=True)

        def warn(self, message: str) -> None:
            err_console.print(Text.assemble(("warning:", "yellow"), " ", message), soft_wrap=True)

        def start(self, stage: str, total) -> None:
            self.task = progress.add_task(stage, total=total, status="")

        def advance(self, stage: str, status: str = "") -> None:
            progress.update(self.task, advance=1, status=escape(status[:60]))

        def done(self, stage: str) -> None:
            progress.update(self.task, status="done")

    return _Events()


def _latency_table(result) -> tuple[Table, list[str]]:
    """The table (model, format, status, size, params, GFLOPs, ms, FPS) and footnotes (devices, skip reasons)."""
    size = result.record["latency"]["size"]
    table = Table(title=f"latency, 1x3x{size[0]}x{size[1]}", title_justify="left")
    for column in ("model", "format", "status", "size (MB)", "params", "GFLOPs", "ms p50", "ms p90", "FPS"):
        table.add_column(column, justify="left" if column in ("model", "format", "status") else "right")
    devices: dict[str, str] = {}
    reasons: dict[str, list[str]] = {}
    for row in result.latency:
        timing = row.timing
        word = row.status.split(":")[0]
        if not row.ok:
            reason = row.status.split(":", 1)[1].strip() if ":" in row.status else row.status
            reasons.setdefault(f"{word}: {reason}", []).append(f"{row.subject} {row.backend}")
        if row.device:
            devices.setdefault(row.backend, row.device)
        table.add_row(
            escape(row.subject),
            row.backend,
            Text(word, style="green" if row.ok else ("yellow" if word == "skipped" else "red")),
            f"{row.megabytes:.1f}" if row.megabytes is not None else "-",
            f"{row.parameters:,}" if row.parameters is not None else "-",
            f"{row.gflops:.2f}" if row.gflops is not None else "-",
            f"{timing.p50:.1f}" if timing else "-",
            f"{timing.p90:.1f}" if timing else "-",
            f"{timing.fps:.1f}" if timing else "-",
        )
    notes = [f"{backend}: {device}" for backend, device in devices.items()]
    notes += [f"{', '.join(where)}: {reason}" for reason, where in reasons.items()]
    return table, notes


def _number(value) -> str:
    return f"{value:.3f}" if value is not None else "-"


def _quality_tables(result) -> list[Table]:
    """Mean scores per row, and the share of images where each row beats the base (and the base+stretch row)."""
    quality = result.quality
    images = result.record["images"]
    seen = ", ".join(f"{n} {k}" for k, n in images.get("seen_by_run", {}).items())
    table = Table(title=f"quality, mean over {images['count']} image(s) ({images['split']}; seen by the run: {seen})",
                  title_justify="left")  # fmt: skip
    table.add_column("output")
    for metric in quality.metrics:
        table.add_column(f"{metric.name} {_ARROWS[metric.direction]}".strip(), justify="right")
    for subject in quality.subjects:
        mean = quality.mean(subject)
        table.add_row(escape(subject), *[_number(mean.get(m.name)) for m in quality.metrics])
    tables = [table]
    ranked = [m for m in quality.metrics if m.direction != "none"]
    for reference in ("base", "base+stretch"):
        others = [s for s in quality.subjects if s not in (reference, "input") and not s.startswith(reference + "+")]
        if reference not in quality.subjects or not others or not ranked:
            continue
        wins = Table(title=f"better than {reference} on (share of images)", title_justify="left")
        wins.add_column("output")
        for metric in ranked:
            wins.add_column(metric.name, justify="right")
        for subject in others:
            shares = quality.wins(subject, reference)
            wins.add_row(escape(subject), *[f"{100 * shares[m.name]:.0f}%" if m.name in shares else "-" for m in ranked])
        tables.append(wins)
    return tables


@user_errors
def bench_command(
    adapter: Optional[list[Path]] = typer.Option(None, "--adapter", "-a", help="Adapter file(s) to compare (repeatable) (default: the newest runs/adapt/<run>)."),
    model: Optional[list[Path]] = typer.Option(None, "--model", "-m", help="Export folder(s) (model.json) to benchmark as they are (repeatable)."),
    base: bool = typer.Option(True, "--base/--no-base", help="Include the unadapted base network."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="Base network (default: the run's)."),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Base weights (default: the run's)."),
    input_norm: Optional[str] = typer.Option(None, "--input-norm", help="Input the base weights expect: clip | none | MEAN,STD (default: the run's or the file's record, else none)."),
    images: Optional[Path] = typer.Option(None, "--images", "-i", help="Images to score (default: the run's held-out test split)."),
    max_images: int = typer.Option(0, "--max-images", help="Score at most this many images (0: all)."),
    max_side: int = typer.Option(1024, "--max-side", help="Downsize images to this longer side first (0: keep)."),
    metrics: str = typer.Option("fade,entropy,dcd,colourfulness,ag,brightness", "--metrics", help="Built-in metrics, comma-separated (empty: no quality)."),
    iqa: Optional[str] = typer.Option(None, "--iqa", help="pyiqa metrics, comma-separated (musiq, niqe, brisque, piqe, ...)."),
    dcp: bool = typer.Option(False, "--dcp", help="Score the dark channel prior baseline too."),
    stretch: bool = typer.Option(True, "--stretch/--no-stretch", help="Score the base followed by a 1-99 % contrast stretch (per channel, and global)."),
    backends: Optional[str] = typer.Option(None, "--backends", help="Comma-separated: torch, torch-fp16 (CUDA), onnx, onnx-fp16, onnx-int8, openvino, openvino-int8, tensorrt (default: all for the device; none: no latency)."),
    size: str = typer.Option("512x512", "--size", help="Input HxW of the latency runs."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed runs before timing."),
    runs: int = typer.Option(20, "--runs", help="Timed runs per backend."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N (PyTorch and the quality pass)."),
    providers: Optional[str] = typer.Option(None, "--providers", help="onnxruntime providers, comma-separated."),
    threads: int = typer.Option(0, "--threads", help="CPU threads for PyTorch and onnxruntime (0: their defaults)."),
    report: Optional[Path] = typer.Option(None, "--report", "-o", help="Output folder (default: <run>/bench)."),
    sheet: int = typer.Option(6, "--sheet", help="Images in the contact sheet sheet.jpg (0: none)."),
) -> None:  # fmt: skip
    """Benchmark adapted vs. unadapted: parameters, FLOPs, latency per format, no-reference quality on held-out images."""
    from bilalora.bench.pipeline import BenchOptions, run_bench

    options = BenchOptions(
        adapters=adapter or [], models=model or [], backbone=backbone, weights=weights, input_norm=input_norm, include_base=base,
        images=images, max_images=max_images, max_side=max_side, metrics=_split(metrics), iqa=_split(iqa),
        dcp=dcp, stretch=stretch, backends=[] if backends == "none" else (_split(backends) or None), size=parse_hw(size, "--size", example="512x512"), warmup=warmup, runs=runs,
        device=resolve_device(device), providers=_split(providers) or None, threads=threads, report=report,
        sheet=sheet,
    )  # fmt: skip
    options.check()
    console.print(f"[bold]bilalora bench[/] on {options.device}", soft_wrap=True)
    with progress_bar() as progress:
        result = run_bench(options, _events(progress))
    if result.latency:
        table, notes = _latency_table(result)
        console.print(table)
        for note in notes:
            console.print(Text(note, style="dim"), soft_wrap=True)
    if result.quality is not None:
        for quality_table in _quality_tables(result):
            console.print(quality_table)
    adapted = [s for s in result.subjects if s.role == "adapted"]
    if adapted and "base" in result.cost:
        same = all(result.cost.get(s.name, {}).get("parameters") == result.cost["base"]["parameters"] for s in adapted)
        if same:
            console.print("merged adapters: same parameters and FLOPs as the base (zero inference overhead)")
    console.print(f"record: {escape(str(result.record_path))}", soft_wrap=True)
    if result.sheet_path:
        console.print(f"contact sheet: {escape(str(result.sheet_path))}", soft_wrap=True)
    if result.figure_path:
        console.print(f"metrics figure: {escape(str(result.figure_path))}", soft_wrap=True)
