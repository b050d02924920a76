"""What defines a pretraining run (:class:`PretrainConfig`), what it returns, and its learning-rate schedule.

Torch-free: the CLI builds and checks a config before importing the training code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

__all__ = ["PretrainConfig", "PretrainResult", "cosine_lr"]


@dataclass
class PretrainConfig:
    """Everything that defines a pretraining run (recorded in checkpoints and the card).

    Attributes:
        backbone: registry name; trained in the form its spec's ``train_kwargs`` build
            (DEA-Net: DEConv), written in the form its ``to_plain`` hook returns.
        steps: optimiser steps in total (the cosine schedule spans them).
        batch: crops per step.
        crop: crop side in pixels.
        lr, lr_min: cosine schedule from ``lr`` to ``lr_min``.
        synth_ratio: probability that a sample is synthesised from ``--clear`` (None:
            0 with pairs only, 1 with clear photos only, 0.5 with both; checked by
            :func:`bilalora.mixture.resolve_synth_ratio`).
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
        artifacts: camera artifacts on every hazy input and uneven airlight in
            synthesised haze (:class:`bilalora.mixture.TrainMixture`).
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
    artifacts: bool = False

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


def cosine_lr(config: PretrainConfig, step: int) -> float:
    """Learning rate of (0-based) ``step``: ``lr_min + (lr - lr_min) * (1 + cos(pi * step / steps)) / 2``."""
    progress = min(max(step, 0), config.steps) / config.steps
    return config.lr_min + 0.5 * (config.lr - config.lr_min) * (1.0 + math.cos(math.pi * progress))
