"""No-reference quality of dehazed outputs: FADE, entropy, dark-channel density, ..., pyiqa metrics.

Every image is dehazed at full resolution (bounded by ``max_side``) by each
subject; the metrics of :mod:`bilalora.metrics` (and pyiqa ones through
:class:`~bilalora.metrics.iqa.PyiqaMetric`) score the uint8 output. The hazy
input itself is scored as the ``input`` row and, on request, the DCP baseline as
``dcp``, so a table shows where each network stands between the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..errors import UserError

__all__ = ["MetricSpec", "resolve_metrics", "load_images", "torch_dehazer", "score_images", "QualityTable"]


@dataclass
class MetricSpec:
    """A metric to compute: its name, ``image -> float`` function and direction ("lower"/"higher"/"none")."""

    name: str
    fn: Callable[[np.ndarray], float]
    direction: str


def resolve_metrics(names: Sequence[str], iqa: Sequence[str] = (), device: str = "cpu") -> list[MetricSpec]:
    """Built-in metrics by name (:data:`bilalora.metrics.METRICS`) plus pyiqa metrics (loaded here)."""
    from bilalora.metrics import METRICS
    from bilalora.metrics.iqa import PyiqaMetric

    specs = []
    for name in names:
        if name not in METRICS:
            raise UserError(f"--metrics {name}: unknown; use some of {', '.join(METRICS)} (pyiqa ones go to --iqa)")
        fn, direction = METRICS[name]
        specs.append(MetricSpec(name, fn, direction))
    for name in iqa:
        metric = PyiqaMetric(name, device)
        specs.append(MetricSpec(name, metric, metric.direction))
    if not specs:
        raise UserError("--metrics/--iqa: name at least one metric")
    return specs


def load_images(paths: Sequence[Path], max_side: Optional[int]) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, str]]]:
    """Decode images to uint8 RGB (longer side <= ``max_side``); returns (name, image) pairs and skipped files."""
    from bilalora.data import ImageDecodeError, downsize, load_image

    images, skipped = [], []
    for path in paths:
        try:
            image = downsize(load_image(path), max_side)
        except ImageDecodeError as exc:
            skipped.append((Path(path).name, str(exc)))
            continue
        images.append((Path(path).name, (image * 255.0 + 0.5).astype(np.uint8)))
    return images, skipped


def torch_dehazer(model, device: str, pad_multiple: int = 4) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 (H, W, 3) RGB -> uint8 (H, W, 3) RGB with a PyTorch network (reflect-padded, cropped, clamped)."""
    import torch

    from bilalora.padding import crop_to, pad_to_multiple

    model = model.to(device).eval()

    def run(image: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255.0).to(device)
        padded, size = pad_to_multiple(x, pad_multiple)
        with torch.no_grad():
            y = crop_to(model(padded), size).clamp(0, 1)
        return (y[0].permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)

    return run


@dataclass
class QualityTable:
    """Scores of every subject on every image.

    Attributes:
        metrics: the metrics, in column order.
        subjects: row labels in order ("input", the subjects, "dcp").
        per_image: {image name: {subject: {metric: value}}}.
    """

    metrics: list[MetricSpec]
    subjects: list[str] = field(default_factory=list)
    per_image: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    def mean(self, subject: str) -> dict[str, float]:
        """Mean of each metric over the images."""
        rows = [scores[subject] for scores in self.per_image.values() if subject in scores]
        return {m.name: float(np.mean([row[m.name] for row in rows])) for m in self.metrics} if rows else {}

    def wins(self, subject: str, reference: str) -> dict[str, float]:
        """Share of images where ``subject`` beats ``reference`` per metric with a direction (ties count half)."""
        result = {}
        for metric in self.metrics:
            if metric.direction == "none":
                continue
            scores = []
            for row in self.per_image.values():
                if subject in row and reference in row:
                    a, b = row[subject][metric.name], row[reference][metric.name]
                    better = a < b if metric.direction == "lower" else a > b
                    scores.append(0.5 if a == b else float(better))
            if scores:
                result[metric.name] = float(np.mean(scores))
        return result

    def as_dict(self, reference: Optional[str] = None) -> dict[str, Any]:
        record: dict[str, Any] = {
            "metrics": {m.name: m.direction for m in self.metrics},
            "mean": {s: self.mean(s) for s in self.subjects},
            "per_image": self.per_image,
        }
        if reference:
            record["wins_vs_" + reference] = {s: self.wins(s, reference) for s in self.subjects if s != reference}
        return record


def score_images(
    images: Sequence[tuple[str, np.ndarray]],
    dehazers: dict[str, Callable[[np.ndarray], np.ndarray]],
    metrics: Sequence[MetricSpec],
    include_input: bool = True,
    keep: int = 0,
    on_image: Optional[Callable[[str], None]] = None,
) -> tuple[QualityTable, dict[str, list[np.ndarray]]]:
    """Dehaze every image with every dehazer and score the outputs.

    Args:
        images: (name, uint8 RGB) pairs.
        dehazers: subject name -> uint8 RGB -> uint8 RGB.
        metrics: what to compute.
        include_input: score the hazy input as the "input" row.
        keep: keep the outputs of the first ``keep`` images (for a contact sheet).
        on_image: called after each image (progress).

    Returns:
        (table, {subject: [outputs of the first ``keep`` images]}), "input" included.
    """
    table = QualityTable(list(metrics))
    table.subjects = (["input"] if include_input else []) + list(dehazers)
    kept: dict[str, list[np.ndarray]] = {name: [] for name in table.subjects}
    for index, (name, image) in enumerate(images):
        outputs = {"input": image} if include_input else {}
        outputs.update({subject: run(image) for subject, run in dehazers.items()})
        table.per_image[name] = {
            subject: {m.name: float(m.fn(output)) for m in metrics} for subject, output in outputs.items()
        }
        if index < keep:
            for subject, output in outputs.items():
                kept[subject].append(output)
        if on_image is not None:
            on_image(name)
    return table, kept
