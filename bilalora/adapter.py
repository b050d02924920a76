"""The adapter file: the top-k sites' LoRA factors plus everything needed to trust them.

Format: safetensors. Tensors: ``<layer path>.lora_A`` / ``.lora_B`` for every
layer of the selected sites. Metadata: one key, ``bilalora``, holding JSON:

    format_version, backbone, base_fingerprint, input_norm, rank, lora_alpha,
    checksum, sites: [{name, gate, layers}], objective, method, schedule, seed, data, created

Trust (what loading checks, each failure one line, see docs/architecture.md):

* the metadata is a JSON object with a non-empty ``sites`` list, a positive
  integer ``rank`` and a positive ``lora_alpha``; every site's layers have both
  factors and the factor shapes agree with ``rank``;
* ``checksum`` (sha256 over names, dtypes, shapes and bytes of the tensors)
  matches: one flipped bit is refused;
* every value is finite and of plausible size (a LoRA factor above
  :data:`MAX_FACTOR_ABS` is damage, not training); on applying, each layer's
  delta is compared with its base weight (:data:`MAX_DELTA_RATIO`);
* loading never imports code: the recorded ``backbone`` is only a string until
  :meth:`Adapter.backbone_for` checks that it is a registered name;
* an adapter is tied to the base weights it was trained on and to the input
  normalisation they expect: :meth:`Adapter.apply` refuses other weights
  (fingerprint mismatch, naming both) and another normalisation.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from . import lora
from .errors import UserError
from .io import atomic_path
from .sites import Site, by_name

__all__ = ["Adapter", "fingerprint", "tensor_checksum", "check_rank_alpha", "check_tensors", "FORMAT_VERSION", "MAX_FACTOR_ABS",
           "MAX_DELTA_RATIO"]

#: Version 2 adds ``checksum`` and ``input_norm``; version 1 files (without them) still load.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_META_KEY = "bilalora"

#: Largest |value| accepted in a LoRA factor. Trained factors are O(1) (A starts at
#: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B at 0, learning rates <= 1e-2); a flipped exponent bit gives 1e35.
MAX_FACTOR_ABS = 1e4
#: Largest accepted ||gate * scale * B A|| / ||W|| for one layer when applying.
MAX_DELTA_RATIO = 1e3


def fingerprint(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """A 16-hex-digit SHA-256 over the base weights (names, shapes, fp32 bytes).

    For a model carrying LoRA, the base weights are read through the wrappers,
    so the fingerprint of a model is the same before and after injection (and
    with or without a folded input normalisation, which adds no state-dict keys).
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


