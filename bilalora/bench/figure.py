"""The metrics figure beside ``sheet.jpg``: one panel per metric, one bar per row (input, networks, baselines).

Bars are the means over the scored images; each panel's title says which way is
better, and bars of rows that post-process or replace the networks (DCP, the
stretches) are hatched so that the networks stand out. A second line of panels
gives each row's share of images where it beats the base (50 % = no better).
Drawn with matplotlib's Agg backend (no display needed), written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

__all__ = ["metrics_figure"]

_ARROWS = {"lower": "lower is better", "higher": "higher is better", "none": "informative"}
_CLASSICAL = ("dcp", "+stretch")


def metrics_figure(quality: dict[str, Any], path: Path, title: str = "") -> Optional[Path]:
    """Draw ``quality`` (a bench.json "quality" section) to ``path`` (PNG); None when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bilalora.io import atomic_path

    metrics = list(quality.get("metrics", {}))
    rows = list(quality.get("mean", {}))
    if not metrics or not rows:
        return None
    wins = quality.get("wins_vs_base") or {}
    ranked = [m for m in metrics if quality["metrics"][m] != "none"]
    two_lines = bool(wins) and bool(ranked)
    columns = len(metrics)
    size = (2.6 * columns + 0.6, 6.4 if two_lines else 3.4)
    figure, axes = plt.subplots(2 if two_lines else 1, columns, figsize=size, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {row: colours[i % len(colours)] for i, row in enumerate(rows)}
    for column, metric in enumerate(metrics):
        axis = axes[0][column]
        values = [quality["mean"][row].get(metric) for row in rows]
        heights = [v if v is not None else 0.0 for v in values]
        bars = axis.bar(range(len(rows)), heights, color=[colour[r] for r in rows])
        for bar, row, value in zip(bars, rows, values):
            if any(mark in row for mark in _CLASSICAL):
                bar.set_hatch("//")
            if value is None:
                bar.set_alpha(0.2)
        axis.set_title(f"{metric}\n({_ARROWS[quality['metrics'][metric]]})", fontsize=9)
        axis.set_xticks(range(len(rows)), rows, rotation=60, ha="right", fontsize=8)
        axis.tick_params(axis="y", labelsize=8)
    if two_lines:
        others = [row for row in rows if row in wins]
        for column in range(columns):
            axis = axes[1][column]
            if column >= len(ranked):
                axis.axis("off")
                continue
            metric = ranked[column]
            shares = [100.0 * wins[row].get(metric, float("nan")) for row in others]
            axis.bar(range(len(others)), shares, color=[colour[r] for r in others])
            axis.axhline(50.0, color="grey", linewidth=0.8, linestyle="--")
            axis.set_ylim(0, 100)
            axis.set_title(f"{metric}: % images better than base", fontsize=9)
            axis.set_xticks(range(len(others)), others, rotation=60, ha="right", fontsize=8)
            axis.tick_params(axis="y", labelsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    plt.close(figure)
    return Path(path)
