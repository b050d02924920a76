"""Parameter and FLOP counts of a model, as the paper reports them.

``torch.utils.flop_counter`` counts a multiply-add as 2 FLOPs; the paper's
"GFLOPs" for DEA-Net (34 G at 256 x 256) counts multiply-accumulates, so both
are reported, labelled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ModelCost", "measure_cost"]


@dataclass(frozen=True)
class ModelCost:
    """Parameters and compute of one forward pass at ``size`` (H, W), batch 1."""

    parameters: int
    flops: int
    size: tuple[int, int]

    @property
    def macs(self) -> int:
        """Multiply-accumulates (= FLOPs / 2), the paper's "FLOPs"."""
        return self.flops // 2

    def as_dict(self) -> dict:
        return {
            "parameters": self.parameters,
            "gflops": round(self.flops / 1e9, 3),
            "gmacs": round(self.macs / 1e9, 3),
            "input_hw": list(self.size),
        }


@torch.no_grad()
def measure_cost(model: nn.Module, size: tuple[int, int] = (256, 256)) -> ModelCost:
    """Count parameters (shared ones once) and FLOPs of one (1, 3, H, W) forward on the model's device."""
    from torch.utils.flop_counter import FlopCounterMode

    parameter = next(model.parameters())
    probe = torch.rand(1, 3, *size, device=parameter.device, dtype=parameter.dtype)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(probe)
    model.train(was_training)
    return ModelCost(sum(p.numel() for p in model.parameters()), int(counter.get_total_flops()), tuple(size))
