"""Read weight files (.pth/.pt/.ckpt/.bin with ``weights_only=True``, .safetensors)
into a plain state dict, and load it into a model with a readable error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..errors import UserError

__all__ = ["read_state_dict", "load_into", "WRAPPER_KEYS"]

#: Keys under which training scripts commonly nest the weights.
WRAPPER_KEYS = ("state_dict", "model", "params", "net", "params_ema", "model_state_dict")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weight file into a flat {name: tensor} dict on the CPU.

    Unwraps one or more levels of ``{"state_dict": ...}``-style nesting and
    strips ``module.`` prefixes left by DataParallel/DDP. Pickled files are read
    with ``weights_only=True`` (no code runs).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decode failure is the user's file
        raise UserError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    for _ in range(3):
        if isinstance(state, Mapping) and not _is_tensor_dict(state):
            inner = next((state[k] for k in WRAPPER_KEYS if k in state and isinstance(state[k], Mapping)), None)
            if inner is None:
                break
            state = inner
    if not isinstance(state, Mapping) or not _is_tensor_dict(state):
        raise UserError(f"{path} holds no state dict of tensors (looked under {', '.join(WRAPPER_KEYS)})")
    return {_strip_prefix(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "weights") -> nn.Module:
    """Load ``state`` strictly into ``model``; on mismatch raise a UserError listing the keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_preview(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_preview(unexpected)})")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} of other shape ({_preview(wrong_shape)})")
        raise UserError(f"{source} do not fit the model: " + "; ".join(parts))
    model.load_state_dict({k: state[k].to(expected[k].dtype) for k in expected})
    return model


def _is_tensor_dict(mapping: Mapping) -> bool:
    return len(mapping) > 0 and all(isinstance(v, torch.Tensor) for v in mapping.values())


def _strip_prefix(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def _preview(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... +{len(names) - limit} more" if len(names) > limit else "")
