"""The ``bilalora`` Typer app. Each command lives in its own module; this file wires them."""

from __future__ import annotations

import os

import typer

from .adapt import adapt_command
from .adapter import adapter_app
from .bench import bench_command
from .export import export_command
from .info import info_command
from .pretrain import pretrain_command
from .run import run_command
from .sites import sites_command

app = typer.Typer(
    name="bilalora",
    help=(
        "Adapt dehazing networks to real haze with bilevel-positioned LoRA, export them "
        "(ONNX, OpenVINO, TensorRT) and run them on cameras and drones.\n\n"
        "images/ -> adapt -> adapter -> export -> model.onnx / model.engine -> run"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("adapt")(adapt_command)
app.command("export")(export_command)
app.command("bench")(bench_command)
app.command("sites")(sites_command)
app.command("info")(info_command)
app.command("pretrain")(pretrain_command)
app.command("run")(run_command)
app.add_typer(adapter_app, name="adapter")


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
