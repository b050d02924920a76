"""The adapter file: the top-k sites' LoRA factors plus everything needed to trust them.

Format: safetensors. Tensors: ``<layer path>.lora_A`` / ``.lora_B`` for every
layer of the selected sites. Metadata: one key, ``bilalora``, holding JSON:

    format_version, backbone, base_fingerprint, rank, lora_alpha,
    sites: [{name, gate, layers}], objective, method, schedule, seed, data, created

An adapter is tied to the base weights it was trained on: :meth:`Adapter.apply`
and :meth:`Adapter.merge_into` refuse other weights (fingerprint mismatch) with
a message naming both fingerprints.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from . import lora
from .errors import UserError
from .io import atomic_path
from .sites import Site, by_name

__all__ = ["Adapter", "fingerprint", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_META_KEY = "bilalora"


def fingerprint(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """A 16-hex-digit SHA-256 over the base weights (names, shapes, fp32 bytes).

    For a model carrying LoRA, the base weights are read through the wrappers,
    so the fingerprint of a model is the same before and after injection.
    """
    if isinstance(model_or_state, nn.Module):
        state = lora.base_state_dict(model_or_state)
    else:
        state = dict(model_or_state)
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class Adapter:
    """LoRA factors of the selected sites with their gates and provenance.

    Attributes:
        tensors: {"<layer>.lora_A" | "<layer>.lora_B": tensor} on the CPU.
        sites: {site name: gate value in (0, 1]} (1.0: ungated), in ranking order.
        rank, lora_alpha: LoRA hyper-parameters (scale = lora_alpha / rank).
        backbone: the backbone's registry name or factory spec.
        base_fingerprint: :func:`fingerprint` of the base weights.
        meta: free JSON-able provenance (objective, prompts, method, schedule, seed, data, ranking).
    """

    tensors: dict[str, torch.Tensor]
    sites: dict[str, float]
    rank: int
    lora_alpha: float
    backbone: str
    base_fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- creation
    @classmethod
    def from_model(cls, model: nn.Module, site_names: Optional[list[str]] = None, **meta) -> "Adapter":
        """Collect the LoRA factors and gate values of ``site_names`` (default: all injected sites)."""
        gates = lora.gate_values(model)
        layers = lora.lora_layers(model)
        if not layers:
            raise ValueError("model carries no LoRA layers")
        names = list(site_names) if site_names is not None else list(gates)
        state = lora.lora_state_dict(model)
        tensors = {}
        for name in names:
            owned = [path for path in layers if _in_site(path, name)]
            for path in owned:
                tensors[f"{path}.lora_A"] = state[f"{path}.lora_A"].float()
                tensors[f"{path}.lora_B"] = state[f"{path}.lora_B"].float()
        first = next(iter(layers.values()))
        info = getattr(model, "bilalora_info", {}) or {}
        return cls(
            tensors=tensors,
            sites={name: gates[name] for name in names},
            rank=first.rank,
            lora_alpha=first.lora_alpha,
            backbone=str(info.get("name", type(model).__name__)),
            base_fingerprint=fingerprint(model),
            meta=dict(meta),
        )

    # ------------------------------------------------------------------ files
    def metadata(self) -> dict[str, Any]:
        """The JSON metadata written into the file."""
        return {
            "format_version": FORMAT_VERSION,
            "backbone": self.backbone,
            "base_fingerprint": self.base_fingerprint,
            "rank": self.rank,
            "lora_alpha": self.lora_alpha,
            "sites": [
                {"name": name, "gate": gate, "layers": self.layers_of(name)} for name, gate in self.sites.items()
            ],
            "created": self.meta.get("created") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **{k: v for k, v in self.meta.items() if k != "created"},
        }

    def save(self, path: str | Path) -> Path:
        """Write the adapter atomically as safetensors; returns the path."""
        from safetensors.torch import save_file

        path = Path(path)
        with atomic_path(path) as tmp:
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
            save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(self.metadata())})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Adapter":
        """Read an adapter file; a file that is not one gives a one-line UserError."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise UserError(f"adapter file not found: {path} (--adapter)")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                raw = (handle.metadata() or {}).get(_META_KEY)
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"{path} is not a readable safetensors adapter: {exc}".splitlines()[0]) from None
        if raw is None:
            raise UserError(f"{path} has no bilalora metadata; it is not an adapter written by bilalora")
        meta = json.loads(raw)
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise UserError(f"{path} has adapter format {version}; this bilalora reads format {FORMAT_VERSION}")
        sites = {entry["name"]: float(entry["gate"]) for entry in meta["sites"]}
        known = {"format_version", "backbone", "base_fingerprint", "rank", "lora_alpha", "sites"}
        return cls(
            tensors=tensors,
            sites=sites,
            rank=int(meta["rank"]),
            lora_alpha=float(meta["lora_alpha"]),
            backbone=meta["backbone"],
            base_fingerprint=meta["base_fingerprint"],
            meta={k: v for k, v in meta.items() if k not in known},
        )

    # ------------------------------------------------------------- applying
    def layers_of(self, site: str) -> list[str]:
        """Layer paths of ``site`` present in the adapter."""
        return sorted({key.rsplit(".", 1)[0] for key in self.tensors if _in_site(key.rsplit(".", 1)[0], site)})

    def verify(self, model: nn.Module) -> None:
        """Refuse (UserError) when ``model``'s base weights are not the ones the adapter was trained on."""
        actual = fingerprint(model)
        if actual != self.base_fingerprint:
            raise UserError(
                f"adapter expects base weights with fingerprint {self.base_fingerprint} "
                f"(backbone {self.backbone}), but these weights have {actual}; "
                "pass the --weights the adapter was trained with"
            )

    def site_objects(self, model: nn.Module) -> list[Site]:
        """The :class:`Site` objects of the adapter's sites in ``model`` (LoRA-free model)."""
        return by_name(model, list(self.sites), where=f"backbone {self.backbone} (adapter sites)")

    def apply(self, model: nn.Module, trainable: bool = False, check: bool = True) -> nn.Module:
        """Inject the adapter's LoRA (with its gates fixed) into ``model`` in place."""
        if check:
            self.verify(model)
        sites = self.site_objects(model)
        lora.inject(model, sites, rank=self.rank, lora_alpha=self.lora_alpha)
        lora.load_lora_state_dict(model, self.tensors)
        lora.set_gate_values(model, self.sites, trainable=False)
        lora.freeze_base(model)
        for param in lora.lora_parameters(model):
            param.requires_grad_(trainable)
        return model

    def merge_into(self, model: nn.Module, check: bool = True) -> nn.Module:
        """Apply and merge: ``model`` becomes a plain network with the deltas in its weights."""
        return lora.merge(self.apply(model, check=check))

    def summary(self) -> dict[str, Any]:
        """A short JSON-able description for records and listings."""
        return {
            "backbone": self.backbone,
            "base_fingerprint": self.base_fingerprint,
            "rank": self.rank,
            "lora_alpha": self.lora_alpha,
            "sites": dict(self.sites),
            "lora_parameters": sum(t.numel() for t in self.tensors.values()),
            "method": self.meta.get("method"),
        }


def _in_site(layer_path: str, site: str) -> bool:
    """A layer belongs to a site when it is a direct child of it (or is the root-level site itself)."""
    return layer_path == site or layer_path.rpartition(".")[0] == site
