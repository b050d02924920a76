"""Objectives for adaptation: H2C (CLIP text-directed), Prior (CLIP-free), compositions.

    obj = build_objective("h2c")                          # CLIP text-directed (docs/method.md)
    obj = build_objective("prior")                        # air-gapped, no CLIP
    obj = build_objective("h2c:1+prior:0.5", pretrained="clip.safetensors", exposure_weight=2)
    loss = obj(output, hazy)      # (N, 3, H, W) each -> 0-d tensor
    obj.last_terms                # {"h2c": ..., "prior": ..., "prior.dark": ..., "total": ...}

A spec is ``NAME``, ``NAME:WEIGHT`` or ``NAME(KEY=VALUE,...)[:WEIGHT]`` joined by
``+``; options in parentheses go to that part only (``prior(range=1,colour=0)``:
a key is a parameter of the part's factory, or a weight named without its
``_weight`` suffix). Keyword options are forwarded to every selected part that
accepts them (by signature); options set to None are dropped, so a CLI can pass
every flag through unchanged. Options in the spec win over keyword options.
:func:`register_objective` adds a factory under a new name.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from ..errors import UserError
from .base import Objective, clamp01
from .h2c import H2C, h2c_from_embeddings
from .prior import Prior

__all__ = [
    "H2C",
    "Composite",
    "Objective",
    "Prior",
    "build_objective",
    "clamp01",
    "h2c_from_embeddings",
    "list_objectives",
    "parse_spec",
    "parse_spec_options",
    "register_objective",
    "spec_text",
]

log = logging.getLogger("bilalora.objectives")

_REGISTRY: dict[str, Callable[..., Objective]] = {}


def register_objective(name: str, factory: Callable[..., Objective], overwrite: bool = False) -> None:
    """Register ``factory(**options) -> Objective`` under ``name`` (lower-case, no ``+`` or ``:``)."""
    key = name.strip().lower()
    if not key or any(ch in key for ch in "+: "):
        raise ValueError(f"objective name {name!r} must be non-empty without '+', ':' or spaces")
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"objective {key!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[key] = factory


def list_objectives() -> list[str]:
    """Registered objective names, sorted."""
    return sorted(_REGISTRY)


register_objective("h2c", H2C)
register_objective("prior", Prior)


class Composite(Objective):
    """Weighted sum of objectives: ``L = sum_i w_i * L_i``.

    ``last_terms`` merges the parts' terms (``h2c``, ``prior``, ``prior.dark``,
    ...; unweighted) and adds ``total`` (the weighted sum).
    """

    def __init__(self, parts: list[tuple[Objective, float]], name: str | None = None) -> None:
        super().__init__()
        if not parts:
            raise ValueError("Composite needs at least one part")
        self.parts = [(obj, float(w)) for obj, w in parts]
        self.name = name or "+".join(f"{obj.name}:{_fmt(w)}" for obj, w in self.parts)

    def forward(self, output: torch.Tensor, hazy: torch.Tensor) -> torch.Tensor:
        total = None
        terms: dict[str, torch.Tensor] = {}
        for obj, weight in self.parts:
            value = obj(output, hazy)
            terms.update(getattr(obj, "_terms", {}))
            terms.setdefault(obj.name, value.detach())
            total = weight * value if total is None else total + weight * value
        terms["total"] = total.detach()
        self._terms = terms
        return total

    def prepare(self, hazy: torch.Tensor) -> None:
        for obj, _ in self.parts:
            obj.prepare(hazy)

    @property
    def wants_reference(self) -> bool:  # type: ignore[override]
        return any(obj.wants_reference for obj, _ in self.parts)

    def bind_reference(self, reference) -> None:
        for obj, _ in self.parts:
            obj.bind_reference(reference)

    def describe(self) -> dict:
        return {"name": self.name, "parts": [{"weight": w, **obj.describe()} for obj, w in self.parts]}

    def _move(self, device: torch.device) -> None:
        for obj, _ in self.parts:
            obj.to(device)


def _fmt(weight: float) -> str:
    return f"{weight:g}"


def _split_parts(spec: str) -> list[str]:
    """Split on ``+`` outside parentheses (``prior(a=1e+2)+h2c`` -> two parts)."""
    parts, depth, current = [], 0, ""
    for ch in spec:
        depth += (ch == "(") - (ch == ")")
        if ch == "+" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def _option_value(text: str) -> Any:
    if text in ("none", "null"):
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _parse(spec: str) -> list[tuple[str, float | None, dict[str, Any]]]:
    valid = ", ".join(list_objectives())
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"--objective: empty; use one of {valid}, or a weighted sum such as h2c:1+prior:0.5")
    parts: list[tuple[str, float | None, dict[str, Any]]] = []
    for chunk in _split_parts(spec.replace(" ", "").lower()):
        options: dict[str, Any] = {}
        if "(" in chunk:
            head, _, rest = chunk.partition("(")
            inner, close, tail = rest.partition(")")
            if not close or "(" in inner or ")" in tail:
                raise UserError(f"--objective {spec}: unbalanced parentheses in {chunk!r}; "
                                "write e.g. prior(range=1,colour=0):0.5")  # fmt: skip
            chunk = head + tail
            for item in filter(None, inner.split(",")):
                key, eq, value = item.partition("=")
                if not eq or not key or not value:
                    raise UserError(f"--objective {spec}: option {item!r} of {head} must be KEY=VALUE")
                options[key] = _option_value(value)
        name, sep, weight_text = chunk.partition(":")
        if name not in _REGISTRY:
            raise UserError(f"--objective {spec}: unknown objective {name!r}; valid names: {valid} "
                            "(combine as h2c:1+prior:0.5)")
        weight = None
        if sep:
            try:
                weight = float(weight_text)
            except ValueError:
                weight = float("nan")
            if not (math.isfinite(weight) and weight > 0):
                raise UserError(f"--objective {spec}: weight {weight_text!r} of {name} must be a number > 0")
        if any(name == seen for seen, _, _ in parts):
            raise UserError(f"--objective {spec}: {name} appears twice")
        parts.append((name, weight, _resolve_options(spec, name, options)))
    return parts


def _resolve_options(spec: str, name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Map spec keys to the factory's parameters (``range`` -> ``range_weight``); unknown keys fail."""
    names, var_kw = _accepted(_REGISTRY[name])
    resolved: dict[str, Any] = {}
    for key, value in options.items():
        if key in names or var_kw:
            target = key
        elif f"{key}_weight" in names:
            target = f"{key}_weight"
        else:
            choices = ", ".join(sorted(n.removesuffix("_weight") for n in names))
            raise UserError(f"--objective {spec}: {name} has no option {key!r}; options: {choices}")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--objective {spec}: option {key} of {name} must be finite")
        resolved[target] = value
    return resolved


