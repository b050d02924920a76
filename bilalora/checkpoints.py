"""Resumable training checkpoints: written atomically, read back without unpickling code.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts with a
``"format"`` key naming what wrote it (e.g. ``"bilalora-pretrain-checkpoint/1"``).
It is saved with ``torch.save`` through :func:`bilalora.io.atomic_path` (a crash
mid-write leaves the previous file intact) and loaded with
``torch.load(..., weights_only=True)``, which refuses anything but tensors and
plain containers, so a checkpoint from elsewhere cannot run code on load.

The RNG helpers capture and restore torch's CPU (and CUDA) generator state so
that a resumed run draws what an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .errors import UserError
from .io import atomic_path

__all__ = ["load_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts only) to ``path`` atomically."""
    with atomic_path(Path(path)) as tmp:
        torch.save(state, str(tmp))


def load_checkpoint(path: str | Path, expected_format: str, flag: str = "--resume", hint: str = "") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`, tensors on the CPU.

    Args:
        path: the file.
        expected_format: the ``"format"`` value it must carry.
        flag: the command-line option named in errors.
        hint: appended to the "no checkpoint" message (e.g. how to start afresh).

    Raises:
        UserError: the file is missing, unreadable, holds anything but plain data
            (``weights_only=True`` refuses it), or has another format.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag}: no checkpoint at {path}{f' ({hint})' if hint else ''}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a broken or unsafe file is the user's problem to hear about
        raise UserError(f"{flag}: cannot read checkpoint {path}: {type(exc).__name__}") from None
    if not isinstance(state, dict) or state.get("format") != expected_format:
        raise UserError(f"{flag}: {path} is not a {expected_format} checkpoint")
    return state


def rng_state() -> dict:
    """torch's CPU generator state, plus every CUDA device's when CUDA is available."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only when CUDA is available and they fit)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])
