"""Gated LoRA layers: :class:`SiteGate`, and :class:`LoRAConv2d` / :class:`LoRALinear` around a frozen layer.

The factorisation (loralib's), the forward pass under autocast and merge/unmerge
(PEFT's layer model) are described in :mod:`bilalora.lora`, which injects these
layers into a model and operates on all of them at once.
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

__all__ = ["LoRAConv2d", "LoRALayer", "LoRALinear", "SiteGate"]


class SiteGate:
    """The gate of one site: ``sigmoid(logit)``, or the constant 1 when ungated.

    The logit is a 0-d ``nn.Parameter`` registered on the site module as
    ``lora_gate`` (a parameter, not a child module, so containers such as
    ``nn.Sequential`` keep iterating only their layers); this object is the
    handle the site's LoRA layers share.

    Args:
        logit: initial logit (0, i.e. gate 0.5).
        gated: False for plain LoRA (the ``manual`` baseline): value() is 1.
    """

    def __init__(self, logit: float = 0.0, gated: bool = True, device=None):
        self.logit = nn.Parameter(torch.tensor(float(logit), device=device), requires_grad=gated)
        self.gated = gated

    def value(self) -> torch.Tensor:
        """The gate as a 0-d tensor in (0, 1) (or exactly 1 when ungated)."""
        if not self.gated:
            return torch.ones((), dtype=self.logit.dtype, device=self.logit.device)
        return torch.sigmoid(self.logit)

    def __repr__(self) -> str:
        return f"SiteGate(gated={self.gated}, value={float(self.value()):.4f})"


class LoRALayer(nn.Module, abc.ABC):
    """Shared logic of LoRA layers: the factors, the delta, merge/unmerge, the forward pass."""

    base: nn.Module
    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def __init__(self, base: nn.Module, rank: int, lora_alpha: float, gate: SiteGate, a_shape, b_shape,
                 generator: torch.Generator | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        weight = base.weight
        self.rank = rank
        self.lora_alpha = float(lora_alpha)
        self.scale = self.lora_alpha / rank
        # kaiming_uniform_(a=sqrt(5)) on a (rows, cols) matrix is U(-1/sqrt(cols), 1/sqrt(cols)); drawn on the
        # CPU (the global generator unless one is given), so the start does not depend on the weight's device.
        bound = 1.0 / math.sqrt(a_shape[1])
        init = torch.empty(a_shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(init.to(device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(weight.new_zeros(b_shape))
        self.merged = False
        self.enabled = True
        # The gate belongs to the site module; keep a reference without registering it here.
        object.__setattr__(self, "_gate", gate)

    @property
    def gate(self) -> SiteGate:
        return self._gate

    # ------------------------------------------------------------------ weights
    def delta(self) -> torch.Tensor:
        """The unscaled, ungated weight delta reshape(B @ A), shaped like the base weight."""
        return (self.lora_B @ self.lora_A).view(self.base.weight.shape)

    def get_delta_weight(self) -> torch.Tensor:
        """gate * scale * reshape(B @ A): what merging adds to the base weight (float32, its shape)."""
        factor = self.gate.value().to(self.lora_B.dtype) * self.scale
        return ((self.lora_B * factor) @ self.lora_A).view(self.base.weight.shape).to(self.base.weight.dtype)

    def effective_weight(self) -> torch.Tensor:
        """W + delta_W, shaped like the base weight (W itself once merged)."""
        if self.merged:
            return self.base.weight
        return self.base.weight + self.get_delta_weight()

    @torch.no_grad()
    def merge(self, safe_merge: bool = True) -> None:
        """Add delta_W to the base weight in place and mark the layer merged.

        With ``safe_merge`` the sum is computed in a copy and checked for NaN/inf
        first; a non-finite result raises a UserError and leaves the layer unchanged.
        Merging a merged layer is a no-op.
        """
        if self.merged:
            return
        delta = self.get_delta_weight()
        if safe_merge:
            merged = self.base.weight + delta
            if not bool(torch.isfinite(merged).all()):
                raise UserError(f"cannot merge LoRA into {self._describe()}: the merged weight has NaN/inf values "
                                "(a corrupt adapter or a diverged run)")
            self.base.weight.copy_(merged)
        else:
            self.base.weight.add_(delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract delta_W from the base weight again (the inverse of :meth:`merge`, to float32 rounding).

        The factors and gate must be those that were merged. Unmerging an unmerged layer is a no-op.
        """
        if not self.merged:
            return
        self.base.weight.sub_(self.get_delta_weight())
        self.merged = False

    # ------------------------------------------------------------------ forward
    @abc.abstractmethod
    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The wrapped layer's operation with ``weight`` (and the base's ``bias``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:
            return self.base(x)
        if torch.is_autocast_enabled(x.device.type):
            # Separate branch: the delta is not rounded to the precision of W (see the module docstring).
            base = self.base(x)
            branch = self._apply_weight(x, self.get_delta_weight(), None)
            return base.float() + branch.float()
        return self._apply_weight(x, self.effective_weight(), self.base.bias)

    def _describe(self) -> str:
        return f"{type(self.base).__name__} with weight {tuple(self.base.weight.shape)}"

    def extra_repr(self) -> str:
        return f"rank={self.rank}, lora_alpha={self.lora_alpha:g}, merged={self.merged}, enabled={self.enabled}"


class LoRAConv2d(LoRALayer):
    """Gated LoRA around an ``nn.Conv2d``. (N, C_in, H, W) -> (N, C_out, H', W') like the base."""

    def __init__(self, base: nn.Conv2d, rank: int, lora_alpha: float, gate: SiteGate,
                 generator: torch.Generator | None = None):
        kernel_h, kernel_w = base.kernel_size
        in_per_group = base.in_channels // base.groups
        super().__init__(
            base,
            rank,
            lora_alpha,
            gate,
            a_shape=(rank * kernel_h, in_per_group * kernel_w),
            b_shape=(base.out_channels * kernel_h, rank * kernel_h),
            generator=generator,
        )

    def _apply_weight(self, x, weight, bias):
        return self.base._conv_forward(x, weight, bias)


class LoRALinear(LoRALayer):
    """Gated LoRA around an ``nn.Linear``. (..., C_in) -> (..., C_out)."""

    def __init__(self, base: nn.Linear, rank: int, lora_alpha: float, gate: SiteGate,
                 generator: torch.Generator | None = None):
        super().__init__(
            base,
            rank,
            lora_alpha,
            gate,
            a_shape=(rank, base.in_features),
            b_shape=(base.out_features, rank),
            generator=generator,
        )

    def _apply_weight(self, x, weight, bias):
        return F.linear(x, weight, bias)
