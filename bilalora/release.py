"""The paper's release adapters (``LoRA.pth``) to and from bilalora adapter files.

The release (BiLaLoRA_Train.py) saves an adapter with ``torch.save`` as a dict:

* ``lora_state_dict``: the trainable parameters by module path,
  ``<site>.<conv>.lora_A`` (``r*k x C_in*k``), ``<site>.<conv>.lora_B``
  (``C_out*k x r*k``) and one gate logit per block, ``<site>.<first conv>.alpha``
  (shape ``[1]``): the gate is shared by all convs of a block, and the state dict
  is built from ``named_parameters()``, so it appears once, under the first conv;
* a config dict, ``lora_config`` (written by the training script) or
  ``nas_lora_config`` (read by the test script, hence in the published files):
  ``selected_layers`` (site names, in ranking order), ``r``, ``lora_alpha``,
  ``top_k``, ``is_finetuned``, ``epoch``.

The effective weight is ``W + sigmoid(alpha) * (lora_alpha / r) * (B @ A).view(W.shape)``,
bilalora's gated LoRA with the same factor shapes, so layer names and factors
map one to one; only the gate changes form (a logit there, ``sigmoid`` of it
here). The release feeds its backbones CLIP-normalised input, so a release
base is loaded with that normalisation folded in and the adapter records it
(``input_norm``):

    base = backbones.load("dea-net", weights="Base.pth", input_norm="clip")
    adapter = import_release("LoRA.pth", base)        # -> Adapter (checked against base)
    export_release(adapter, "LoRA.pth")               # <- Adapter

Files are read with ``torch.load(weights_only=True)``: no code in them runs.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .adapter import Adapter, check_rank_alpha, check_tensors, fingerprint
from .errors import UserError
from .io import atomic_path

__all__ = ["read_release", "import_release", "export_release", "release_dict", "CONFIG_KEYS", "UNGATED_LOGIT"]

#: Where the release keeps its config: the training script writes the first, the test script reads the second.
CONFIG_KEYS = ("lora_config", "nas_lora_config")
#: Logit written for an ungated site (a gate of exactly 1): sigmoid(40) is 1.0 in float32 and float64.
UNGATED_LOGIT = 40.0


def read_release(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a release ``LoRA.pth``: ({parameter name: tensor}, config). One-line UserError on any defect."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"release adapter not found: {path}")
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decode failure is the user's file
        raise UserError(f"cannot read {path} as a release LoRA.pth: {type(exc).__name__}: {exc}".splitlines()[0]) \
            from None
    if not isinstance(data, Mapping) or not isinstance(data.get("lora_state_dict"), Mapping):
        keys = sorted(map(str, data)) if isinstance(data, Mapping) else type(data).__name__
        raise UserError(f"{path} has no 'lora_state_dict' (found {keys}); it is not a release LoRA.pth")
    config = next((data[key] for key in CONFIG_KEYS if isinstance(data.get(key), Mapping)), None)
    if config is None:
        raise UserError(f"{path} has no LoRA config (looked for {' and '.join(CONFIG_KEYS)})")
    state = {}
    for key, value in data["lora_state_dict"].items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{path}: lora_state_dict['{key}'] is {type(value).__name__}, not a tensor")
        while key.startswith("module."):
            key = key[len("module."):]
        state[key] = value
    return state, dict(config)


def import_release(
    path: str | Path,
    base: nn.Module,
    extra_meta: Optional[dict] = None,
) -> Adapter:
    """Turn a release ``LoRA.pth`` into an :class:`Adapter` for ``base``.

    Args:
        path: the release file.
        base: the base network the adapter was trained on (its fingerprint is
            recorded; its sites tell which convs each selected block holds; the input
            normalisation folded into it, ``bilalora_info["input_norm"]``, is recorded too:
            load it with ``input_norm="clip"`` for the release's own bases). Not modified.
        extra_meta: merged into the adapter's provenance.

    Returns:
        The adapter: sites in the release's ranking order with gates ``sigmoid(alpha)``,
        factors as float32. It is checked by applying it to a copy of ``base``.
    """
    from .sites import by_name

    path = Path(path)
    state, config = read_release(path)
    where = f"{path}"
    rank, lora_alpha, selected = _config_values(config, where)
    info = getattr(base, "bilalora_info", None) or {}
    backbone = str(info.get("name", type(base).__name__))
    sites = by_name(base, selected, where=f"backbone {backbone} ({path.name} selected_layers)")
    tensors: dict[str, torch.Tensor] = {}
    gates: dict[str, float] = {}
    gate_keys: dict[str, str] = {}
    used: set[str] = set()
    for site in sites:
        logits = []
        for conv in site.convs:
            for kind in ("lora_A", "lora_B"):
                key = f"{conv}.{kind}"
                if key not in state:
                    raise UserError(f"{where}: lora_state_dict has no '{key}' (site {site.name} of {backbone})")
                tensors[key] = state[key].detach().to(torch.float32).contiguous()
                used.add(key)
            if f"{conv}.alpha" in state:
                logits.append(f"{conv}.alpha")
        if len(logits) != 1:
            found = ", ".join(logits) or "none"
            raise UserError(f"{where}: site {site.name} needs exactly one gate logit '<conv>.alpha' (found {found})")
        logit = state[logits[0]]
        used.add(logits[0])
        gate_keys[site.name] = logits[0].rsplit(".", 1)[0]
        if logit.numel() != 1 or not bool(torch.isfinite(logit).all()):
            raise UserError(f"{where}: gate '{logits[0]}' must be one finite number, got shape {tuple(logit.shape)}")
        gates[site.name] = float(torch.sigmoid(logit.reshape(-1)[0].double()))
    check_tensors(tensors, rank, where)  # finite, plausible, shapes that agree with r
    unused = sorted(set(state) - used)
    if unused:
        shown = ", ".join(unused[:4]) + (f", ... +{len(unused) - 4} more" if len(unused) > 4 else "")
        raise UserError(f"{where}: lora_state_dict holds tensors outside its selected_layers: {shown}")
    norm = info.get("input_norm")
    meta = {
        "method": "release",
        "source": {
            "format": "release LoRA.pth",
            "file": path.name,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "config": {k: _jsonable(v) for k, v in config.items()},
            "gate_layers": gate_keys,
        },
        **(extra_meta or {}),
    }
    adapter = Adapter(
        tensors=tensors,
        sites=gates,
        rank=rank,
        lora_alpha=lora_alpha,
        backbone=backbone,
        base_fingerprint=fingerprint(base),
        meta=meta,
        input_norm=norm,
    )
    adapter.apply(copy.deepcopy(base))  # shapes against the model at the recorded rank, magnitudes against the weights
    return adapter


def release_dict(adapter: Adapter, epoch: Optional[int] = None, is_finetuned: bool = True) -> dict[str, Any]:
    """The release's ``LoRA.pth`` content for ``adapter`` (config under both of :data:`CONFIG_KEYS`)."""
    state: dict[str, torch.Tensor] = {}
    for site, gate in adapter.sites.items():
        layers = adapter.layers_of(site)
        if not layers:
            raise UserError(f"adapter site {site} holds no layers")
        for index, layer in enumerate(gate_layer_first(adapter, site, layers)):
            state[f"{layer}.lora_A"] = adapter.tensors[f"{layer}.lora_A"].detach().to(torch.float32).clone()
            state[f"{layer}.lora_B"] = adapter.tensors[f"{layer}.lora_B"].detach().to(torch.float32).clone()
            if index == 0:
                state[f"{layer}.alpha"] = torch.tensor([_logit(gate)], dtype=torch.float32)
    source = (adapter.meta.get("source") or {}).get("config") or {}
    config = {
        "selected_layers": list(adapter.sites),
        "r": int(adapter.rank),
        "lora_alpha": _number(adapter.lora_alpha),
        "top_k": len(adapter.sites),
        "is_finetuned": bool(source.get("is_finetuned", is_finetuned)),
        "epoch": int(epoch if epoch is not None else source.get("epoch", 0) or 0),
    }
    return {"lora_state_dict": state, CONFIG_KEYS[0]: dict(config), CONFIG_KEYS[1]: dict(config)}


def export_release(adapter: Adapter, path: str | Path, epoch: Optional[int] = None) -> Path:
    """Write ``adapter`` as a release ``LoRA.pth`` (atomically); returns the path."""
    content = release_dict(adapter, epoch=epoch)
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(content, str(tmp))
    return path


def gate_layer_first(adapter: Adapter, site: str, layers: list[str]) -> list[str]:
    """``layers`` of ``site`` with the one that carries the release's gate first: the conv recorded at
    import (``meta["source"]["gate_layers"]``), else the first in natural order (``conv2`` before ``conv10``)."""
    recorded = ((adapter.meta.get("source") or {}).get("gate_layers") or {}).get(site)
    natural = sorted(layers, key=lambda name: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)])
    if recorded in natural:
        natural.remove(recorded)
        natural.insert(0, recorded)
    return natural


def _config_values(config: Mapping[str, Any], where: str) -> tuple[int, float, list[str]]:
    rank, alpha = check_rank_alpha(config.get("r"), config.get("lora_alpha"), f"{where}: config", ("r", "lora_alpha"))
    selected = config.get("selected_layers")
    if isinstance(selected, (str, bytes)) or not isinstance(selected, (list, tuple)) or not selected:
        raise UserError(f"{where}: config 'selected_layers' must be a non-empty list of site names, got {selected!r}")
    if not all(isinstance(name, str) for name in selected) or len(set(selected)) != len(selected):
        raise UserError(f"{where}: config 'selected_layers' must be distinct site names, got {list(selected)!r}")
    return rank, alpha, list(selected)


def _logit(gate: float) -> float:
    if gate >= 1.0:
        return UNGATED_LOGIT
    gate = min(max(float(gate), 1e-12), 1.0 - 1e-12)
    return math.log(gate / (1.0 - gate))


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
