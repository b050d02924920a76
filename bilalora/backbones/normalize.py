"""Input normalisation as a property of a set of weights, folded into the network.

Some checkpoints expect normalised input: the paper's release feeds its
backbones CLIP-normalised RGB, ``(x - CLIP_MEAN) / CLIP_STD``, while DEA-Net's
own checkpoints (and every network ``bilalora pretrain`` writes) take plain
``[0, 1]`` RGB. bilalora keeps one convention everywhere: **a model takes
(N, 3, H, W) RGB in [0, 1]**. A checkpoint that expects normalised input gets
the normalisation folded in by :func:`fold_input_norm`:

* two non-persistent buffers (``mean``, ``std`` of shape (1, 3, 1, 1)) and a
  forward pre-hook computing ``(x - mean) / std`` before the network's own
  forward. The state-dict keys do not change (non-persistent buffers are not
  saved), so weight files, fingerprints, LoRA sites and adapters are the same
  with and without normalisation;
* the hook is a module-level function reading the buffers of the module it
  is called on, so the normalisation survives ``copy.deepcopy``, ``.to()``,
  ``.half()`` and ``channels_last``, and ``torch.onnx.export`` traces it into
  the graph (the exported graph takes [0, 1] RGB too).

The choice is recorded as ``model.bilalora_info["input_norm"]``: ``None`` (plain
[0, 1] input) or ``{"mean": [m_r, m_g, m_b], "std": [s_r, s_g, s_b]}``; adapter
metadata and ``model.json`` carry the same dict. See docs/weights.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..errors import UserError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "InputNorm",
    "parse_input_norm",
    "resolve_input_norm",
    "recorded_input_norm",
    "fold_input_norm",
    "unfold_input_norm",
    "folded_input_norm",
    "same_input_norm",
    "describe",
]

#: OpenAI CLIP's RGB normalisation (what the paper's release feeds its backbones).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: An input normalisation as the user may give it: None (ask the weights), "clip", "none",
#: "MEAN,STD"-style text (3 or 6 numbers, see :func:`parse_input_norm`) or a (mean, std) pair.
InputNorm = Union[None, str, tuple, dict]

_HOOK_ATTR = "_bilalora_input_norm_hook"
_MEAN = "bilalora_input_mean"
_STD = "bilalora_input_std"


def parse_input_norm(value: InputNorm, flag: str = "--input-norm") -> Optional[dict] | str:
    """Normalise a user-given input normalisation.

    Args:
        value: ``None`` / ``"auto"`` (let the weights say), ``"none"``, ``"clip"``,
            ``"m_r,m_g,m_b,s_r,s_g,s_b"`` or ``"m,s"`` text, a ``(mean, std)`` pair of
            3-sequences or numbers, or a ``{"mean": ..., "std": ...}`` dict.
        flag: option name for the error message.

    Returns:
        ``"auto"`` for ``None``/``"auto"``; ``None`` for ``"none"``; else ``{"mean": [3 floats],
        "std": [3 floats]}`` with finite means and finite positive stds.
    """
    if value is None:
        return "auto"
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "auto"):
            return "auto"
        if text in ("none", "off", "0-1", "[0,1]"):
            return None
        if text == "clip":
            return {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}
        try:
            numbers = [float(part) for part in text.replace(";", ",").split(",") if part.strip()]
        except ValueError:
            raise UserError(
                f"{flag} {value!r}: use clip, none, or MEAN,STD as 2 or 6 comma-separated numbers "
                "(e.g. 0.5,0.5 or 0.48,0.46,0.41,0.27,0.26,0.28)"
            ) from None
        if len(numbers) == 2:
            mean, std = [numbers[0]] * 3, [numbers[1]] * 3
        elif len(numbers) == 6:
            mean, std = numbers[:3], numbers[3:]
        else:
            raise UserError(f"{flag} {value!r}: give 2 numbers (mean,std) or 6 (3 means, 3 stds), got {len(numbers)}")
        return _checked(mean, std, flag)
    if isinstance(value, dict):
        if "mean" not in value or "std" not in value:
            raise UserError(f"{flag}: an input normalisation needs 'mean' and 'std', got keys {sorted(value)}")
        return _checked(value["mean"], value["std"], flag)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return _checked(value[0], value[1], flag)
    raise UserError(f"{flag}: cannot read {value!r} as an input normalisation (clip, none or MEAN,STD)")


def _checked(mean, std, flag: str) -> dict:
    def triple(x, what):
        if isinstance(x, (int, float)):
            x = [x] * 3
        try:
            values = [float(v) for v in x]
        except (TypeError, ValueError):
            raise UserError(f"{flag}: {what} must be numbers, got {x!r}") from None
        if len(values) != 3:
            raise UserError(f"{flag}: {what} needs 3 values (R, G, B), got {len(values)}")
        if not all(math.isfinite(v) for v in values):
            raise UserError(f"{flag}: {what} must be finite, got {values}")
        return values

    mean_v, std_v = triple(mean, "mean"), triple(std, "std")
    if min(std_v) <= 0:
        raise UserError(f"{flag}: std must be positive, got {std_v}")
    return {"mean": mean_v, "std": std_v}


def recorded_input_norm(weights: str | Path | None) -> Optional[dict] | str:
    """What a weights file says about its input normalisation, ``"unknown"`` when it says nothing.

    Looked up, in order: the ``input_norm`` field of the file's ``bilalora``
    safetensors metadata, then of its weights card (``<stem>.json`` beside it,
    written by ``bilalora pretrain``). Returns ``None`` (plain [0, 1]), a
    ``{"mean", "std"}`` dict, or ``"unknown"``.
    """
    if weights is None or str(weights) == "random":
        return "unknown"
    path = Path(weights)
    if path.suffix.lower() == ".safetensors" and path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as handle:
                raw = (handle.metadata() or {}).get("bilalora")
            meta = json.loads(raw) if raw else {}
        except Exception:  # noqa: BLE001 - an unreadable header is reported by the loader itself
            meta = {}
        if isinstance(meta, dict) and "input_norm" in meta:
            return parse_input_norm(meta["input_norm"] or "none", flag=f"{path} metadata input_norm")
    card = path.with_suffix(".json")
    if card.is_file():
        try:
            data = json.loads(card.read_text())
        except (OSError, ValueError):
            return "unknown"
        if isinstance(data, dict) and "input_norm" in data and data.get("weights_file", path.name) == path.name:
            return parse_input_norm(data["input_norm"] or "none", flag=f"{card} input_norm")
    return "unknown"


def resolve_input_norm(choice: InputNorm, weights: str | Path | None, with_origin: bool = False):
    """The input normalisation to fold for ``weights`` given the user's ``choice``.

    An explicit choice wins ("none", "clip", numbers); ``None``/"auto" takes what
    the weights record (:func:`recorded_input_norm`) and plain [0, 1] when they record nothing.

    Returns:
        ``None`` or ``{"mean", "std"}``; with ``with_origin``, a pair (that, origin) where
        origin is ``"flag"`` (explicit choice), ``"weights"`` (recorded) or ``"default"``.
    """
    parsed = parse_input_norm(choice)
    if parsed != "auto":
        norm, origin = parsed, "flag"
    else:
        recorded = recorded_input_norm(weights)
        norm, origin = (None, "default") if recorded == "unknown" else (recorded, "weights")
    return (norm, origin) if with_origin else norm


def fold_input_norm(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """Make ``model`` take [0, 1] RGB and normalise it internally, in place; returns ``model``.

    Args:
        model: a network whose weights expect ``(x - mean) / std`` input of shape (N, 3, H, W).
        mean, std: per-channel RGB statistics (3 values each, std > 0).

    Folding twice replaces the earlier statistics (never stacks). State-dict keys do not change.
    """
    norm = _checked(mean, std, "input_norm")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    mean_t = torch.tensor(norm["mean"], dtype=dtype, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(norm["std"], dtype=dtype, device=device).view(1, 3, 1, 1)
    model.register_buffer(_MEAN, mean_t, persistent=False)
    model.register_buffer(_STD, std_t, persistent=False)
    if getattr(model, _HOOK_ATTR, None) is None:
        handle = model.register_forward_pre_hook(_normalise_input)
        # Keep only the hook id: a RemovableHandle holds a weak reference that deepcopy cannot copy.
        object.__setattr__(model, _HOOK_ATTR, handle.id)
    info = dict(getattr(model, "bilalora_info", {}) or {})
    info["input_norm"] = norm
    model.bilalora_info = info
    return model


def unfold_input_norm(model: nn.Module) -> nn.Module:
    """Remove a folded normalisation (the model then takes whatever its weights expect)."""
    hook_id = getattr(model, _HOOK_ATTR, None)
    if hook_id is not None:
        model._forward_pre_hooks.pop(hook_id, None)
        object.__setattr__(model, _HOOK_ATTR, None)
    for name in (_MEAN, _STD):
        model._buffers.pop(name, None)
        model._non_persistent_buffers_set.discard(name)
    info = dict(getattr(model, "bilalora_info", {}) or {})
    info["input_norm"] = None
    model.bilalora_info = info
    return model


def folded_input_norm(model: nn.Module) -> Optional[dict]:
    """The normalisation folded into ``model`` (read from its buffers), or None."""
    if getattr(model, _HOOK_ATTR, None) is None or _MEAN not in model._buffers:
        return None
    return {
        "mean": [float(v) for v in model._buffers[_MEAN].flatten().float()],
        "std": [float(v) for v in model._buffers[_STD].flatten().float()],
    }


def same_input_norm(a: Optional[dict], b: Optional[dict], tol: float = 1e-6) -> bool:
    """Whether two recorded normalisations (None or {"mean", "std"}) are the same."""
    if a is None or b is None:
        return a is None and b is None
    pairs = list(zip(a["mean"], b["mean"])) + list(zip(a["std"], b["std"]))
    return len(pairs) == 6 and all(abs(float(x) - float(y)) <= tol for x, y in pairs)


def describe(norm: Optional[dict]) -> str:
    """Short human form: ``[0, 1] RGB``, ``CLIP mean/std`` or the numbers."""
    if norm is None:
        return "none ([0, 1] RGB)"
    if same_input_norm(norm, {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}):
        return "clip (CLIP mean/std, folded into the network)"
    mean = ",".join(f"{v:g}" for v in norm["mean"])
    std = ",".join(f"{v:g}" for v in norm["std"])
    return f"mean {mean} std {std} (folded into the network)"


def _normalise_input(module: nn.Module, args: tuple):
    """Forward pre-hook: ``(x - mean) / std`` on the first positional input (N, 3, H, W)."""
    if not args:
        return None
    x = args[0]
    mean = module._buffers[_MEAN]
    std = module._buffers[_STD]
    return ((x - mean.to(x.dtype)) / std.to(x.dtype),) + tuple(args[1:])
