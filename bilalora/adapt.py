"""Adaptation runs: stage A (site search) and stage B (top-k LoRA fine-tuning).

    run = adapt(model, "frames/", objective, AdaptConfig(method="bilevel"), run_dir="runs/adapt/exp")

Methods (docs/method.md):

* ``bilevel``: gated LoRA on every candidate site; gates on the validation
  half, LoRA on the train half, first-order hypergradient (stage A); then the
  top-k sites keep their stage-A LoRA, gates fixed, and are fine-tuned (stage B).
* ``joint``: stage A with gates and LoRA on the same train batches (plain gradient).
* ``manual``: ungated LoRA on the sites named by ``sites``; fine-tuning only.
* ``full``: all backbone weights fine-tuned; writes ``finetuned.safetensors``.

A run folder holds ``adapter.safetensors`` (or ``finetuned.safetensors``),
``summary.json``, ``log.jsonl`` (one line per step), ``split.json`` (the
train/validation images) and ``checkpoints/last.pt``. Batches are a pure
function of (seed, epoch, step), and the checkpoint holds the LoRA/gate state
and the optimisers, so a resumed run reaches the same adapter as an
uninterrupted one (on the CPU; GPU kernels may differ in the last bits).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import lora
from . import sites as site_lib
from .adapter import Adapter, fingerprint
from .data import CropBatches, ImageFolder, split_half, val_batches
from .devices import autocast_factory
from .errors import UserError
from .io import append_jsonl, atomic_path, read_json, write_json
from .search import (
    OptimConfig,
    bilevel_step,
    joint_step,
    make_gate_optimizer,
    make_lora_optimizer,
    rank_sites,
    train_step,
)

__all__ = ["AdaptConfig", "AdaptResult", "adapt", "METHODS", "ADAPTER_FILE", "FULL_FILE"]

METHODS = ("bilevel", "joint", "manual", "full")
ADAPTER_FILE = "adapter.safetensors"
FULL_FILE = "finetuned.safetensors"
CHECKPOINT = "checkpoints/last.pt"


@dataclass
class AdaptConfig:
    """Everything that defines a run (the release's defaults, docs/method.md, except the LoRA learning rate)."""

    method: str = "bilevel"
    sites: Optional[list[str]] = None
    exclude_sites: Optional[list[str]] = None
    top_k: int = 3
    rank: int = 8
    lora_alpha: float = 16.0
    epochs: int = 30
    search_epochs: int = 5
    batch: int = 24
    crop: int = 224
    seed: int = 0
    precision: str = "auto"
    passes: int = 2
    checkpoint_every: int = 50
    max_side: Optional[int] = None
    recursive: bool = False
    workers: int = 2
    max_bad_steps: int = 20
    move_threshold: float = 2e-3
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> None:
        """Raise a UserError naming the flag for inconsistent settings."""
        if self.method not in METHODS:
            raise UserError(f"--method {self.method}: use one of {', '.join(METHODS)}")
        if self.method == "manual" and not self.sites:
            raise UserError("--method manual needs --sites (site names or glob patterns; see `bilalora sites`)")
        if self.method in ("bilevel", "joint") and not 0 < self.search_epochs <= self.epochs:
            raise UserError(f"--search-epochs {self.search_epochs} must be between 1 and --epochs {self.epochs}")
        for flag, value in (("--top-k", self.top_k), ("--rank", self.rank), ("--batch", self.batch)):
            if value < 1:
                raise UserError(f"{flag} must be at least 1, got {value}")
        if self.crop < 8 or self.crop % 4:
            raise UserError(f"--crop {self.crop}: use a multiple of 4 of at least 8")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise UserError(f"--precision {self.precision}: use auto, fp32 or bf16")
        if self.passes not in (2, 3):
            raise UserError("passes must be 2 (bilalora) or 3 (the release's procedure)")

    def stages(self) -> list[tuple[str, int]]:
        """[(stage name, epochs)] of this method."""
        if self.method in ("bilevel", "joint"):
            return [("search", self.search_epochs), ("finetune", self.epochs - self.search_epochs)]
        return [("finetune", self.epochs)]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "AdaptConfig":
        data = dict(data)
        optim = data.pop("optim", {}) or {}
        for key in ("betas", "gate_betas"):
            if key in optim:
                optim[key] = tuple(optim[key])
        return cls(**data, optim=OptimConfig(**optim))


@dataclass
class AdaptResult:
    """What a run produced: its folder, the files written and the summary record."""

    run_dir: Path
    artefact: Path
    summary: dict[str, Any]
    adapter: Optional[Adapter] = None


class _Progress:
    """Rich progress reporting (a no-op when ``console`` is None)."""

    def __init__(self, console):
        self.console = console
        self.progress = None
        self.task = None

    def __enter__(self):
        if self.console is not None:
            from .progress import make_progress

            self.progress = make_progress(self.console)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def start(self, description: str, total: int, completed: int = 0):
        if self.progress is not None:
            if self.task is not None:
                self.progress.update(self.task, visible=True)
            self.task = self.progress.add_task(description, total=total, completed=completed, status="")

    def advance(self, status: str):
        if self.progress is not None:
            self.progress.update(self.task, advance=1, status=status)

    def print(self, text: str):
        if self.console is not None:
            self.console.print(text)


def candidate_sites(model: nn.Module, config: AdaptConfig) -> list[site_lib.Site]:
    pool = site_lib.discover(model) if config.sites else site_lib.default_sites(model)
    chosen = site_lib.select(pool, include=config.sites, exclude=config.exclude_sites)
    if not chosen:
        raise UserError("no candidate sites left after --sites/--exclude-sites; run `bilalora sites --all`")
    return chosen


def _load_split(run_dir: Path, folder: ImageFolder, seed: int, resume: bool) -> tuple[list[Path], list[Path], Optional[str]]:
    split_file = run_dir / "split.json"
    if resume and split_file.is_file():
        record = read_json(split_file)
        by_name = {str(p): p for p in folder.paths}
        try:
            return [by_name[n] for n in record["train"]], [by_name[n] for n in record["val"]], record.get("warning")
        except KeyError as missing:
            raise UserError(f"cannot resume: image {missing} of the interrupted run is gone from the folder") from None
    split = split_half(folder.paths, seed)
    write_json(split_file, {"seed": seed, "train": [str(p) for p in split.train], "val": [str(p) for p in split.val],
                            "warning": split.warning})
    return list(split.train), list(split.val), split.warning


class _Run:
    """The mutable state of one run: model structure, optimisers, counters."""

    def __init__(self, model, objective, config: AdaptConfig, device: str):
        self.model = model
        self.objective = objective
        self.config = config
        self.device = device
        self.stage_index = 0
        self.epoch = 0  # epoch within the current stage
        self.step = 0  # next step within the epoch
        self.global_step = 0
        self.bad_steps = 0
        self.bad_streak = 0
        self.selected: Optional[list[str]] = None
        self.ranking: Optional[list[tuple[str, float]]] = None
        self.stage_seconds: dict[str, float] = {}
        self.stage_steps: dict[str, int] = {}
        self.trainable: dict[str, int] = {}
        self.lora_optimizer = None
        self.gate_optimizer = None

    # ------------------------------------------------------------ structure
    def build_stage(self, stage: str) -> None:
        config, model = self.config, self.model
        if config.method == "full":
            for param in model.parameters():
                param.requires_grad_(True)
            self.lora_optimizer = make_lora_optimizer(model.parameters(), config.optim)
        elif stage == "search":
            lora.inject(model, candidate_sites(model, config), config.rank, config.lora_alpha, gated=True)
            lora.freeze_base(model)
            self.lora_optimizer = make_lora_optimizer(lora.lora_parameters(model), config.optim)
            self.gate_optimizer = make_gate_optimizer(lora.gate_parameters(model), config.optim)
        elif config.method == "manual":
            lora.inject(model, candidate_sites(model, config), config.rank, config.lora_alpha, gated=False)
            lora.freeze_base(model)
            self.selected = list(lora.site_gates(model))
            self.lora_optimizer = make_lora_optimizer(lora.lora_parameters(model), config.optim)
        else:  # stage B of bilevel/joint: keep the top-k sites' stage-A LoRA, gates fixed
            self.ranking = rank_sites(model)
            self.selected = [name for name, _ in self.ranking[: config.top_k]]
            lora.keep_sites(model, self.selected)
            self.lora_optimizer = make_lora_optimizer(lora.lora_parameters(model), config.optim)
            self.gate_optimizer = None
        self.model.to(self.device)
        self.trainable[stage] = lora.count_parameters(model, trainable_only=True)

    # ---------------------------------------------------------- checkpoints
    def state(self) -> dict:
        model = self.model
        record = {
            "config": self.config.as_dict(),
            "stage_index": self.stage_index,
            "epoch": self.epoch,
            "step": self.step,
            "global_step": self.global_step,
            "bad_steps": self.bad_steps,
            "selected": self.selected,
            "ranking": self.ranking,
            "stage_seconds": self.stage_seconds,
            "stage_steps": self.stage_steps,
            "trainable": self.trainable,
            "lora_optimizer": self.lora_optimizer.state_dict() if self.lora_optimizer else None,
            "gate_optimizer": self.gate_optimizer.state_dict() if self.gate_optimizer else None,
        }
        if self.config.method == "full":
            record["weights"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        else:
            record["lora"] = lora.lora_state_dict(model)
            record["gates"] = {name: gate.logit.detach().cpu() for name, gate in lora.site_gates(model).items()}
            record["gated"] = {name: gate.gated for name, gate in lora.site_gates(model).items()}
        return record

    def save(self, run_dir: Path) -> None:
        with atomic_path(run_dir / CHECKPOINT) as tmp:
            torch.save(self.state(), tmp)

    def restore(self, record: dict, stages: list[tuple[str, int]]) -> None:
        for key in ("stage_index", "epoch", "step", "global_step", "bad_steps", "selected", "stage_seconds",
                    "stage_steps", "trainable"):
            setattr(self, key, record[key])
        self.ranking = [tuple(item) for item in record["ranking"]] if record["ranking"] else None
        stage = stages[self.stage_index][0] if self.stage_index < len(stages) else stages[-1][0]
        if self.config.method == "full":
            self.build_stage(stage)
            self.model.load_state_dict(record["weights"])
        elif stage == "search" or self.config.method == "manual":
            self.build_stage(stage)
        else:
            lora.inject(self.model, site_lib.by_name(self.model, self.selected), self.config.rank,
                        self.config.lora_alpha)
            lora.freeze_base(self.model)
            self.lora_optimizer = make_lora_optimizer(lora.lora_parameters(self.model), self.config.optim)
            self.model.to(self.device)
        if self.config.method != "full":
            lora.load_lora_state_dict(self.model, record["lora"])
            with torch.no_grad():
                for name, gate in lora.site_gates(self.model).items():
                    gate.logit.copy_(record["gates"][name])
                    gate.gated = record["gated"][name]
                    gate.logit.requires_grad_(stage == "search" and gate.gated)
        if record["lora_optimizer"] and self.lora_optimizer:
            self.lora_optimizer.load_state_dict(record["lora_optimizer"])
        if record["gate_optimizer"] and self.gate_optimizer:
            self.gate_optimizer.load_state_dict(record["gate_optimizer"])


class _GracefulInterrupt:
    """The first Ctrl-C lets the current step finish (the loop then checkpoints and stops); a second one kills."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous = signal.getsignal(signal.SIGINT)

            def handler(signum, frame):
                if self.requested:
                    raise KeyboardInterrupt
                self.requested = True

            signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            import signal

            signal.signal(signal.SIGINT, self.previous)


class _Prefetch:
    """Prepare the next train batches in worker threads while the current step runs.

    Batches are a pure function of (epoch, step), so prefetching changes nothing
    but the wall time.
    """

    def __init__(self, batches: CropBatches, workers: int, ahead: int = 2):
        self.batches = batches
        self.workers = workers
        self.ahead = ahead
        self.pending: dict = {}
        self.pool = None

    def __enter__(self):
        if self.workers > 0:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=self.workers)
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def get(self, epoch: int, step: int, steps_per_epoch: int) -> torch.Tensor:
        if self.pool is None:
            return self.batches.batch(epoch, step)
        for offset in range(self.ahead + 1):
            e, s = epoch + (step + offset) // steps_per_epoch, (step + offset) % steps_per_epoch
            if (e, s) not in self.pending:
                self.pending[(e, s)] = self.pool.submit(self.batches.batch, e, s)
        batch = self.pending.pop((epoch, step)).result()
        for key in [k for k in self.pending if k < (epoch, step)]:
            self.pending.pop(key).cancel()
        return batch


@torch.no_grad()
def _movement(base: nn.Module, adapted: nn.Module, objective, batches, autocast, device) -> dict:
    """Mean |adapted(x) - base(x)| and the objective before/after on the validation half."""
    change, before, after, count = 0.0, 0.0, 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        with autocast():
            base_out = base(batch).float()
            adapted_out = adapted(batch).float()
        change += float((adapted_out - base_out).abs().mean()) * len(batch)
        before += float(objective(base_out, batch)) * len(batch)
        after += float(objective(adapted_out, batch)) * len(batch)
        count += len(batch)
    return {
        "mean_abs_output_change": change / count,
        "objective_before": before / count,
        "objective_after": after / count,
        "images": count,
    }


def adapt(
    model: nn.Module,
    images: str | Path,
    objective,
    config: AdaptConfig,
    run_dir: str | Path,
    device: str = "cpu",
    resume: bool = False,
    console=None,
    on_step: Optional[Callable[[int, dict], None]] = None,
) -> AdaptResult:
    """Adapt ``model`` to the hazy images in ``images``; write the run into ``run_dir``.

    Args:
        model: the backbone, (N, 3, H, W) in [0, 1] -> same; modified in place.
        images: folder of unlabeled hazy images.
        objective: callable (output, hazy) -> 0-d loss, with ``describe()``.
        config: the run's settings (on resume, the checkpoint's settings win).
        run_dir: output folder (created).
        device: torch device string.
        resume: continue from ``run_dir/checkpoints/last.pt``.
        console: a rich Console for progress and messages, or None for silence.
        on_step: called after every step with (global step, log record); may raise to interrupt.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = run_dir / CHECKPOINT
    record = None
    if resume:
        if not checkpoint_path.is_file():
            raise UserError(f"--resume: no checkpoint at {checkpoint_path}; start a new run without --resume")
        record = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        config = AdaptConfig.from_dict(record["config"])
    config.validate()
    say = console.print if console is not None else (lambda *_: None)

    folder = ImageFolder(images, recursive=config.recursive, max_side=config.max_side)
    skipped_line = folder.report_skipped()
    if skipped_line:
        say(f"[yellow]warning:[/] {skipped_line}")
    train_paths, val_paths, split_warning = _load_split(run_dir, folder, config.seed, resume)
    if split_warning:
        say(f"[yellow]warning:[/] {split_warning}")
    by_path = {p: folder[i] for i, p in enumerate(folder.paths)}
    train_images = [by_path[p] for p in train_paths]
    val_images = [by_path[p] for p in val_paths]
    train_batches = CropBatches(train_images, config.batch, config.crop, config.seed)
    val_sampler = CropBatches(val_images, config.batch, config.crop, config.seed + 1)

    model.eval()  # DEA-Net has no dropout/batch-norm; eval keeps any such layer deterministic
    base_fingerprint = fingerprint(model)
    base_model = copy.deepcopy(model).to(device).eval()
    for param in base_model.parameters():
        param.requires_grad_(False)
    objective.to(device)
    # channels-last on every device: also 1.55x faster per adapt step on a 2-core CPU (dea-net-s, batch 4 of 128)
    model.to(memory_format=torch.channels_last)
    autocast = autocast_factory(device, config.precision)
    stages = config.stages()
    run = _Run(model.to(device), objective, config, device)
    if record is not None:
        run.restore(record, stages)
        say(f"resuming {run_dir} at stage {stages[min(run.stage_index, len(stages) - 1)][0]}, "
            f"epoch {run.epoch + 1}, step {run.step} (global step {run.global_step})")
    else:
        run.build_stage(stages[0][0])
        (run_dir / "log.jsonl").unlink(missing_ok=True)

    steps_per_epoch = train_batches.steps_per_epoch
    log_path = run_dir / "log.jsonl"
    started = time.time()
    with _Progress(console) as progress, _Prefetch(train_batches, config.workers) as prefetch, \
            _GracefulInterrupt() as interrupt:
        try:
            while run.stage_index < len(stages):
                stage, stage_epochs = stages[run.stage_index]
                total = stage_epochs * steps_per_epoch
                progress.start(f"{stage}", total, completed=run.epoch * steps_per_epoch + run.step)
                stage_started = time.time() - run.stage_seconds.get(stage, 0.0)
                while run.epoch < stage_epochs:
                    epoch_key = sum(e for _, e in stages[: run.stage_index]) + run.epoch
                    while run.step < steps_per_epoch:
                        step_started = time.time()
                        batch = prefetch.get(epoch_key, run.step, steps_per_epoch).to(device)
                        batch = batch.contiguous(memory_format=torch.channels_last)
                        if stage == "search" and config.method == "bilevel":
                            val_index = run.global_step % val_sampler.steps_per_epoch
                            val_epoch = run.global_step // val_sampler.steps_per_epoch
                            val_batch = val_sampler.batch(val_epoch, val_index).to(device)
                            val_batch = val_batch.contiguous(memory_format=torch.channels_last)
                            result = bilevel_step(model, objective, batch, val_batch, run.lora_optimizer,
                                                  run.gate_optimizer, config.optim, config.passes, autocast)
                        elif stage == "search":
                            result = joint_step(model, objective, batch, run.lora_optimizer, run.gate_optimizer,
                                                config.optim, autocast)
                        else:
                            result = train_step(model, objective, batch, run.lora_optimizer, config.optim, autocast)
                        if result.skipped:
                            run.bad_steps += 1
                            run.bad_streak += 1
                            if run.bad_streak >= config.max_bad_steps:
                                raise UserError(
                                    f"the loss was NaN/inf for {run.bad_streak} steps in a row; lower --lr "
                                    f"(now {config.optim.lr:g}) or use --precision fp32"
                                )
                        else:
                            run.bad_streak = 0
                        run.step += 1
                        run.global_step += 1
                        run.stage_steps[stage] = run.stage_steps.get(stage, 0) + 1
                        entry = {
                            "step": run.global_step,
                            "stage": stage,
                            "epoch": run.epoch + 1,
                            **result.as_dict(),
                            "lr": run.lora_optimizer.param_groups[0]["lr"],
                            "seconds": round(time.time() - step_started, 4),
                        }
                        if stage == "search":
                            entry["gates"] = {k: round(v, 6) for k, v in lora.gate_values(model).items()}
                        append_jsonl(log_path, entry)
                        run.stage_seconds[stage] = time.time() - stage_started
                        progress.advance(f"epoch {run.epoch + 1}/{stage_epochs} loss {result.train_loss:.4f}")
                        if config.checkpoint_every and run.global_step % config.checkpoint_every == 0:
                            run.save(run_dir)
                        if on_step is not None:
                            on_step(run.global_step, entry)
                        if interrupt.requested:
                            run.save(run_dir)
                            raise KeyboardInterrupt
                    run.epoch += 1
                    run.step = 0
                    if stage == "search":
                        ranking = rank_sites(model)
                        shown = ", ".join(f"{name} {value:.4f}" for name, value in ranking[: max(config.top_k, 5)])
                        progress.print(f"  gates after epoch {run.epoch}: {shown}")
                    run.save(run_dir)
                run.stage_index += 1
                run.epoch = 0
                if run.stage_index < len(stages):
                    run.build_stage(stages[run.stage_index][0])
                    if run.selected and stage == "search":
                        progress.print(f"  selected top-{config.top_k}: {', '.join(run.selected)}")
                run.save(run_dir)
        except KeyboardInterrupt:
            say(f"[yellow]interrupted[/]: progress up to global step {run.global_step} is in {checkpoint_path}; "
                "continue with --resume")
            raise

    model.eval()
    movement = _movement(base_model, model, objective, val_batches(val_images, config.crop, config.batch), autocast,
                         device)
    adapter = None
    meta = {
        "method": config.method,
        "objective": objective.describe() if hasattr(objective, "describe") else {"name": type(objective).__name__},
        "schedule": {k: v for k, v in config.as_dict().items() if k not in ("sites", "exclude_sites")},
        "seed": config.seed,
        "data": {"folder": str(images), "train": len(train_paths), "val": len(val_paths),
                 "skipped": len(folder.skipped)},
        "ranking": [[name, value] for name, value in (run.ranking or [])],
        "movement": movement,
    }
    if config.method == "full":
        from safetensors.torch import save_file

        artefact = run_dir / FULL_FILE
        with atomic_path(artefact) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp),
                      metadata={"bilalora": "full fine-tune", "base_fingerprint": base_fingerprint})
    else:
        adapter = Adapter.from_model(model, run.selected, **meta)
        adapter.base_fingerprint = base_fingerprint
        artefact = adapter.save(run_dir / ADAPTER_FILE)

    info = getattr(model, "bilalora_info", {}) or {}
    summary = {
        "method": config.method,
        "backbone": info.get("name"),
        "weights": info.get("weights"),
        "base_fingerprint": base_fingerprint,
        "artefact": str(artefact),
        "device": device,
        "precision": "bf16" if autocast is not contextlib.nullcontext else "fp32",
        "objective": meta["objective"],
        "config": config.as_dict(),
        "ranking": meta["ranking"],
        "selected": run.selected,
        "trainable_parameters": run.trainable,
        "stages": {
            stage: {
                "seconds": round(run.stage_seconds.get(stage, 0.0), 3),
                "steps": run.stage_steps.get(stage, 0),
                "seconds_per_step": round(run.stage_seconds.get(stage, 0.0) / max(run.stage_steps.get(stage, 0), 1), 4),
            }
            for stage, _ in stages
        },
        "wall_seconds_this_session": round(time.time() - started, 3),
        "skipped_steps": run.bad_steps,
        "data": {**folder.summary(), "train": len(train_paths), "val": len(val_paths)},
        "movement": movement,
        "negligible_change": movement["mean_abs_output_change"] < config.move_threshold,
    }
    write_json(run_dir / "summary.json", summary)
    if summary["negligible_change"]:
        say(f"[yellow]warning:[/] the adapted model barely differs from the base (mean |change| "
            f"{movement['mean_abs_output_change']:.2e} < {config.move_threshold:g}); raise --lr or --epochs")
    return AdaptResult(run_dir, artefact, summary, adapter)
