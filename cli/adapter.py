"""``bilalora adapter``: inspect adapter files and convert the paper's release ``LoRA.pth`` to and from them."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .common import console, err_console, user_errors

adapter_app = typer.Typer(
    name="adapter",
    help="Adapter files: import a release LoRA.pth, export one, show what a file holds.",
    no_args_is_help=True,
    add_completion=False,
)

_NORM_HELP = (
    "Input normalisation the base weights expect: clip (the release's), none ([0, 1] RGB), or MEAN,STD "
    "(2 or 6 numbers). Default for import: clip, unless the weights file records its own."
)


def _record_path(out: Path) -> Path:
    """The JSON record written beside an output file (``day.safetensors`` -> ``day.safetensors.json``)."""
    return out.with_name(out.name + ".json")


def _refuse_overwrite(out: Path, overwrite: bool) -> None:
    from bilalora.errors import UserError

    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")


@adapter_app.command("import")
@user_errors
def import_command(
    release: Path = typer.Argument(..., help="The release's LoRA.pth (read with weights_only=True)."),
    out: Path = typer.Option(..., "--out", "-o", help="Adapter file to write (.safetensors)."),
    backbone: Optional[str] = typer.Option(
        None, "--backbone", "-b", help="Registry name or package.module:factory (default: the shipped DEA-Net)."
    ),
    weights: str = typer.Option(..., "--weights", "-w", help="The base weights the adapter was trained on (Base.pth)."),
    input_norm: Optional[str] = typer.Option(None, "--input-norm", help=_NORM_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
) -> None:
    """Import a release LoRA.pth (lora_state_dict + lora_config/nas_lora_config) into a bilalora adapter."""
    from bilalora import backbones
    from bilalora.backbones.normalize import describe, recorded_input_norm
    from bilalora.io import write_json
    from bilalora.release import import_release

    out = out if out.suffix == ".safetensors" else out.with_suffix(".safetensors")
    _refuse_overwrite(out, overwrite)
    name = backbone or backbones.default_backbone()
    if input_norm is None and recorded_input_norm(weights) == "unknown":
        input_norm = "clip"
        console.print("input normalisation: clip (the release's; --input-norm none for [0, 1] weights)")
    base = backbones.load(name, weights=weights, input_norm=input_norm)
    adapter = import_release(release, base, extra_meta={"weights": str(weights)})
    adapter.save(out)
    summary = adapter.summary()
    gates = ", ".join(f"{site} {gate:.4f}" for site, gate in adapter.sites.items())
    console.print(f"imported {len(adapter.sites)} site(s) at rank {adapter.rank} (alpha {adapter.lora_alpha:g}): "
                  f"{escape(gates)}")
    console.print(f"base {name} fingerprint {adapter.base_fingerprint}; input {describe(adapter.input_norm)}")
    record = {
        "command": "adapter import",
        "release": str(release),
        "release_sha256": adapter.meta["source"]["sha256"],
        "out": str(out),
        "backbone": name,
        "weights": str(weights),
        "adapter": summary,
        "python": platform.python_version(),
    }
    write_json(_record_path(out), record)
    console.print(f"wrote {escape(str(out))} (record: {escape(str(_record_path(out)))})")


@adapter_app.command("export")
@user_errors
def export_command(
    adapter_path: Path = typer.Argument(..., help="A bilalora adapter (.safetensors)."),
    out: Path = typer.Option(..., "--out", "-o", help="Release-layout file to write (LoRA.pth)."),
    epoch: Optional[int] = typer.Option(None, "--epoch", min=0, help="Epoch to record in the config (default: kept)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
) -> None:
    """Write an adapter in the release's LoRA.pth layout (gate logits under each block's first conv)."""
    from bilalora.adapter import Adapter
    from bilalora.backbones.normalize import CLIP_MEAN, CLIP_STD, describe, same_input_norm
    from bilalora.io import write_json
    from bilalora.release import export_release

    _refuse_overwrite(out, overwrite)
    adapter = Adapter.load(adapter_path)
    if not same_input_norm(adapter.input_norm, {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}):
        err_console.print(
            f"[yellow]warning:[/] the release feeds CLIP-normalised input; this adapter's base expects "
            f"{describe(adapter.input_norm)}, so the release's scripts would run it on the wrong input"
        )
    export_release(adapter, out, epoch=epoch)
    console.print(f"exported {len(adapter.sites)} site(s) at rank {adapter.rank}: {escape(', '.join(adapter.sites))}")
    write_json(
        _record_path(out),
        {"command": "adapter export", "adapter": str(adapter_path), "out": str(out), "summary": adapter.summary(),
         "python": platform.python_version()},
    )
    console.print(f"wrote {escape(str(out))} (record: {escape(str(_record_path(out)))})")


@adapter_app.command("show")
@user_errors
def show_command(adapter_path: Path = typer.Argument(..., help="A bilalora adapter (.safetensors).")) -> None:
    """Check an adapter file (metadata, checksum, magnitudes) and print what it holds."""
    from rich.table import Table

    from bilalora.adapter import Adapter
    from bilalora.backbones.normalize import describe

    adapter = Adapter.load(adapter_path)
    table = Table(title=f"{adapter_path.name}: {adapter.backbone}, rank {adapter.rank}, alpha {adapter.lora_alpha:g}")
    table.add_column("#", justify="right")
    table.add_column("site")
    table.add_column("gate", justify="right")
    table.add_column("layers")
    for index, (site, gate) in enumerate(adapter.sites.items(), 1):
        table.add_row(str(index), site, f"{gate:.4f}", ", ".join(adapter.layers_of(site)))
    console.print(table)
    console.print(f"base fingerprint {adapter.base_fingerprint}; input {describe(adapter.input_norm)}; "
                  f"{adapter.summary()['lora_parameters']:,} LoRA parameters; method {adapter.meta.get('method')}")
