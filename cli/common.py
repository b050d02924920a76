"""Shared pieces of the CLI: the console, one-line errors, device choice, progress bars."""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from bilalora.devices import resolve_device  # noqa: F401 - re-exported for the commands
from bilalora.errors import UserError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable)


def user_errors(func: F) -> F:
    """Turn a :class:`UserError` into one red line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            err_console.print(f"[bold red]error:[/] {escape(exc.message)}", soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: what was already written is kept")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def progress_bar(transient: bool = False):
    """The library's progress-bar layout on the CLI console."""
    from bilalora.progress import make_progress

    return make_progress(console, transient=transient)


def backbone_from_flags(backbone: str, weights: str | None):
    """Load the backbone named by --backbone/--weights (UserError on bad input)."""
    from bilalora import backbones

    return backbones.load(backbone, weights=weights)
