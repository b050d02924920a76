"""The mutable state of one adapt run (:class:`AdaptState`) and its resumable checkpoint.

The checkpoint (``checkpoints/last.pt``) holds tensors, dicts, lists, tuples,
numbers, strings and None only, so it is read with ``torch.load(weights_only=True)``:
a crafted file cannot run code, and a damaged one is refused in one line. It
records the base weights' fingerprint and the run's configuration; resuming on
other weights is refused.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from .. import lora
from .. import sites as site_lib
from ..checkpoints import load_checkpoint, save_checkpoint
from ..errors import UserError
from ..runs import checkpoint_path
from ..search import make_gate_optimizer, make_lora_optimizer, rank_sites
from .config import AdaptConfig

__all__ = ["CHECKPOINT_FORMAT", "AdaptState", "candidate_sites", "read_checkpoint"]

CHECKPOINT_FORMAT = "bilalora-adapt-checkpoint/2"


def candidate_sites(model: nn.Module, config: AdaptConfig) -> list[site_lib.Site]:
    """The sites a run may put LoRA on: ``--sites`` (any layer) or the defaults, minus ``--exclude-sites``.

    Raises:
        UserError: nothing is left, or ``--top-k`` asks for more sites than there are.
    """
    pool = site_lib.discover(model) if config.sites else site_lib.default_sites(model)
    chosen = site_lib.select(pool, include=config.sites, exclude=config.exclude_sites)
    if not chosen:
        raise UserError("no candidate sites left after --sites/--exclude-sites; run `bilalora sites --all`")
    if config.searches and config.top_k > len(chosen):
        raise UserError(f"--top-k {config.top_k} is more than the {len(chosen)} candidate site(s); "
                        f"use --top-k {len(chosen)} or fewer")
    return chosen


class AdaptState:
    """Where a run stands: the model's LoRA structure, the optimisers, the counters and the gate trajectory.

    ``stage_index`` / ``stage_step`` locate the next step; ``global_step`` counts
    steps over all stages (the train batch stream's index). ``trajectory`` holds
    the gate values read every ``log_every`` search steps: ``{"steps": [...],
    "values": {site: [...]}}``.
    """

    def __init__(self, model: nn.Module, config: AdaptConfig, device: str, base_fingerprint: str):
        self.model = model
        self.config = config
        self.device = device
        self.base_fingerprint = base_fingerprint
        self.stage_index = 0
        self.stage_step = 0
        self.global_step = 0
        self.bad_steps = 0
        self.bad_streak = 0
        self.selected: list[str] | None = None
        self.ranking: list[tuple[str, float]] | None = None
        self.stage_seconds: dict[str, float] = {}
        self.stage_steps: dict[str, int] = {}
        self.trainable: dict[str, int] = {}
        self.trajectory: dict = {"steps": [], "values": {}}
        self.lora_optimizer: torch.optim.Optimizer | None = None
        self.gate_optimizer: torch.optim.Optimizer | None = None
        self.saved_at = time.monotonic()

    # ------------------------------------------------------------ structure
    def build_stage(self, stage: str) -> None:
        """Give the model the structure of ``stage`` and fresh optimisers for it.

        New LoRA factors are created while the model is on the CPU (the CPU
        generator initialises A), so a seed means the same start on every device.
        """
        config, model = self.config, self.model
        if config.method == "full":
            for param in model.parameters():
                param.requires_grad_(True)
        elif stage == "search" or config.method == "manual":
            model.to("cpu")
            gated = stage == "search"
            lora.inject(model, candidate_sites(model, config), config.rank, config.lora_alpha, gated=gated)
            lora.freeze_base(model)
            if not gated:
                self.selected = list(lora.site_gates(model))
        else:  # stage B of bilevel/joint: keep the top-k sites' stage-A LoRA, gates fixed
            self.ranking = rank_sites(model)
            self.selected = [name for name, _ in self.ranking[: config.top_k]]
            lora.keep_sites(model, self.selected)
        model.to(self.device, memory_format=torch.channels_last)
        self._make_optimizers(stage)
        self.trainable[stage] = lora.count_parameters(model, trainable_only=True)

    def _make_optimizers(self, stage: str) -> None:
        if self.config.method == "full":
            self.lora_optimizer = make_lora_optimizer(self.model.parameters(), self.config.optim)
            self.gate_optimizer = None
            return
        self.lora_optimizer = make_lora_optimizer(lora.lora_parameters(self.model), self.config.optim)
        gates = [g for g in lora.gate_parameters(self.model) if g.requires_grad]
        self.gate_optimizer = make_gate_optimizer(gates, self.config.optim) if stage == "search" else None

    # ---------------------------------------------------------- trajectory
    def gate_tensor(self) -> torch.Tensor:
        """Every gate value as one (S,) float32 device tensor in :func:`lora.site_gates` order (no host sync)."""
        gates = lora.site_gates(self.model)
        if not gates:
            return torch.zeros(0)
        with torch.no_grad():
            return torch.stack([gate.value().detach().float() for gate in gates.values()])

    def record_gates(self, values: list[float] | None = None) -> dict[str, float]:
        """Append the gate values (read now with one host sync, or ``values`` already read) to the trajectory."""
        names = list(lora.site_gates(self.model))
        if not names:
            return {}
        if values is None:
            values = self.gate_tensor().cpu().tolist()
        current = dict(zip(names, values))
        self.trajectory["steps"].append(self.global_step)
        for name, value in current.items():
            self.trajectory["values"].setdefault(name, []).append(value)
        return current

    # ---------------------------------------------------------- checkpoints
    def state(self) -> dict:
        """The checkpoint record: tensors and plain types only (``weights_only``-loadable)."""
        model = self.model
        record = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.as_dict(),
            "base_fingerprint": self.base_fingerprint,
            "input_norm": (getattr(model, "bilalora_info", None) or {}).get("input_norm"),
            "stage_index": self.stage_index,
            "stage_step": self.stage_step,
            "global_step": self.global_step,
            "bad_steps": self.bad_steps,
            "bad_streak": self.bad_streak,
            "selected": self.selected,
            "ranking": [[name, float(value)] for name, value in self.ranking] if self.ranking else None,
            "stage_seconds": dict(self.stage_seconds),
            "stage_steps": dict(self.stage_steps),
            "trainable": dict(self.trainable),
            "trajectory": self.trajectory,
            "lora_optimizer": self.lora_optimizer.state_dict() if self.lora_optimizer else None,
            "gate_optimizer": self.gate_optimizer.state_dict() if self.gate_optimizer else None,
        }
        if self.config.method == "full":
            record["weights"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        else:
            gates = lora.site_gates(model)
            record["lora"] = lora.lora_state_dict(model)
            record["gates"] = {name: gate.logit.detach().cpu() for name, gate in gates.items()}
            record["gated"] = {name: bool(gate.gated) for name, gate in gates.items()}
        return record

    def save(self, run_dir: Path) -> None:
        """Write the checkpoint atomically (a kill mid-write leaves the previous one)."""
        save_checkpoint(checkpoint_path(run_dir), self.state())
        self.saved_at = time.monotonic()

    def checkpoint_due(self) -> bool:
        """Every ``checkpoint_every`` steps or ``checkpoint_minutes`` minutes (0 disables either)."""
        every, minutes = self.config.checkpoint_every, self.config.checkpoint_minutes
        by_steps = bool(every) and self.global_step % every == 0
        by_time = bool(minutes) and time.monotonic() - self.saved_at >= minutes * 60
        return by_steps or by_time

    def restore(self, record: dict, stage: str) -> None:
        """Rebuild the model structure of ``stage`` and load the checkpoint's tensors and counters."""
        for key in ("stage_index", "stage_step", "global_step", "bad_steps", "bad_streak", "selected",
                    "stage_seconds", "stage_steps", "trainable", "trajectory"):
            setattr(self, key, record[key])
        self.ranking = [(name, value) for name, value in record["ranking"]] if record["ranking"] else None
        config, model = self.config, self.model
        if config.method == "full":
            self.build_stage(stage)
            model.load_state_dict(record["weights"])
        elif stage == "search" or config.method == "manual":
            self.build_stage(stage)
        else:
            model.to("cpu")
            lora.inject(model, site_lib.by_name(model, self.selected), config.rank, config.lora_alpha)
            lora.freeze_base(model)
            model.to(self.device, memory_format=torch.channels_last)
        if config.method != "full":
            lora.load_lora_state_dict(model, record["lora"])
            with torch.no_grad():
                for name, gate in lora.site_gates(model).items():
                    gate.logit.copy_(record["gates"][name])
                    gate.gated = record["gated"][name]
                    gate.logit.requires_grad_(stage == "search" and gate.gated)
            self._make_optimizers(stage)
        if record["lora_optimizer"] and self.lora_optimizer:
            self.lora_optimizer.load_state_dict(record["lora_optimizer"])
        if record["gate_optimizer"] and self.gate_optimizer:
            self.gate_optimizer.load_state_dict(record["gate_optimizer"])


def read_checkpoint(run_dir: Path) -> dict:
    """Load ``run_dir/checkpoints/last.pt`` safely (``weights_only=True``, :mod:`bilalora.checkpoints`).

    Raises:
        UserError: missing, truncated, not an adapt checkpoint of this version, or holding
            anything but tensors and plain types (one line naming the file).
    """
    return load_checkpoint(checkpoint_path(run_dir), CHECKPOINT_FORMAT, hint="start a new run without --resume")
