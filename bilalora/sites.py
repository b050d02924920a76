"""Candidate LoRA injection sites of any ``nn.Module``.

A *site* is a module with direct ``Conv2d`` (or ``Linear``) children; all those
children get LoRA and share the site's gate (docs/method.md, "Gated LoRA"). A conv that
is a direct child of the root model is a site of its own, named after it.
Backbones may declare a default search space as glob patterns (DEA-Net: the
release's 16 encoder blocks), and search spaces for particular objectives (DEA-Net
under the prior: its level-1 encoder blocks); ``include``/``exclude`` patterns narrow
any list.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from torch import nn

from .errors import UserError

__all__ = ["Site", "discover", "default_sites", "objective_patterns", "select", "by_name", "lora_param_count",
           "LORA_TYPES"]

#: Layer types that can carry LoRA.
LORA_TYPES = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class Site:
    """One injection site.

    Attributes:
        name: dotted module path of the site (``level3_block1``).
        convs: dotted paths of the layers that get LoRA (``level3_block1.conv1``, ...).
        shapes: each layer's weight shape, aligned with ``convs``.
        groups: each layer's ``groups`` (1 for Linear).
    """

    name: str
    convs: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    groups: tuple[int, ...]

    def lora_params(self, rank: int) -> int:
        """Number of LoRA parameters (A and B of all layers) at rank ``rank``."""
        return sum(lora_param_count(shape, groups, rank) for shape, groups in zip(self.shapes, self.groups))

    def base_params(self) -> int:
        """Number of weight parameters of the layers (biases excluded)."""
        total = 0
        for shape in self.shapes:
            count = 1
            for dim in shape:
                count *= dim
            total += count
        return total


def lora_param_count(weight_shape: Sequence[int], groups: int, rank: int) -> int:
    """LoRA parameter count for a layer weight.

    Conv (C_out, C_in/g, kh, kw): A is (r*kh, C_in/g*kw), B is (C_out*kh, r*kh).
    Linear (C_out, C_in): A is (r, C_in), B is (C_out, r).
    """
    if len(weight_shape) == 2:
        out_features, in_features = weight_shape
        return rank * in_features + out_features * rank
    out_channels, in_per_group, kernel_h, kernel_w = weight_shape
    return rank * kernel_h * in_per_group * kernel_w + out_channels * kernel_h * rank * kernel_h


def discover(model: nn.Module) -> list[Site]:
    """All sites of ``model`` in module order (see the module docstring)."""
    sites: list[Site] = []
    for name, module in model.named_modules():
        children = [(child_name, child) for child_name, child in module.named_children() if _is_lora_layer(child)]
        if not children:
            continue
        if name == "":
            for child_name, child in children:
                sites.append(_make_site(child_name, [(child_name, child)]))
        else:
            sites.append(_make_site(name, [(f"{name}.{child_name}", child) for child_name, child in children]))
    return sites


def objective_patterns(model: nn.Module, objective: Optional[str]) -> Optional[list[str]]:
    """The backbone's search space (glob patterns) for the objective named ``objective``, if it declares one."""
    if not objective:
        return None
    by_objective = (getattr(model, "bilalora_info", None) or {}).get("objective_sites") or {}
    patterns = by_objective.get(objective)
    return list(patterns) if patterns else None


def default_sites(model: nn.Module, objective: Optional[str] = None) -> list[Site]:
    """The backbone's default search space (all sites when it declares none).

    ``objective``: an objective's name (``"prior"``); a backbone that declares a search
    space for it (``objective_sites`` in its registry entry) gives that one instead.
    """
    patterns = objective_patterns(model, objective)
    if patterns is None:
        patterns = (getattr(model, "bilalora_info", None) or {}).get("default_sites")
    if patterns is None:
        patterns = getattr(model, "default_sites", None)
    every = discover(model)
    if not patterns:
        return every
    return select(every, include=patterns)


def select(
    sites: Iterable[Site],
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    flag: str = "--sites",
) -> list[Site]:
    """Filter sites by glob patterns on their names, keeping order.

    Raises a UserError when an include pattern matches nothing.
    """
    sites = list(sites)
    if include:
        unmatched = [p for p in include if not any(fnmatch.fnmatchcase(s.name, p) for s in sites)]
        if unmatched:
            names = ", ".join(s.name for s in sites[:6])
            raise UserError(
                f"{flag} pattern(s) {', '.join(unmatched)} match no site; sites look like {names}, ... "
                "(run `bilalora sites --all`)"
            )
        sites = [s for s in sites if any(fnmatch.fnmatchcase(s.name, p) for p in include)]
    if exclude:
        sites = [s for s in sites if not any(fnmatch.fnmatchcase(s.name, p) for p in exclude)]
    return sites


def by_name(model: nn.Module, names: Sequence[str], where: str = "the model") -> list[Site]:
    """The sites called ``names`` (exact names, in that order); a UserError names the missing ones."""
    sites = {site.name: site for site in discover(model)}
    missing = [name for name in names if name not in sites]
    if missing:
        raise UserError(f"sites {', '.join(missing)} do not exist in {where}")
    return [sites[name] for name in names]


def _is_lora_layer(module: nn.Module) -> bool:
    return type(module) in LORA_TYPES


def _make_site(name: str, layers: list[tuple[str, nn.Module]]) -> Site:
    return Site(
        name=name,
        convs=tuple(path for path, _ in layers),
        shapes=tuple(tuple(layer.weight.shape) for _, layer in layers),
        groups=tuple(getattr(layer, "groups", 1) for _, layer in layers),
    )
