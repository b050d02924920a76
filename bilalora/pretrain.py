"""Supervised pretraining of a dehazing backbone on hazy/clear pairs (docs/method.md, "Pretraining").

Recipe (defaults): L1 loss; Adam, lr 1e-4 cosine-annealed to 1e-6; batch 16;
random 256 crops with 90-degree rotations and flips; 10,000 steps. The backbone
is trained in the form its registry entry builds for training (DEA-Net: the
DEConv form) and the output file holds the plain network (safetensors) with a
JSON card beside it (:mod:`bilalora.card`). Tensors are channels-last by default
(on a 2-core Xeon a width-16 step of 8 crops of 128 took 0.77 s instead of
1.35 s). On CUDA the forward runs under bf16 autocast; on the CPU in fp32 unless
``precision="bf16"`` (0.57 s on a CPU with AMX).

:func:`pretrain` is a sequence of named steps: build the data mixture
(:mod:`bilalora.mixture`), start or resume the run (:func:`start_run`), train
(:func:`train_steps`, validating with :func:`bilalora.validation.evaluate_pairs` and
checkpointing with :mod:`bilalora.checkpoints`), then write the selected weights
and the card (:func:`write_outputs`).

Files (``work_dir``, default ``runs/pretrain/<out stem>/``):

* ``last.pt``            resumable state: train-form weights, Adam, schedule (closed-form cosine), step,
                         RNG state, best validation score (written atomically, read with ``weights_only=True``);
* ``best.safetensors``   plain weights of the best validation PSNR so far;
* ``log.jsonl``          one line per logged step and per validation;
* ``record.json``        a copy of the card.

Tensors: batches are float32 ``(B, 3, S, S)`` RGB in ``[0, 1]``; PSNR/SSIM are
computed on outputs clamped to ``[0, 1]``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import backbones
from .card import export_plain, model_card, plain_copy, without_rows
from .checkpoints import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .devices import autocast_factory, device_name
from .errors import UserError
from .io import append_jsonl, write_json
from .metrics.reference import psnr
from .mixture import TrainMixture
from .pairs import ClearFolder, PairedFolder
from .pretrain_config import PretrainConfig, PretrainResult, cosine_lr
from .validation import evaluate_pairs

__all__ = [
    "PretrainConfig",
    "PretrainResult",
    "RunState",
    "cosine_lr",
    "init_weights",
    "pretrain",
    "start_run",
    "train_steps",
    "write_outputs",
]

CKPT_FORMAT = "bilalora-pretrain-checkpoint/1"

#: Config keys whose change on --resume is worth a note (the run continues with the new values).
_RESUME_NOTED = ("crop", "batch", "seed", "steps", "lr", "lr_min", "synth_ratio", "artifacts")

ProgressFn = Callable[[int, int, dict], None]
MessageFn = Callable[[str], None]


# --------------------------------------------------------------------------- run state


@dataclass
class RunPaths:
    """Where a run writes: the weights ``out`` (card beside it) and the work folder's files."""

    out: Path
    work: Path

    @property
    def card(self) -> Path:
        return self.out.with_suffix(".json")

    @property
    def checkpoint(self) -> Path:
        return self.work / "last.pt"

    @property
    def best(self) -> Path:
        return self.work / "best.safetensors"

    @property
    def log(self) -> Path:
        return self.work / "log.jsonl"