def tensor_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """``sha256:<hex>`` over the tensors' names, dtypes, shapes and raw bytes, in sorted name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


@dataclass
class Adapter:
    """LoRA factors of the selected sites with their gates and provenance.

    Attributes:
        tensors: {"<layer>.lora_A" | "<layer>.lora_B": tensor} on the CPU. For a conv
            with kernel k: A is (r*k, C_in/groups*k), B is (C_out*k, r*k); for a linear
            layer A is (r, C_in), B is (C_out, r).
        sites: {site name: gate value in (0, 1]} (1.0: ungated), in ranking order.
        rank, lora_alpha: LoRA hyper-parameters (scale = lora_alpha / rank).
        backbone: the backbone's name as recorded (a string; see :meth:`backbone_for`).
        base_fingerprint: :func:`fingerprint` of the base weights.
        input_norm: None (the base takes [0, 1] RGB) or {"mean": [3], "std": [3]} folded into it.
        meta: free JSON-able provenance (objective, prompts, method, schedule, seed, data, ranking).
    """

    tensors: dict[str, torch.Tensor]
    sites: dict[str, float]
    rank: int
    lora_alpha: float
    backbone: str
    base_fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)
    input_norm: Optional[dict] = None

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
            input_norm=info.get("input_norm"),
        )

    # ------------------------------------------------------------------ files
    def metadata(self) -> dict[str, Any]:
        """The JSON metadata written into the file."""
        return {
            "format_version": FORMAT_VERSION,
            "backbone": self.backbone,
            "base_fingerprint": self.base_fingerprint,
            "input_norm": self.input_norm,
            "rank": self.rank,
            "lora_alpha": self.lora_alpha,
            "checksum": tensor_checksum(self.tensors),
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
        self.tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        check_tensors(self.tensors, self.rank, str(path))
        with atomic_path(path) as tmp:
            save_file(self.tensors, str(tmp), metadata={_META_KEY: json.dumps(self.metadata())})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Adapter":
        """Read and check an adapter file; anything wrong gives a one-line UserError. Imports nothing."""
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
        meta = _parse_metadata(raw, path)
        where = f"adapter {path}"
        sites = {entry["name"]: float(entry["gate"]) for entry in meta["sites"]}
        expected = meta.get("checksum")
        if expected is not None and tensor_checksum(tensors) != expected:
            raise UserError(f"{where}: tensor checksum does not match its metadata; the file is damaged or was edited")
        check_tensors(tensors, meta["rank"], where)
        owned: set[str] = set()
        for name, entry in zip(sites, meta["sites"]):
            layers = entry.get("layers")
            present = {key.rsplit(".", 1)[0] for key in tensors if _in_site(key.rsplit(".", 1)[0], name)}
            if not present or (isinstance(layers, list) and set(layers) != present):
                raise UserError(f"{where}: site '{name}' lists layers {layers} but the file holds {sorted(present)}")
            owned |= present
        stray = sorted({key.rsplit(".", 1)[0] for key in tensors} - owned)
        if stray:
            raise UserError(f"{where}: tensors of layers outside its sites: {', '.join(stray[:4])}")
        known = {"format_version", "backbone", "base_fingerprint", "rank", "lora_alpha", "sites", "input_norm",
                 "checksum"}
        return cls(
            tensors=tensors,
            sites=sites,
            rank=meta["rank"],
            lora_alpha=meta["lora_alpha"],
            backbone=meta["backbone"],
            base_fingerprint=meta["base_fingerprint"],
            meta={k: v for k, v in meta.items() if k not in known},
            input_norm=meta.get("input_norm"),
        )

    # ------------------------------------------------------------- applying
    def backbone_for(self, override: Optional[str] = None, where: str = "the adapter") -> str:
        """The backbone to build for this adapter: ``override`` (typed by the user) when given,
        else the recorded name, which must be registered (a recorded ``module:factory`` is refused)."""
        from .backbones import registered_name

        return override if override else registered_name(self.backbone, where)

    def layers_of(self, site: str) -> list[str]:
        """Layer paths of ``site`` present in the adapter."""
        return sorted({key.rsplit(".", 1)[0] for key in self.tensors if _in_site(key.rsplit(".", 1)[0], site)})

    def verify(self, model: nn.Module) -> None:
        """Refuse (UserError) when ``model``'s base weights or input normalisation are not the adapter's.

        A model whose normalisation was not chosen by anyone (``input_norm_source == "default"``)
        takes the adapter's: the adapter records what its base weights expect.
        """
        from .backbones.normalize import describe, fold_input_norm, same_input_norm

        actual = fingerprint(model)
        if actual != self.base_fingerprint:
            raise UserError(
                f"adapter expects base weights with fingerprint {self.base_fingerprint} "
                f"(backbone {self.backbone}), but these weights have {actual}; "
                "pass the --weights the adapter was trained with"
            )
        info = getattr(model, "bilalora_info", None) or {}
        current = info.get("input_norm")
        if same_input_norm(current, self.input_norm):
            return
        if info.get("input_norm_source") == "default" and self.input_norm is not None:
            fold_input_norm(model, self.input_norm["mean"], self.input_norm["std"])
            model.bilalora_info["input_norm_source"] = "adapter"
            return
        raise UserError(
            f"adapter was trained with input normalisation {describe(self.input_norm)}, but the base was "
            f"loaded with {describe(current)}; pass the --input-norm the adapter was trained with"
        )

    def site_objects(self, model: nn.Module) -> list[Site]:
        """The :class:`Site` objects of the adapter's sites in ``model`` (LoRA-free model)."""
        return by_name(model, list(self.sites), where=f"backbone {self.backbone} (adapter sites)")

    def apply(self, model: nn.Module, trainable: bool = False, check: bool = True) -> nn.Module:
        """Inject the adapter's LoRA (with its gates fixed) into ``model`` in place.

        Raises:
            UserError: other base weights or normalisation (with ``check``), factor shapes that do not
                fit the model at the recorded rank, or a delta implausibly large for its layer.
        """
        if check:
            self.verify(model)
        sites = self.site_objects(model)
        lora.inject(model, sites, rank=self.rank, lora_alpha=self.lora_alpha)
        try:
            lora.load_lora_state_dict(model, self.tensors)
        except (KeyError, ValueError) as exc:
            lora.strip(model)
            message = str(exc.args[0]) if exc.args else str(exc)
            raise UserError(f"adapter tensors do not fit {self.backbone} at rank {self.rank}: {message}") from None
        lora.set_gate_values(model, self.sites, trainable=False)
        _check_delta_ratio(model, self.backbone)
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
            "input_norm": self.input_norm,
            "rank": self.rank,
            "lora_alpha": self.lora_alpha,
            "sites": dict(self.sites),
            "lora_parameters": sum(t.numel() for t in self.tensors.values()),
            "method": self.meta.get("method"),
        }


