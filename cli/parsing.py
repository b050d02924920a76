"""Parsing of CLI values (sizes, lists) with one-line errors naming the flag."""

from __future__ import annotations

from bilalora.errors import UserError


def parse_hw(text: str, flag: str, multiple: int = 1) -> tuple[int, int]:
    """Parse ``HxW`` (or a single ``N`` for a square) into ints; both must divide by ``multiple``."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"{flag} {text}: expected HxW, e.g. 256x256") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) <= 0:
        raise UserError(f"{flag} {text}: expected HxW with positive sizes, e.g. 256x256")
    if multiple > 1 and any(v % multiple for v in values):
        raise UserError(f"{flag} {text}: height and width must be multiples of {multiple}")
    return values[0], values[1]


def parse_list(text: str | None) -> list[str] | None:
    """Split a comma/space separated list; None or empty gives None."""
    if not text:
        return None
    items = [item.strip() for chunk in text.split(",") for item in chunk.split()]
    return [item for item in items if item] or None