@dataclass
class RunState:
    """Everything that changes while training (and what ``last.pt`` stores).

    Attributes:
        model: the training-form network on its device; optimizer: its Adam.
        precision: "fp32" or "bf16" (resolved from the config); channels_last: the memory format.
        step: steps done; best, last_val: validation records (without per-image rows) or None.
        history: every validation record; sessions: one dict per invocation (start/end step, device, time).
        seconds_before: training seconds of earlier sessions; started: this session's start (time.time()).
        loss_avg, psnr_avg: exponential moving averages of the training loss and batch PSNR.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    precision: str
    channels_last: bool
    step: int = 0
    best: dict | None = None
    last_val: dict | None = None
    history: list = field(default_factory=list)
    sessions: list = field(default_factory=list)
    seconds_before: float = 0.0
    started: float = field(default_factory=time.time)
    loss_avg: float | None = None
    psnr_avg: float | None = None

    @property
    def session(self) -> dict:
        return self.sessions[-1]

    def seconds(self) -> float:
        """Training seconds over all sessions so far."""
        return self.seconds_before + (time.time() - self.started)


# --------------------------------------------------------------------------- start


def build_train_model(name: str) -> nn.Module:
    """The backbone ``name`` in its training form (its spec's ``train_kwargs``), random weights."""
    spec = backbones.get_spec(name)
    return backbones.create(name, **(spec.train_kwargs or {}))


def init_weights(model: nn.Module, init: str) -> str:
    """Load starting weights into a (training-form) model; returns the file used.

    Args:
        model: the model being pretrained (built by :func:`build_train_model`).
        init: a weights file, or a registered backbone name whose shipped weights are used.
            Plain weights are lifted into the training form exactly by the spec's
            ``lift_state`` hook (DEA-Net: :func:`~bilalora.backbones.dea_net.lift_plain_state`).
    """
    from .backbones.checkpoint import load_into, read_state_dict

    path = Path(init)
    if not path.is_file():
        shipped = backbones.shipped_weights(init)
        if shipped is None:
            raise UserError(f"--init {init}: no such weights file, nor a backbone with shipped weights")
        path = shipped
    state = read_state_dict(path)
    spec = backbones.get_spec(model.bilalora_info["name"])
    if spec.lift_state is not None and not all(key in state for key in model.state_dict()):
        state = spec.lift_state(model, state)
    load_into(model, state, source=f"--init {init}")
    return str(path)


def _session_record(state_step: int, config: PretrainConfig, device: str, precision: str) -> dict:
    return {
        "start_step": state_step,
        "end_step": state_step,
        "steps_total": config.steps,
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "precision": precision,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": 0.0,
    }


def _restore(state: RunState, config: PretrainConfig, path: Path, say: MessageFn) -> None:
    """Load ``last.pt`` into ``state`` (weights, Adam, step, validation, history, RNG)."""
    saved = load_checkpoint(path, CKPT_FORMAT, hint="start without --resume, or pass --work-dir")
    recorded = saved["config"]
    if recorded.get("backbone") != config.backbone:
        raise UserError(f"--resume: {path} was trained as {recorded.get('backbone')}, not {config.backbone}")
    for key in _RESUME_NOTED:
        if recorded.get(key) != getattr(config, key):
            say(f"note: --{key.replace('_', '-')} was {recorded.get(key)} in the checkpoint, now {getattr(config, key)}")
    state.model.load_state_dict({k: v.float() for k, v in saved["model"].items()})
    if saved.get("optimizer") is not None:
        state.optimizer.load_state_dict(saved["optimizer"])
    else:
        say("light checkpoint: Adam moments restart")
    state.step = int(saved["step"])
    state.best, state.last_val = saved.get("best"), saved.get("last_val")
    state.seconds_before = float(saved.get("train_seconds", 0.0))
    state.history = list(saved.get("history", []))
    state.sessions = list(saved.get("sessions", []))
    set_rng_state(saved.get("rng", {}))
    say(f"resumed from {path} at step {state.step}/{config.steps}")


def start_run(config: PretrainConfig, device: str, paths: RunPaths, resume: bool, say: MessageFn) -> RunState:
    """Build the training-form model and its optimizer, from scratch, ``--init`` weights or ``last.pt``."""
    torch.manual_seed(config.seed)
    model = build_train_model(config.backbone)
    if config.init is not None and not resume:
        say(f"initialised from {init_weights(model, config.init)}")
    on_cuda = device.startswith("cuda")
    precision = ("bf16" if on_cuda else "fp32") if config.precision == "auto" else config.precision
    channels_last = True if config.channels_last is None else config.channels_last
    if on_cuda:
        torch.backends.cudnn.benchmark = True
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.999))
    state = RunState(model, optimizer, precision, channels_last)
    if resume:
        _restore(state, config, paths.checkpoint, say)
    state.sessions.append(_session_record(state.step, config, device, precision))
    state.started = time.time()
    return state


# --------------------------------------------------------------------------- train


def save_run(state: RunState, config: PretrainConfig, paths: RunPaths) -> None:
    """Write ``last.pt`` (full, or weights-only fp16 with ``light_checkpoints``)."""
    if config.light_checkpoints:
        model_state = {k: v.detach().to("cpu", torch.float16) for k, v in state.model.state_dict().items()}
        optimizer_state = None
    else:
        model_state = {k: v.detach().cpu() for k, v in state.model.state_dict().items()}
        optimizer_state = state.optimizer.state_dict()
    state.session.update(end_step=state.step, seconds=round(time.time() - state.started, 1))
    save_checkpoint(
        paths.checkpoint,
        {
            "format": CKPT_FORMAT,
            "config": asdict(config),
            "model": model_state,
            "optimizer": optimizer_state,
            "schedule": {"kind": "cosine", "lr": config.lr, "lr_min": config.lr_min, "steps": config.steps},
            "step": state.step,
            "best": state.best,
            "last_val": state.last_val,
            "history": state.history,
            "sessions": state.sessions,
            "train_seconds": state.seconds(),
            "rng": rng_state(),
        },
    )


