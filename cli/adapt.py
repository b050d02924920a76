"""``bilalora adapt``: adapt a backbone to a folder of real hazy images."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from bilalora.parsing import parse_list

from .common import console, resolve_device, user_errors

_DEFAULTS_NOTE = ("defaults follow the paper's release (docs/method.md) except --lr and --gate-lr, chosen by "
                  "measurement, the schedule, which is the cpu preset on the CPU (--schedule), and the search "
                  "space under --objective prior where the backbone declares one (DEA-Net: its level-1 blocks)")

#: CLI parameter -> AdaptConfig field (``optim.*`` for the optimiser), for the flags a resumed run compares.
_CONFIG_FIELDS = {
    "method": "method", "sites": "sites", "exclude_sites": "exclude_sites", "top_k": "top_k", "rank": "rank",
    "lora_alpha": "lora_alpha", "steps": "steps", "search_steps": "search_steps", "epochs": "epochs",
    "search_epochs": "search_epochs", "batch": "batch", "crop": "crop", "seed": "seed", "precision": "precision",
    "passes": "passes", "test_fraction": "test_fraction", "log_every": "log_every",
    "checkpoint_every": "checkpoint_every", "checkpoint_minutes": "checkpoint_minutes", "max_side": "max_side",
    "recursive": "recursive", "workers": "workers", "schedule": "schedule", "lr": "optim.lr",
    "gate_lr": "optim.gate_lr", "clip_norm": "optim.clip_norm", "hypergradient": "optim.hypergradient",
    "gate_optimizer": "optim.gate_optimizer",
}


@user_errors
def adapt_command(
    ctx: typer.Context,
    images: Path = typer.Option(..., "--images", "-i", help="Folder of unlabeled hazy images of the target domain."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default runs/adapt/<name>)."),
    name: Optional[str] = typer.Option(None, "--name", help="Run name under runs/adapt/ (default exp, exp2, ...)."),
    exist_ok: bool = typer.Option(False, "--exist-ok", help="Replace the earlier run in --out/--name (else refused)."),
    backbone: Optional[str] = typer.Option(
        None, "--backbone", "-b", help="Registry name or package.module:factory (default: the shipped DEA-Net)."
    ),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Base weights (default: shipped weights)."),
    input_norm: Optional[str] = typer.Option(
        None, "--input-norm", help="Input the weights expect: clip | none | MEAN,STD (default: what the file records, else none)."
    ),
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
    sites: Optional[str] = typer.Option(None, "--sites", help="Candidate sites (names/globs, comma separated; default: the backbone's search space, for "
                              "--objective prior its prior space if it declares one; see `bilalora sites`)."),
    exclude_sites: Optional[str] = typer.Option(None, "--exclude-sites", help="Sites to leave out (globs)."),
    top_k: int = typer.Option(3, "--top-k", "-k", help="Sites kept for stage B."),
    rank: int = typer.Option(8, "--rank", "-r", help="LoRA rank."),
    lora_alpha: float = typer.Option(16.0, "--lora-alpha", help="LoRA alpha (scale = alpha / rank)."),
    schedule: str = typer.Option(
        "auto", "--schedule",
        help="Preset of --batch, --crop, --search-steps, --steps, --max-side: paper (24, 224, 5 epochs but at least "
        "55 steps, 30 epochs but at least 330 steps, full size) | cpu (4, 96, 20, 60, 512) | auto (paper on a GPU, "
        "cpu on the CPU). Flags given explicitly win.",
    ),
    steps: Optional[int] = typer.Option(
        None, "--steps", help="Total steps, search included (default: the preset's; paper: 30 epochs, at least 330)."
    ),
    search_steps: Optional[int] = typer.Option(
        None, "--search-steps",
        help="Steps of stage A, bilevel/joint (default: the preset's; paper: 5 epochs, at least 55).",
    ),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Total length in passes over the train images."),
    search_epochs: Optional[int] = typer.Option(None, "--search-epochs", help="Stage A length in passes."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Batch size (default: the preset's, paper 24, cpu 4)."),
    crop: Optional[int] = typer.Option(
        None, "--crop", help="Training crop side, a multiple of 4 (default: the preset's, paper 224, cpu 96)."
    ),
    test_fraction: float = typer.Option(
        0.2, "--test-fraction", help="Images held out from both levels, for `bench` (at least 1 image from 3 on)."
    ),
    lr: float = typer.Option(1e-3, "--lr", help="LoRA learning rate, Adam (the release: 1e-6)."),
    gate_lr: float = typer.Option(3e-3, "--gate-lr", help="Gate learning rate (the release: 3e-4)."),
    gate_optimizer: Optional[str] = typer.Option(
        None, "--gate-optimizer", help="adam | sgd | normalized (default: the library default, shown in the banner)."
    ),
    hypergradient: Optional[str] = typer.Option(
        None, "--hypergradient",
        help="ift (the paper's) | release | direct (default: the library default, shown in the banner).",
    ),
    clip_norm: float = typer.Option(5.0, "--clip-norm", help="Gradient-norm clip of the LoRA step."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 on CUDA) | fp32 | bf16"),
    seed: int = typer.Option(0, "--seed", help="Seed of the split, crops and LoRA init."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out/--name (or the newest)."),
    workers: int = typer.Option(2, "--workers", help="Threads preparing batches ahead of the step (0: none)."),
    log_every: int = typer.Option(10, "--log-every", help="Steps between log lines and gate readings."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="Steps between checkpoints (0: stage ends)."),
    checkpoint_minutes: float = typer.Option(10.0, "--checkpoint-minutes", help="Minutes between checkpoints."),
    max_side: Optional[int] = typer.Option(
        None, "--max-side", help="Downsize larger images to this side first (default: the preset's, paper none, "
        "cpu 512; 0: full size)."
    ),
    recursive: bool = typer.Option(False, "--recursive", help="Also read images in subfolders."),
    passes: int = typer.Option(2, "--passes", hidden=True, help="3 = the release's three-pass search step."),
) -> None:
    """Adapt a dehazing backbone to real haze: bilevel site search (stage A), then top-k LoRA (stage B)."""
    import torch

    from bilalora import backbones
    from bilalora.adapt import AdaptConfig, adapt, candidate_sites
    from bilalora.adapt.config import resolve_preset
    from bilalora.data import list_images
    from bilalora.errors import UserError
    from bilalora.objectives import build_objective, parse_spec, spec_text
    from bilalora.runs import check_run_dir, choose_run_dir
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
    optim = {"lr": lr, "gate_lr": gate_lr, "clip_norm": clip_norm}
    optim.update({k: v for k, v in (("gate_optimizer", gate_optimizer), ("hypergradient", hypergradient)) if v})
    config = AdaptConfig(
        method=method, sites=parse_list(sites), exclude_sites=parse_list(exclude_sites), top_k=top_k, rank=rank,
        lora_alpha=lora_alpha, steps=steps, search_steps=search_steps, epochs=epochs, search_epochs=search_epochs,
        batch=batch, crop=crop, seed=seed, precision=precision, passes=passes, test_fraction=test_fraction,
        log_every=log_every, checkpoint_every=checkpoint_every, checkpoint_minutes=checkpoint_minutes,
        max_side=max_side, schedule=schedule.lower(), recursive=recursive, workers=workers,
        optim=_optim_config(OptimConfig, optim),
    )
    config.validate()
    if not resume:
        config = resolve_preset(config, device)  # the preset's values where flags were not given (shown below)
    if out is not None:
        check_run_dir(out, resume, exist_ok)  # an earlier run in --out is refused before anything loads
    if not resume:
        list_images(images, recursive=recursive)  # a bad folder fails before CLIP loads
    model = backbones.load(backbone, weights=weights, input_norm=input_norm)
    if not resume and method != "full":
        candidate_sites(model, config)  # bad --sites / --top-k fail before CLIP loads
    options = {
        "clip": clip,
        "pretrained": clip_pretrained,
        "clip_config": str(clip_config) if clip_config else None,
        "negative": negative,
        "positive": positive,
        "night": night or None,
    }
    backbone_options = {part: preset for part, _ in parse_spec(objective)
                        if (preset := (model.bilalora_info.get("objective_options") or {}).get(part))}
    loss = build_objective(objective, part_defaults=backbone_options,
                           **{k: v for k, v in options.items() if v is not None})
    run_dir = choose_run_dir(out, name, resume, exist_ok)
    console.print(f"[bold]bilalora adapt[/] -> {run_dir}")
    for part, preset in backbone_options.items():
        console.print(f"objective options of {backbone}: {spec_text(part, preset)} (its registry entry, chosen on "
                      f"its own validation halves; options written in --objective win)")
    if resume:
        console.print(f"backbone {backbone} ({model.bilalora_info['weights']}), objective {objective}, device {device}; "
                      "the interrupted run's settings apply")
    else:
        console.print(
            f"backbone {backbone} ({model.bilalora_info['weights']}), objective {objective}, method {method}, "
            f"device {device}, top-k {top_k}, rank {rank}, alpha {lora_alpha:g}, batch {config.batch}, "
            f"crop {config.crop}, lr {lr:g}, gate-lr {gate_lr:g} ({config.optim.gate_optimizer}), hypergradient "
            f"{config.optim.hypergradient}, seed {seed}"
        )
        console.print(f"[dim]{_DEFAULTS_NOTE}[/]")
    given = [field for param, field in _CONFIG_FIELDS.items() if _given(ctx, param)]
    result = adapt(model, images, loss, config, run_dir, device=device, resume=resume, exist_ok=exist_ok,
                   console=console, given=given)
    _report(result)


def _given(ctx: typer.Context, param: str) -> bool:
    """Whether the user set ``param`` (on the command line or through the environment), not its default."""
    source = ctx.get_parameter_source(param)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _optim_config(optim_type, values: dict):
    """OptimConfig from the flags; choices are checked by ``AdaptConfig.validate`` (one line naming the flag)."""
    optim = optim_type(**{k: v for k, v in values.items() if k not in ("gate_optimizer", "hypergradient")})
    for key in ("gate_optimizer", "hypergradient"):
        if key in values:
            setattr(optim, key, values[key])
    return optim


def _report(result) -> None:
    summary = result.summary
    moved = summary["movement"]
    if summary.get("selected"):
        console.print(f"selected sites: {', '.join(summary['selected'])}")
    if moved.get("images"):
        seen = "held out from both levels" if moved["split"] == "test" else "the gates' validation half"
        console.print(
            f"{moved['split']} split ({moved['images']} images, {seen}): mean |output change| "
            f"{moved['mean_abs_output_change']:.4f}, objective {moved['objective_before']:.4f} -> "
            f"{moved['objective_after']:.4f}"
        )
    console.print(f"[green]saved[/] {result.artefact}  (summary.json, log.jsonl, results.png beside it)")
    if result.adapter is not None:
        console.print(f"next: bilalora export --merge --adapter {result.artefact}")


os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