def parse_spec(spec: str) -> list[tuple[str, float | None]]:
    """``"h2c:1+prior:0.5"`` -> ``[("h2c", 1.0), ("prior", 0.5)]``; a bare name gets None."""
    return [(name, weight) for name, weight, _ in _parse(spec)]


def spec_text(name: str, options: dict[str, Any]) -> str:
    """``("prior", {"bright_weight": 0.0, "range_gain": 0.0})`` -> ``"prior(bright=0,range_gain=0)"`` (spec syntax)."""
    def value(v: Any) -> str:
        return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)

    inner = ",".join(f"{key.removesuffix('_weight')}={value(v)}" for key, v in options.items())
    return f"{name}({inner})" if inner else name


def parse_spec_options(spec: str) -> dict[str, dict[str, Any]]:
    """``"prior(range=1,colour=0)"`` -> ``{"prior": {"range_weight": 1.0, "colour_weight": 0.0}}``."""
    return {name: options for name, _, options in _parse(spec)}


def _accepted(factory: Callable[..., Objective]) -> tuple[set[str], bool]:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def _is_default(option: str, value: Any) -> bool:
    """True if some registered factory takes ``option`` with ``value`` as its default."""
    for factory in _REGISTRY.values():
        try:
            param = inspect.signature(factory).parameters.get(option)
        except (TypeError, ValueError):
            continue
        if param is not None and param.default is not inspect.Parameter.empty and param.default == value:
            return True
    return False


def build_objective(spec: str, part_defaults: dict[str, dict[str, Any]] | None = None, **options: Any) -> Objective:
    """Build an objective from a spec (``h2c``, ``prior``, ``h2c+prior``, ``h2c:1+prior:0.5``).

    Args:
        spec: the ``--objective`` value; per-part options in parentheses
            (``prior(range=1,colour=0)``) are passed to that part only.
        **options: forwarded to each part that accepts them; H2C: ``clip``,
            ``pretrained``, ``clip_config``, ``negative``, ``positive``, ``night``,
            ``mode``, ``device``; Prior: ``dark_weight``, ``exposure_weight``,
            ``colour_weight``, ``hue_weight``, ``structure_weight``,
            ``exposure_target``, ``exposure_relative``, ``dark_window``, ``tau``,
            ``dark_floor``, ``hue_reference``. None values are dropped; an option
            that only unselected parts accept is ignored (logged as a warning
            unless it equals that part's default, e.g. ``night=False``).
        part_defaults: options by part name (``{"prior": {"bright_weight": 0.0}}``, keys as
            the part factory's parameters), e.g. a backbone's ``objective_options``: they
            replace that part's defaults and keyword options; options in the spec win.

    Returns:
        The single objective for a bare single name, else a :class:`Composite`
        (bare names weigh 1).

    Raises:
        UserError: unknown name or bad weight (naming ``--objective``), or
            whatever a part raises (e.g. CLIP weights that cannot be loaded).
        TypeError: an option no registered objective accepts (a programming error).
    """
    parts = _parse(spec)
    options = {k: v for k, v in options.items() if v is not None}
    known_anywhere: set[str] = set()
    for factory in _REGISTRY.values():
        names, var_kw = _accepted(factory)
        known_anywhere |= names
        if var_kw:
            known_anywhere |= set(options)
    stray = sorted(set(options) - known_anywhere)
    if stray:
        raise TypeError(f"build_objective: unknown option(s) {', '.join(stray)}")

    built: list[tuple[Objective, float]] = []
    used: set[str] = set()
    for name, weight, own in parts:
        factory = _REGISTRY[name]
        names, var_kw = _accepted(factory)
        kwargs = {k: v for k, v in options.items() if var_kw or k in names}
        used |= set(kwargs)
        preset = (part_defaults or {}).get(name) or {}
        unknown = sorted(k for k in preset if not (var_kw or k in names))
        if unknown:
            raise TypeError(f"build_objective: {name} has no option(s) {', '.join(unknown)} (part_defaults)")
        kwargs.update(preset)
        kwargs.update(own)
        try:
            built.append((factory(**kwargs), 1.0 if weight is None else weight))
        except (TypeError, ValueError, UserError) as exc:
            if not own:
                raise
            raise UserError(f"--objective {spec}: bad option for {name}: {exc}") from None
    unused = sorted(k for k in set(options) - used - {"device"} if not _is_default(k, options[k]))
    if unused:
        log.warning("objective %s ignores option(s): %s", spec, ", ".join(unused))
    if len(built) == 1 and parts[0][1] is None:
        return built[0][0]
    return Composite(built, name=None)