def validate(state: RunState, val: PairedFolder | None, config: PretrainConfig, device: str, paths: RunPaths,
             say: MessageFn) -> None:
    """Score the model on ``val``; keep ``best.safetensors`` when the PSNR improved."""
    if val is None:
        return
    result = evaluate_pairs(state.model, val, device, config.val_crop, config.val_max, state.precision)
    state.last_val = {"step": state.step, **without_rows(result)}
    state.history.append(state.last_val)
    append_jsonl(paths.log, {"event": "val", **state.last_val})
    improved = state.best is None or state.last_val["psnr"] > state.best["psnr"]
    if improved:
        state.best = dict(state.last_val)
        export_plain(state.model, paths.best, config.dtype, {"step": state.step, "val": state.best})
    say(
        f"step {state.step}: val PSNR {state.last_val['psnr']:.2f} dB, SSIM {state.last_val['ssim']:.4f} "
        f"(n={state.last_val['n']}){' best' if improved else ''}"
    )


def optimizer_step(state: RunState, hazy: torch.Tensor, target: torch.Tensor, lr: float, device: str) -> None:
    """One L1 step on a batch ((B, 3, S, S) in [0, 1]); updates the loss and PSNR averages."""
    hazy = hazy.to(device, non_blocking=True)
    target = target.to(device, non_blocking=True)
    if state.channels_last:
        hazy = hazy.contiguous(memory_format=torch.channels_last)
    with autocast_factory(device, state.precision)():
        output = state.model(hazy)
    output = output.float()
    loss = F.l1_loss(output, target)
    if not torch.isfinite(loss):
        raise UserError(f"loss became {float(loss)} at step {state.step}; lower --lr or use --precision fp32")
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.step += 1
    batch_psnr = float(psnr(output.detach(), target).mean())
    loss_value = float(loss.detach())
    state.loss_avg = loss_value if state.loss_avg is None else 0.9 * state.loss_avg + 0.1 * loss_value
    state.psnr_avg = batch_psnr if state.psnr_avg is None else 0.9 * state.psnr_avg + 0.1 * batch_psnr


def _progress_info(state: RunState, lr: float) -> dict:
    info = {
        "loss": float("nan") if state.loss_avg is None else state.loss_avg,
        "psnr": float("nan") if state.psnr_avg is None else state.psnr_avg,
        "lr": lr,
    }
    shown = state.last_val if state.last_val is not None else state.best
    if shown is not None:
        info.update(val_psnr=shown["psnr"], val_ssim=shown["ssim"])
    return info


def train_steps(
    state: RunState,
    mixture: TrainMixture,
    val: PairedFolder | None,
    config: PretrainConfig,
    device: str,
    paths: RunPaths,
    on_progress: ProgressFn | None,
    say: MessageFn,
) -> bool:
    """Train from ``state.step`` to ``config.steps``, or until the time limit; returns whether all steps ran.

    Logs every ``log_every`` steps, validates every ``val_every`` steps and once at the
    end, and writes ``last.pt`` every ``ckpt_every`` steps or ``ckpt_minutes``, and on exit.
    """
    state.model.train()
    last_save = time.time()
    finished = True
    for _, hazy, target in mixture.iterate(state.step, config.steps, config.workers):
        lr = cosine_lr(config, state.step)
        optimizer_step(state, hazy, target, lr, device)
        step = state.step
        if step % config.log_every == 0 or step == config.steps:
            append_jsonl(paths.log, {"event": "train", "step": step, "loss": state.loss_avg, "psnr": state.psnr_avg,
                                     "lr": lr, "seconds": round(state.seconds(), 1)})
        if config.val_every and step % config.val_every == 0 and step < config.steps:
            validate(state, val, config, device, paths, say)
        if on_progress is not None:
            on_progress(step, config.steps, _progress_info(state, lr))
        now = time.time()
        if step % config.ckpt_every == 0 or now - last_save >= 60 * config.ckpt_minutes:
            save_run(state, config, paths)
            last_save = time.time()
        if config.time_limit_min and now - state.started >= 60 * config.time_limit_min and step < config.steps:
            finished = False
            say(f"time limit of {config.time_limit_min:g} min reached at step {step}; --resume continues")
            break
    if finished and (state.last_val is None or state.last_val["step"] != state.step):
        validate(state, val, config, device, paths, say)
    save_run(state, config, paths)
    return finished


