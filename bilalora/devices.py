"""Devices and precision: one home for device choice, device names and autocast contexts."""

from __future__ import annotations

import contextlib
import platform
from typing import Callable, ContextManager

from .errors import UserError

__all__ = ["resolve_device", "device_name", "cpu_name", "autocast_factory", "uses_bf16"]


def resolve_device(device: str) -> str:
    """Map ``auto|cpu|cuda|cuda:N`` to a torch device string; ``cuda`` without a GPU is a UserError."""
    import torch

    device = device.lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was given but no CUDA GPU is visible; use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device {device}: use auto, cpu, cuda or cuda:N")
    return device


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what :mod:`platform` knows."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def device_name(device: str) -> str:
    """A human name of a torch device: the GPU's name, or the CPU model with its thread count."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def uses_bf16(device: str, precision: str) -> bool:
    """Whether ``precision`` (auto | fp32 | bf16) means bf16 autocast on ``device`` (auto: bf16 on CUDA)."""
    return precision == "bf16" or (precision == "auto" and device.startswith("cuda"))


def autocast_factory(device: str, precision: str) -> Callable[[], ContextManager]:
    """A zero-argument factory of the autocast context for ``precision`` on ``device``.

    bf16 autocast when :func:`uses_bf16`; otherwise ``contextlib.nullcontext``.
    """
    if not uses_bf16(device, precision):
        return contextlib.nullcontext
    import torch

    device_type = "cuda" if device.startswith("cuda") else "cpu"
    return lambda: torch.autocast(device_type=device_type, dtype=torch.bfloat16)
