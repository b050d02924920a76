"""The plain weights file a training run ships, and the JSON card beside it.

A backbone trained in a training form (DEA-Net's DEConv form) is turned into its
plain inference form by the registry's ``to_plain`` hook
(:class:`bilalora.backbones.BackboneSpec`), written as safetensors with a
``bilalora`` metadata entry, and described by a card (``<weights>.json``,
format :data:`CARD_FORMAT`; fields in docs/weights.md): what was trained, on
what data, for how long, on which machine, which step was selected, and the
validation PSNR/SSIM history.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from . import backbones
from .adapter import fingerprint
from .devices import device_name
from .io import atomic_path

__all__ = ["CARD_FORMAT", "RECIPE", "export_plain", "model_card", "plain_copy", "plain_form", "without_rows"]

CARD_FORMAT = "bilalora-weights-card/1"

#: The training recipe, as written into every card.
RECIPE = (
    "L1 loss, Adam (betas 0.9/0.999), cosine lr, random crops with 90-degree rotations and flips, "
    "trained in the backbone's training form (DEA-Net: DEConv) and re-parameterised to the plain network"
)


def _spec_of(model: nn.Module) -> backbones.BackboneSpec | None:
    name = getattr(model, "bilalora_info", {}).get("name")
    if not name:
        return None
    try:
        return backbones.get_spec(name)
    except Exception:  # noqa: BLE001 - a model from elsewhere: treated as plain
        return None


def plain_form(model: nn.Module) -> nn.Module:
    """The inference form of ``model`` by its backbone's ``to_plain`` hook (``model`` itself when it is plain)."""
    spec = _spec_of(model)
    if spec is None or spec.to_plain is None:
        return model
    plain = spec.to_plain(model)
    if plain is not model and hasattr(model, "bilalora_info"):
        plain.bilalora_info = dict(model.bilalora_info)
    return plain


def plain_copy(model: nn.Module) -> nn.Module:
    """A plain-form network of the same architecture as ``model``, independent of it, on the CPU in fp32."""
    plain = plain_form(model)
    if plain is model:
        plain = copy.deepcopy(model)
    return plain.to("cpu", torch.float32)


def _export_state(model: nn.Module, dtype: str) -> dict[str, torch.Tensor]:
    """Plain weights as a CPU state dict in ``dtype`` (floating tensors only are cast)."""
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    return {
        k: (v.detach().to("cpu", torch_dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in plain_form(model).state_dict().items()
    }


def export_plain(model: nn.Module, path: str | Path, dtype: str = "fp16", metadata: dict | None = None) -> str:
    """Write the plain (re-parameterised) weights of ``model`` to a safetensors file, atomically.

    Args:
        model: the training-form or plain network.
        path: destination ``.safetensors``.
        dtype: "fp16" or "fp32".
        metadata: stored as the file's ``bilalora`` metadata (JSON).

    Returns:
        The fingerprint (:func:`bilalora.adapter.fingerprint`) of the weights as stored,
        i.e. as ``backbones.load`` will see them.
    """
    from safetensors.torch import save_file

    state = _export_state(model, dtype)
    meta = {"format": CARD_FORMAT}
    if metadata:
        meta["bilalora"] = json.dumps(metadata)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return fingerprint(state)


def without_rows(record: dict | None) -> dict | None:
    """A validation record without its ``per_image`` rows (None stays None)."""
    if record is None:
        return None
    return {k: v for k, v in record.items() if k != "per_image"}


def model_card(
    config,
    model: nn.Module,
    weights: Path,
    weights_fingerprint: str,
    step: int,
    data: dict,
    best: dict | None,
    last_val: dict | None,
    train_seconds: float,
    device: str,
    selected: str,
    notes: list[str] | None = None,
) -> dict:
    """The JSON card written beside the weights.

    Args:
        config: the run's :class:`bilalora.pretrain.PretrainConfig` (a dataclass).
        model: the network whose weights were written (training or plain form).
        weights: the weights file; weights_fingerprint: its fingerprint.
        step: steps done; data: the data summary; best, last_val: validation records.
        train_seconds: training time over all sessions; device: torch device string.
        selected: which weights were written, in words; notes: free lines.
    """
    plain = plain_form(model)
    return {
        "format": CARD_FORMAT,
        "weights_file": weights.name,
        "backbone": config.backbone,
        "width": getattr(plain, "width", None),
        "parameters": int(sum(p.numel() for p in plain.parameters())),
        "dtype": config.dtype,
        "file_bytes": weights.stat().st_size if weights.exists() else None,
        "fingerprint": weights_fingerprint,
        # the input the weights expect (docs/weights.md): None = [0, 1] RGB, as pretraining feeds it
        "input_norm": (getattr(model, "bilalora_info", None) or {}).get("input_norm"),
        "selected": selected,
        "steps_done": step,
        "training": {
            "recipe": RECIPE,
            **asdict(config),
            "device": device,
            "device_name": device_name(device),
            "train_seconds": round(train_seconds, 1),
            "torch": torch.__version__,
        },
        "data": data,
        "validation": {"best": without_rows(best), "last": without_rows(last_val)},
        "notes": list(notes or []),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
