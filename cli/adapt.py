"""``bilalora adapt``: adapt a backbone to a folder of real hazy images."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from .common import console, resolve_device, user_errors
from bilalora.parsing import parse_list

_DEFAULTS_NOTE = "defaults follow the paper's release (docs/method.md) except --lr and --gate-lr, chosen by measurement"


@user_errors
def adapt_command(
    images: Path = typer.Option(..., "--images", "-i", help="Folder of unlabeled hazy images of the target domain."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default runs/adapt/<name>)."),
    name: Optional[str] = typer.Option(None, "--name", help="Run name under runs/adapt/ (default exp, exp2, ...)."),
    backbone: Optional[str] = typer.Option(
        None, "--backbone", "-b", help="Registry name or package.module:factory (default: the shipped DEA-Net)."
    ),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Base weights (default: shipped weights)."),
    objective: str = typer.Option("h2c", "--objective", help="h2c | prior | h2c+prior | weighted: h2c:1+prior:0.5"),
    clip: Optional[str] = typer.Option(None, "--clip", help="open_clip model name (default ViT-B-32-quickgelu)."),
    clip_pretrained: Optional[str] = typer.Option(
        None, "--clip-pretrained", help="open_clip tag (openai), a weights file, or local-dir:DIR "
        "(default $BILALORA_CLIP_PRETRAINED or openai)."
    ),
    clip_config: Optional[Path] = typer.Option(None, "--clip-config", help="JSON config of a custom CLIP architecture."),
    negative: Optional[str] = typer.Option(None, "--negative", help="Negative prompt (default 'a photo with haze')."),
    positive: Optional[str] = typer.Option(None, "--positive", help="Positive prompt (default 'a clear photo')."),
    night: bool = typer.Option(False, "--night", help="Night adapter: negative prompt 'a photo with nighttime haze'."),
    method: str = typer.Option("bilevel", "--method", "-m", help="bilevel | joint | manual | full"),
    sites: Optional[str] = typer.Option(None, "--sites", help="Candidate sites (names/globs, comma separated)."),
    exclude_sites: Optional[str] = typer.Option(None, "--exclude-sites", help="Sites to leave out (globs)."),
    top_k: int = typer.Option(3, "--top-k", "-k", help="Sites kept for stage B."),
    rank: int = typer.Option(8, "--rank", "-r", help="LoRA rank."),
    lora_alpha: float = typer.Option(16.0, "--lora-alpha", help="LoRA alpha (scale = alpha / rank)."),
    epochs: int = typer.Option(30, "--epochs", help="Total epochs over the train half."),
    search_epochs: int = typer.Option(5, "--search-epochs", help="Epochs of stage A (bilevel/joint)."),
    batch: int = typer.Option(24, "--batch", help="Batch size."),
    crop: int = typer.Option(224, "--crop", help="Training crop side (multiple of 4)."),
    lr: float = typer.Option(1e-3, "--lr", help="LoRA learning rate, Adam (the release: 1e-6)."),
    gate_lr: float = typer.Option(3e-3, "--gate-lr", help="Gate learning rate, AdamW (the release: 3e-4)."),
    clip_norm: float = typer.Option(5.0, "--clip-norm", help="Gradient-norm clip of the LoRA step."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 on CUDA) | fp32 | bf16"),
    seed: int = typer.Option(0, "--seed", help="Seed of the split, crops and LoRA init."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out/--name (or the newest)."),
    workers: int = typer.Option(2, "--workers", help="Threads preparing batches ahead of the step (0: none)."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="Steps between checkpoints."),
    max_side: Optional[int] = typer.Option(None, "--max-side", help="Downsize larger images to this side first."),
    recursive: bool = typer.Option(False, "--recursive", help="Also read images in subfolders."),
    passes: int = typer.Option(2, "--passes", hidden=True, help="3 = the release's three-pass search step."),
) -> None:
    """Adapt a dehazing backbone to real haze: bilevel site search (stage A), then top-k LoRA (stage B)."""
    import torch

    from bilalora import backbones
    from bilalora.adapt import AdaptConfig, adapt, candidate_sites
    from bilalora.data import list_images
    from bilalora.errors import UserError
    from bilalora.objectives import build_objective
    from bilalora.runs import adapt_root, new_run_dir
    from bilalora.search import OptimConfig

    device = resolve_device(device)
    torch.manual_seed(seed)
    if backbone is None:
        backbone = backbones.default_backbone()
    if weights is None and backbones.shipped_weights(backbone) is None and ":" not in backbone:
        raise UserError(
            f"backbone '{backbone}' has no shipped weights in this installation; pass --weights FILE "
            "(a checkpoint trained on synthetic pairs, e.g. from `bilalora pretrain`)"
        )
    config = AdaptConfig(
        method=method,
        sites=parse_list(sites),
        exclude_sites=parse_list(exclude_sites),
        top_k=top_k,
        rank=rank,
        lora_alpha=lora_alpha,
        epochs=epochs,
        search_epochs=search_epochs,
        batch=batch,
        crop=crop,
        seed=seed,
        precision=precision,
        passes=passes,
        checkpoint_every=checkpoint_every,
        max_side=max_side,
        recursive=recursive,
        workers=workers,
        optim=OptimConfig(lr=lr, gate_lr=gate_lr, clip_norm=clip_norm),
    )
    config.validate()
    if not resume:
        list_images(images, recursive=recursive)  # a bad folder fails before CLIP loads
    model = backbones.load(backbone, weights=weights)
    if not resume and method != "full":
        candidate_sites(model, config)  # bad --sites patterns fail before CLIP loads
    options = {
        "clip": clip,
        "pretrained": clip_pretrained,
        "clip_config": str(clip_config) if clip_config else None,
        "negative": negative,
        "positive": positive,
        "night": night or None,
    }
    loss = build_objective(objective, **{k: v for k, v in options.items() if v is not None})
    run_dir = _choose_run_dir(out, name, resume, adapt_root, new_run_dir)
    console.print(f"[bold]bilalora adapt[/] -> {run_dir}")
    console.print(
        f"backbone {backbone} ({model.bilalora_info['weights']}), objective {objective}, method {method}, "
        f"device {device}, top-k {top_k}, rank {rank}, alpha {lora_alpha:g}, epochs {epochs} "
        f"({search_epochs} search), batch {batch}, crop {crop}, lr {lr:g}, gate-lr {gate_lr:g}, seed {seed}"
    )
    console.print(f"[dim]{_DEFAULTS_NOTE}[/]")
    result = adapt(model, images, loss, config, run_dir, device=device, resume=resume, console=console)
    summary = result.summary
    moved = summary["movement"]
    if summary.get("selected"):
        console.print(f"selected sites: {', '.join(summary['selected'])}")
    console.print(
        f"validation half: mean |output change| {moved['mean_abs_output_change']:.4f}, objective "
        f"{moved['objective_before']:.4f} -> {moved['objective_after']:.4f}"
    )
    console.print(f"[green]saved[/] {result.artefact}  (summary.json, log.jsonl beside it)")
    if result.adapter is not None:
        console.print(f"next: bilalora export --merge --adapter {result.artefact}")


def _choose_run_dir(out, name, resume, adapt_root, new_run_dir) -> Path:
    from bilalora.errors import UserError

    if out is not None:
        return Path(out)
    root = adapt_root()
    if resume:
        if name:
            return root / name
        candidates = sorted(
            (p for p in root.glob("*") if (p / "checkpoints" / "last.pt").is_file()),
            key=lambda p: (p / "checkpoints" / "last.pt").stat().st_mtime_ns,
        )
        if not candidates:
            raise UserError(f"--resume: no interrupted run under {root}; name it with --out or --name")
        return candidates[-1]
    return new_run_dir(root, name)


os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
