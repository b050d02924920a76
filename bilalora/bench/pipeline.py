"""The benchmark: subjects -> latency per backend -> quality over images -> bench.json (+ a contact sheet).

Defaults chain from the newest adapt run (see :mod:`.subjects`): the images are
that run's validation half (``split.json``), the report goes to
``<run>/bench/``. Without a run, ``--images`` and ``--report`` (default
``runs/bench/exp``, numbered) must be given.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import UserError
from .latency import BACKENDS, LatencyRow, time_backend
from .quality import QualityTable, load_images, resolve_metrics, score_images, torch_dehazer
from .subjects import Subject, resolve_subjects

__all__ = ["BenchOptions", "BenchEvents", "BenchResult", "run_bench", "DEFAULT_METRICS", "RECORD_NAME"]

DEFAULT_METRICS = ("fade", "entropy", "dcd", "colourfulness", "ag", "brightness")
RECORD_NAME = "bench.json"


@dataclass
class BenchOptions:
    """What to benchmark and how (every field is a ``bilalora bench`` flag).

    Attributes:
        adapters: adapter files (none: the newest run's); models: export folders.
        backbone, weights: the base network (default: from the run's summary).
        include_base: benchmark the unadapted base too.
        images: folder of images (default: the run's validation half).
        max_images: use at most this many images (0: all); max_side: downsize longer sides to this.
        metrics: built-in metric names; iqa: pyiqa metric names (musiq, niqe, piqe, ...).
        dcp: score the dark channel prior baseline too.
        backends: subset of :data:`~.latency.BACKENDS` (None: all).
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
    include_base: bool = True
    images: Optional[Path] = None
    max_images: int = 0
    max_side: int = 1024
    metrics: Sequence[str] = DEFAULT_METRICS
    iqa: Sequence[str] = ()
    dcp: bool = False
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
        unknown = [b for b in (self.backends or ()) if b not in BACKENDS]
        if unknown:
            raise UserError(f"--backends {','.join(unknown)}: use some of {', '.join(BACKENDS)}")
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


def _image_paths(options: BenchOptions, run: Optional[Path]) -> tuple[list[Path], str]:
    from bilalora.data import list_images
    from bilalora.io import read_json

    if options.images is not None:
        folder = Path(options.images)
        if not folder.is_dir():
            raise UserError(f"--images {folder}: not a folder")
        paths = list_images(folder)
        if not paths:
            raise UserError(f"--images {folder}: no images in this folder")
        return paths, str(folder)
    split = run / "split.json" if run is not None else None
    if split is None or not split.is_file():
        raise UserError("no --images given and no adapt run with split.json to take the validation images from")
    paths = [Path(p) for p in read_json(split).get("val", [])]
    present = [p for p in paths if p.is_file()]
    if not present:
        raise UserError(f"{split}: none of its validation images exist any more; pass --images DIR")
    return present, f"{split} (validation half, {len(present)} of {len(paths)} images present)"


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


def _contact_sheet(kept: dict[str, list[np.ndarray]], names: list[str], path: Path, height: int = 240) -> Optional[Path]:
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


def run_bench(options: BenchOptions, events: Optional[BenchEvents] = None) -> BenchResult:
    """Benchmark the subjects; write ``bench.json`` (and ``sheet.jpg``) into the report folder."""
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
                                             options.include_base, options.runs_root)  # fmt: skip
    for line in picked:
        events.info(line)
    report = _report_dir(options, run)
    timings: dict[str, float] = {}

    # ---- cost: parameters and FLOPs at the timed size (merging keeps both equal to the base's)
    cost = {}
    for subject in subjects:
        if subject.model is not None:
            measured = measure_cost(subject.model, tuple(options.size))
            cost[subject.name] = {"parameters": measured.parameters, "gflops": round(measured.flops / 1e9, 3),
                                  "gmacs": round(measured.macs / 1e9, 3), "input_hw": list(options.size)}  # fmt: skip

    # ---- latency per backend
    backends = list(options.backends or BACKENDS)
    tick = time.perf_counter()
    events.start("latency", len(subjects) * len(backends))
    latency: list[LatencyRow] = []
    for subject in subjects:
        for backend in backends:
            row = time_backend(subject, backend, tuple(options.size), options.device, options.warmup,
                               options.runs, options.providers, cost.get(subject.name), options.threads)  # fmt: skip
            latency.append(row)
            events.advance("latency", f"{subject.name} {backend}: {row.status}")
    events.done("latency")
    timings["latency"] = round(time.perf_counter() - tick, 3)

    # ---- quality over images
    tick = time.perf_counter()
    quality, sheet_path, image_info = None, None, None
    if options.metrics or options.iqa:
        paths, origin = _image_paths(options, run)
        if options.max_images:
            paths = paths[: options.max_images]
        images, skipped = load_images(paths, options.max_side or None)
        for name, reason in skipped:
            events.warn(f"skipped {name}: {reason}")
        if not images:
            raise UserError(f"no readable image among {len(paths)} from {origin}")
        events.info(f"images: {len(images)} from {origin}")
        metrics = resolve_metrics(options.metrics, options.iqa, options.device)
        dehazers = {}
        for subject in subjects:
            if subject.model is not None:
                pad = int(getattr(subject.model, "bilalora_info", {}).get("pad_multiple", 4))
                dehazers[subject.name] = torch_dehazer(subject.model, options.device, pad)
            elif subject.export is not None:
                from bilalora.runtime import Dehazer

                dehazers[subject.name] = Dehazer(subject.export, color="rgb", providers=options.providers,
                                                 threads=options.threads)
        if options.dcp:
            from bilalora.baselines.dcp import dehaze_dcp

            dehazers["dcp"] = lambda image: (np.clip(dehaze_dcp(image), 0, 1) * 255.0 + 0.5).astype(np.uint8)
        events.start("quality", len(images))
        quality, kept = score_images(images, dehazers, metrics, keep=options.sheet,
                                     on_image=lambda name: events.advance("quality", name))  # fmt: skip
        events.done("quality")
        for subject in subjects:
            if subject.model is not None:
                subject.model.to("cpu")
        if options.sheet:
            sheet_path = _contact_sheet(kept, [n for n, _ in images], report / "sheet.jpg")
        image_info = {"origin": origin, "count": len(images), "max_side": options.max_side,
                      "skipped": [{"name": n, "reason": r} for n, r in skipped]}  # fmt: skip
    timings["quality"] = round(time.perf_counter() - tick, 3)
    timings["total"] = round(time.perf_counter() - started, 3)

    reference = "base" if any(s.role == "base" for s in subjects) else None
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
        "quality": quality.as_dict(reference) if quality is not None else None,
        "sheet": str(sheet_path) if sheet_path else None,
        "notes": picked,
        "timings": timings,
    }
    record_path = write_json(report / RECORD_NAME, record)
    return BenchResult(subjects, latency, quality, cost, report, record_path, sheet_path, record)
