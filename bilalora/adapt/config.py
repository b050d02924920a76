"""The settings of an adapt run (:class:`AdaptConfig`), their checks, and what ``--resume`` may change.

The schedule presets (:data:`PRESETS`, ``--schedule``) are resolved in one place,
:func:`resolve_preset`: ``auto`` takes ``cpu`` when the run's device is the CPU and
``paper`` on any accelerator, and only the fields the caller left None come from the
preset. The resolved config (with ``preset`` and ``explicit``) is what the checkpoint
and ``summary.json`` record, so a resumed run keeps it whatever its device is then.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from ..search import OptimConfig

__all__ = ["METHODS", "PRESETS", "PRESET_FIELDS", "RESUME_APPLIED", "SCHEDULES", "AdaptConfig", "describe_preset",
           "preset_for_device", "reconcile_resume", "resolve_preset", "resolve_search_space"]

METHODS = ("bilevel", "joint", "manual", "full")

#: ``--schedule`` choices: a preset by name, or ``auto`` (by the run's device, :func:`preset_for_device`).
SCHEDULES = ("auto", "paper", "cpu")

#: The fields a preset fills when the user left them unset (None), in the order they are printed.
PRESET_FIELDS = ("batch", "crop", "search_steps", "steps", "max_side")

#: The schedule presets. ``paper``: the release's batch and crops, full-size images, and stage
#: lengths left to :func:`bilalora.adapt.schedule.resolve_schedule` (the paper's 5 / 30 epochs with a
#: floor of 55 search / 330 total steps). ``cpu``: the reduced schedule of the measured CPU runs
#: (batch 4, crops of 96, 20 search steps of 80, images downsized to 512 px), a few minutes on a
#: 2-core CPU where the paper's takes hours (benchmarks/results/adapt_schedule_cpu.json). 80 steps
#: in all (60 before) were chosen on real_day's validation halves of three seeds
#: (benchmarks/results/site_space_val_day.json): FADE -36 % on average against -30 % at 60, PIQE
#: within 2 % of the contrast-stretch row on two of three splits as at 60; 100 steps painted texture.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"batch": 24, "crop": 224, "search_steps": None, "steps": None, "max_side": None},
    "cpu": {"batch": 4, "crop": 96, "search_steps": 20, "steps": 80, "max_side": 512},
}

#: Settings a resumed run takes from the command line (schedule length and bookkeeping);
#: every other setting comes from the checkpoint, and a different value is reported as ignored.
RESUME_APPLIED = ("steps", "epochs", "log_every", "checkpoint_every", "checkpoint_minutes", "workers", "max_bad_steps")

#: What the run itself records about its preset (never compared on resume).
_RECORD_FIELDS = ("preset", "explicit", "search_space")

#: Stage lengths come in pairs: a stage takes ``steps`` when set, else ``epochs``.
_STAGE_PAIRS = {"steps": "epochs", "epochs": "steps", "search_steps": "search_epochs", "search_epochs": "search_steps"}


@dataclass
class AdaptConfig:
    """Everything that defines a run (the release's defaults, docs/method.md, except the learning rates).

    Schedule (see :mod:`bilalora.adapt.schedule`): the run is counted in steps of
    ``batch`` crops. ``search_steps`` / ``steps`` (total, search included) fix the
    stage lengths; ``search_epochs`` / ``epochs`` give them in passes over the
    train images instead.

    Presets: ``batch``, ``crop``, ``max_side`` and the stage lengths default to
    None, "from the preset": :func:`resolve_preset` fills what was left unset
    from the preset that ``schedule`` names (:data:`PRESETS`): ``paper`` (batch
    24, crops of 224, full-size images; each stage the paper's epochs, 5 search
    and 30 in all, but at least 55 search and 330 total steps, so a folder of
    8-100 images still gets about the paper's number of optimiser steps: 500
    images, batch 24, 55 search + 275 fine-tune steps), ``cpu`` (batch 4, crops
    of 96, 20 search steps of 80 in all, images downsized to 512 px), or
    ``auto`` (the default): ``paper`` on an accelerator, ``cpu`` on the CPU.

    Search space: a searching run without ``sites`` takes the backbone's search
    space for its objective when the backbone declares one (DEA-Net under the
    prior: its level-1 encoder blocks), else the backbone's default; :func:`adapt`
    fills ``sites`` with its patterns and ``search_space`` with where they came
    from (:func:`resolve_search_space`), so a resumed run keeps them.
    A stage given in epochs takes no steps from the preset. ``max_side`` 0 keeps
    images at full size whatever the preset. :func:`adapt` resolves the
    config for its device; ``preset`` (the preset used) and ``explicit`` (the
    fields that were set, not taken from it) record the resolution.
    """

    method: str = "bilevel"
    sites: list[str] | None = None
    search_space: str | None = None
    exclude_sites: list[str] | None = None
    top_k: int = 3
    rank: int = 8
    lora_alpha: float = 16.0
    steps: int | None = None
    search_steps: int | None = None
    epochs: int | None = None
    search_epochs: int | None = None
    batch: int | None = None
    crop: int | None = None
    seed: int = 0
    precision: str = "auto"
    passes: int = 2
    test_fraction: float = 0.2
    log_every: int = 10
    checkpoint_every: int = 50
    checkpoint_minutes: float = 10.0
    max_side: int | None = None
    schedule: str = "auto"
    preset: str | None = None
    explicit: list[str] | None = None
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
        if self.schedule not in SCHEDULES:
            raise UserError(f"--schedule {self.schedule}: use one of {', '.join(SCHEDULES)}")
        positive = [("--top-k", self.top_k), ("--rank", self.rank), ("--log-every", self.log_every)]
        if self.batch is not None:
            positive.append(("--batch", self.batch))
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
        if self.crop is not None and (self.crop < 8 or self.crop % 4):
            raise UserError(f"--crop {self.crop}: use a multiple of 4 of at least 8")
        if self.max_side is not None and self.max_side < 0:
            raise UserError(f"--max-side must be >= 0 (0: full size), got {self.max_side}")
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

    @property
    def resolved(self) -> bool:
        """Whether :func:`resolve_preset` has filled the preset's fields."""
        return self.preset is not None

    @classmethod
    def from_dict(cls, data: dict) -> AdaptConfig:
        """Rebuild from :meth:`as_dict` output (unknown keys of older or newer versions are dropped).

        A record written before presets existed (no ``preset`` key) holds the values
        its run used, the paper's defaults where nothing was given: it comes back
        resolved as ``paper`` with its values as they were.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        data = dict(data)
        if "preset" not in data:
            data.update(preset="paper", schedule="paper", explicit=None)
        data = {k: v for k, v in data.items() if k in known}
        optim = dict(data.pop("optim", {}) or {})
        optim_known = {f.name for f in dataclasses.fields(OptimConfig)}
        optim = {k: tuple(v) if isinstance(v, list) else v for k, v in optim.items() if k in optim_known}
        return cls(**data, optim=OptimConfig(**optim))


def preset_for_device(device: Any) -> str:
    """The preset ``--schedule auto`` takes on ``device``: ``cpu`` on the CPU, ``paper`` on any accelerator."""
    return "cpu" if str(device).split(":", 1)[0].lower() == "cpu" else "paper"


def resolve_preset(config: AdaptConfig, device: Any = "cpu") -> AdaptConfig:
    """``config`` with every preset field it left unset filled from its preset (a copy; see :class:`AdaptConfig`).

    Args:
        config: the settings asked for; one already resolved comes back unchanged
            (a resumed run keeps its preset whatever the device now).
        device: the run's torch device; decides the preset of ``schedule="auto"``.

    Returns:
        a copy with ``preset`` set to the preset used, ``explicit`` to the preset
        fields that were given (they keep their values), and the other preset
        fields taken from :data:`PRESETS`. A stage whose length was given in
        epochs takes no step count from the preset.
    """
    if config.resolved:
        return config
    if config.schedule not in SCHEDULES:
        raise UserError(f"--schedule {config.schedule}: use one of {', '.join(SCHEDULES)}")
    name = preset_for_device(device) if config.schedule == "auto" else config.schedule
    values = PRESETS[name]
    explicit = [key for key in PRESET_FIELDS if getattr(config, key) is not None]
    explicit += [key for key in ("search_epochs", "epochs") if getattr(config, key) is not None]
    resolved = AdaptConfig.from_dict(config.as_dict())
    for key in PRESET_FIELDS:
        if getattr(config, key) is not None:
            continue  # given: kept
        if key in _STAGE_PAIRS and getattr(config, _STAGE_PAIRS[key]) is not None:
            continue  # the stage is given in epochs
        setattr(resolved, key, values[key])
    resolved.preset = name
    resolved.explicit = explicit
    return resolved


def resolve_search_space(config: AdaptConfig, model: Any, objective_name: str | None) -> AdaptConfig:
    """``config`` with the backbone's search space for ``objective_name`` as its ``sites`` (a copy), if it applies.

    Applies to a searching run (``bilevel``, ``joint``) that names no ``sites`` and
    was not resolved before (``search_space`` unset), on a backbone that declares a
    search space for the objective (``bilalora_info["objective_sites"]``). Anything
    else comes back unchanged. ``search_space`` records the origin, e.g.
    ``"dea-net-s for the prior objective"``.
    """
    from ..sites import objective_patterns

    if config.sites or not config.searches or config.search_space is not None:
        return config
    patterns = objective_patterns(model, objective_name)
    if patterns is None:
        return config
    resolved = AdaptConfig.from_dict(config.as_dict())
    resolved.sites = patterns
    backbone = (getattr(model, "bilalora_info", None) or {}).get("name") or type(model).__name__
    resolved.search_space = f"{backbone} for the {objective_name} objective"
    return resolved


def describe_preset(config: AdaptConfig, device: Any, resumed: bool = False) -> str:
    """One line: the preset of ``config`` (resolved for ``device`` if it is not), why, and how to get the other.

    ``resumed``: the config is an interrupted run's, kept whatever ``device`` is now.
    """
    if not config.resolved:
        config = resolve_preset(config, device)
    name = config.preset
    if resumed:
        why = "the interrupted run's"
        if config.schedule == "auto" and preset_for_device(device) != name:
            why += f", kept on device {device}"
    elif config.explicit is None:
        why = "recorded"
    elif config.schedule == "auto":
        why = f"device {device}"
    else:
        why = f"--schedule {name}"
    given = [_flag(key) for key in config.explicit or []]
    if given:
        why += f"; {', '.join(given)} given"
    other = {"cpu": "--schedule paper for the paper's: at least 55+275 steps at batch 24, crops of 224",
             "paper": "--schedule cpu for 20+60 steps at batch 4, crops of 96, images of at most 512 px"}[name]
    if resumed:
        other = "a new run takes " + other
    return f"schedule: {name} preset ({why}; {other})"


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
    if new["sites"] is None and old["search_space"] is not None:
        new["sites"] = old["sites"]  # the run's own search space (resolved from its objective) is not a request
    if given is None:  # every field, but a preset field left None asks for nothing
        keys = [k for k in new if not (new[k] is None and (k in PRESET_FIELDS or k in _STAGE_PAIRS))]
    else:
        keys = [k for k in given if k in new]
    changed = [k for k in keys if k not in _RECORD_FIELDS and new[k] != old[k]]
    applied = [k for k in changed if k in RESUME_APPLIED]
    ignored = [k for k in changed if k not in RESUME_APPLIED]
    config = AdaptConfig.from_dict(saved.as_dict())
    for key in applied:
        setattr(config, key, new[key])
        partner = _STAGE_PAIRS.get(key)
        if partner and partner not in applied:
            setattr(config, partner, None)  # --epochs now replaces the run's steps (and the other way round)
    if config.explicit is not None:  # the record of what was given follows the stage lengths now applied
        replaced = set(applied) | {_STAGE_PAIRS[k] for k in applied if k in _STAGE_PAIRS}
        config.explicit = [k for k in config.explicit if k not in replaced] + [k for k in applied if k in _STAGE_PAIRS]
    return config, [_flag(k) for k in applied], [_flag(k) for k in ignored]
