"""Gated LoRA for Conv2d and Linear layers (docs/method.md, "Gated LoRA"), after PEFT's LoRA layer.

For a frozen conv weight W (C_out, C_in/g, kh, kw) the layer learns
A (r*kh, C_in/g*kw) (Kaiming-uniform, a = sqrt(5)) and B (C_out*kh, r*kh)
(zeros); the effective weight is

    W_eff = W + gate * (lora_alpha / r) * reshape(B @ A, W.shape)

with ``gate = sigmoid(a)`` for a logit ``a`` shared by all layers of a site
(or 1 for ungated LoRA). The delta is added to the weight and the frozen
layer's own conv runs with it, so stride, dilation, groups and padding mode
are honoured exactly, and :func:`merge` writes W_eff back with no change of
output.

Injection replaces ``site.conv1`` by a :class:`LoRAConv2d` holding the original
conv as ``.base``; the site module gets one :class:`SiteGate` as
``.lora_gate``. :func:`merge` and :func:`strip` restore the original module
tree (same state-dict keys and shapes as the base model).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .sites import Site, by_name

__all__ = [
    "SiteGate",
    "LoRAConv2d",
    "LoRALinear",
    "inject",
    "freeze_base",
    "lora_layers",
    "site_gates",
    "lora_parameters",
    "gate_parameters",
    "lora_state_dict",
    "load_lora_state_dict",
    "gate_values",
    "set_gate_values",
    "merge",
    "strip",
    "keep_sites",
    "base_state_dict",
    "count_parameters",
    "GATE_ATTR",
]

GATE_ATTR = "lora_gate"
_GATE_HANDLE = "_lora_site_gate"


class SiteGate:
    """The gate of one site: ``sigmoid(logit)``, or the constant 1 when ungated.

    The logit is an ``nn.Parameter`` registered on the site module as
    ``lora_gate`` (a parameter, not a child module, so containers such as
    ``nn.Sequential`` keep iterating only their layers); this object is the
    handle the site's LoRA layers share.

    Args:
        logit: initial logit (default 0, i.e. gate 0.5).
        gated: False for plain LoRA (the ``manual`` baseline): value() is 1.
    """

    def __init__(self, logit: float = 0.0, gated: bool = True, device=None):
        self.logit = nn.Parameter(torch.tensor(float(logit), device=device), requires_grad=gated)
        self.gated = gated

    def value(self) -> torch.Tensor:
        """The gate as a 0-d tensor in (0, 1) (or exactly 1 when ungated)."""
        if not self.gated:
            return torch.ones((), dtype=self.logit.dtype, device=self.logit.device)
        return torch.sigmoid(self.logit)

    def __repr__(self) -> str:
        return f"SiteGate(gated={self.gated}, value={float(self.value()):.4f})"


class _LoRALayer(nn.Module):
    """Shared logic of LoRA layers: the factors, the delta, the effective weight."""

    base: nn.Module
    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def __init__(self, base: nn.Module, rank: int, lora_alpha: float, gate: SiteGate, a_shape, b_shape):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        weight = base.weight
        self.rank = rank
        self.lora_alpha = float(lora_alpha)
        self.scale = self.lora_alpha / rank
        self.lora_A = nn.Parameter(weight.new_empty(a_shape))
        self.lora_B = nn.Parameter(weight.new_zeros(b_shape))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # The gate belongs to the site module; keep a reference without registering it here.
        object.__setattr__(self, "_gate", gate)

    @property
    def gate(self) -> SiteGate:
        return self._gate

    def delta(self) -> torch.Tensor:
        """The unscaled, ungated weight delta reshape(B @ A), shaped like the base weight."""
        return (self.lora_B @ self.lora_A).view(self.base.weight.shape)

    def effective_weight(self) -> torch.Tensor:
        """W + gate * scale * delta, shaped like the base weight."""
        gate = self.gate.value().to(self.lora_A.dtype)
        return self.base.weight + (gate * self.scale) * self.delta().to(self.base.weight.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, lora_alpha={self.lora_alpha:g}"


class LoRAConv2d(_LoRALayer):
    """Gated LoRA around an ``nn.Conv2d``. (N, C_in, H, W) -> (N, C_out, H', W') like the base."""

    def __init__(self, base: nn.Conv2d, rank: int, lora_alpha: float, gate: SiteGate):
        kernel_h, kernel_w = base.kernel_size
        in_per_group = base.in_channels // base.groups
        super().__init__(
            base,
            rank,
            lora_alpha,
            gate,
            a_shape=(rank * kernel_h, in_per_group * kernel_w),
            b_shape=(base.out_channels * kernel_h, rank * kernel_h),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base._conv_forward(x, self.effective_weight(), self.base.bias)


class LoRALinear(_LoRALayer):
    """Gated LoRA around an ``nn.Linear``. (..., C_in) -> (..., C_out)."""

    def __init__(self, base: nn.Linear, rank: int, lora_alpha: float, gate: SiteGate):
        super().__init__(
            base,
            rank,
            lora_alpha,
            gate,
            a_shape=(rank, base.in_features),
            b_shape=(base.out_features, rank),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.base.bias)


def inject(
    model: nn.Module,
    sites: Iterable[Site],
    rank: int = 8,
    lora_alpha: float = 16.0,
    gated: bool = True,
    gate_logit: float = 0.0,
) -> dict[str, SiteGate]:
    """Wrap every layer of ``sites`` in gated LoRA, in place. Returns {site name: gate}.

    The new LoRA parameters are created on the device and dtype of each base weight.
    """
    gates: dict[str, SiteGate] = {}
    for site in sites:
        gate = SiteGate(gate_logit, gated=gated, device=_first_weight(model, site).device)
        for path in site.convs:
            parent, child_name = _parent_of(model, path)
            layer = getattr(parent, child_name)
            if isinstance(layer, _LoRALayer):
                raise ValueError(f"layer {path} already carries LoRA")
            wrapper_type = LoRAConv2d if isinstance(layer, nn.Conv2d) else LoRALinear
            setattr(parent, child_name, wrapper_type(layer, rank, lora_alpha, gate))
        # The gate lives on the site module; a root-level layer is its own site and holds it.
        host = _module_at(model, site.name)
        host.register_parameter(GATE_ATTR, gate.logit)
        object.__setattr__(host, _GATE_HANDLE, gate)
        gates[site.name] = gate
    return gates


def freeze_base(model: nn.Module) -> nn.Module:
    """Freeze every parameter that is not a LoRA factor or a gate logit."""
    for name, param in model.named_parameters():
        is_lora = name.endswith(".lora_A") or name.endswith(".lora_B")
        is_gate = name == GATE_ATTR or name.endswith(f".{GATE_ATTR}")
        if not (is_lora or is_gate):
            param.requires_grad_(False)
    return model


def lora_layers(model: nn.Module) -> dict[str, _LoRALayer]:
    """{layer path: LoRA layer} in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, _LoRALayer)}


