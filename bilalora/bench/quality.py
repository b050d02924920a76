"""No-reference quality of dehazed outputs: FADE, entropy, dark-channel density, ..., pyiqa metrics.

Every image is dehazed at full resolution (bounded by ``max_side``) by each
subject; the metrics of :mod:`bilalora.metrics` (and pyiqa ones through
:class:`~bilalora.metrics.iqa.PyiqaMetric`) score the uint8 output. The hazy
input itself is scored as the ``input`` row; classical baselines (DCP on the
input, a contrast stretch of the base's output, see :mod:`.baselines`) are rows
too, so a table shows what a trivial method achieves beside the networks.

A metric that is undefined on an image (FADE or the average gradient of a 1x1
image) is recorded as ``None`` and left out of that metric's mean and win rate
(the per-metric ``count`` says over how many images a mean was taken).
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


def load_images(paths: Sequence[Path], max_side: Optional[int]
                ) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, str]]]:  # fmt: skip
    """Decode images to uint8 (H, W, 3) RGB, longer side <= ``max_side``.

    Returns:
        (name, image) pairs of the decodable files, and (name, reason) of those that are not
        (truncated, empty, not an image, a decompression bomb, ...): every file is one or the other.
    """
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
    """uint8 (H, W, 3) RGB -> uint8 (H, W, 3) RGB with a PyTorch network.

    Like the runtime: frames are reflect-padded (bottom/right) to a multiple of
    ``pad_multiple``; sides under four multiples (16 px for DEA-Net, whose deepest
    reflect padding needs that much) are first edge-padded up to it; the output is
    cropped back and clamped to [0, 1] before rounding.
    """
    import torch
    import torch.nn.functional as F

    from bilalora.padding import crop_to, pad_to_multiple

    model = model.to(device).eval()
    min_side = 4 * pad_multiple

    def run(image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div(255.0).to(device)
        grow_h, grow_w = max(0, min_side - height), max(0, min_side - width)
        if grow_h or grow_w:
            x = F.pad(x, (0, grow_w, 0, grow_h), mode="replicate")
        padded, _ = pad_to_multiple(x, pad_multiple)
        with torch.no_grad():
            y = crop_to(model(padded), (height, width)).clamp(0, 1)
        return (y[0].permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)

    return run


def _finite(value: Optional[float]) -> bool:
    return value is not None and bool(np.isfinite(value))


@dataclass
class QualityTable:
    """Scores of every subject on every image.

    Attributes:
        metrics: the metrics, in column order.
        subjects: row labels in order ("input", the subjects, the classical baselines).
        per_image: {image name: {subject: {metric: value or None (undefined on this image)}}}.
    """

    metrics: list[MetricSpec]
    subjects: list[str] = field(default_factory=list)
    per_image: dict[str, dict[str, dict[str, Optional[float]]]] = field(default_factory=dict)

    def _values(self, subject: str, metric: str) -> list[float]:
        return [row[subject][metric] for row in self.per_image.values()
                if subject in row and _finite(row[subject].get(metric))]  # fmt: skip

    def mean(self, subject: str) -> dict[str, Optional[float]]:
        """Mean of each metric over the images where it is defined (None where it is nowhere)."""
        result: dict[str, Optional[float]] = {}
        for metric in self.metrics:
            values = self._values(subject, metric.name)
            result[metric.name] = float(np.mean(values)) if values else None
        return result if any(subject in row for row in self.per_image.values()) else {}

    def count(self, subject: str) -> dict[str, int]:
        """Over how many images each metric's mean was taken."""
        return {metric.name: len(self._values(subject, metric.name)) for metric in self.metrics}

    def wins(self, subject: str, reference: str) -> dict[str, float]:
        """Share of images where ``subject`` beats ``reference`` per metric with a direction (ties count half).

        Images where either value is undefined are left out.
        """
        result = {}
        for metric in self.metrics:
            if metric.direction == "none":
                continue
            scores = []
            for row in self.per_image.values():
                if subject not in row or reference not in row:
                    continue
                a, b = row[subject].get(metric.name), row[reference].get(metric.name)
                if not (_finite(a) and _finite(b)):
                    continue
                better = a < b if metric.direction == "lower" else a > b
                scores.append(0.5 if a == b else float(better))
            if scores:
                result[metric.name] = float(np.mean(scores))
        return result

    def as_dict(self, references: Sequence[str] = ()) -> dict[str, Any]:
        """JSON-ready: directions, means, counts, per-image scores and ``wins_vs_<reference>`` per reference."""
        if isinstance(references, str):
            references = [references]
        record: dict[str, Any] = {
            "metrics": {m.name: m.direction for m in self.metrics},
            "mean": {s: self.mean(s) for s in self.subjects},
            "count": {s: self.count(s) for s in self.subjects},
            "per_image": self.per_image,
        }
        for reference in references:
            if reference in self.subjects:
                record["wins_vs_" + reference] = {s: self.wins(s, reference) for s in self.subjects
                                                  if s not in (reference, "input")}  # fmt: skip
        return record


#: A row computed from another row's output: (name of the source row, uint8 RGB -> uint8 RGB).
Derived = tuple[str, Callable[[np.ndarray], np.ndarray]]


def _score(metric: MetricSpec, image: np.ndarray) -> Optional[float]:
    value = float(metric.fn(image))
    return value if np.isfinite(value) else None


def score_images(
    images: Sequence[tuple[str, np.ndarray]],
    dehazers: dict[str, Callable[[np.ndarray], np.ndarray]],
    metrics: Sequence[MetricSpec],
    include_input: bool = True,
    keep: int = 0,
    on_image: Optional[Callable[[str], None]] = None,
    derived: Optional[dict[str, Derived]] = None,
) -> tuple[QualityTable, dict[str, list[np.ndarray]]]:
    """Dehaze every image with every dehazer and score the outputs.

    Args:
        images: (name, uint8 (H, W, 3) RGB) pairs.
        dehazers: subject name -> uint8 RGB -> uint8 RGB of the same size.
        metrics: what to compute.
        include_input: score the hazy input as the "input" row.
        keep: keep the outputs of the first ``keep`` images (for a contact sheet).
        on_image: called after each image (progress).
        derived: rows post-processing another row's output, e.g.
            ``{"base+stretch": ("base", stretch)}`` (the source row is computed once).

    Returns:
        (table, {row: [outputs of the first ``keep`` images]}), "input" included.
    """
    derived = dict(derived or {})
    table = QualityTable(list(metrics))
    table.subjects = (["input"] if include_input else []) + list(dehazers) + list(derived)
    kept: dict[str, list[np.ndarray]] = {name: [] for name in table.subjects}
    for index, (name, image) in enumerate(images):
        outputs = {"input": image}
        outputs.update({subject: run(image) for subject, run in dehazers.items()})
        for row, (source, post) in derived.items():
            if source not in outputs:
                raise KeyError(f"derived row {row!r} needs row {source!r}")
            outputs[row] = post(outputs[source])
        if not include_input:
            outputs.pop("input")
        table.per_image[name] = {subject: {m.name: _score(m, output) for m in metrics}
                                 for subject, output in outputs.items()}  # fmt: skip
        if index < keep:
            for subject, output in outputs.items():
                kept[subject].append(output)
        if on_image is not None:
            on_image(name)
    return table, kept
