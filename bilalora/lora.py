"""Gated LoRA for Conv2d and Linear layers (docs/method.md, "Gated LoRA").

The factorisation is loralib's (Hu et al.'s reference ``ConvLoRA``): for a
frozen conv weight W (C_out, C_in/g, kh, kw) the layer learns
A (r*kh, C_in/g*kw) (Kaiming-uniform, a = sqrt(5), drawn from the CPU
generator so a seed means the same start on every device) and
B (C_out*kh, r*kh) (zeros); for a Linear W (C_out, C_in), A (r, C_in) and
B (C_out, r). The delta and the effective weight are

    delta_W = gate * (lora_alpha / r) * reshape(B @ A, W.shape)
    W_eff   = W + delta_W

with ``gate = sigmoid(a)`` for a logit ``a`` shared by all layers of a site
(or 1 for ungated LoRA). The frozen layer's own conv runs with the delta, so
stride, dilation, groups and padding mode are honoured exactly.

Precision. In float32 the forward pass is ``conv(x, W_eff)``. Under autocast
(bf16 on CUDA by default) ``W + delta_W`` would be rounded to bf16 by the
convolution and a small delta (1e-3 of W) is mostly rounded away; the layer
then runs the LoRA contribution as its own branch and sums in float32:

    y = float(conv(x, W)) + float(conv(x, delta_W))          (output float32)

so the delta keeps its own relative precision (measured on the CPU with bf16
autocast: README, "Sites, LoRA and adapters"). Merging stays exact: the branch
is linear in the weight.

Merge and unmerge follow PEFT's ``tuners/lora/layer.py``: each layer has
:meth:`LoRALayer.get_delta_weight`, :meth:`LoRALayer.merge` (with
``safe_merge`` refusing non-finite weights), :meth:`LoRALayer.unmerge` and a
``merged`` flag, so an adapter can be folded in and taken out of a live model;
``enabled`` switches a layer's LoRA off without touching its factors.

The layers live in :mod:`bilalora.lora_layers`. Injection replaces ``site.conv1`` by a :class:`LoRAConv2d` holding the original
conv as ``.base``; the site module gets one :class:`SiteGate` as
``.lora_gate``. :func:`merge` (merge then :func:`strip`) and :func:`strip`
restore the original module tree (same state-dict keys and shapes as the base
model); :func:`keep_sites` removes the other sites and fixes the kept gates in
place, keeping the kept layers' parameter objects.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .errors import UserError
from .lora_layers import LoRAConv2d, LoRALayer, LoRALinear, SiteGate
from .sites import Site

__all__ = [
    "GATE_ATTR",
    "LoRAConv2d",
    "LoRALayer",
    "LoRALinear",
    "SiteGate",
    "base_state_dict",
    "count_parameters",
    "freeze_base",
    "gate_parameters",
    "gate_tensor",
    "gate_values",
    "inject",
    "keep_sites",
    "load_lora_state_dict",
    "lora_layers",
    "lora_parameters",
    "lora_state_dict",
    "merge",
    "merge_adapter",
    "remove_sites",
    "set_enabled",
    "set_gate_values",
    "site_gates",
    "strip",
    "unmerge_adapter",
]

GATE_ATTR = "lora_gate"
_GATE_HANDLE = "_lora_site_gate"


def inject(
    model: nn.Module,
    sites: Iterable[Site],
    rank: int = 8,
    lora_alpha: float = 16.0,
    gated: bool = True,
    gate_logit: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, SiteGate]:
    """Wrap every layer of ``sites`` in gated LoRA, in place. Returns {site name: gate}.

    The new LoRA parameters live on the device and dtype of each base weight; A is drawn
    on the CPU from ``generator`` (default: the global CPU generator, i.e. ``torch.manual_seed``),
    so the same seed gives the same start on any device.
    """
    gates: dict[str, SiteGate] = {}
    for site in sites:
        gate = SiteGate(gate_logit, gated=gated, device=_first_weight(model, site).device)
        for path in site.convs:
            parent, child_name = _parent_of(model, path)
            layer = getattr(parent, child_name)
            if isinstance(layer, LoRALayer):
                raise ValueError(f"layer {path} already carries LoRA")
            wrapper_type = LoRAConv2d if isinstance(layer, nn.Conv2d) else LoRALinear
            setattr(parent, child_name, wrapper_type(layer, rank, lora_alpha, gate, generator=generator))
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


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """{layer path: LoRA layer} in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALayer)}


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
    """Copy A/B factors into the injected layers; every injected layer must be present and unmerged."""
    for path, layer in lora_layers(model).items():
        if layer.merged:
            raise ValueError(f"layer {path} is merged; unmerge before loading other factors")
        for attr in ("lora_A", "lora_B"):
            key = f"{path}.{attr}"
            if key not in state:
                raise KeyError(f"LoRA state has no '{key}'")
            target = getattr(layer, attr)
            if tuple(state[key].shape) != tuple(target.shape):
                raise ValueError(f"'{key}' has shape {tuple(state[key].shape)}, expected {tuple(target.shape)}")
            target.copy_(state[key].to(target.device, target.dtype))