def site_gates(model: nn.Module) -> dict[str, SiteGate]:
    """{site name: gate} for every injected site, in module order."""
    return {
        name: module.__dict__[_GATE_HANDLE] for name, module in model.named_modules() if _GATE_HANDLE in module.__dict__
    }


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All LoRA A/B factors."""
    return [p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All gate logits (one per site)."""
    return [gate.logit for gate in site_gates(model).values()]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<layer path>.lora_A": tensor, "<layer path>.lora_B": tensor} detached on the CPU."""
    state = {}
    for path, layer in lora_layers(model).items():
        state[f"{path}.lora_A"] = layer.lora_A.detach().cpu().clone()
        state[f"{path}.lora_B"] = layer.lora_B.detach().cpu().clone()
    return state


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy A/B factors into the injected layers; every injected layer must be present."""
    for path, layer in lora_layers(model).items():
        for attr in ("lora_A", "lora_B"):
            key = f"{path}.{attr}"
            if key not in state:
                raise KeyError(f"LoRA state has no '{key}'")
            target = getattr(layer, attr)
            if tuple(state[key].shape) != tuple(target.shape):
                raise ValueError(f"'{key}' has shape {tuple(state[key].shape)}, expected {tuple(target.shape)}")
            target.copy_(state[key].to(target.device, target.dtype))


def gate_values(model: nn.Module) -> dict[str, float]:
    """{site name: gate value in (0, 1] as a float}."""
    return {name: float(gate.value().detach()) for name, gate in site_gates(model).items()}


@torch.no_grad()
def set_gate_values(model: nn.Module, values: Mapping[str, float], trainable: bool = False) -> None:
    """Set each site's gate to a value in (0, 1] (1 means ungated) and fix it unless ``trainable``."""
    gates = site_gates(model)
    for name, value in values.items():
        gate = gates[name]
        if value >= 1.0:
            gate.gated = False
            gate.logit.fill_(0.0)
        else:
            gate.gated = True
            value = min(max(float(value), 1e-7), 1 - 1e-7)
            gate.logit.fill_(math.log(value / (1 - value)))
        gate.logit.requires_grad_(trainable and gate.gated)


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Write every W_eff into its base layer and remove LoRA and gates, in place.

    Afterwards the model has exactly the base model's modules and state-dict keys.
    """
    for path, layer in lora_layers(model).items():
        layer.base.weight.copy_(layer.effective_weight())
    return strip(model)


def strip(model: nn.Module) -> nn.Module:
    """Remove LoRA wrappers and gates without merging (restores the base model), in place."""
    for path in list(lora_layers(model)):
        parent, child_name = _parent_of(model, path)
        wrapper = getattr(parent, child_name)
        setattr(parent, child_name, wrapper.base)
    for module in model.modules():
        if _GATE_HANDLE in module.__dict__:
            del module.__dict__[_GATE_HANDLE]
            del module._parameters[GATE_ATTR]
    return model


def keep_sites(model: nn.Module, names: list[str]) -> nn.Module:
    """Keep LoRA on the sites ``names`` only, in place: their factors and gate values stay,
    the gates become fixed, every other site returns to its base layers (stage B's start)."""
    layers = lora_layers(model)
    first = next(iter(layers.values()))
    state = lora_state_dict(model)
    gates = {name: value for name, value in gate_values(model).items() if name in names}
    strip(model)
    inject(model, by_name(model, names), first.rank, first.lora_alpha)
    kept = lora_layers(model)
    load_lora_state_dict(model, {k: v for k, v in state.items() if k.rsplit(".", 1)[0] in kept})
    set_gate_values(model, gates, trainable=False)
    return freeze_base(model)


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict seen through any LoRA wrappers (keys as without LoRA)."""
    wrapper_prefixes = [f"{path}." for path in lora_layers(model)]
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith((".lora_A", ".lora_B", f".{GATE_ATTR}")) or key == GATE_ATTR:
            continue
        for prefix in wrapper_prefixes:
            if key.startswith(prefix + "base."):
                key = prefix + key[len(prefix) + len("base.") :]
                break
        state[key] = value
    return state


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters, each shared parameter counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _module_at(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def _parent_of(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child_name = path.rpartition(".")
    return _module_at(model, parent_path), child_name


def _first_weight(model: nn.Module, site: Site) -> torch.Tensor:
    return model.get_submodule(site.convs[0]).weight
