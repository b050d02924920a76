"""What ``bilalora export`` is asked for and what it hands back: options, artefacts, result, progress events."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from bilalora.sources import Source

from .formats import label_of
from .parity import DEFAULT_SIZES, ParityResult
from .trt import ShapeProfile

__all__ = ["ExportOptions", "Artefact", "ExportResult", "Events"]


@dataclass
class ExportOptions:
    """What to export and how (the ``bilalora export`` flags).

    Attributes:
        adapter: adapter file; None with ``base`` False: the newest adapt run's adapter.
        base: export the unadapted backbone.
        backbone, weights: override the base network (registry name or pkg.mod:factory; a weights file).
        random_weights: allow a backbone without weights (no shipped file, no ``weights``): random init,
            seeded (the same network on every export).
        input_norm: what input the base weights expect (None: what the weights record, else [0, 1];
            "clip", "none" or "MEAN,STD"); folded into the graph, which always takes [0, 1] RGB.
        out: output folder (default: :func:`bilalora.sources.default_out_dir`).
        merge: merge the adapter into the weights (False: gated LoRA graph).
        trt: build a TensorRT engine.
        fp16: also write the fp16 ONNX model; the engine is fp16 too.
        int8: also write the calibrated QDQ ``model_int8.onnx`` (and an INT8 engine with ``trt``).
        calib: folder of calibration images (default: the adapted run's training images).
        calib_images: how many calibration images to use.
        int8_min_psnr: the INT8 gate in dB (None: 35); a lower value is recorded in model.json with every number.
        openvino: also write OpenVINO ``model.xml``/``model.bin``.
        shape: "HxW" for a fixed input size; else dynamic with ``min_hw/opt_hw/max_hw``.
        dynamic: ask for a dynamic shape explicitly (the default without ``shape``).
        batch: fixed batch (with ``shape``) or the profile's opt/max batch.
        opset: ONNX opset; None: 17 (TorchScript exporter) or 18 (dynamo, whose native opset it is).
        images: folder of real images for the parity gates.
        refit: refittable graph and engine: state-dict names kept on every weight (no folding, no onnxslim).
        dynamo: use the torch.export-based ONNX exporter.
        workspace_gb: TensorRT workspace memory-pool limit in GiB.
        slim: run onnxslim when installed.
        parity_sizes: (H, W) of the random parity cases (dynamic shapes).
        parity_images: how many images of ``images`` to use.
        runs_root: the folder of adapt runs (default ``runs/adapt``).
    """

    adapter: Optional[Path] = None
    base: bool = False
    backbone: Optional[str] = None
    weights: Optional[str] = None
    input_norm: Optional[str] = None  # --input-norm: what the base weights expect (docs/weights.md)
    random_weights: bool = False
    out: Optional[Path] = None
    merge: bool = True
    trt: bool = False
    fp16: bool = False
    int8: bool = False
    calib: Optional[Path] = None
    calib_images: int = 16
    int8_min_psnr: Optional[float] = None
    openvino: bool = False
    shape: Optional[str] = None
    dynamic: bool = False
    min_hw: Optional[str] = None
    opt_hw: Optional[str] = None
    max_hw: Optional[str] = None
    batch: int = 1
    opset: Optional[int] = None
    images: Optional[Path] = None
    refit: bool = False
    dynamo: bool = False
    workspace_gb: float = 4.0
    slim: bool = True
    parity_sizes: tuple[tuple[int, int], ...] = DEFAULT_SIZES
    parity_images: int = 2
    runs_root: Optional[Path] = None


@dataclass
class Artefact:
    """One written file (with its companions, e.g. OpenVINO's model.bin).

    Attributes:
        name: file name ("model.onnx").
        path: full path (in the final export folder once the export is complete).
        format: "onnx", "openvino", "tensorrt" or "safetensors".
        precision: "fp32", "fp16", "bf16" or "int8".
        seconds: time to produce it (export/build, not parity).
        parity: its parity result, None when not measured.
        parameters: number of stored parameters (initializer elements for ONNX).
        notes: one-line remarks ("onnxslim 0.1.98", ...).
        extra: further model.json fields of this entry ("bin", "kept_float", "calibration", ...).
        destination: where the file will be once the export is swapped in (``path`` is in the staging
            folder until then; both are the same afterwards).
    """

    name: str
    path: Path
    format: str
    precision: str
    seconds: float
    parity: Optional[ParityResult] = None
    parameters: Optional[int] = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    destination: Optional[Path] = None

    @property
    def megabytes(self) -> float:
        files = [self.path] + [self.path.parent / name for name in self.companions]
        return sum(f.stat().st_size for f in files if f.is_file()) / 1e6

    @property
    def companions(self) -> list[str]:
        from .formats import by_file

        row = by_file(self.name)
        return list(row.companions) if row else []

    @property
    def label(self) -> str:
        return label_of(self.format, self.precision)


@dataclass
class ExportResult:
    """What :func:`bilalora.export.run_export` wrote.

    Attributes:
        out_dir: the output folder.
        source: the resolved :class:`bilalora.sources.Source`.
        profile: the input shapes.
        artefacts: written files, in order.
        record: the model.json record.
        sidecar: the model.json path.
        merge: the merge report as a dict (None without merging).
        seconds: total wall time.
        next_commands: commands to run next.
        warnings: one-line warnings.
    """

    out_dir: Path
    source: Source
    profile: ShapeProfile
    artefacts: list[Artefact]
    record: dict[str, Any]
    sidecar: Path
    merge: Optional[dict[str, Any]]
    seconds: float
    next_commands: list[str]
    warnings: list[str]


class Events:
    """Progress callbacks of :func:`bilalora.export.run_export` (the CLI prints them; the default ignores them)."""

    def info(self, message: str) -> None:
        """A line about what was picked or what happens next."""

    def warn(self, message: str) -> None:
        """A one-line warning; the export goes on."""

    def step(self, message: str) -> None:
        """A long step starts ("ONNX: starting export with ...")."""

    def merge(self, record: dict[str, Any]) -> None:
        """The merge (or the unmerged gated graph) is ready; ``record`` as in model.json's adapter.merge."""

    def artefact(self, artefact: Artefact) -> None:
        """A file was written and passed its gate."""
