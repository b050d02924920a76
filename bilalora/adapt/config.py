"""The settings of an adapt run (:class:`AdaptConfig`), their checks, and what ``--resume`` may change."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from ..search import OptimConfig

__all__ = ["METHODS", "RESUME_APPLIED", "AdaptConfig", "reconcile_resume"]

METHODS = ("bilevel", "joint", "manual", "full")

#: Settings a resumed run takes from the command line (schedule length and bookkeeping);
#: every other setting comes from the checkpoint, and a different value is reported as ignored.
RESUME_APPLIED = ("steps", "epochs", "log_every", "checkpoint_every", "checkpoint_minutes", "workers", "max_bad_steps")


@dataclass
class AdaptConfig:
    """Everything that defines a run (the release's defaults, docs/method.md, except the learning rates).

    Schedule (see :mod:`bilalora.adapt.schedule`): the run is counted in steps of
    ``batch`` crops. ``search_steps`` / ``steps`` (total, search included) fix the
    stage lengths; ``search_epochs`` / ``epochs`` give them in passes over the
    train images instead. Left unset, each stage takes the paper's epochs
    (5 search, 30 in all) but at least 55 search and 330 total steps, so a folder
    of 8-100 images still gets about the paper's number of optimiser steps
    (500 images, batch 24: 55 search + 275 fine-tune steps).
    """

    method: str = "bilevel"
    sites: list[str] | None = None
    exclude_sites: list[str] | None = None
    top_k: int = 3
    rank: int = 8
    lora_alpha: float = 16.0
    steps: int | None = None
    search_steps: int | None = None
    epochs: int | None = None
    search_epochs: int | None = None
    batch: int = 24
    crop: int = 224
    seed: int = 0
    precision: str = "auto"
    passes: int = 2
    test_fraction: float = 0.2
    log_every: int = 10
    checkpoint_every: int = 50
    checkpoint_minutes: float = 10.0
    max_side: int | None = None
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
        positive = [("--top-k", self.top_k), ("--rank", self.rank), ("--batch", self.batch),
                    ("--log-every", self.log_every)]
        positive += [(flag, value) for flag, value in (("--steps", self.steps), ("--search-steps", self.search_steps),
                                                       ("--epochs", self.epochs),
                                                       ("--search-epochs", self.search_epochs)) if value is not None]
        for flag, value in positive:
            if value < 1:
                raise UserError(f"{flag} must be at least 1, got {value}")
        if self.seed < 0:
            raise UserError(f"--seed must be a non-negative integer, got {self.seed}")
        if not self.lora_alpha > 0:
            raise UserError(f"--lora-alpha must be positive, got {self.lora_alpha:g}")
        for flag, value in (("--lr", self.optim.lr), ("--gate-lr", self.optim.gate_lr)):
            if not value >= 0 or value == float("inf"):
                raise UserError(f"{flag} must be a finite number >= 0, got {value:g}")
        if self.checkpoint_every < 0 or self.checkpoint_minutes < 0:
            raise UserError("--checkpoint-every and --checkpoint-minutes must be >= 0 (0: only at stage ends)")
        if self.crop < 8 or self.crop % 4:
            raise UserError(f"--crop {self.crop}: use a multiple of 4 of at least 8")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise UserError(f"--precision {self.precision}: use auto, fp32 or bf16")
        if self.passes not in (2, 3):
            raise UserError("passes must be 2 (bilalora) or 3 (the release's procedure)")
        if not 0 <= self.test_fraction < 1:
            raise UserError(f"--test-fraction {self.test_fraction:g}: use a fraction in [0, 1)")
        from .. import search

        for flag, value, allowed in (("--hypergradient", getattr(self.optim, "hypergradient", None),
                                      getattr(search, "HYPERGRADIENTS", None)),
                                     ("--gate-optimizer", getattr(self.optim, "gate_optimizer", None),
                                      getattr(search, "GATE_OPTIMIZERS", None))):
            if allowed is not None and value not in allowed:
                raise UserError(f"{flag} {value}: use one of {', '.join(allowed)}")
        if self.workers < 0:
            raise UserError(f"--workers must be >= 0, got {self.workers}")

    @property
    def searches(self) -> bool:
        """Whether the method has a search stage (stage A)."""
        return self.method in ("bilevel", "joint")

    def as_dict(self) -> dict:
        """Plain JSON/``weights_only``-safe types only (dicts, lists, tuples, numbers, strings, None)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AdaptConfig:
        """Rebuild from :meth:`as_dict` output (unknown keys of older or newer versions are dropped)."""
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in dict(data).items() if k in known}
        optim = dict(data.pop("optim", {}) or {})
        optim_known = {f.name for f in dataclasses.fields(OptimConfig)}
        optim = {k: tuple(v) if isinstance(v, list) else v for k, v in optim.items() if k in optim_known}
        return cls(**data, optim=OptimConfig(**optim))


def _flat(config: AdaptConfig) -> dict[str, Any]:
    record = config.as_dict()
    optim = record.pop("optim")
    record.update({f"optim.{k}": v for k, v in optim.items()})
    return record


def _flag(key: str) -> str:
    name = key.split(".", 1)[-1]
    return "--" + {"lr": "lr", "gate_lr": "gate-lr"}.get(name, name.replace("_", "-"))


def reconcile_resume(
    saved: AdaptConfig, requested: AdaptConfig | None, given: Iterable[str] | None = None
) -> tuple[AdaptConfig, list[str], list[str]]:
    """The configuration a resumed run continues with.

    Args:
        saved: the checkpoint's configuration.
        requested: the configuration asked for now (None: the checkpoint's).
        given: names of the fields the user set explicitly (``"optim.lr"`` for
            optimiser fields); None compares every field of ``requested``.

    Returns:
        (config, applied flags, ignored flags): fields in :data:`RESUME_APPLIED`
        take the requested value; any other requested field that differs from
        the checkpoint's keeps the checkpoint's value and is listed as ignored.
    """
    if requested is None:
        return saved, [], []
    old, new = _flat(saved), _flat(requested)
    keys = list(new) if given is None else [k for k in given if k in new]
    changed = [k for k in keys if new[k] != old[k]]
    applied = [k for k in changed if k in RESUME_APPLIED]
    ignored = [k for k in changed if k not in RESUME_APPLIED]
    config = AdaptConfig.from_dict(saved.as_dict())
    for key in applied:
        setattr(config, key, new[key])
    return config, [_flag(k) for k in applied], [_flag(k) for k in ignored]