# --------------------------------------------------------------------------- outputs


def _selected_model(state: RunState, config: PretrainConfig, paths: RunPaths) -> tuple[nn.Module, str]:
    """The network written to ``out`` and, in words, which one it is (best validated or last)."""
    if config.select == "best" and state.best is not None and paths.best.is_file():
        from safetensors.torch import load_file

        model = plain_copy(state.model)
        model.load_state_dict({k: v.float() for k, v in load_file(str(paths.best)).items()})
        return model, f"best validation PSNR (step {state.best['step']})"
    return state.model, f"last (step {state.step})"


def write_outputs(state: RunState, config: PretrainConfig, paths: RunPaths, data_summary: dict, device: str,
                  notes: list[str] | None, finished: bool) -> PretrainResult:
    """Write the selected plain weights to ``out``, the card beside them and ``record.json`` in the work folder."""
    model, selected = _selected_model(state, config, paths)
    fp = export_plain(model, paths.out, config.dtype, {"backbone": config.backbone, "step": state.step})
    record = model_card(config, model, paths.out, fp, state.step, data_summary, state.best, state.last_val,
                        state.seconds(), device, selected, notes)
    record["validation"]["history"] = state.history
    record["training"]["sessions"] = state.sessions
    write_json(paths.card, record)
    write_json(paths.work / "record.json", record)
    return PretrainResult(paths.out, paths.card, state.step, finished, state.best, state.last_val, fp, record)


def _paths(out: str | Path, work_dir: str | Path | None) -> RunPaths:
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise UserError(f"--out {out}: the weights file must end in .safetensors")
    work = Path(work_dir) if work_dir is not None else Path("runs") / "pretrain" / out.stem
    work.mkdir(parents=True, exist_ok=True)
    return RunPaths(out, work)


def _silent(message: str) -> None:
    """The default ``on_message``: say nothing."""


# --------------------------------------------------------------------------- pretrain


def pretrain(
    config: PretrainConfig,
    out: str | Path,
    pairs: PairedFolder | None = None,
    clear: ClearFolder | None = None,
    val: PairedFolder | None = None,
    device: str = "cpu",
    work_dir: str | Path | None = None,
    resume: bool = False,
    notes: list[str] | None = None,
    on_progress: ProgressFn | None = None,
    on_message: MessageFn | None = None,
) -> PretrainResult:
    """Train ``config.backbone`` on pairs and/or synthesised pairs; write plain weights and a card.

    Args:
        config: the recipe.
        out: destination ``.safetensors`` of the plain network; the card is ``out`` with ``.json``.
        pairs, clear: training sources (at least one).
        val: validation pairs (PSNR/SSIM every ``val_every`` steps; the best is kept).
        device: torch device string.
        work_dir: checkpoints and log (default ``runs/pretrain/<out stem>``).
        resume: continue from ``work_dir/last.pt``.
        notes: free lines stored in the card (e.g. data licences).
        on_progress: called as ``on_progress(step, steps, info)`` after every step;
            ``info`` has ``loss``, ``psnr`` (train batch), ``lr`` and, once validated, ``val_psnr``, ``val_ssim``.
        on_message: called with one-line status messages.

    Returns:
        :class:`PretrainResult`. ``out`` holds the best validated weights when ``val``
        is given and ``config.select == "best"``, else the last; the card says which,
        and ``work_dir/best.safetensors`` keeps the best either way.
    """
    config.check()
    say = on_message or _silent
    paths = _paths(out, work_dir)
    mixture = TrainMixture(
        pairs, clear, config.synth_ratio, config.batch, config.crop, config.seed, artifacts=config.artifacts
    )
    data_summary = {**mixture.summary(), **({"validation": val.summary()} if val is not None else {})}
    state = start_run(config, device, paths, resume, say)
    finished = True
    if state.step < config.steps:
        finished = train_steps(state, mixture, val, config, device, paths, on_progress, say)
    elif state.last_val is None or state.last_val["step"] != state.step:
        validate(state, val, config, device, paths, say)
    return write_outputs(state, config, paths, data_summary, device, notes, finished)
