"""``bilalora sites``: list the candidate LoRA sites of a backbone and what LoRA would cost."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from .common import console, user_errors


@user_errors
def sites_command(
    backbone: Optional[str] = typer.Option(
        None, "--backbone", "-b", help="Registry name or package.module:factory (default: the shipped DEA-Net)."
    ),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Weights file (.pth/.safetensors)."),
    rank: int = typer.Option(8, "--rank", "-r", min=1, help="LoRA rank for the parameter counts."),
    all_sites: bool = typer.Option(False, "--all", help="List every site, not only the default search space."),
    size: str = typer.Option("256x256", "--size", help="Input HxW for the FLOP count."),
    input_norm: Optional[str] = typer.Option(
        None, "--input-norm", help="Input the weights expect: clip, none or MEAN,STD (default: what the file records)."
    ),
) -> None:
    """List candidate injection sites (site, layers, LoRA parameters) and the model's cost."""
    from bilalora import backbones
    from bilalora import sites as site_lib
    from bilalora.backbones.normalize import describe
    from bilalora.objectives import spec_text
    from bilalora.parsing import parse_hw
    from bilalora.profile import measure_cost

    backbone = backbone or backbones.default_backbone()
    model = backbones.load(backbone, weights=weights, input_norm=input_norm)
    listed = site_lib.discover(model) if all_sites else site_lib.default_sites(model)
    scope = "all sites" if all_sites else "default search space"
    table = Table(title=f"{backbone}: {len(listed)} sites ({scope}), LoRA rank {rank}")
    table.add_column("#", justify="right")
    table.add_column("site")
    table.add_column("layers", justify="right")
    table.add_column("layer names")
    table.add_column(f"LoRA params (r={rank})", justify="right")
    total = 0
    for index, site in enumerate(listed, 1):
        count = site.lora_params(rank)
        total += count
        short = ", ".join(path.rpartition(".")[2] if path != site.name else path for path in site.convs)
        table.add_row(str(index), site.name, str(len(site.convs)), short, f"{count:,}")
    console.print(table)
    console.print(f"total LoRA parameters over {len(listed)} sites at rank {rank}: {total:,}")
    height, width = parse_hw(size, "--size")
    cost = measure_cost(model, (height, width))
    console.print(
        f"model: {cost.parameters:,} parameters; at {height}x{width}: {cost.flops / 1e9:.2f} GFLOPs "
        f"(torch.utils.flop_counter, multiply-add = 2) = {cost.macs / 1e9:.2f} GMACs (the paper's 'FLOPs')"
    )
    console.print(f"weights: {model.bilalora_info['weights']}; input: {describe(model.bilalora_info['input_norm'])}")
    for objective, patterns in sorted((model.bilalora_info.get("objective_sites") or {}).items()):
        names = [site.name for site in site_lib.default_sites(model, objective)]
        console.print(f"--objective {objective} searches {len(names)} of them by default: {', '.join(names)} "
                      f"({', '.join(patterns)}; --sites overrides)")
    for objective, preset in sorted((model.bilalora_info.get("objective_options") or {}).items()):
        console.print(f"--objective {objective} on this backbone means {spec_text(objective, preset)} "
                      "(options written in --objective win)")
