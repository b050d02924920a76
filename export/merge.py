"""Merge an adapter's top-k gated LoRA deltas into the base weights.

For every layer of the adapter's sites the merged weight is

    W' = W + gate * (lora_alpha / rank) * reshape(B @ A, W.shape)

(:func:`bilalora.lora.merge`), so the merged network has exactly the base's
modules, state-dict keys and shapes, the same parameter count and FLOPs, and
reproduces the gated network's output (gate: max abs error <= 1e-5).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from bilalora import lora
from bilalora.adapter import Adapter, fingerprint
from bilalora.errors import UserError
from bilalora.io import atomic_path

from .parity import Case, ParityResult, evaluate, gate_for

__all__ = ["MergeReport", "gated_copy", "merge_adapter", "save_merged", "structure_diff"]


@dataclass
class MergeReport:
    """What merging did and how well the merged network matches the gated one.

    Attributes:
        sites: {site name: gate value}.
        layers: number of layers that received a delta.
        parameters_base, parameters_gated, parameters_merged: parameter counts.
        base_fingerprint, merged_fingerprint: :func:`bilalora.adapter.fingerprint` values.
        parity: merged vs gated on the cases (gate 1e-5).
        seconds: wall time of the merge and its check.
        outputs: the merged model's (wrapped) outputs on the cases, float32 numpy;
            reused as the PyTorch reference of the ONNX parity gates (not serialised).
    """

    sites: dict[str, float]
    layers: int
    parameters_base: int
    parameters_gated: int
    parameters_merged: int
    base_fingerprint: str
    merged_fingerprint: str
    parity: Optional[ParityResult] = None
    seconds: float = 0.0
    outputs: list = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sites": dict(self.sites),
            "layers": self.layers,
            "parameters_base": self.parameters_base,
            "parameters_gated": self.parameters_gated,
            "parameters_merged": self.parameters_merged,
            "base_fingerprint": self.base_fingerprint,
            "merged_fingerprint": self.merged_fingerprint,
            "max_abs": self.parity.max_abs if self.parity else None,
            "gate": self.parity.gate.get("max_abs") if self.parity else None,
            "seconds": round(self.seconds, 3),
        }


def gated_copy(adapter: Adapter, base: nn.Module) -> nn.Module:
    """A copy of ``base`` carrying the adapter's gated LoRA (fingerprint checked), in eval mode."""
    model = copy.deepcopy(base)
    adapter.apply(model)  # refuses other base weights with a one-line UserError
    return model.eval()


def structure_diff(model: nn.Module, base: nn.Module) -> list[str]:
    """Differences of state-dict keys/shapes between ``model`` and ``base`` (empty: identical)."""
    ours, theirs = model.state_dict(), base.state_dict()
    problems = []
    if list(ours) != list(theirs):
        missing = [k for k in theirs if k not in ours]
        extra = [k for k in ours if k not in theirs]
        problems.append(f"keys differ (missing {missing[:3]}, extra {extra[:3]})")
    for key, value in theirs.items():
        if key in ours and tuple(ours[key].shape) != tuple(value.shape):
            problems.append(f"{key}: {tuple(ours[key].shape)} vs {tuple(value.shape)}")
    return problems


@torch.no_grad()
def merge_adapter(
    adapter: Adapter,
    base: nn.Module,
    cases: Sequence[Case] = (),
    wrap=None,
) -> tuple[nn.Module, MergeReport]:
    """Merge ``adapter`` into a copy of ``base``; check structure and parity against the gated model.

    Args:
        adapter: the adapter (its ``base_fingerprint`` must match ``base``).
        base: the LoRA-free base network; not modified.
        cases: parity inputs, float32 (N, 3, H, W) in [0, 1]; none: no parity check.
        wrap: optional callable applied to both models before comparing (e.g. the
            export wrapper that clamps); identity by default.

    Returns:
        (merged model in eval mode, report).

    Raises:
        UserError: wrong base weights, sites missing, a structure change, or
            max |gated - merged| > 1e-5 (a ParityError).
    """
    start = time.perf_counter()
    gated = gated_copy(adapter, base)
    merged = lora.merge(copy.deepcopy(gated)).eval()
    problems = structure_diff(merged, base)
    if problems:
        raise UserError(f"merging changed the network's structure: {'; '.join(problems[:3])}")
    report = MergeReport(
        sites=dict(adapter.sites),
        layers=sum(len(adapter.layers_of(name)) for name in adapter.sites),
        parameters_base=lora.count_parameters(base),
        parameters_gated=lora.count_parameters(gated),
        parameters_merged=lora.count_parameters(merged),
        base_fingerprint=fingerprint(base),
        merged_fingerprint=fingerprint(merged),
    )
    if cases:
        wrap = wrap or (lambda m: m)
        gated_run, merged_run = wrap(gated), wrap(merged)
        references = [gated_run(torch.from_numpy(c.array)).float().numpy() for c in cases]
        outputs = [merged_run(torch.from_numpy(c.array)).float().numpy() for c in cases]
        report.outputs = outputs
        report.parity = evaluate(
            "merged weights", "fp32", cases, outputs, references, gate_for("merge", "fp32"), "gated LoRA model"
        ).check()
    report.seconds = time.perf_counter() - start
    return merged, report


def save_merged(model: nn.Module, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write the merged state dict as safetensors (atomically), with JSON ``metadata`` under "bilalora".

    The file loads like any checkpoint: ``backbones.load(name, weights=path)``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"bilalora": json.dumps(metadata)})
    return path
