"""``bilalora run``: dehaze images, a video, a camera or a stream with an exported model (torch-free).

Thin over :class:`bilalora.runtime.session.RunSession`: pick the model (the newest
adapt run's export when ``--model`` is not given), run with a progress bar, print
what runs and a summary, write the JSON record beside the output. Exit codes: 0 done,
2 a user error (one line), 130 interrupted (Ctrl-C; the frames written are kept).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from bilalora.errors import UserError

from bilalora.parsing import parse_list

from .common import console, err_console, progress_bar, user_errors


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
    from bilalora.runtime.session import record_path

    return record_path(output)


@user_errors
def run_command(
    input: Optional[str] = typer.Option(None, "--input", "-i", help="Folder of images, an image, a video, a camera index or a stream URL."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (images), a video file (.mp4/.avi/...) or, for one image, an image file."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Export folder (model.json), .onnx, .xml or .engine (default: the newest runs/adapt/<run>/export)."),
    night_model: Optional[Path] = typer.Option(None, "--night-model", help="A second model for dark frames (switches by mean luma)."),
    night_below: float = typer.Option(0.22, "--night-below", help="Mean luma (0-1) under which a frame counts as night."),
    skip_clear: bool = typer.Option(False, "--skip-clear", help="Pass frames with little haze through unchanged."),
    haze_above: float = typer.Option(0.3, "--haze-above", help="Mean dark channel (0-1) above which a frame counts as hazy."),
    hold: int = typer.Option(15, "--hold", help="Frames a new domain must persist before the model switches."),
    prefer: str = typer.Option("auto", "--prefer", help="auto (engine if TensorRT can load it, else the rest) | engine | onnx (no engine)."),
    precision: str = typer.Option("auto", "--precision", help="auto (fastest artefact that passed its gate here) | fp32 | fp16 | bf16 (OpenVINO, CPUs with AMX/AVX512-BF16) | int8."),
    providers: Optional[str] = typer.Option(None, "--providers", help="onnxruntime providers, comma-separated (default: TensorRT, CUDA, CPU as available)."),
    tile: Optional[int] = typer.Option(None, "--tile", help="Run frames in tiles of at most this side (pixels)."),
    overlap: int = typer.Option(32, "--overlap", help="Overlap of neighbouring tiles (pixels)."),
    threads: int = typer.Option(0, "--threads", help="onnxruntime CPU threads (0: its default)."),
    max_frames: int = typer.Option(0, "--max-frames", help="Stop after this many frames (0: all)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Allow the output to replace the input's own files (-i DIR -o DIR)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check each artefact's sha256 against model.json before use (--no-verify: skip, for huge engines)."),
    ray: bool = typer.Option(False, "--ray", help="Spread images and videos over a Ray cluster (a new local one unless --ray-address or $RAY_ADDRESS)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="With --ray: auto (the cluster of `ray start` here), HOST:PORT or ray://HOST:10001."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="With --ray: CSV/JSON rows input,output,model, each input with its own camera's model."),
    resume: bool = typer.Option(False, "--resume", help="With --ray: skip outputs already written from the same input and model (run.outputs.jsonl)."),
    workers: int = typer.Option(0, "--workers", help="With --ray: workers (0: one per GPU for engines, else one per --worker-cpus CPUs)."),
    worker_cpus: float = typer.Option(1.0, "--worker-cpus", help="With --ray: CPUs per worker (also its onnxruntime threads)."),
    worker_gpus: Optional[float] = typer.Option(None, "--worker-gpus", help="With --ray: GPUs per worker, e.g. 0.5 for two per GPU (default: 1 for engines/CUDA when the cluster has GPUs, else 0)."),
    batch: int = typer.Option(8, "--batch", help="With --ray: image files per task."),
    chunk_frames: int = typer.Option(32, "--chunk-frames", help="With --ray: least frames per video chunk (chunks start on keyframes)."),
) -> None:  # fmt: skip
    """Dehaze frames with an exported model: folders, images, videos, cameras, streams. No torch needed."""
    from bilalora.runtime.session import RunOptions, RunSession

    if ray or manifest is not None or resume or ray_address is not None:
        from .run_ray import run_ray

        dehazer = dict(providers=parse_list(providers), prefer=prefer, precision=precision, tile=tile, overlap=overlap,
                       threads=threads, verify=verify)  # fmt: skip
        refused = {"--night-model": night_model is not None, "--skip-clear": skip_clear, "--max-frames": max_frames != 0}
        return run_ray(input=input, output=output, model=model, manifest=manifest, address=ray_address, resume=resume,
                       workers=workers, worker_cpus=worker_cpus, worker_gpus=worker_gpus, batch=batch,
                       chunk_frames=chunk_frames, dehazer=dehazer, overwrite=overwrite, default_model=_default_model,
                       record_path=_record_path, refused=refused)  # fmt: skip
    if input is None or output is None:
        raise UserError("give --input and --output (--manifest FILE with --ray)")
    chosen = model if model is not None else _default_model()
    if model is None:
        console.print(f"model: {escape(str(chosen))} (newest adapt run; --model to choose)", soft_wrap=True)
    options = RunOptions(
        input=input, output=output, model=chosen, night_model=night_model, night_below=night_below,
        skip_clear=skip_clear, haze_above=haze_above, hold=hold, prefer=prefer, precision=precision,
        providers=parse_list(providers), tile=tile, overlap=overlap, threads=threads, max_frames=max_frames,
        overwrite=overwrite, verify=verify,
    )  # fmt: skip

    def note(line: str) -> None:
        err_console.print(f"[yellow]note:[/] {escape(line)}", soft_wrap=True)

    with RunSession(options, on_note=note) as session:
        for info in session.describe_models():
            why = "fastest that passed its gate here" if info["precision_asked"] == "auto" else "--precision"
            console.print(
                f"[bold]{escape(Path(info['file']).name)}[/]: {info['backend']} {info['precision']} on "
                f"{escape(info['device'])}; {why}",
                soft_wrap=True,
            )
        with progress_bar() as progress:
            task = progress.add_task("run", total=session.total, status="")

            def on_frame(frame, latency: float) -> None:
                progress.update(task, advance=1, status=f"{latency:.1f} ms  {escape(frame.name)}")

            try:
                report = session.run(on_frame=on_frame)
            finally:  # the record is written also when an error stops the run
                record_path = session.write_record()
    summary = report.as_dict()
    latency = summary["latency_ms"]
    timing = f", {latency['p50']:.1f} ms per frame (p50), {summary['fps']:.1f} FPS" if latency else ""
    console.print(f"[bold]run:[/] {report.frames} frame(s) -> {escape(str(output))}{timing}", soft_wrap=True)
    for name, reason in report.skipped:
        err_console.print(f"[yellow]skipped[/] {escape(name)}: {escape(reason)}", soft_wrap=True)
    console.print(f"record: {escape(str(record_path))}", soft_wrap=True)
    if report.interrupted:
        err_console.print(f"[yellow]interrupted[/]: the {report.frames} frame(s) written so far are kept")
        raise typer.Exit(130)
    if report.frames == 0:
        raise UserError(f"--input {input}: no frame could be read")
