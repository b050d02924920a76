"""``bilalora pretrain``: train a dehazing backbone on hazy/clear pairs (and/or synthesised haze)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .common import console, progress_bar, resolve_device, user_errors

_RECIPE_NOTE = "the paper's recipe (docs/method.md): L1, Adam 1e-4 cosine to 1e-6, batch 16, 256 crops, 10,000 steps"


@user_errors
def pretrain_command(
    pairs: Optional[Path] = typer.Option(
        None, "--pairs", "-p", help="Folder with hazy/ and clear/ matched by file stem (RESIDE names as fallback)."
    ),
    clear: Optional[Path] = typer.Option(
        None, "--clear", help="Clear photos (DIR or DIR/rgb, optional DIR/depth) to synthesise haze from."
    ),
    synthesize: bool = typer.Option(
        False, "--synthesize", help="Make hazy partners of --clear on the fly (I = J t + A (1 - t))."
    ),
    synth_ratio: Optional[float] = typer.Option(
        None, "--synth-ratio", help="Share of synthesised samples (default 0.5 with --pairs and --clear, else 0 or 1)."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output .safetensors (plain re-parameterised net); card = .json beside it."
    ),
    val: Optional[Path] = typer.Option(None, "--val", help="Validation pairs (hazy/ + clear/): PSNR/SSIM, best kept."),
    backbone: str = typer.Option(
        "dea-net", "--backbone", "-b", help="dea-net | dea-net-s | dea-net-t (trained in DEConv form)."
    ),
    steps: int = typer.Option(10_000, "--steps", help="Optimiser steps in total."),
    batch: int = typer.Option(16, "--batch", help="Crops per step."),
    crop: int = typer.Option(256, "--crop", help="Crop side (multiple of 4)."),
    lr: float = typer.Option(1e-4, "--lr", help="Initial learning rate (Adam)."),
    lr_min: float = typer.Option(1e-6, "--lr-min", help="Final learning rate of the cosine schedule."),
    val_every: int = typer.Option(500, "--val-every", help="Steps between validations (0: only at the end)."),
    val_crop: int = typer.Option(0, "--val-crop", help="Validate on centred squares of this side (0: whole images)."),
    val_max: int = typer.Option(0, "--val-max", help="Validate on at most this many pairs (0: all)."),
    ckpt_every: int = typer.Option(500, "--ckpt-every", help="Steps between checkpoints ..."),
    ckpt_minutes: float = typer.Option(5.0, "--ckpt-minutes", help="... or minutes, whichever comes first."),
    light_checkpoints: bool = typer.Option(
        False, "--light-checkpoints", help="Checkpoint weights only, fp16 (~4x smaller; Adam restarts on resume)."
    ),
    time_limit: float = typer.Option(0.0, "--time-limit", help="Stop after this many minutes, save, exit (0: none)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from WORK_DIR/last.pt."),
    work_dir: Optional[Path] = typer.Option(
        None, "--work-dir", help="Checkpoints and log (default runs/pretrain/<out stem>)."
    ),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    precision: str = typer.Option(
        "auto", "--precision", help="auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16"
    ),
    channels_last: Optional[bool] = typer.Option(
        None, "--channels-last/--no-channels-last", help="Channels-last tensors (default: on; faster on CPU and CUDA)."
    ),
    dtype: str = typer.Option("fp16", "--dtype", help="Exported weights: fp16 | fp32."),
    select: str = typer.Option("best", "--select", help="Weights written to --out: best (validation PSNR) | last."),
    init: Optional[str] = typer.Option(
        None,
        "--init",
        help="Start from these weights (a file, plain or training form, or a backbone name with shipped weights).",
    ),
    artifacts: bool = typer.Option(
        False,
        "--artifacts/--no-artifacts",
        help="Give every hazy input camera grain, 8-bit steps and JPEG, and synthesised haze an uneven airlight "
        "(the clear side untouched): teaches the network not to amplify them into blotches.",
    ),
    max_side: int = typer.Option(0, "--max-side", help="Downsize training photos to this longer side first (0: keep)."),
    workers: int = typer.Option(2, "--workers", help="Threads preparing batches ahead (0: none)."),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0: torch's default)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the init and of every sample."),
    log_every: int = typer.Option(
        10, "--log-every", help="Steps between log lines (log.jsonl; stdout when not a terminal)."
    ),
    note: Optional[list[str]] = typer.Option(
        None, "--note", help="A line for the card (e.g. data licence); repeatable."
    ),
) -> None:
    """Pretrain a dehazing backbone (L1, cosine Adam) and write its re-parameterised weights and a JSON card."""
    import torch

    from bilalora.errors import UserError
    from bilalora.mixture import resolve_synth_ratio
    from bilalora.pairs import ClearFolder, PairedFolder
    from bilalora.pretrain import pretrain
    from bilalora.pretrain_config import PretrainConfig

    if clear is not None and not synthesize:
        raise UserError("--clear needs --synthesize (hazy partners are made from the clear photos)")
    if synthesize and clear is None:
        raise UserError("--synthesize needs --clear DIR (haze-free photos, optional DIR/depth)")
    resolve_synth_ratio(pairs is not None, clear is not None, synth_ratio)  # before decoding any folder
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(device)
    config = PretrainConfig(
        backbone=backbone,
        steps=steps,
        batch=batch,
        crop=crop,
        lr=lr,
        lr_min=lr_min,
        synth_ratio=synth_ratio,
        seed=seed,
        val_every=val_every,
        ckpt_every=ckpt_every,
        ckpt_minutes=ckpt_minutes,
        log_every=log_every,
        time_limit_min=time_limit,
        precision=precision,
        channels_last=channels_last,
        val_crop=val_crop,
        val_max=val_max,
        max_side=max_side,
        workers=workers,
        dtype=dtype,
        light_checkpoints=light_checkpoints,
        select=select,
        init=init,
        artifacts=artifacts,
    )
    config.check()
    side = max_side or None
    with console.status("decoding training images"):
        pair_set = PairedFolder(pairs, max_side=side) if pairs is not None else None
        clear_set = ClearFolder(clear, max_side=side) if clear is not None else None
        val_set = PairedFolder(val, flag="--val") if val is not None else None
    console.print(f"[bold]bilalora pretrain[/] {backbone} -> {out}")
    if pair_set is not None:
        summary = pair_set.summary()
        console.print(
            f"pairs: {summary['n_pairs']} from {pairs} ({summary['n_clear_images']} distinct clear images; "
            f"matched by {summary['matched_by']}; {summary['n_unmatched_hazy']} hazy without partner)"
        )
        for path, reason in pair_set.skipped:
            console.print(f"[yellow]skipped[/] {path}: {reason}")
    if clear_set is not None:
        console.print(
            f"synthesis: {len(clear_set)} clear photos from {clear} ({clear_set.n_with_depth} with depth maps, "
            "the rest get a synthetic depth)"
        )
    if val_set is not None:
        console.print(f"validation: {len(val_set)} pairs from {val}, every {val_every} steps")
    console.print(
        f"device {device}, precision {precision}, steps {steps}, batch {batch}, crop {crop}, lr {lr:g} -> {lr_min:g}, "
        f"seed {seed}" + (", camera artifacts and uneven airlight on" if artifacts else "")
    )
    console.print(f"[dim]{_RECIPE_NOTE}[/]")

    interactive = sys.stdout.isatty()
    with progress_bar() as progress:
        task = progress.add_task("pretrain", total=steps, status="")

        def on_progress(step: int, total: int, info: dict) -> None:
            status = f"loss {info['loss']:.4f}  PSNR {info['psnr']:.2f}  lr {info['lr']:.2e}"
            if "val_psnr" in info:
                status += f"  val {info['val_psnr']:.2f} dB / {info['val_ssim']:.3f}"
            progress.update(task, completed=step, status=status)
            if not interactive and (step % log_every == 0 or step == total):
                console.print(f"step {step}/{total}  {status}")

        def on_message(message: str) -> None:
            progress.console.print(message)

        result = pretrain(
            config,
            out,
            pairs=pair_set,
            clear=clear_set,
            val=val_set,
            device=device,
            work_dir=work_dir,
            resume=resume,
            notes=list(note or []),
            on_progress=on_progress,
            on_message=on_message,
        )
    state = "finished" if result.finished else "stopped (time limit); run again with --resume to continue"
    console.print(f"{state} at step {result.step}/{steps}")
    if result.best is not None:
        console.print(
            f"best validation: PSNR {result.best['psnr']:.2f} dB, SSIM {result.best['ssim']:.4f} (step {result.best['step']})"
        )
    console.print(f"[green]saved[/] {result.out} (fingerprint {result.fingerprint}) and card {result.card}")
