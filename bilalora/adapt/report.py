"""What an adapt run reports: output movement, gate separation, ``summary.json`` and ``results.png``."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..io import atomic_path

__all__ = ["gate_separation", "is_channels_last", "movement", "plot_results"]


@torch.no_grad()
def movement(base: nn.Module, adapted: nn.Module, objective, batches: Sequence[torch.Tensor], device: str) -> dict:
    """Mean |adapted(x) - base(x)| and the objective of both on fixed crops, in fp32.

    Both models run without autocast, the base in the memory layout of the
    adapted model, so an adapted model that did not change gives exactly 0
    whatever precision and layout the run trained in.

    Args:
        base, adapted: (N, 3, S, S) in [0, 1] -> same.
        batches: float32 (N, 3, S, S) in [0, 1] (e.g. :func:`eval_batches` of a split).

    Returns:
        {"mean_abs_output_change", "objective_before", "objective_after", "images"} (floats; 0 images
        when ``batches`` is empty, with None values).
    """
    layout = torch.channels_last if is_channels_last(adapted) else torch.contiguous_format
    base = base.to(device=device, dtype=torch.float32, memory_format=layout)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    count = 0
    for batch in batches:
        batch = batch.to(device, torch.float32).contiguous(memory_format=layout)
        base_out = base(batch).float()
        adapted_out = adapted(batch).float()
        weight = len(batch)
        sums += torch.stack([(adapted_out - base_out).abs().mean(), objective(base_out, batch).float(),
                             objective(adapted_out, batch).float()]).double() * weight
        count += weight
    if not count:
        return {"mean_abs_output_change": None, "objective_before": None, "objective_after": None, "images": 0}
    change, before, after = (sums / count).cpu().tolist()
    return {"mean_abs_output_change": change, "objective_before": before, "objective_after": after, "images": count}


def is_channels_last(model: nn.Module) -> bool:
    """True when the model's first spatial convolution weight is stored channels-last."""
    for param in model.parameters():
        if param.dim() == 4 and param.shape[1] > 1 and param.shape[2] * param.shape[3] > 1:
            return param.is_contiguous(memory_format=torch.channels_last) and not param.is_contiguous()
    return False


def gate_separation(trajectory: dict, top_k: int, tail: float = 0.25) -> dict | None:
    """How clearly the search separated its top-k sites from the rest.

    Over the last ``tail`` of the gate readings (at least three), each gate's
    values are fitted with a straight line; what is left is the jitter of that
    gate (a steady drift, which is how an optimiser moves a gate that keeps
    winning, is not noise). ``spread`` is the median over sites of twice the
    residuals' standard deviation. ``gap`` is the k-th highest final gate minus
    the (k+1)-th. The top-k is *within noise* when the gap is smaller than the
    spread, or when the top-k set changed during that last stretch: a few more
    or fewer steps could then have picked other sites.

    Args:
        trajectory: ``{"steps": [...], "values": {site: [...]}}`` as kept by the run.

    Returns:
        {"k", "gap", "spread", "stable_readings", "within_noise", "kth", "next", "readings"}
        (``stable_readings``: how many of the last readings had today's top-k set), or None without gates.
    """
    values = trajectory.get("values") or {}
    if not values:
        return None
    readings = len(trajectory["steps"])
    final = sorted(((series[-1], name) for name, series in values.items()), reverse=True)
    if top_k >= len(final):
        return {"k": top_k, "gap": None, "spread": None, "stable_readings": readings, "within_noise": False,
                "kth": final[-1][1], "next": None, "readings": readings}
    gap = final[top_k - 1][0] - final[top_k][0]
    window = min(readings, max(3, math.ceil(tail * readings)))
    spread = _median([2 * _residual_std(series[-window:]) for series in values.values()]) if window >= 3 else None
    chosen = {name for _, name in final[:top_k]}
    stable = 0
    for index in range(readings - 1, -1, -1):
        at = sorted(values, key=lambda name: -values[name][index])[:top_k]
        if set(at) != chosen:
            break
        stable += 1
    within = (spread is not None and gap < spread) or stable < window
    return {"k": top_k, "gap": gap, "spread": spread, "stable_readings": stable, "within_noise": within,
            "kth": final[top_k - 1][1], "next": final[top_k][1], "readings": readings}


def _residual_std(series: list[float]) -> float:
    """Standard deviation of ``series`` around its least-squares straight line (index as x)."""
    n = len(series)
    mean_x, mean_y = (n - 1) / 2, sum(series) / n
    sxx = sum((i - mean_x) ** 2 for i in range(n))
    slope = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(series)) / sxx
    residuals = [y - (mean_y + slope * (i - mean_x)) for i, y in enumerate(series)]
    return math.sqrt(sum(r * r for r in residuals) / n)


def _median(items: list[float]) -> float:
    ordered = sorted(items)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


def plot_results(run_dir: Path, trajectory: dict, selected: list[str] | None, search_steps: int) -> Path | None:
    """``results.png``: the logged losses over the steps, and every gate's trajectory (selected sites marked).

    Reads ``run_dir/log.jsonl``; writes atomically; returns the path (None when nothing was logged).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    log = run_dir / "log.jsonl"
    entries = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if log.is_file() else []
    if not entries:
        return None
    has_gates = bool(trajectory.get("values"))
    figure = Figure(figsize=(11 if has_gates else 6, 4.2), dpi=110)
    axes = figure.subplots(1, 2 if has_gates else 1, squeeze=False)[0]
    steps = [e["step"] for e in entries]
    for key, label in (("train_loss", "train (lower level)"), ("val_loss", "validation (upper level)")):
        points = [(s, e[key]) for s, e in zip(steps, entries) if e.get(key) is not None]
        if points:
            axes[0].plot(*zip(*points), marker=".", label=label)
    if 0 < search_steps < steps[-1]:
        axes[0].axvline(search_steps, color="grey", linestyle=":", label="end of the search")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("objective (mean over the logged steps)")
    axes[0].set_title("losses")
    axes[0].legend(fontsize=8)
    if has_gates:
        chosen = set(selected or [])
        for name, series in trajectory["values"].items():
            if name in chosen:
                axes[1].plot(trajectory["steps"], series, linewidth=2, marker="o", markersize=3, label=name)
            else:
                axes[1].plot(trajectory["steps"], series, color="0.7", linewidth=0.8)
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("gate value sigmoid(a)")
        axes[1].set_title(f"gates ({len(trajectory['values'])} sites; selected in colour)")
        if chosen:
            axes[1].legend(fontsize=8)
    figure.tight_layout()
    path = run_dir / "results.png"
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path
