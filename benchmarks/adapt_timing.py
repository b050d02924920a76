"""Time the adaptation steps: bilevel search (bilalora's 2 passes vs the release's 3),
joint search, and stage-B fine-tuning; peak GPU memory on CUDA.

    python benchmarks/adapt_timing.py --backbone dea-net --objective prior --device cuda
    python benchmarks/adapt_timing.py --objective h2c --clip-pretrained vit_b32_random.pt --device cuda

Prints a table and writes benchmarks/results/adapt_timing_<device name>.json.
Batches are random crops of random images (timing does not depend on content).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from bilalora import backbones, lora, sites
from bilalora.objectives import build_objective
from bilalora.search import (
    OptimConfig,
    bilevel_step,
    joint_step,
    make_gate_optimizer,
    make_lora_optimizer,
    rank_sites,
    train_step,
)


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(step, warmup: int, steps: int, device: str) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - started) / steps


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="dea-net")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--objective", default="prior")
    parser.add_argument("--clip", default=None)
    parser.add_argument("--clip-pretrained", default=None)
    parser.add_argument("--clip-config", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = args.device
    use_bf16 = args.bf16 if args.bf16 is not None else device.startswith("cuda")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else None
    options = {k: v for k, v in {"clip": args.clip, "pretrained": args.clip_pretrained,
                                 "clip_config": args.clip_config}.items() if v}
    objective = build_objective(args.objective, **options).to(device)
    model = backbones.load(args.backbone, weights=args.weights).to(device)
    if device.startswith("cuda"):
        model.to(memory_format=torch.channels_last)
    lora.inject(model, sites.default_sites(model), rank=8, lora_alpha=16)
    lora.freeze_base(model)
    config = OptimConfig()
    lora_opt = make_lora_optimizer(lora.lora_parameters(model), config)
    gate_opt = make_gate_optimizer(lora.gate_parameters(model), config)
    shape = (args.batch, 3, args.crop, args.crop)
    train = torch.rand(shape, device=device)
    val = torch.rand(shape, device=device)
    kwargs = {"autocast": autocast} if autocast else {}
    results = {}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    results["bilevel_2pass_s"] = _time(
        lambda: bilevel_step(model, objective, train, val, lora_opt, gate_opt, config, passes=2, **kwargs),
        args.warmup, args.steps, device)
    results["bilevel_3pass_s"] = _time(
        lambda: bilevel_step(model, objective, train, val, lora_opt, gate_opt, config, passes=3, **kwargs),
        args.warmup, args.steps, device)
    results["joint_s"] = _time(
        lambda: joint_step(model, objective, train, lora_opt, gate_opt, config, **kwargs), args.warmup, args.steps,
        device)
    peak_search = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    # stage B: keep top-k
    lora.keep_sites(model, [name for name, _ in rank_sites(model)[: args.top_k]])
    ft_opt = make_lora_optimizer(lora.lora_parameters(model), config)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    results["finetune_s"] = _time(lambda: train_step(model, objective, train, ft_opt, config, **kwargs),
                                  args.warmup, args.steps, device)
    peak_finetune = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    record = {
        "device": _device_name(device),
        "torch": torch.__version__,
        "backbone": args.backbone,
        "objective": objective.describe() if hasattr(objective, "describe") else args.objective,
        "batch": args.batch,
        "crop": args.crop,
        "precision": "bf16" if use_bf16 else "fp32",
        "steps_timed": args.steps,
        "seconds_per_step": {k: round(v, 5) for k, v in results.items()},
        "three_pass_over_two_pass": round(results["bilevel_3pass_s"] / results["bilevel_2pass_s"], 3),
        "peak_memory_mib": {"search": peak_search, "finetune": peak_finetune},
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
    }
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"adaptation step time, {record['device']}, batch {args.batch} x {args.crop}^2, "
                        f"{record['precision']}")
    table.add_column("step")
    table.add_column("ms", justify="right")
    for key, value in results.items():
        table.add_row(key.removesuffix("_s"), f"{value * 1000:.1f}")
    Console().print(table)
    print(f"3-pass / 2-pass = {record['three_pass_over_two_pass']}")
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        "adapt_timing_" + "".join(c if c.isalnum() else "_" for c in record["device"]).strip("_") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {out}")
    return record


if __name__ == "__main__":
    main()
