"""The objective protocol and the helpers every objective shares.

An objective scores a batch of backbone outputs against the hazy inputs they came
from and returns a 0-d loss tensor to minimise:

    loss = objective(output, hazy)      # output: (N, 3, H, W) raw backbone output
                                        # hazy:   (N, 3, H, W) in [0, 1]

Objectives are deliberately **not** ``nn.Module``: whatever frozen networks they
hold (CLIP) can never leak into an optimiser through ``.parameters()``, and
``model.train()`` on the backbone never touches them.

Precision: an objective computes in float32 whatever autocast region it is
called from (:func:`fp32_region`); reduced precision belongs to the backbone
(and to CLIP's own forward, see :class:`~bilalora.objectives.h2c.H2C`). Under
bf16 the prior's blur convolutions and E[y^2] - mu^2 variances lose the signal.

Per-batch work on the hazy input (CLIP's embedding of it) is done once:
``objective.prepare(hazy)`` computes it ahead, and every call with the same
tensor (same object, unmodified) reuses it.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable
from typing import Any

import torch

from ..errors import UserError

__all__ = ["Objective", "check_pair", "clamp01", "fp32_region", "HazyCache"]


class _InwardClamp(torch.autograd.Function):
    """Clamp to [0, 1]; the gradient passes where descent moves a pixel toward [0, 1].

    Forward: ``x.clamp(0, 1)``. Backward: ``grad`` where ``0 <= x <= 1``; for
    ``x > 1`` only a positive ``grad`` passes (gradient descent then lowers x);
    for ``x < 0`` only a negative ``grad`` passes (descent raises x). Anything
    else gets 0.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        keep = ((x >= 0) & (x <= 1)) | ((x > 1) & (grad > 0)) | ((x < 0) & (grad < 0))
        return grad * keep.to(grad.dtype)


def clamp01(x: torch.Tensor) -> torch.Tensor:
    """Clamp ``x`` to [0, 1] for scoring, keeping a gradient that pulls outliers back.

    A plain clamp gives pixels outside [0, 1] zero gradient, so a backbone that
    overshoots never hears about it; a straight-through clamp passes every
    gradient, so a pixel already above 1 can be pushed further out with no effect
    on the loss (silent drift). This clamp is straight-through only in the inward
    direction: out-of-range pixels receive the part of the gradient that brings
    them back toward [0, 1] and nothing that pushes them further out.
    """
    return _InwardClamp.apply(x)


def fp32_region(tensor: torch.Tensor):
    """A context where autocast is off for ``tensor``'s device type: the objective's arithmetic runs in the
    dtype of its (float32) inputs even when the caller runs the backbone under bf16/fp16 autocast."""
    try:
        return torch.autocast(device_type=tensor.device.type, enabled=False)
    except (RuntimeError, ValueError):  # a device type without autocast support
        return contextlib.nullcontext()


class HazyCache:
    """A small cache of per-batch results on the hazy input, keyed by tensor identity and version.

    An entry holds a reference to its tensor (so the identity cannot be reused by another
    tensor) and the tensor's in-place version counter at the time; a modified or different
    tensor misses. ``size`` entries are kept (a search step alternates train and validation batches).
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._entries: list[tuple[torch.Tensor, int, Any]] = []
        self.hits = 0
        self.misses = 0

    def get(self, tensor: torch.Tensor, compute):
        """The cached value for ``tensor``, else ``compute(tensor)`` (stored)."""
        for index, (held, version, value) in enumerate(self._entries):
            if held is tensor and held._version == version:
                self.hits += 1
                if index:
                    self._entries.insert(0, self._entries.pop(index))
                return value
        self.misses += 1
        value = compute(tensor)
        self._entries.insert(0, (tensor, tensor._version, value))
        del self._entries[self.size:]
        return value

    def clear(self) -> None:
        self._entries.clear()


def check_pair(name: str, output: torch.Tensor, hazy: torch.Tensor, same_size: bool = True) -> None:
    """Raise :class:`UserError` unless output and hazy are (N, 3, H, W) batches that fit."""
    for label, tensor in (("output", output), ("hazy input", hazy)):
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 4 or tensor.shape[1] != 3:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise UserError(f"objective {name}: the backbone {label} must be an (N, 3, H, W) tensor, got {shape}")
    if output.shape[0] != hazy.shape[0]:
        raise UserError(f"objective {name}: batch sizes differ: output {tuple(output.shape)}, hazy {tuple(hazy.shape)}")
    if same_size and output.shape[-2:] != hazy.shape[-2:]:
        raise UserError(
            f"objective {name}: output {tuple(output.shape)} and hazy input {tuple(hazy.shape)} differ in size; "
            "the backbone must return an image of its input's size"
        )


class Objective(abc.ABC):
    """Base class: ``objective(output, hazy) -> 0-d loss`` plus bookkeeping.

    Subclasses implement :meth:`forward` and :meth:`describe`, and move their
    tensors in :meth:`_move`.

    Attributes:
        name: short registry name (``"h2c"``, ``"prior"``, ``"h2c:1+prior:0.5"``).
        last_terms: ``dict[str, float]`` of the named terms of the latest call
            (read lazily: values are kept as detached tensors and converted to
            float only when read, so logging costs no device sync unless used).
    """

    name: str = "objective"

    def __init__(self) -> None:
        self._terms: dict[str, torch.Tensor] = {}
        self.device = torch.device("cpu")

    # -- protocol -----------------------------------------------------------------
    def __call__(self, output: torch.Tensor, hazy: torch.Tensor) -> torch.Tensor:
        """Score ``output`` (N, 3, H, W), any range) against ``hazy`` (N, 3, H, W) in [0, 1]; 0-d loss."""
        return self.forward(output, hazy)

    @abc.abstractmethod
    def forward(self, output: torch.Tensor, hazy: torch.Tensor) -> torch.Tensor:
        """The loss of one batch (subclasses define it)."""

    def prepare(self, hazy: torch.Tensor) -> None:
        """Compute what depends only on the hazy batch (N, 3, H, W) in [0, 1] ahead of the calls
        (default: nothing). Calls with the same, unmodified tensor reuse it."""

    def describe(self) -> dict[str, Any]:
        """JSON-able settings (name, prompts, CLIP model and source, term weights, mode)."""
        return {"name": self.name}

    #: True when some term compares the output with the unadapted network's output on the same
    #: input; :func:`bilalora.adapt.adapt` then binds one with :meth:`bind_reference`.
    wants_reference: bool = False

    def bind_reference(self, reference: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """Give the objective ``reference(hazy) -> (N, 3, H, W)``: the unadapted network's output on the
        hazy batch (no gradient), or None to unbind (default: ignored)."""

    def to(self, device) -> Objective:
        """Move every tensor the objective holds to ``device``; returns self."""
        self.device = torch.device(device)
        self._move(self.device)
        return self

    def _move(self, device: torch.device) -> None:
        """Subclass hook for :meth:`to`."""

    # -- logging ------------------------------------------------------------------
    @property
    def last_terms(self) -> dict[str, float]:
        """Per-term values of the latest call, as floats (empty before the first call)."""
        return {key: float(value) for key, value in self._terms.items()}

    def _record(self, **terms: torch.Tensor) -> None:
        self._terms = {key: value.detach() for key, value in terms.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"