def gate_values(model: nn.Module) -> dict[str, float]:
    """{site name: gate value in (0, 1] as a float} (one host transfer for all gates)."""
    gates = site_gates(model)
    if not gates:
        return {}
    return dict(zip(gates, gate_tensor(model).tolist()))


def gate_tensor(model: nn.Module) -> torch.Tensor:
    """Every site's gate value as one detached (S,) float32 tensor on the gates' device, in
    :func:`site_gates` order. No host sync: stack it per step and read it every N steps."""
    gates = list(site_gates(model).values())
    if not gates:
        return torch.zeros(0)
    with torch.no_grad():
        return torch.stack([gate.value().float() for gate in gates])


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


def merge_adapter(model: nn.Module, safe_merge: bool = True) -> nn.Module:
    """Merge every LoRA layer into its base weight, keeping the wrappers (undo with :func:`unmerge_adapter`).

    With ``safe_merge`` every merged weight is checked for NaN/inf first; on a non-finite
    one a UserError is raised and the layers merged so far are unmerged again.
    """
    done = []
    try:
        for layer in lora_layers(model).values():
            if not layer.merged:
                layer.merge(safe_merge=safe_merge)
                done.append(layer)
    except UserError:
        for layer in reversed(done):
            layer.unmerge()
        raise
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Take every merged LoRA delta out of its base weight again, in place."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def set_enabled(model: nn.Module, enabled: bool, sites: Iterable[str] | None = None) -> nn.Module:
    """Switch LoRA on or off (all sites, or the sites named) without touching factors or gates.

    A disabled layer runs its base layer alone; a merged layer is unmerged first.
    """
    names = None if sites is None else set(sites)
    gates = site_gates(model)
    if names is not None and names - set(gates):
        raise KeyError(f"no LoRA site named {sorted(names - set(gates))[0]!r}")
    for path, layer in lora_layers(model).items():
        if names is None or _site_of(gates, layer) in names:
            if not enabled:
                layer.unmerge()
            layer.enabled = enabled
    return model


@torch.no_grad()
def merge(model: nn.Module, safe_merge: bool = True) -> nn.Module:
    """Write every W_eff into its base layer and remove LoRA and gates, in place.

    Afterwards the model has exactly the base model's modules and state-dict keys.
    Raises a UserError (model unchanged) when a merged weight would hold NaN/inf.
    """
    merge_adapter(model, safe_merge=safe_merge)
    return strip(model)


def strip(model: nn.Module) -> nn.Module:
    """Remove LoRA wrappers and gates, in place. Merged layers keep their merged weight;
    unmerged ones return to the base weight (on an unmerged model: restores the base model)."""
    return _unwrap(model, None)


def remove_sites(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Unwrap the LoRA layers of the sites ``names`` and delete their gates, in place.
    A merged layer is unmerged first, so the base weight comes back unchanged."""
    names = set(names)
    unknown = names - set(site_gates(model))
    if unknown:
        raise KeyError(f"no LoRA site named {sorted(unknown)[0]!r}")
    return _unwrap(model, names)


def _unwrap(model: nn.Module, names: set[str] | None) -> nn.Module:
    """Replace LoRA wrappers by their base layers and drop gates: of every site (``names`` None,
    merged weights kept) or of the sites ``names`` (merged layers unmerged first)."""
    gates = site_gates(model)
    chosen = {id(gate) for name, gate in gates.items() if names is None or name in names}
    for path, layer in list(lora_layers(model).items()):
        if id(layer.gate) in chosen:
            if names is not None:
                layer.unmerge()
            parent, child_name = _parent_of(model, path)
            setattr(parent, child_name, layer.base)
    for module in model.modules():
        handle = module.__dict__.get(_GATE_HANDLE)
        if handle is not None and id(handle) in chosen:
            del module.__dict__[_GATE_HANDLE]
            del module._parameters[GATE_ATTR]
    return model


def keep_sites(model: nn.Module, names: list[str]) -> nn.Module:
    """Keep LoRA on the sites ``names`` only, in place (stage B's start): every other site
    returns to its base layers, the kept layers keep their factors (the same parameter
    objects) and their gates stay at their current value, fixed."""
    gates = site_gates(model)
    missing = [name for name in names if name not in gates]
    if missing:
        raise KeyError(f"no LoRA site named {missing[0]!r}")
    remove_sites(model, [name for name in gates if name not in names])
    for name in names:
        gates[name].logit.requires_grad_(False)
    return freeze_base(model)


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict seen through any LoRA wrappers (keys as without LoRA).

    On a merged model the weights are the merged ones."""
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


def _site_of(gates: Mapping[str, SiteGate], layer: LoRALayer) -> str | None:
    for name, gate in gates.items():
        if layer.gate is gate:
            return name
    return None


def _module_at(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def _parent_of(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child_name = path.rpartition(".")
    return _module_at(model, parent_path), child_name


def _first_weight(model: nn.Module, site: Site) -> torch.Tensor:
    return model.get_submodule(site.convs[0]).weight
