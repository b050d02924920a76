"""Supervised pretraining of a dehazing backbone on hazy/clear pairs (docs/method.md, "Pretraining").

Recipe (defaults): L1 loss; Adam, lr 1e-4 cosine-annealed to 1e-6; batch 16;
random 256 crops with 90-degree rotations and flips; 10,000 steps. DEA-Net is
trained in its DEConv form (``create(name, train_form=True)``) and the output
file holds the re-parameterised plain network (safetensors) with a JSON card
beside it. Tensors are channels-last by default (on a 2-core Xeon a width-16
step of 8 crops of 128 took 0.77 s instead of 1.35 s). On CUDA the forward runs
under bf16 autocast; on the CPU in fp32 unless ``precision="bf16"`` (0.57 s on
a CPU with AMX).

Training data is a mixture of matched pairs (:class:`bilalora.pairs.PairedFolder`)
and clear photos with synthesised haze (:class:`bilalora.pairs.ClearFolder`).
Sample ``i`` of step ``s`` is drawn with ``numpy.random.default_rng([seed, s, i])``
(source, image, crop, haze, rotation, flip), so a batch is a pure function of
``(seed, step)`` and a resumed run sees exactly the data an uninterrupted run would.

Files (``work_dir``, default ``runs/pretrain/<out stem>/``):

* ``last.pt``            resumable state: train-form weights, Adam, schedule (closed-form cosine), step,
                         RNG state, best validation score (written atomically);
* ``best.safetensors``   plain weights of the best validation PSNR so far;
* ``log.jsonl``          one line per logged step and per validation.

Tensors: batches are float32 ``(B, 3, S, S)`` RGB in ``[0, 1]``; PSNR/SSIM are
computed on outputs clamped to ``[0, 1]``.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import backbones
from .adapter import fingerprint
from .devices import autocast_factory, device_name
from .errors import UserError
from .io import append_jsonl, atomic_path, write_json
from .padding import crop_to, pad_to_multiple
from .pairs import ClearFolder, PairedFolder

__all__ = [
    "PretrainConfig",
    "PretrainResult",
    "TrainMixture",
    "cosine_lr",
    "evaluate",
    "export_plain",
    "model_card",
    "pretrain",
    "psnr",
    "ssim",
]

CKPT_FORMAT = "bilalora-pretrain-checkpoint/1"
CARD_FORMAT = "bilalora-weights-card/1"


# --------------------------------------------------------------------------- metrics


def psnr(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (N, 3, H, W) tensors in [0, 1] (output clamped). Returns (N,)."""
    mse = (output.clamp(0, 1).float() - target.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _gaussian_window(size: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # (1, 1, size, size)


def ssim(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of (N, 3, H, W) tensors in [0, 1]. Returns (N,).

    11x11 Gaussian window (sigma 1.5), valid region only, K1 = 0.01, K2 = 0.03,
    computed per channel and averaged over channels and positions (output clamped).
    """
    x = output.clamp(0, 1).float()
    y = target.float()
    channels = x.shape[1]
    window = _gaussian_window(device=x.device).expand(channels, 1, 11, 11)
    if min(x.shape[-2:]) < 11:
        window = _gaussian_window(size=min(x.shape[-2:]) | 1, device=x.device)
        window = window.expand(channels, 1, *window.shape[-2:])

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    score = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return score.flatten(1).mean(1)


# --------------------------------------------------------------------------- config


@dataclass
class PretrainConfig:
    """Everything that defines a pretraining run (recorded in checkpoints and the card).

    Attributes:
        backbone: registry name; its factory must accept ``train_form=True`` for DEConv training.
        steps: optimiser steps in total (the cosine schedule spans them).
        batch: crops per step.
        crop: crop side in pixels.
        lr, lr_min: cosine schedule from ``lr`` to ``lr_min``.
        synth_ratio: probability that a sample is synthesised from ``--clear`` (None:
            0 with pairs only, 1 with clear photos only, 0.5 with both).
        seed: data and init seed.
        val_every: validate every this many steps (0: only at the end).
        ckpt_every: write ``last.pt`` every this many steps ...
        ckpt_minutes: ... or after this many minutes, whichever comes first.
        log_every: a log line every this many steps.
        time_limit_min: stop after this many minutes of this session (0: none),
            writing the checkpoint and the output so that ``--resume`` continues.
        precision: "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32" or "bf16".
        channels_last: use channels-last tensors (None: yes).
        val_crop: validate on centred squares of this side (0: whole images, padded to 4).
        val_max: validate on at most this many pairs (0: all).
        max_side: downsize training images whose longer side exceeds it (0: keep).
        workers: threads preparing batches ahead of the GPU/CPU.
        dtype: "fp16" or "fp32" for the exported weights.
        light_checkpoints: store only the train-form weights in fp16 in ``last.pt``
            (no Adam moments: about a quarter of the size; Adam restarts on resume).
        select: which weights go to ``out``: "best" (best validation PSNR; the last
            when there is no validation) or "last".
        init: start from these weights instead of a random init: a weights file (plain or
            training form) or the name of a backbone with shipped weights (e.g. "dea-net-s").
            Ignored on ``--resume`` (the checkpoint holds the weights).
    """

    backbone: str = "dea-net"
    steps: int = 10_000
    batch: int = 16
    crop: int = 256
    lr: float = 1e-4
    lr_min: float = 1e-6
    synth_ratio: float | None = None
    seed: int = 0
    val_every: int = 500
    ckpt_every: int = 500
    ckpt_minutes: float = 5.0
    log_every: int = 10
    time_limit_min: float = 0.0
    precision: str = "auto"
    channels_last: bool | None = None
    val_crop: int = 0
    val_max: int = 0
    max_side: int = 0
    workers: int = 2
    dtype: str = "fp16"
    light_checkpoints: bool = False
    select: str = "best"
    init: str | None = None

    def check(self) -> None:
        """Raise a UserError naming the flag of the first invalid value."""
        if self.steps < 1:
            raise UserError(f"--steps must be at least 1, got {self.steps}")
        if self.batch < 1:
            raise UserError(f"--batch must be at least 1, got {self.batch}")
        if self.crop < 8 or self.crop % 4:
            raise UserError(f"--crop must be a multiple of 4 and at least 8, got {self.crop}")
        if not 0 < self.lr_min <= self.lr:
            raise UserError(f"--lr {self.lr} and --lr-min {self.lr_min}: need 0 < lr-min <= lr")
        if self.synth_ratio is not None and not 0.0 <= self.synth_ratio <= 1.0:
            raise UserError(f"--synth-ratio must be in [0, 1], got {self.synth_ratio}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise UserError(f"--precision {self.precision}: use auto, fp32 or bf16")
        if self.dtype not in ("fp16", "fp32"):
            raise UserError(f"--dtype {self.dtype}: use fp16 or fp32")
        if self.select not in ("best", "last"):
            raise UserError(f"--select {self.select}: use best or last")
        if self.val_crop and self.val_crop % 4:
            raise UserError(f"--val-crop must be a multiple of 4 (or 0 for whole images), got {self.val_crop}")


@dataclass
class PretrainResult:
    """What :func:`pretrain` produced.

    Attributes:
        out: the plain weights file; card: its JSON card; step: steps done;
        finished: all steps done (False: stopped by the time limit);
        best: best validation record (``{"step", "psnr", "ssim"}``) or None;
        last_val: the last validation record or None; fingerprint: of the written weights;
        record: the card as a dict.
    """

    out: Path
    card: Path
    step: int
    finished: bool
    best: dict | None
    last_val: dict | None
    fingerprint: str
    record: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- data


class TrainMixture:
    """Batches mixing matched pairs and synthesised pairs, a pure function of (seed, step).

    Args:
        pairs: matched pairs or None.
        clear: clear photos to synthesise from, or None.
        synth_ratio: probability of a synthesised sample (None: see :class:`PretrainConfig`).
        batch, crop, seed: as in :class:`PretrainConfig`.
    """

    def __init__(
        self,
        pairs: PairedFolder | None,
        clear: ClearFolder | None,
        synth_ratio: float | None,
        batch: int,
        crop: int,
        seed: int,
    ):
        if pairs is None and clear is None:
            raise UserError("no training data: give --pairs DIR and/or --clear DIR --synthesize")
        if synth_ratio is None:
            synth_ratio = 1.0 if pairs is None else (0.0 if clear is None else 0.5)
        if synth_ratio > 0 and clear is None:
            raise UserError(f"--synth-ratio {synth_ratio} needs --clear DIR --synthesize")
        if synth_ratio < 1 and pairs is None:
            raise UserError(f"--synth-ratio {synth_ratio} needs --pairs DIR for the paired part")
        self.pairs, self.clear = pairs, clear
        self.synth_ratio = float(synth_ratio)
        self.batch, self.crop, self.seed = batch, crop, seed

    def sample(self, step: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``index`` of ``step``: (hazy, clear) float32 (crop, crop, 3) in [0, 1]."""
        rng = np.random.default_rng([self.seed, int(step), int(index)])
        if rng.uniform() < self.synth_ratio:
            return self.clear.sample(int(rng.integers(len(self.clear))), self.crop, rng)
        return self.pairs.sample(int(rng.integers(len(self.pairs))), self.crop, rng)

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch of ``step``: (hazy, clear) float32 tensors (B, 3, crop, crop) in [0, 1]."""
        samples = [self.sample(step, i) for i in range(self.batch)]
        hazy = np.stack([s[0] for s in samples]).transpose(0, 3, 1, 2)
        clear = np.stack([s[1] for s in samples]).transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(hazy)), torch.from_numpy(np.ascontiguousarray(clear))

    def iterate(self, start: int, stop: int, workers: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(step, hazy, clear)`` for ``start <= step < stop``, prepared ``workers`` steps ahead."""
        if workers <= 0:
            for step in range(start, stop):
                yield (step, *self.batch_at(step))
            return
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pretrain-data") as pool:
            pending = {}
            for step in range(start, min(stop, start + workers + 1)):
                pending[step] = pool.submit(self.batch_at, step)
            for step in range(start, stop):
                hazy, clear = pending.pop(step).result()
                ahead = step + workers + 1
                if ahead < stop:
                    pending[ahead] = pool.submit(self.batch_at, ahead)
                yield step, hazy, clear

    def summary(self) -> dict:
        """JSON-ready description of the mixture."""
        return {
            "synth_ratio": self.synth_ratio,
            "pairs": self.pairs.summary() if self.pairs is not None else None,
            "synthesized_from": self.clear.summary() if self.clear is not None else None,
        }


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    val: PairedFolder,
    device: str = "cpu",
    crop: int = 0,
    max_pairs: int = 0,
    precision: str = "fp32",
    dehaze: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict:
    """Mean PSNR/SSIM of ``model`` (or of ``dehaze``) on validation pairs.

    Args:
        model: maps (1, 3, H, W) in [0, 1] to the same; ignored when ``dehaze`` is given.
        val: the pairs.
        device: torch device of ``model``.
        crop: evaluate centred squares of this side (0: whole images, reflect-padded to 4).
        max_pairs: the first this many pairs only (0: all).
        precision: "fp32" or "bf16" (autocast).
        dehaze: a numpy dehazer ``(H, W, 3) float32 -> (H, W, 3)`` (e.g. DCP) instead of the model.

    Returns:
        ``{"psnr": mean dB, "ssim": mean, "n": pairs, "per_image": [{"name", "psnr", "ssim"}]}``.
    """
    from .data import center_square_crop

    count = len(val) if not max_pairs else min(max_pairs, len(val))
    if model is not None:
        was_training = model.training
        model.eval()
    rows = []
    for index in range(count):
        hazy, clear = val.full(index)
        if crop:
            hazy, clear = center_square_crop(hazy, crop), center_square_crop(clear, crop)
        target = torch.from_numpy(clear.transpose(2, 0, 1).copy())[None]
        if dehaze is not None:
            output = torch.from_numpy(np.ascontiguousarray(dehaze(hazy).transpose(2, 0, 1)))[None]
        else:
            x = torch.from_numpy(hazy.transpose(2, 0, 1).copy())[None].to(device)
            x, size = pad_to_multiple(x, 4)
            with autocast_factory(device, precision)():
                output = crop_to(model(x), size).float().cpu()
        rows.append(
            {
                "name": val.pairs[index].hazy.name,
                "psnr": float(psnr(output, target)[0]),
                "ssim": float(ssim(output, target)[0]),
            }
        )
    if model is not None and was_training:
        model.train()
    return {
        "psnr": float(np.mean([r["psnr"] for r in rows])),
        "ssim": float(np.mean([r["ssim"] for r in rows])),
        "n": count,
        "crop": crop,
        "per_image": rows,
    }


# --------------------------------------------------------------------------- export


def _plain(model: nn.Module) -> nn.Module:
    """The inference form of ``model``: re-parameterised when it is a DEConv DEA-Net."""
    from .backbones.dea_net import DEANet, reparameterize

    if isinstance(model, DEANet) and model.train_form:
        return reparameterize(model)
    return model


def _export_state(model: nn.Module, dtype: str) -> dict[str, torch.Tensor]:
    """Plain weights as a CPU state dict in ``dtype`` (floating tensors only are cast)."""
    plain = _plain(model)
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    return {
        k: (v.detach().to("cpu", torch_dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in plain.state_dict().items()
    }


def export_plain(model: nn.Module, path: str | Path, dtype: str = "fp16", metadata: dict | None = None) -> str:
    """Write the plain (re-parameterised) weights of ``model`` to a safetensors file, atomically.

    Args:
        model: the training-form or plain network.
        path: destination ``.safetensors``.
        dtype: "fp16" or "fp32".
        metadata: stored as the file's ``bilalora`` metadata (JSON).

    Returns:
        The fingerprint (:func:`bilalora.adapter.fingerprint`) of the weights as stored,
        i.e. as ``backbones.load`` will see them.
    """
    from safetensors.torch import save_file

    state = _export_state(model, dtype)
    meta = {"format": CARD_FORMAT}
    if metadata:
        meta["bilalora"] = json.dumps(metadata)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return fingerprint(state)


def model_card(
    config: PretrainConfig,
    model: nn.Module,
    weights: Path,
    weights_fingerprint: str,
    step: int,
    data: dict,
    best: dict | None,
    last_val: dict | None,
    train_seconds: float,
    device: str,
    selected: str,
    notes: list[str] | None = None,
) -> dict:
    """The JSON card written beside the weights (see the README's pretraining section)."""
    plain = _plain(model)
    return {
        "format": CARD_FORMAT,
        "weights_file": weights.name,
        "backbone": config.backbone,
        "width": getattr(plain, "width", None),
        "parameters": int(sum(p.numel() for p in plain.parameters())),
        "dtype": config.dtype,
        "file_bytes": weights.stat().st_size if weights.exists() else None,
        "fingerprint": weights_fingerprint,
        "selected": selected,
        "steps_done": step,
        "training": {
            "recipe": "L1 loss, Adam (betas 0.9/0.999), cosine lr, random crops with 90-degree "
            "rotations and flips, DEConv training form re-parameterised to the plain network",
            **{k: v for k, v in asdict(config).items()},
            "device": device,
            "device_name": device_name(device),
            "train_seconds": round(train_seconds, 1),
            "torch": torch.__version__,
        },
        "data": data,
        "validation": {"best": _strip_rows(best), "last": _strip_rows(last_val)},
        "notes": list(notes or []),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _strip_rows(record: dict | None) -> dict | None:
    if record is None:
        return None
    return {k: v for k, v in record.items() if k != "per_image"}


# --------------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, str(tmp))


def _load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path} (start without --resume, or pass --work-dir)")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a broken file is the user's problem to hear about
        raise UserError(f"--resume: cannot read checkpoint {path}: {type(exc).__name__}") from None
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise UserError(f"--resume: {path} is not a bilalora pretraining checkpoint")
    return state


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- training


def cosine_lr(config: PretrainConfig, step: int) -> float:
    """Learning rate of (0-based) ``step``: ``lr_min + (lr - lr_min) * (1 + cos(pi * step / steps)) / 2``."""
    progress = min(max(step, 0), config.steps) / config.steps
    return config.lr_min + 0.5 * (config.lr - config.lr_min) * (1.0 + math.cos(math.pi * progress))


def _build_model(name: str) -> nn.Module:
    try:
        return backbones.create(name, train_form=True)
    except UserError:
        spec = backbones.get_spec(name)
        if "train_form" in spec.kwargs:
            raise
        return backbones.create(name)  # a user factory without a training form


def init_weights(model: nn.Module, init: str) -> str:
    """Load starting weights into a (training-form) model; returns the file used.

    Args:
        model: the model being pretrained.
        init: a weights file, or a registered backbone name whose shipped weights are used.
            Plain DEA-Net weights are lifted into the training form exactly
            (:func:`~bilalora.backbones.dea_net.lift_plain_state`).
    """
    from .backbones.checkpoint import load_into, read_state_dict
    from .backbones.dea_net import DEANet, lift_plain_state

    path = Path(init)
    if not path.is_file():
        shipped = backbones.shipped_weights(init)
        if shipped is None:
            raise UserError(f"--init {init}: no such weights file, nor a backbone with shipped weights")
        path = shipped
    state = read_state_dict(path)
    expected = model.state_dict()
    if isinstance(model, DEANet) and model.train_form and not all(key in state for key in expected):
        state = lift_plain_state(model, state)
    load_into(model, state, source=f"--init {init}")
    return str(path)


ProgressFn = Callable[[int, int, dict], None]


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
    on_message: Callable[[str], None] | None = None,
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
            ``info`` has ``loss``, ``psnr`` (train batch), ``lr``, ``val_psnr``, ``val_ssim``, ``phase``.
        on_message: called with one-line status messages.

    Returns:
        :class:`PretrainResult`. ``out`` holds the best validated weights when ``val``
        is given and ``config.select == "best"``, else the last; the card says which,
        and ``work_dir/best.safetensors`` keeps the best either way.
    """
    config.check()
    say = on_message or (lambda message: None)
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise UserError(f"--out {out}: the weights file must end in .safetensors")
    work = Path(work_dir) if work_dir is not None else Path("runs") / "pretrain" / out.stem
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path, best_path, log_path = work / "last.pt", work / "best.safetensors", work / "log.jsonl"

    mixture = TrainMixture(pairs, clear, config.synth_ratio, config.batch, config.crop, config.seed)
    torch.manual_seed(config.seed)
    model = _build_model(config.backbone)
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

    step, best, last_val, elapsed_before, history, sessions = 0, None, None, 0.0, [], []
    if resume:
        state = _load_checkpoint(ckpt_path)
        saved = state["config"]
        if saved.get("backbone") != config.backbone:
            raise UserError(f"--resume: {ckpt_path} was trained as {saved.get('backbone')}, not {config.backbone}")
        for key in ("crop", "batch", "seed", "steps", "lr", "lr_min", "synth_ratio"):
            if saved.get(key) != getattr(config, key):
                say(
                    f"note: --{key.replace('_', '-')} was {saved.get(key)} in the checkpoint, now {getattr(config, key)}"
                )
        model.load_state_dict({k: v.float() for k, v in state["model"].items()})
        if state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        else:
            say("light checkpoint: Adam moments restart")
        step = int(state["step"])
        best, last_val = state.get("best"), state.get("last_val")
        elapsed_before = float(state.get("train_seconds", 0.0))
        history = list(state.get("history", []))
        sessions = list(state.get("sessions", []))
        _set_rng_state(state.get("rng", {}))
        say(f"resumed from {ckpt_path} at step {step}/{config.steps}")

    session = {
        "start_step": step,
        "end_step": step,
        "steps_total": config.steps,
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "precision": precision,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": 0.0,
    }
    sessions.append(session)
    data_summary = mixture.summary()
    if val is not None:
        data_summary["validation"] = val.summary()

    def checkpoint() -> None:
        if config.light_checkpoints:
            model_state = {k: v.detach().to("cpu", torch.float16) for k, v in model.state_dict().items()}
            opt_state = None
        else:
            model_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            opt_state = optimizer.state_dict()
        session.update(end_step=step, seconds=round(time.time() - started, 1))
        _save_checkpoint(
            ckpt_path,
            {
                "format": CKPT_FORMAT,
                "config": asdict(config),
                "model": model_state,
                "optimizer": opt_state,
                "schedule": {"kind": "cosine", "lr": config.lr, "lr_min": config.lr_min, "steps": config.steps},
                "step": step,
                "best": best,
                "last_val": last_val,
                "history": history,
                "sessions": sessions,
                "train_seconds": elapsed_before + (time.time() - started),
                "rng": _rng_state(),
            },
        )

    def validate() -> None:
        nonlocal best, last_val
        if val is None:
            return
        result = evaluate(model, val, device, config.val_crop, config.val_max, precision)
        last_val = {"step": step, **_strip_rows(result)}
        history.append(last_val)
        append_jsonl(log_path, {"event": "val", **last_val})
        improved = best is None or last_val["psnr"] > best["psnr"]
        if improved:
            best = dict(last_val)
            export_plain(model, best_path, config.dtype, {"step": step, "val": best})
        say(
            f"step {step}: val PSNR {last_val['psnr']:.2f} dB, SSIM {last_val['ssim']:.4f} "
            f"(n={last_val['n']}){' best' if improved else ''}"
        )

    started = time.time()
    last_ckpt_time, finished = started, True
    info = {"loss": float("nan"), "psnr": float("nan"), "lr": cosine_lr(config, step)}
    if best is not None:
        info.update(val_psnr=best["psnr"], val_ssim=best["ssim"])
    model.train()
    loss_avg, psnr_avg = None, None
    if step < config.steps:
        for step_index, hazy, target in mixture.iterate(step, config.steps, config.workers):
            hazy = hazy.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            if channels_last:
                hazy = hazy.contiguous(memory_format=torch.channels_last)
            with autocast_factory(device, precision)():
                output = model(hazy)
            output = output.float()
            loss = F.l1_loss(output, target)
            if not torch.isfinite(loss):
                raise UserError(f"loss became {float(loss)} at step {step_index}; lower --lr or use --precision fp32")
            lr = cosine_lr(config, step_index)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step = step_index + 1
            batch_psnr = float(psnr(output.detach(), target).mean())
            loss_value = float(loss.detach())
            loss_avg = loss_value if loss_avg is None else 0.9 * loss_avg + 0.1 * loss_value
            psnr_avg = batch_psnr if psnr_avg is None else 0.9 * psnr_avg + 0.1 * batch_psnr
            info.update(loss=loss_avg, psnr=psnr_avg, lr=lr)
            if step % config.log_every == 0 or step == config.steps:
                append_jsonl(
                    log_path,
                    {
                        "event": "train",
                        "step": step,
                        "loss": loss_avg,
                        "psnr": psnr_avg,
                        "lr": info["lr"],
                        "seconds": round(elapsed_before + time.time() - started, 1),
                    },
                )
            if config.val_every and step % config.val_every == 0 and step < config.steps:
                validate()
                if last_val is not None:
                    info.update(val_psnr=last_val["psnr"], val_ssim=last_val["ssim"])
            if on_progress is not None:
                on_progress(step, config.steps, info)
            now = time.time()
            if step % config.ckpt_every == 0 or now - last_ckpt_time >= 60 * config.ckpt_minutes:
                checkpoint()
                last_ckpt_time = time.time()
            if config.time_limit_min and now - started >= 60 * config.time_limit_min and step < config.steps:
                finished = False
                say(f"time limit of {config.time_limit_min:g} min reached at step {step}; --resume continues")
                break
        if finished and (last_val is None or last_val["step"] != step):
            validate()
        checkpoint()
    elif val is not None and (last_val is None or last_val["step"] != step):
        validate()

    train_seconds = elapsed_before + (time.time() - started)
    if config.select == "best" and best is not None and best_path.is_file():
        from safetensors.torch import load_file

        selected = f"best validation PSNR (step {best['step']})"
        best_state = load_file(str(best_path))
        export_model = _build_plain_like(model)
        export_model.load_state_dict({k: v.float() for k, v in best_state.items()})
    else:
        selected = f"last (step {step})"
        export_model = model
    card_path = out.with_suffix(".json")
    weights_fp = export_plain(export_model, out, config.dtype, {"backbone": config.backbone, "step": step})
    record = model_card(
        config,
        export_model,
        out,
        weights_fp,
        step,
        data_summary,
        best,
        last_val,
        train_seconds,
        device,
        selected,
        notes,
    )
    record["validation"]["history"] = history
    record["training"]["sessions"] = sessions
    write_json(card_path, record)
    write_json(work / "record.json", record)
    return PretrainResult(out, card_path, step, finished, best, last_val, weights_fp, record)


def _build_plain_like(model: nn.Module) -> nn.Module:
    """A plain-form network of the same architecture as ``model`` (CPU, fp32)."""
    import copy

    from .backbones.dea_net import DEANet

    if isinstance(model, DEANet):
        return DEANet(model.width, train_form=False)
    return copy.deepcopy(model).to("cpu", torch.float32)
