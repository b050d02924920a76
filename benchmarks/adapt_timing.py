"""Time the adaptation steps: bilevel search (bilalora's 2 passes vs the release's 3),
joint search, and stage-B fine-tuning, in fp32 and bf16 autocast; peak GPU memory on CUDA.

    python benchmarks/adapt_timing.py --backbone dea-net --objective prior --device cuda
    python benchmarks/adapt_timing.py --backbone dea-net-s --device cpu --precisions fp32 --batch 4 --crop 128

Prints a table and writes benchmarks/results/adapt_timing_<device name>.json (or --out).
Batches are random tensors in [0, 1] of shape (batch, 3, crop, crop) (timing does not
depend on content). Each precision starts from a fresh network with the same seed:
LoRA injected into the default sites (rank 8), the base frozen, the default
:class:`~bilalora.search.OptimConfig`; ``warmup`` untimed steps then ``steps`` timed
ones per kind, with the device synchronised around the timed block.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bilalora import backbones, lora, sites
from bilalora.devices import autocast_factory, device_name
from bilalora.objectives import build_objective
from bilalora.parsing import parse_list
from bilalora.search import (
    OptimConfig,
    bilevel_step,
    joint_step,
    make_gate_optimizer,
    make_lora_optimizer,
    rank_sites,
    train_step,
)

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(step, warmup: int, steps: int, device: str) -> float:
    """Seconds per call of ``step`` (mean over ``steps`` after ``warmup``)."""
    for _ in range(warmup):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - started) / steps


def _peak_mib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.startswith("cuda") else None


def time_precision(args, precision: str) -> dict:
    """Seconds per step of each kind and peak memory, for one precision ("fp32" or "bf16")."""
    device = args.device
    cuda = device.startswith("cuda")
    torch.manual_seed(args.seed)
    autocast = autocast_factory(device, precision)
    options = {k: v for k, v in {"clip": args.clip, "pretrained": args.clip_pretrained,
                                 "clip_config": args.clip_config}.items() if v}  # fmt: skip
    objective = build_objective(args.objective, **options).to(device)
    model = backbones.load(args.backbone, weights=args.weights)
    lora.inject(model, sites.default_sites(model), rank=8, lora_alpha=16)  # on the CPU: same start on every device
    model.to(device)
    if cuda:
        model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # fixed crops
    lora.freeze_base(model)
    config = OptimConfig()
    lora_opt = make_lora_optimizer(lora.lora_parameters(model), config)
    gate_opt = make_gate_optimizer(lora.gate_parameters(model), config)
    shape = (args.batch, 3, args.crop, args.crop)
    layout = torch.channels_last if cuda else torch.contiguous_format
    train = torch.rand(shape, device=device).contiguous(memory_format=layout)
    val = torch.rand(shape, device=device).contiguous(memory_format=layout)
    seconds = {}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for passes in (2, 3):
        seconds[f"bilevel_{passes}pass"] = _time(
            lambda: bilevel_step(model, objective, train, val, lora_opt, gate_opt, config, passes=passes,
                                 autocast=autocast),  # fmt: skip
            args.warmup, args.steps, device)
    seconds["joint"] = _time(lambda: joint_step(model, objective, train, lora_opt, gate_opt, config, autocast=autocast),
                             args.warmup, args.steps, device)  # fmt: skip
    peak_search = _peak_mib(device)
    lora.keep_sites(model, [name for name, _ in rank_sites(model)[: args.top_k]])
    ft_opt = make_lora_optimizer(lora.lora_parameters(model), config)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds["finetune"] = _time(lambda: train_step(model, objective, train, ft_opt, config, autocast=autocast),
                                args.warmup, args.steps, device)  # fmt: skip
    return {
        "seconds_per_step": {k: round(v, 5) for k, v in seconds.items()},
        "images_per_second": {k: round(args.batch / v, 1) for k, v in seconds.items()},
        "three_pass_over_two_pass": round(seconds["bilevel_3pass"] / seconds["bilevel_2pass"], 3),
        "peak_memory_mib": {"search": peak_search, "finetune": _peak_mib(device)},
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="dea-net")
    parser.add_argument("--weights", default=None, help="weights file or 'random' (default: the shipped ones)")
    parser.add_argument("--objective", default="prior")
    parser.add_argument("--clip", default=None)
    parser.add_argument("--clip-pretrained", default=None)
    parser.add_argument("--clip-config", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", default=None,
                        help="comma-separated fp32,bf16 (default: both on CUDA, fp32 on CPU)")
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    precisions = parse_list(args.precisions) or (["fp32", "bf16"] if args.device.startswith("cuda") else ["fp32"])
    unknown = [p for p in precisions if p not in ("fp32", "bf16")]
    if unknown:
        parser.error(f"--precisions: unknown {', '.join(unknown)} (use fp32, bf16)")

    record = {
        "device": device_name(args.device),
        "torch": torch.__version__,
        "backbone": args.backbone,
        "objective": args.objective,
        "batch": args.batch,
        "crop": args.crop,
        "steps_timed": args.steps,
        "warmup": args.warmup,
        "hypergradient": getattr(OptimConfig(), "hypergradient", None),
        "precisions": {},
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"adaptation step time, {record['device']}, batch {args.batch} x {args.crop}^2")
    table.add_column("step")
    for precision in precisions:
        record["precisions"][precision] = time_precision(args, precision)
        table.add_column(f"ms {precision}", justify="right")
    for kind in record["precisions"][precisions[0]]["seconds_per_step"]:
        table.add_row(kind, *[f"{record['precisions'][p]['seconds_per_step'][kind] * 1000:.1f}" for p in precisions])
    Console().print(table)
    for precision in precisions:
        result = record["precisions"][precision]
        ratio, peak = result["three_pass_over_two_pass"], result["peak_memory_mib"]
        print(f"{precision}: 3-pass / 2-pass = {ratio}; peak MiB {peak}")
    out = Path(args.out) if args.out else RESULTS / (
        "adapt_timing_" + "".join(c if c.isalnum() else "_" for c in record["device"]).strip("_") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {out}")
    return record


if __name__ == "__main__":
    main()
