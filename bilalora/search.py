"""Bilevel layer positioning (docs/method.md, "Search") and its baselines, one step at a time.

The upper level tunes the site gates ``a`` on the validation half (loss F), the
lower level the LoRA factors ``w`` on the train half (loss f). The gate
gradient is a hypergradient (:mod:`bilalora.hypergradient`, where the
derivation is): ``OptimConfig.hypergradient`` chooses

    ift      dF/da|_w - (<v, g> / (|g|^2 + eps)) * df/da        (the paper's)
    release  dF/da|_w + eta * (<v, g> / (|g|^2 + eps)) * df/da  (BiLaLoRA_Train.py)
    direct   dF/da|_w                                           (default, by the oracle comparison)

with v = dF/dw, g = df/dw and eta the LoRA learning rate.

:func:`bilevel_step` evaluates it with two forward/backward passes: one on a
validation batch (v and dF/da) and one on a train batch whose gradients serve
both the hypergradient (g, df/da) and the LoRA step (g). The release's
procedure spends a third pass on a fresh train forward for the LoRA step;
``passes=3`` reproduces it.

Baselines: :func:`joint_step` (gates and LoRA on the same train batch with the
plain gradient) and :func:`train_step` (plain training of whatever is trainable:
LoRA in stage B and ``manual``, all weights in ``full``).

Precision: autocast (when given) wraps only the backbone's forward; the
objective runs in float32 on the float32 output.

Host synchronisation: a step never reads a value back. Losses, the gradient
norm and the skip flag are 0-d device tensors in :class:`StepResult`
(``as_dict()`` reads them in one transfer); a non-finite loss or gradient skips
the optimiser update on the device (fused optimisers' ``found_inf``), so the
parameters and optimiser state stay as they were.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import lora
from .hypergradient import VARIANTS as HYPERGRADIENTS
from .hypergradient import estimate

__all__ = [
    "GATE_OPTIMIZERS",
    "HYPERGRADIENTS",
    "NormalizedGradient",
    "OptimConfig",
    "StepResult",
    "bilevel_step",
    "hypergradient",
    "joint_step",
    "make_gate_optimizer",
    "make_lora_optimizer",
    "rank_sites",
    "train_step",
]

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Gate optimisers: AdamW, plain SGD, and a normalised-gradient step (see :class:`NormalizedGradient`).
GATE_OPTIMIZERS = ("adam", "sgd", "normalized")


@dataclass
class OptimConfig:
    """Optimiser settings.

    The release's LoRA learning rate (1e-6, constant) leaves the output almost
    unchanged and its gate rate (3e-4) barely separates the gates in a short
    search; bilalora's LoRA rate (1e-3) was chosen by measurement
    (benchmarks/adapt_lr.py on real_day), the gate optimiser, its rate and the
    hypergradient by the oracle comparison (benchmarks/search_oracle.py; README,
    "Adapt"): normalised-gradient gate steps ranked the sites closer to the
    oracle than AdamW for every hypergradient (on 64-px crops, Spearman +0.47
    against +0.03 with ``direct``, +0.21 against 0.00 with ``ift``); the gate
    rate did not change the ranking between 3e-4 and 3e-2; ``direct`` ranked
    better than the paper's ``ift`` in 5 of 5 paired seeds on 64-px crops (a tie
    on 48-px ones) and ended lower on held-out crops, so it is the default: with
    both halves from one distribution the rank-one implicit term cancels most of
    dF/da (see :mod:`bilalora.hypergradient`).

    Attributes:
        hypergradient: ``direct`` (the default) | ``ift`` (the paper's) | ``release`` (see the module docstring).
        gate_optimizer: ``normalized`` (:class:`NormalizedGradient`, the default),
            ``adam`` (AdamW with ``gate_betas`` and ``gate_weight_decay``, the release's)
            or ``sgd`` (plain gradient steps; the rate is in the objective's units).
        gate_lr: the gate optimiser's learning rate.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_norm: float = 5.0
    gate_lr: float = 3e-3
    gate_betas: tuple[float, float] = (0.5, 0.999)
    gate_weight_decay: float = 1e-3
    gate_optimizer: str = "normalized"
    hypergradient: str = "direct"
    hyper_eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.hypergradient not in HYPERGRADIENTS:
            raise ValueError(f"hypergradient {self.hypergradient!r}: use one of {', '.join(HYPERGRADIENTS)}")
        if self.gate_optimizer not in GATE_OPTIMIZERS:
            raise ValueError(f"gate optimizer {self.gate_optimizer!r}: use one of {', '.join(GATE_OPTIMIZERS)}")


@dataclass
class StepResult:
    """What one optimisation step measured, as 0-d device tensors (no host sync in the step).

    Attributes:
        train_loss: f on the train batch.
        val_loss: F on the validation batch (bilevel steps).
        grad_norm: the LoRA (or weight) gradient norm before clipping.
        skipped: bool tensor, True when a loss or gradient was not finite and the update was skipped.
        gates: (S,) gate values after the step (search steps), in :func:`lora.site_gates` order.
    """

    train_loss: torch.Tensor
    val_loss: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None
    skipped: torch.Tensor | bool = False
    gates: torch.Tensor | None = None

    def as_dict(self) -> dict:
        """Python floats (``skipped`` a bool, ``gates`` a list), read from the device in one transfer."""
        names = [k for k in ("train_loss", "val_loss", "grad_norm") if getattr(self, k) is not None]
        parts = [torch.as_tensor(getattr(self, k)).detach().float().reshape(1).cpu() for k in names]
        skipped = torch.as_tensor(self.skipped).detach().reshape(1)
        parts.append(skipped.float().cpu())
        if self.gates is not None:
            parts.append(self.gates.detach().float().reshape(-1).cpu())
        values = torch.cat(parts).tolist() if len(parts) > 1 else parts[0].tolist()
        out = {k: values[i] for i, k in enumerate(names)}
        out["skipped"] = bool(values[len(names)])
        if self.gates is not None:
            out["gates"] = values[len(names) + 1 :]
        return out


class NormalizedGradient(torch.optim.Optimizer):
    """Normalised-gradient descent: ``p -= lr * grad / (rms(grad over the group) + eps)``.

    Every step moves the group by about ``lr`` per parameter (root mean square), like
    Adam, but keeps the *relative* size of the gradients: a gate whose gradient is
    ten times larger moves ten times further (Adam moves each by about lr, whatever
    its gradient; plain SGD moves by a scale that depends on the objective's units).
    Honours ``found_inf`` (set by the caller) without a host sync.
    """

    def __init__(self, params, lr: float = 1e-2, eps: float = 1e-12):
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            count = sum(g.numel() for g in grads)
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            factor = -group["lr"] / (norm / math.sqrt(count) + group["eps"])
            updates = torch._foreach_mul(grads, factor)
            if found_inf is not None:  # NaN * 0 is NaN: select, do not multiply
                skip = found_inf > 0
                updates = [torch.where(skip, torch.zeros_like(u), u) for u in updates]
            torch._foreach_add_(params, updates)


def make_lora_optimizer(params: Iterable[nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    """Adam over the LoRA factors (or all weights in ``full``); fused where available (device-side skip)."""
    params = list(params)
    return torch.optim.Adam(params, lr=config.lr, betas=config.betas, eps=config.eps, fused=_fusable(params))


def make_gate_optimizer(params: Iterable[nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    """The gate optimiser named by ``config.gate_optimizer`` over the gate logits."""
    params = list(params)
    if config.gate_optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.gate_lr, fused=_fusable(params))
    if config.gate_optimizer == "normalized":
        return NormalizedGradient(params, lr=config.gate_lr)
    return torch.optim.AdamW(params, lr=config.gate_lr, betas=config.gate_betas,
                             weight_decay=config.gate_weight_decay, fused=_fusable(params))


def _loss(model: nn.Module, objective: Objective, batch: torch.Tensor, autocast) -> torch.Tensor:
    """The objective (float32, 0-d) of ``model(batch)``; autocast around the backbone only."""
    with autocast():
        output = model(batch)
    return objective(output.float(), batch).float()


def hypergradient(
    model: nn.Module,
    objective: Objective,
    train_batch: torch.Tensor,
    val_batch: torch.Tensor,
    eta: float = 0.0,
    hyper_eps: float = 1e-8,
    autocast=contextlib.nullcontext,
    variant: str = "ift",
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The gate hypergradient of ``variant`` (``ift`` | ``release`` | ``direct``).

    Args:
        train_batch, val_batch: (N, 3, S, S) in [0, 1].
        eta: the LoRA learning rate (used by ``release`` only).

    Returns:
        (hypergradient per gate (0-d each), g = df/dw per LoRA factor, f, F): in the order of
        :func:`lora.gate_parameters` / :func:`lora.lora_parameters`; f and F detached 0-d.
    """
    gates = lora.gate_parameters(model)
    weights = lora.lora_parameters(model)
    upper = _loss(model, objective, val_batch, autocast)
    grads = torch.autograd.grad(upper, gates + weights, allow_unused=True)
    direct = _stack_grads(grads[: len(gates)], gates)
    v = [_zero_if_none(x, p) for x, p in zip(grads[len(gates):], weights)]
    lower = _loss(model, objective, train_batch, autocast)
    grads = torch.autograd.grad(lower, gates + weights, allow_unused=True)
    df_da = _stack_grads(grads[: len(gates)], gates)
    g = [_zero_if_none(x, p) for x, p in zip(grads[len(gates):], weights)]
    hyper = estimate(variant, direct, df_da, v, g, eta=eta, eps=hyper_eps)
    return list(hyper.unbind(0)), g, lower.detach(), upper.detach()


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
    hyper, g, lower, upper = hypergradient(model, objective, train_batch, val_batch, eta, config.hyper_eps, autocast,
                                           variant=config.hypergradient)
    gates = lora.gate_parameters(model)
    weights = lora.lora_parameters(model)
    _set_grads(weights, g)
    norm = _clip(weights, config.clip_norm)
    found_inf = _nonfinite(lower, upper, norm, torch.stack(hyper).sum())
    _set_grads(gates, hyper)
    _guarded_step(gate_optimizer, found_inf)
    if passes == 3:
        lower = _loss(model, objective, train_batch, autocast)
        g = torch.autograd.grad(lower, weights, allow_unused=True)
        lower = lower.detach()
        _set_grads(weights, [_zero_if_none(x, p) for x, p in zip(g, weights)])
        norm = _clip(weights, config.clip_norm)
        found_inf = torch.maximum(found_inf, _nonfinite(lower, norm))
    _guarded_step(lora_optimizer, found_inf)
    return StepResult(lower, upper, norm, found_inf > 0, lora.gate_tensor(model))


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
    loss.backward()
    gates = lora.gate_parameters(model)
    norm = _clip(lora.lora_parameters(model), config.clip_norm)
    gate_grads = [p.grad for p in gates if p.grad is not None]
    found_inf = _nonfinite(loss.detach(), norm, *([torch.stack(gate_grads).sum()] if gate_grads else []))
    _guarded_step(gate_optimizer, found_inf)
    _guarded_step(lora_optimizer, found_inf)
    return StepResult(loss.detach(), grad_norm=norm, skipped=found_inf > 0, gates=lora.gate_tensor(model))


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
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = _clip(params, config.clip_norm)
    found_inf = _nonfinite(loss.detach(), norm)
    _guarded_step(optimizer, found_inf)
    return StepResult(loss.detach(), grad_norm=norm, skipped=found_inf > 0)


def rank_sites(model: nn.Module) -> list[tuple[str, float]]:
    """Sites ordered by gate value, highest first (ties keep module order)."""
    values = lora.gate_values(model)
    return sorted(values.items(), key=lambda item: -item[1])


def _fusable(params: Sequence[torch.Tensor]) -> bool:
    """Whether a fused optimiser (device-side ``found_inf`` skip) supports these parameters."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) \
        and len({(p.device, p.dtype) for p in params}) == 1


def _guarded_step(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``found_inf`` (a 0-d float tensor, 1 = skip) is set.

    Fused optimisers and :class:`NormalizedGradient` skip on the device; any other
    optimiser needs one host read of the flag.
    """
    if optimizer.defaults.get("fused") or isinstance(optimizer, NormalizedGradient):
        optimizer.found_inf = found_inf.to(torch.float32)
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bool(found_inf):
        optimizer.step()


def _nonfinite(*values: torch.Tensor) -> torch.Tensor:
    """1.0 when any of the 0-d ``values`` is NaN/inf, else 0.0 (a 0-d float32 device tensor)."""
    stacked = torch.stack([v.detach().float() for v in values])
    return (~torch.isfinite(stacked).all()).float()


def _set_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    for param, grad in zip(params, grads):
        param.grad = grad.detach()


def _clip(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the gradients' total norm to ``max_norm`` (<= 0: no clipping); the norm before, 0-d, no sync."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf, foreach=True)


def _stack_grads(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> torch.Tensor:
    if not params:
        return torch.zeros(0)
    return torch.stack([_zero_if_none(x, p) for x, p in zip(grads, params)])


def _zero_if_none(grad: torch.Tensor | None, param: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(param) if grad is None else grad
