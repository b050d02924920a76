"""Bilevel layer positioning (docs/method.md, "Bilevel layer positioning") and its baselines, one step at a time.

The upper level tunes the site gates ``a`` on the validation half (loss F), the
lower level the LoRA factors ``w`` on the train half (loss f). The first-order
hypergradient with the rank-one Hessian approximation d2f/dw2 ~ g g^T is

    dF/da ~ dF/da|_w - eta * (<v, g> / (||g||^2 + eps)) * df/da,
    v = dF/dw,  g = df/dw,  eta = the current LoRA learning rate.

:func:`bilevel_step` evaluates it with two forward/backward passes: one on a
validation batch (v and dF/da) and one on a train batch whose gradients serve
both the hypergradient (g, df/da) and the LoRA step (g). The release's
procedure spends a third pass on a fresh train forward for the LoRA step;
``passes=3`` reproduces it for timing comparisons.

Baselines: :func:`joint_step` (gates and LoRA on the same train batch with the
plain gradient) and :func:`train_step` (plain training of whatever is trainable:
LoRA in stage B and ``manual``, all weights in ``full``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from . import lora

__all__ = [
    "OptimConfig",
    "StepResult",
    "make_lora_optimizer",
    "make_gate_optimizer",
    "hypergradient",
    "bilevel_step",
    "joint_step",
    "train_step",
    "rank_sites",
]

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class OptimConfig:
    """Optimiser settings (the release's defaults, docs/method.md, except the learning rates).

    The release's LoRA learning rate (1e-6, constant) leaves the output almost
    unchanged and its gate rate (3e-4) barely separates the gates in a short
    search; bilalora's defaults (1e-3, 3e-3) were chosen by measurement
    (benchmarks/adapt_lr.py on real_day; README, "Adapt").
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_norm: float = 5.0
    gate_lr: float = 3e-3
    gate_betas: tuple[float, float] = (0.5, 0.999)
    gate_weight_decay: float = 1e-3
    hyper_eps: float = 1e-8


@dataclass
class StepResult:
    """What one optimisation step measured (floats; ``skipped`` when the loss was not finite)."""

    train_loss: float
    val_loss: Optional[float] = None
    grad_norm: Optional[float] = None
    skipped: bool = False

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def make_lora_optimizer(params: Iterable[nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    """Adam over the LoRA factors (or all weights in ``full``)."""
    return torch.optim.Adam(list(params), lr=config.lr, betas=config.betas, eps=config.eps)


def make_gate_optimizer(params: Iterable[nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the gate logits."""
    return torch.optim.AdamW(
        list(params), lr=config.gate_lr, betas=config.gate_betas, weight_decay=config.gate_weight_decay
    )


def _loss(model: nn.Module, objective: Objective, batch: torch.Tensor, autocast) -> torch.Tensor:
    with autocast():
        output = model(batch)
        loss = objective(output, batch)
    return loss.float()


def _dot(left: Sequence[torch.Tensor], right: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((a.double() * b.double()).sum() for a, b in zip(left, right))


def hypergradient(
    model: nn.Module,
    objective: Objective,
    train_batch: torch.Tensor,
    val_batch: torch.Tensor,
    eta: float,
    hyper_eps: float = 1e-8,
    autocast=contextlib.nullcontext,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """First-order hypergradient of the gates.

    Args:
        train_batch, val_batch: (N, 3, S, S) in [0, 1].
        eta: the LoRA learning rate.

    Returns:
        (dF/da estimate per gate, g = df/dw per LoRA factor, f, F): gradients in
        the order of :func:`lora.gate_parameters` / :func:`lora.lora_parameters`.
    """
    gates = lora.gate_parameters(model)
    weights = lora.lora_parameters(model)
    upper = _loss(model, objective, val_batch, autocast)
    grads = torch.autograd.grad(upper, gates + weights, allow_unused=True)
    direct = [_zero_if_none(g, p) for g, p in zip(grads[: len(gates)], gates)]
    v = [_zero_if_none(g, p) for g, p in zip(grads[len(gates) :], weights)]
    lower = _loss(model, objective, train_batch, autocast)
    grads = torch.autograd.grad(lower, gates + weights, allow_unused=True)
    df_da = [_zero_if_none(g, p) for g, p in zip(grads[: len(gates)], gates)]
    g = [_zero_if_none(gr, p) for gr, p in zip(grads[len(gates) :], weights)]
    coefficient = _dot(v, g) / (_dot(g, g) + hyper_eps)
    hyper = [d - eta * coefficient.to(d.dtype) * s for d, s in zip(direct, df_da)]
    return hyper, g, lower.detach(), upper.detach()


def bilevel_step(
    model: nn.Module,
    objective: Objective,
    train_batch: torch.Tensor,
    val_batch: torch.Tensor,
    lora_optimizer: torch.optim.Optimizer,
    gate_optimizer: torch.optim.Optimizer,
    config: OptimConfig,
    passes: int = 2,
    autocast=contextlib.nullcontext,
) -> StepResult:
    """One search step: a gate step with the hypergradient, then a LoRA step on f.

    ``passes=2`` reuses the train batch's gradient g for the LoRA step;
    ``passes=3`` recomputes it after the gate step (the release's procedure).
    """
    eta = lora_optimizer.param_groups[0]["lr"]
    hyper, g, lower, upper = hypergradient(
        model, objective, train_batch, val_batch, eta, config.hyper_eps, autocast
    )
    if not (torch.isfinite(lower) and torch.isfinite(upper)):
        return StepResult(float(lower), float(upper), skipped=True)
    gates = lora.gate_parameters(model)
    weights = lora.lora_parameters(model)
    gate_optimizer.zero_grad(set_to_none=True)
    for param, grad in zip(gates, hyper):
        param.grad = grad.detach()
    gate_optimizer.step()
    if passes == 3:
        lower = _loss(model, objective, train_batch, autocast)
        g = list(torch.autograd.grad(lower, weights, allow_unused=True))
        g = [_zero_if_none(gr, p) for gr, p in zip(g, weights)]
        lower = lower.detach()
    lora_optimizer.zero_grad(set_to_none=True)
    for param, grad in zip(weights, g):
        param.grad = grad.detach()
    norm = _clip(weights, config.clip_norm)
    lora_optimizer.step()
    return StepResult(float(lower), float(upper), norm)


def joint_step(
    model: nn.Module,
    objective: Objective,
    train_batch: torch.Tensor,
    lora_optimizer: torch.optim.Optimizer,
    gate_optimizer: torch.optim.Optimizer,
    config: OptimConfig,
    autocast=contextlib.nullcontext,
) -> StepResult:
    """Naive joint search: gates and LoRA updated together with the plain gradient of f."""
    lora_optimizer.zero_grad(set_to_none=True)
    gate_optimizer.zero_grad(set_to_none=True)
    loss = _loss(model, objective, train_batch, autocast)
    if not torch.isfinite(loss):
        return StepResult(float(loss), skipped=True)
    loss.backward()
    norm = _clip(lora.lora_parameters(model), config.clip_norm)
    gate_optimizer.step()
    lora_optimizer.step()
    return StepResult(float(loss.detach()), grad_norm=norm)


def train_step(
    model: nn.Module,
    objective: Objective,
    train_batch: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    config: OptimConfig,
    autocast=contextlib.nullcontext,
) -> StepResult:
    """Plain training step over the optimiser's parameters (stage B, ``manual``, ``full``)."""
    optimizer.zero_grad(set_to_none=True)
    loss = _loss(model, objective, train_batch, autocast)
    if not torch.isfinite(loss):
        return StepResult(float(loss), skipped=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = _clip(params, config.clip_norm)
    optimizer.step()
    return StepResult(float(loss.detach()), grad_norm=norm)


def rank_sites(model: nn.Module) -> list[tuple[str, float]]:
    """Sites ordered by gate value, highest first (ties keep module order)."""
    values = lora.gate_values(model)
    return sorted(values.items(), key=lambda item: -item[1])


def _clip(params: Sequence[torch.Tensor], max_norm: float) -> float:
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    return float(norm)


def _zero_if_none(grad: Optional[torch.Tensor], param: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(param) if grad is None else grad
