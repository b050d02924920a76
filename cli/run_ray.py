"""``bilalora run --ray`` / ``--manifest``: the fleet form of ``run`` (thin over :mod:`bilalora.runtime.ray`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.markup import escape

from bilalora.errors import UserError

from .common import console, err_console


def run_ray(
    *,
    input: Optional[str],
    output: Optional[Path],
    model: Optional[Path],
    manifest: Optional[Path],
    address: Optional[str],
    resume: bool,
    workers: int,
    worker_cpus: float,
    worker_gpus: Optional[float],
    batch: int,
    chunk_frames: int,
    dehazer: dict[str, Any],
    overwrite: bool,
    default_model: Callable[[], Path],
    record_path: Callable[[Path], Path],
    refused: dict[str, bool],
) -> None:
    """Plan, run on Ray, print a summary and write the run.json record.

    Args:
        refused: one-process options that do not spread (flag name -> whether it was given).
    """
    from bilalora.runtime.manifest import Job, read_manifest
    from bilalora.runtime.ray import FleetOptions, run_fleet

    from bilalora.io import write_json

    for flag, given in refused.items():
        if given:
            raise UserError(f"{flag} is not available with --ray (frame-to-frame state does not split into chunks); "
                            "run without --ray")  # fmt: skip
    if manifest is not None:
        if input is not None or output is not None:
            raise UserError("--manifest lists inputs and outputs: drop --input/--output")
        jobs = read_manifest(manifest)
        where = manifest.with_name(f"{manifest.stem}.run.json")
    else:
        if input is None or output is None:
            raise UserError("give --input and --output (or --manifest FILE)")
        jobs = [Job(input, str(output))]
        where = record_path(output)
    chosen = model
    if chosen is None and any(job.model is None for job in jobs):
        chosen = default_model()
        console.print(f"model: {escape(str(chosen))} (newest adapt run; --model to choose)", soft_wrap=True)
    options = FleetOptions(address=address, workers=workers, worker_cpus=worker_cpus, worker_gpus=worker_gpus,
                           batch=batch, chunk_frames=chunk_frames, resume=resume, overwrite=overwrite,
                           dehazer=dehazer)  # fmt: skip
    record = run_fleet(jobs, str(chosen) if chosen else None, options, console=console)
    path = write_json(where, record)

    fleet = record["ray"]
    for model_info in record["models"]:
        console.print(
            f"[bold]{escape(Path(model_info['file']).name)}[/]: {model_info['backend']} on {escape(model_info['device'])}",
            soft_wrap=True,
        )
    for row in fleet["workers"]:
        restarts = f", restarted {row['restarts']}x" if row["restarts"] else ""
        fps = f"{row['fps_busy']:.1f} FPS busy" if row["fps_busy"] else "idle"
        console.print(f"  worker {row['worker']} ({row['node']}): {row['frames']} frame(s) in {row['items']} item(s), "
                      f"{fps}{restarts}", soft_wrap=True)  # fmt: skip
    if fleet["resumed_outputs"]:
        console.print(f"resume: {fleet['resumed_outputs']} output(s) already done, left as they are")
    rate = f", {record['fps']:.1f} FPS over {len(fleet['workers'])} worker(s)" if record["fps"] and record["frames"] else ""
    target = escape(str(output)) if manifest is None else f"{len(jobs)} output(s)"
    console.print(f"[bold]run --ray:[/] {record['frames']} frame(s) -> {target}{rate}", soft_wrap=True)
    for job in record["jobs"]:
        for skipped in job["skipped"]:
            err_console.print(f"[yellow]skipped[/] {escape(skipped['name'])}: {escape(skipped['reason'])}", soft_wrap=True)
    for note in fleet["notes"]:
        err_console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    console.print(f"record: {escape(str(path))}", soft_wrap=True)
    if record["interrupted"]:
        err_console.print("[yellow]interrupted[/]: the outputs finished so far are kept (rerun with --resume)")
        raise typer.Exit(130)
    if record["frames"] == 0 and not fleet["resumed_outputs"]:
        raise UserError("no frame could be read")
