"""DEConv: the detail-enhanced convolution of DEA-Net's training form.

Five parallel 3x3 convolutions (central-, horizontal-, vertical-, angular-
difference and vanilla) whose kernels are linear in their parameters, so their
sum is one 3x3 kernel: the layer re-parameterises exactly into a plain conv.
Parameter names follow the release (``conv1_1.conv.weight`` ... ``conv1_5.weight``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DEConv"]

# Kernel positions are flattened row-major: 0 1 2 / 3 4 5 / 6 7 8.
_ANGULAR_SHIFT = [3, 0, 1, 6, 4, 2, 7, 8, 5]


class _CentralDifference(nn.Module):
    """Central-difference conv: w' = w with w'[centre] = w[centre] - sum(w)."""

    def __init__(self, dim: int, theta: float = 1.0):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, bias=True)
        self.theta = theta

    def merged_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.conv.weight
        flat = weight.flatten(2)
        centre = flat[:, :, 4] - self.theta * flat.sum(2)
        flat = torch.cat([flat[:, :, :4], centre.unsqueeze(2), flat[:, :, 5:]], dim=2)
        return flat.view_as(weight), self.conv.bias


class _AngularDifference(nn.Module):
    """Angular-difference conv: w' = w - theta * w rotated by one position clockwise."""

    def __init__(self, dim: int, theta: float = 1.0):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, bias=True)
        self.theta = theta
        # A device buffer (moved by .to(), not in the state dict): indexing with a Python list would
        # copy the index to the device, a blocking host transfer, on every call.
        self.register_buffer("shift_index", torch.tensor(_ANGULAR_SHIFT, dtype=torch.long), persistent=False)

    def merged_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.conv.weight
        flat = weight.flatten(2)
        flat = flat - self.theta * flat.index_select(2, self.shift_index)
        return flat.view_as(weight), self.conv.bias


class _AxisDifference(nn.Module):
    """Horizontal/vertical-difference conv from a 1-D kernel of 3 taps.

    Horizontal: left column = +w, right column = -w. Vertical: top row = +w,
    bottom row = -w.
    """

    def __init__(self, dim: int, vertical: bool):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, padding=1, bias=True)
        self.vertical = vertical

    def merged_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        taps = self.conv.weight  # (C_out, C_in, 3)
        zeros = torch.zeros_like(taps)
        if self.vertical:
            grid = torch.stack([taps, zeros, -taps], dim=2)  # rows: +w, 0, -w
        else:
            grid = torch.stack([taps, zeros, -taps], dim=3)  # columns: +w, 0, -w
        return grid, self.conv.bias


class DEConv(nn.Module):
    """Sum of five 3x3 difference convolutions, applied as one conv.

    (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.conv1_1 = _CentralDifference(dim)
        self.conv1_2 = _AxisDifference(dim, vertical=False)
        self.conv1_3 = _AxisDifference(dim, vertical=True)
        self.conv1_4 = _AngularDifference(dim)
        self.conv1_5 = nn.Conv2d(dim, dim, 3, padding=1, bias=True)

    def merged_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The equivalent single 3x3 kernel (C, C, 3, 3) and bias (C,)."""
        weights, biases = zip(
            self.conv1_1.merged_weight(),
            self.conv1_2.merged_weight(),
            self.conv1_3.merged_weight(),
            self.conv1_4.merged_weight(),
            (self.conv1_5.weight, self.conv1_5.bias),
        )
        return sum(weights), sum(biases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.merged_weight()
        return F.conv2d(x, weight, bias, stride=1, padding=1)
