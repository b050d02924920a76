"""The benchmark: subjects -> images -> latency per format -> quality over images -> bench.json.

Defaults chain from the newest adapt run (see :mod:`.subjects`): the images are
that run's held-out test split (``split.json``, see :mod:`.selection`), the
report goes to ``<run>/bench/``. Without a run, ``--images`` and ``--report``
(default ``runs/bench/exp``, numbered) must be given. The images are checked
before the (slow) latency pass, so a wrong ``--images`` fails at once.

Beside ``bench.json`` the report folder gets ``sheet.jpg`` (inputs and outputs
side by side) and ``metrics.png`` (see :mod:`.figure`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import UserError
from .baselines import STRETCH_ROWS
from .latency import FORMATS, LatencyRow, default_formats, time_backend
from .quality import QualityTable, load_images, resolve_metrics, score_images, torch_dehazer
from .selection import ImageSelection, select_images
from .subjects import Subject, resolve_subjects

__all__ = ["BenchOptions", "BenchEvents", "BenchResult", "run_bench", "DEFAULT_METRICS", "RECORD_NAME",
           "FIGURE_NAME", "SHEET_NAME"]  # fmt: skip

DEFAULT_METRICS = ("fade", "entropy", "dcd", "colourfulness", "ag", "brightness")
RECORD_NAME = "bench.json"
SHEET_NAME = "sheet.jpg"
FIGURE_NAME = "metrics.png"


@dataclass
class BenchOptions:
    """What to benchmark and how (every field is a ``bilalora bench`` flag).

    Attributes:
        adapters: adapter files (none: the newest run's); models: export folders.
        backbone, weights: the base network (default: from the run's summary).
        include_base: benchmark the unadapted base too.
        images: folder of images (default: the run's held-out test split).
        max_images: use at most this many images (0: all); max_side: downsize longer sides to this.
        metrics: built-in metric names; iqa: pyiqa metric names (musiq, niqe, piqe, ...).
        dcp: score the dark channel prior baseline too.
        stretch: score the base followed by a contrast stretch (per-channel and global rows).
        backends: subset of :data:`~.latency.FORMATS` (None: all that run on ``device``; empty: no latency pass).
        size: (H, W) of the timed input; warmup, runs: timing repetitions.
        device: torch device string (already resolved); providers: onnxruntime providers.
        threads: CPU threads for PyTorch and onnxruntime (0: their defaults).
        report: output folder (default ``<run>/bench``).
        sheet: images in the contact sheet (0: none).
        runs_root: folder of adapt runs.
    """

    adapters: Sequence[Path] = ()
    models: Sequence[Path] = ()
    backbone: Optional[str] = None
    weights: Optional[str] = None
    input_norm: Optional[str] = None
    include_base: bool = True
    images: Optional[Path] = None
    max_images: int = 0
    max_side: int = 1024
    metrics: Sequence[str] = DEFAULT_METRICS
    iqa: Sequence[str] = ()
    dcp: bool = False
    stretch: bool = True
    backends: Optional[Sequence[str]] = None
    size: tuple[int, int] = (512, 512)
    warmup: int = 3
    runs: int = 20
    device: str = "cpu"
    providers: Optional[list[str]] = None
    threads: int = 0
    report: Optional[Path] = None
    sheet: int = 6
    runs_root: Optional[Path] = None

    def check(self) -> None:
        """Raise a UserError naming the flag of the first invalid value."""
        unknown = [b for b in (self.backends or ()) if b not in FORMATS]
        if unknown:
            raise UserError(f"--backends {','.join(unknown)}: use some of {', '.join(FORMATS)}")
        height, width = self.size
        if height < 16 or width < 16 or height % 4 or width % 4:
            raise UserError(f"--size {height}x{width}: use multiples of 4, at least 16")
        if self.runs < 1 or self.warmup < 0:
            raise UserError(f"--runs {self.runs} / --warmup {self.warmup}: need runs >= 1 and warmup >= 0")
        if self.max_images < 0 or self.sheet < 0 or self.max_side < 0 or self.threads < 0:
            raise UserError("--max-images, --sheet, --max-side and --threads must be 0 or more")


class BenchEvents:
    """Callbacks of :func:`run_bench` (the CLI prints them and draws progress bars)."""

    def info(self, message: str) -> None:
        """A line about what was picked."""

    def warn(self, message: str) -> None:
        """A one-line warning; the benchmark goes on."""

    def start(self, stage: str, total: Optional[int]) -> None:
        """A long stage starts ("latency", "quality") with ``total`` steps."""

    def advance(self, stage: str, status: str = "") -> None:
        """One step of the current stage is done."""

    def done(self, stage: str) -> None:
        """The stage is over."""


@dataclass
class BenchResult:
    """What :func:`run_bench` measured and wrote."""

    subjects: list[Subject]
    latency: list[LatencyRow]
    quality: Optional[QualityTable]
    cost: dict[str, dict[str, Any]]
    report: Path
    record_path: Path
    sheet_path: Optional[Path]
    record: dict[str, Any] = field(default_factory=dict)
    figure_path: Optional[Path] = None


def _report_dir(options: BenchOptions, run: Optional[Path]) -> Path:
    from bilalora.runs import RUNS_ROOT, new_run_dir

    if options.report is not None:
        Path(options.report).mkdir(parents=True, exist_ok=True)
        return Path(options.report)
    if run is not None:
        folder = run / "bench"
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return new_run_dir(RUNS_ROOT / "bench")


def _contact_sheet(kept: dict[str, list[np.ndarray]], names: list[str], path: Path, height: int = 240
                   ) -> Optional[Path]:  # fmt: skip
    """Rows of images, columns of subjects (labelled), written as JPEG atomically."""
    import cv2

    from bilalora.io import write_bytes_atomic

    columns = [name for name in kept if kept[name]]
    if not columns:
        return None
    rows = []
    for index in range(len(kept[columns[0]])):
        tiles = []
        for column in columns:
            image = kept[column][index]
            scale = height / image.shape[0]
            tile = cv2.resize(image, (max(1, round(image.shape[1] * scale)), height), interpolation=cv2.INTER_AREA)
            tile = cv2.cvtColor(tile, cv2.COLOR_RGB2BGR)
            cv2.putText(tile, column, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 3, cv2.LINE_AA)
            cv2.putText(tile, column, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
            tiles.append(tile)
        rows.append(np.concatenate(tiles, axis=1))
    width = max(row.shape[1] for row in rows)
    rows = [np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0))) for row in rows]
    ok, encoded = cv2.imencode(".jpg", np.concatenate(rows, axis=0), [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        return None
    return write_bytes_atomic(path, encoded.tobytes())


def _dehazers(subjects: list[Subject], options: BenchOptions) -> dict[str, Any]:
    """Row name -> uint8 RGB -> uint8 RGB for every subject that can run (PyTorch, else its export)."""
    dehazers: dict[str, Any] = {}
    for subject in subjects:
        if subject.model is not None:
            pad = int(getattr(subject.model, "bilalora_info", {}).get("pad_multiple", 4))
            dehazers[subject.name] = torch_dehazer(subject.model, options.device, pad)
        elif subject.export is not None:
            from bilalora.runtime import Dehazer

            # quality is scored on the fp32 graph (the export's reference), not whatever is fastest here
            dehazers[subject.name] = Dehazer(subject.export, color="rgb", providers=options.providers,
                                             threads=options.threads, precision="fp32")  # fmt: skip
    if options.dcp:
        from .baselines import dcp_row

        dehazers["dcp"] = dcp_row()
    return dehazers


def _quality(options: BenchOptions, subjects: list[Subject], selection: ImageSelection, report: Path,
             events: BenchEvents) -> tuple[QualityTable, Optional[Path], dict[str, Any]]:  # fmt: skip
    """Decode the selected images, score every row, draw the contact sheet; the record's "images" section."""
    paths = selection.paths[: options.max_images] if options.max_images else selection.paths
    images, undecodable = load_images(paths, options.max_side or None)
    skipped = list(selection.skipped) + list(undecodable)
    for name, reason in skipped:
        events.warn(f"skipped {name}: {reason}")
    if not images:
        raise UserError(f"no readable image among {len(paths)} from {selection.origin}")
    events.info(f"images: {len(images)} from {selection.origin}")
    metrics = resolve_metrics(options.metrics, options.iqa, options.device)
    dehazers = _dehazers(subjects, options)
    derived = {}
    if options.stretch and "base" in dehazers:
        from .baselines import stretch_rows

        derived = stretch_rows("base")
    events.start("quality", len(images))
    quality, kept = score_images(images, dehazers, metrics, keep=options.sheet, derived=derived,
                                 on_image=lambda name: events.advance("quality", name))  # fmt: skip
    events.done("quality")
    for subject in subjects:
        if subject.model is not None:
            subject.model.to("cpu")
    sheet_path = _contact_sheet(kept, [n for n, _ in images], report / SHEET_NAME) if options.sheet else None
    names = {Path(p).name: p for p in paths}
    info = {
        **selection.summary(),
        "count": len(images),
        "max_side": options.max_side,
        "scored": [{"name": n, "path": str(names[n]), "seen_by_run": selection.seen.get(str(names[n]), "unseen")}
                   for n, _ in images],  # fmt: skip
        "skipped": [{"name": n, "reason": r} for n, r in skipped],
    }
    return quality, sheet_path, info


def run_bench(options: BenchOptions, events: Optional[BenchEvents] = None) -> BenchResult:
    """Benchmark the subjects; write ``bench.json`` (``sheet.jpg``, ``metrics.png``) into the report folder."""
    import platform

    import bilalora
    from bilalora.io import write_json
    from bilalora.profile import measure_cost

    events = events or BenchEvents()
    options.check()
    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    started = time.perf_counter()
    subjects, run, picked = resolve_subjects(options.adapters, options.models, options.backbone, options.weights,
                                             options.include_base, options.runs_root,
                                             input_norm=options.input_norm)  # fmt: skip
    for line in picked:
        events.info(line)
    # the images are checked before anything slow runs (a wrong --images fails at once)
    selection = select_images(options.images, run) if (options.metrics or options.iqa) else None
    for line in selection.notes if selection else ():
        events.warn(line)
    report = _report_dir(options, run)
    timings: dict[str, float] = {}

    # ---- cost: parameters and FLOPs at the timed size (merging keeps both equal to the base's)
    cost = {}
    for subject in subjects:
        if subject.model is not None:
            measured = measure_cost(subject.model, tuple(options.size))
            cost[subject.name] = {"parameters": measured.parameters, "gflops": round(measured.flops / 1e9, 3),
                                  "gmacs": round(measured.macs / 1e9, 3), "input_hw": list(options.size)}  # fmt: skip

    # ---- latency per format
    backends = default_formats(options.device) if options.backends is None else list(options.backends)
    tick = time.perf_counter()
    latency: list[LatencyRow] = []
    if backends:
        events.start("latency", len(subjects) * len(backends))
        for subject in subjects:
            for backend in backends:
                row = time_backend(subject, backend, tuple(options.size), options.device, options.warmup, options.runs,
                                   options.providers, cost.get(subject.name), options.threads)  # fmt: skip
                latency.append(row)
                events.advance("latency", f"{subject.name} {backend}: {row.status}")
        events.done("latency")
    timings["latency"] = round(time.perf_counter() - tick, 3)

    # ---- quality over images
    tick = time.perf_counter()
    quality, sheet_path, image_info, figure_path = None, None, None, None
    if selection is not None:
        quality, sheet_path, image_info = _quality(options, subjects, selection, report, events)
    timings["quality"] = round(time.perf_counter() - tick, 3)
    quality_record = quality.as_dict(("base", *STRETCH_ROWS)) if quality is not None else None
    if quality_record is not None:
        from .figure import metrics_figure

        title = f"{image_info['count']} image(s), {image_info['split']}: {image_info['origin']}"
        figure_path = metrics_figure(quality_record, report / FIGURE_NAME, title=title[:110])
    timings["total"] = round(time.perf_counter() - started, 3)

    record = {
        "command": "bench",
        "bilalora": bilalora.__version__,
        "run": str(run) if run is not None else None,
        "device": options.device,
        "platform": platform.platform(),
        "subjects": [{"name": s.name, "role": s.role, "export": str(s.export) if s.export else None,
                      "fingerprint": s.fingerprint, **s.info} for s in subjects],  # fmt: skip
        "cost": cost,
        "latency": {"size": list(options.size), "warmup": options.warmup, "runs": options.runs,
                    "rows": [row.as_dict() for row in latency]},  # fmt: skip
        "images": image_info,
        "quality": quality_record,
        "sheet": str(sheet_path) if sheet_path else None,
        "figure": str(figure_path) if figure_path else None,
        "notes": picked + (selection.notes if selection else []),
        "timings": timings,
    }
    record_path = write_json(report / RECORD_NAME, record)
    return BenchResult(subjects, latency, quality, cost, report, record_path, sheet_path, record, figure_path)
