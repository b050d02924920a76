"""The one progress-bar layout every long loop uses (description, bar, count, elapsed, ETA, status)."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["make_progress"]


def make_progress(console=None, transient: bool = False) -> Progress:
    """A rich Progress; tasks take a ``status`` field shown after the ETA (loss, PSNR, ...)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=transient,
    )
