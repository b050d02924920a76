"""Parsing of command-line values (sizes, lists) with one-line errors naming the flag. Torch-free."""

from __future__ import annotations

from typing import Optional, Sequence

from bilalora.errors import UserError

__all__ = ["parse_hw", "parse_list"]


def parse_hw(value: str | Sequence[int], flag: str, multiple: int = 1, example: str = "256x256") -> tuple[int, int]:
    """``"HxW"`` (or ``"N"`` for a square, or an (H, W) pair) -> (H, W), both positive multiples of ``multiple``.

    Raises:
        UserError: naming ``flag``, for text that is not a size or sizes that are not multiples.
    """
    if isinstance(value, str):
        parts = value.lower().replace("*", "x").replace(",", "x").split("x")
        try:
            numbers = [int(part) for part in parts]
        except ValueError:
            raise UserError(f"{flag} {value}: expected HxW, e.g. {example}") from None
    else:
        numbers = [int(v) for v in value]
    if len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != 2 or min(numbers) <= 0:
        raise UserError(f"{flag} {value}: expected HxW with two positive sizes, e.g. {example}")
    if multiple > 1 and any(v % multiple for v in numbers):
        height, width = numbers
        suggestion = f"{-(-height // multiple) * multiple}x{-(-width // multiple) * multiple}"
        raise UserError(
            f"{flag} {value}: height and width must be multiples of {multiple} (the network downsamples twice); "
            f"use e.g. {suggestion} (the runtime pads frames up to it)"
        )
    return numbers[0], numbers[1]


def parse_list(text: Optional[str]) -> Optional[list[str]]:
    """Split a comma/space separated list; None or empty gives None."""
    if not text:
        return None
    items = [item.strip() for chunk in text.split(",") for item in chunk.split()]
    return [item for item in items if item] or None