# ---------------------------------------------------------------------- checks
def check_rank_alpha(
    rank: Any, alpha: Any, where: str, keys: tuple[str, str] = ("rank", "lora_alpha")
) -> tuple[int, float]:
    """(rank, lora_alpha) read from a file, checked: a positive integer and a positive finite number.

    Raises:
        UserError: one line, ``"<where> '<key>' must be ..."``.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UserError(f"{where} '{keys[0]}' must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise UserError(f"{where} '{keys[1]}' must be a positive number, got {alpha!r}")
    return rank, float(alpha)


def _parse_metadata(raw: str, path: Path) -> dict[str, Any]:
    """Decode and validate the ``bilalora`` metadata JSON (one-line UserError for each defect)."""
    where = f"adapter {path}"
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise UserError(f"{where}: metadata is not valid JSON ({exc})".splitlines()[0]) from None
    if not isinstance(meta, dict):
        raise UserError(f"{where}: metadata must be a JSON object, got {type(meta).__name__}")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise UserError(f"{where} has adapter format {version!r}; this bilalora reads formats "
                        f"{', '.join(map(str, READABLE_VERSIONS))}")
    for key in ("backbone", "base_fingerprint"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            raise UserError(f"{where}: metadata '{key}' must be a non-empty string, got {meta.get(key)!r}")
    meta["rank"], meta["lora_alpha"] = check_rank_alpha(meta.get("rank"), meta.get("lora_alpha"), f"{where}: metadata")
    sites = meta.get("sites")
    if not isinstance(sites, list) or not sites:
        raise UserError(f"{where}: metadata has no 'sites' list (the selected sites and their gates)")
    seen = set()
    for entry in sites:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise UserError(f"{where}: every entry of 'sites' needs a 'name' and a 'gate', got {entry!r}"[:300])
        gate = entry.get("gate")
        if isinstance(gate, bool) or not isinstance(gate, (int, float)) or not (0.0 <= gate <= 1.0):
            raise UserError(f"{where}: site '{entry['name']}' has gate {gate!r}; a gate is a number in [0, 1]")
        if entry["name"] in seen:
            raise UserError(f"{where}: site '{entry['name']}' is listed twice")
        seen.add(entry["name"])
    checksum = meta.get("checksum")
    if checksum is not None and (not isinstance(checksum, str) or not checksum.startswith("sha256:")):
        raise UserError(f"{where}: metadata 'checksum' must be 'sha256:<hex>', got {checksum!r}")
    if version >= 2 and checksum is None:
        raise UserError(f"{where}: format {version} metadata has no 'checksum'; the file was edited or truncated")
    norm = meta.get("input_norm")
    if norm is not None:
        from .backbones.normalize import parse_input_norm

        meta["input_norm"] = parse_input_norm(norm, flag=f"{where} metadata input_norm")
    return meta


def check_tensors(tensors: Mapping[str, torch.Tensor], rank: int, where: str) -> None:
    """LoRA factors read from a file: pairs of 2-D float matrices whose shapes agree with ``rank``,
    finite values of plausible size (:data:`MAX_FACTOR_ABS`). One-line UserError naming ``where``."""
    if not tensors:
        raise UserError(f"{where}: holds no LoRA tensors")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        layer, _, kind = key.rpartition(".")
        if kind not in ("lora_A", "lora_B") or not layer:
            raise UserError(f"{where}: unexpected tensor '{key}' (an adapter holds '<layer>.lora_A/.lora_B' only)")
        if tensor.dim() != 2 or not tensor.is_floating_point():
            raise UserError(f"{where}: '{key}' must be a 2-D float matrix, got {tuple(tensor.shape)} {tensor.dtype}")
        layers.setdefault(layer, {})[kind] = tensor
    for layer, pair in layers.items():
        if len(pair) != 2:
            missing = "lora_B" if "lora_A" in pair else "lora_A"
            raise UserError(f"{where}: layer '{layer}' has no {missing}")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.shape[0] % rank or b.shape[1] != a.shape[0]:
            raise UserError(
                f"{where}: rank {rank} does not match '{layer}' (lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}); "
                "A has rank*k rows and B as many columns"
            )
    for key, tensor in tensors.items():
        values = tensor.detach().float()
        if not bool(torch.isfinite(values).all()):
            raise UserError(f"{where}: '{key}' holds NaN or infinite values; the file is damaged")
        peak = float(values.abs().max()) if values.numel() else 0.0
        if peak > MAX_FACTOR_ABS:
            raise UserError(f"{where}: '{key}' holds a value of {peak:.3g}, implausible for a LoRA factor "
                            f"(limit {MAX_FACTOR_ABS:g}); the file is damaged")


@torch.no_grad()
def _check_delta_ratio(model: nn.Module, backbone: str) -> None:
    """Refuse a layer whose gated, scaled delta dwarfs its base weight (damaged factors)."""
    for path, layer in lora.lora_layers(model).items():
        delta = layer.get_delta_weight().float()
        base = layer.base.weight.detach().float()
        ratio = float(delta.norm() / base.norm().clamp_min(1e-12))
        if not math.isfinite(ratio) or ratio > MAX_DELTA_RATIO:
            lora.strip(model)
            raise UserError(f"adapter delta on {backbone} layer '{path}' is {ratio:.3g} times its base weight "
                            f"(limit {MAX_DELTA_RATIO:g}); the adapter is damaged or not for these weights")


def _in_site(layer_path: str, site: str) -> bool:
    """A layer belongs to a site when it is a direct child of it (or is the root-level site itself)."""
    return layer_path == site or layer_path.rpartition(".")[0] == site
