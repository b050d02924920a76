"""The export pipeline behind ``bilalora export``: source -> merge -> ONNX (fp32, fp16) -> TensorRT.

    result = run_export(ExportOptions(merge=True, trt=True))   # newest run under runs/adapt/

Steps, each timed and recorded in ``model.json`` (:mod:`.sidecar`):

1. **Source.** ``adapter`` (a file), ``base`` (the unadapted backbone), or by
   default the newest ``runs/adapt/<name>/adapter.safetensors``. The base
   network is rebuilt from ``--backbone/--weights``, else from the run's
   ``summary.json`` (``backbone``, ``weights``), else from the adapter's
   ``backbone`` with its shipped weights; the adapter's fingerprint check
   refuses other weights with one line.
2. **Merge** (adapter, ``merge=True``): top-k deltas into the base weights,
   same keys/shapes/parameters/FLOPs, gated-vs-merged max abs error <= 1e-5;
   ``merged.safetensors``. ``merge=False`` exports the gated LoRA graph.
3. **ONNX** ``model.onnx`` (and ``model_fp16.onnx`` with ``fp16``), each run with
   onnxruntime against PyTorch on random inputs at two sizes (and real
   images): fp32 max abs error <= 1e-4, fp16 PSNR >= 40 dB. A failure stops the
   export (the failing file is removed; model.json records the error).
4. **TensorRT** (``trt``): ``model.engine`` built by :func:`.trt.build_engine`;
   without TensorRT the ONNX artefacts stay and :class:`.trt.TensorRTMissing`
   is raised after model.json is written (status "partial").

Output folder: ``--out``, else ``<run>/export`` for a run's adapter,
``<run>/export-base`` for ``--base`` next to a run (same backbone and weights
as the run: the bench's baseline), ``<adapter stem>-export`` beside a loose
adapter file, or ``runs/export/<backbone>-base``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from bilalora.errors import UserError
from bilalora.sources import Source, default_out_dir, resolve_source

from bilalora.runtime import model_json as sidecar
from .parity import DEFAULT_SIZES, Case, ParityResult
from .trt import ShapeProfile

__all__ = ["ExportOptions", "Artefact", "ExportResult", "Events", "run_export"]

ONNX_NAME = "model.onnx"
FP16_NAME = "model_fp16.onnx"
ENGINE_NAME = "model.engine"
MERGED_NAME = "merged.safetensors"
_MANAGED = (MERGED_NAME, ONNX_NAME, FP16_NAME, ENGINE_NAME)


@dataclass
class ExportOptions:
    """What to export and how (the ``bilalora export`` flags).

    Attributes:
        adapter: adapter file; None with ``base`` False: the newest adapt run's adapter.
        base: export the unadapted backbone.
        backbone, weights: override the base network (registry name or pkg.mod:factory; a weights file).
        out: output folder (default: see the module docstring).
        merge: merge the adapter into the weights (False: gated LoRA graph).
        trt: build a TensorRT engine.
        fp16: also write the fp16 ONNX model; the engine is fp16 too.
        shape: "HxW" for a fixed input size; else dynamic with ``min_hw/opt_hw/max_hw``.
        dynamic: ask for a dynamic shape explicitly (the default without ``shape``).
        batch: fixed batch (with ``shape``) or the profile's opt/max batch.
        opset: ONNX opset; None: 17 (TorchScript exporter) or 18 (dynamo, whose native opset it is).
        images: folder of real images for the parity gates.
        refit: refittable engine (needs ``trt``).
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
    out: Optional[Path] = None
    merge: bool = True
    trt: bool = False
    fp16: bool = False
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
    """One written file.

    Attributes:
        name: file name ("model.onnx").
        path: full path.
        format: "onnx", "tensorrt" or "safetensors".
        precision: "fp32" or "fp16".
        seconds: time to produce it (export/build, not parity).
        parity: its parity result, None when not measured.
        parameters: number of stored parameters (initializer elements for ONNX).
        notes: one-line remarks ("onnxslim 0.1.98", ...).
    """

    name: str
    path: Path
    format: str
    precision: str
    seconds: float
    parity: Optional[ParityResult] = None
    parameters: Optional[int] = None
    notes: list[str] = field(default_factory=list)

    @property
    def megabytes(self) -> float:
        return self.path.stat().st_size / 1e6 if self.path.is_file() else 0.0

    @property
    def label(self) -> str:
        return {
            ("onnx", "fp32"): "ONNX",
            ("onnx", "fp16"): "ONNX fp16",
            ("tensorrt", "fp32"): "TensorRT",
            ("tensorrt", "fp16"): "TensorRT fp16",
        }.get((self.format, self.precision), "PyTorch")


@dataclass
class ExportResult:
    """What :func:`run_export` wrote.

    Attributes:
        out_dir: the output folder.
        source: the resolved :class:`Source`.
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
    """Progress callbacks of :func:`run_export` (the CLI prints them; the default ignores them)."""

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


# --------------------------------------------------------------------------- pipeline


class _Run:
    """State of one export, accumulated into the model.json record."""

    def __init__(self, options: ExportOptions, source: Source, out_dir: Path, profile: ShapeProfile):
        self.options = options
        self.source = source
        self.out_dir = out_dir
        self.profile = profile
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.artefacts: list[Artefact] = []
        self.warnings: list[str] = []
        self.adapter_record: Optional[dict[str, Any]] = None
        self.merge_record: Optional[dict[str, Any]] = None
        self.base_fingerprint: Optional[str] = None
        self.weights_source: Optional[str] = None
        self.cost: Optional[dict[str, Any]] = None
        self.trt_record: Optional[dict[str, Any]] = None
        self.tensorrt_version: Optional[str] = None
        self.exporter = "dynamo" if options.dynamo else "torchscript"
        self.opset = options.opset  # resolved by run_export
        self.slim: Optional[str] = None
        self.stage = "start"

    def timed(self, key: str, seconds: float) -> None:
        self.timings[key] = round(self.timings.get(key, 0.0) + seconds, 3)

    def next_commands(self) -> list[str]:
        out = _quote(self.out_dir)
        images = f" --images {_quote(self.options.images)}" if self.options.images else ""
        inputs = _quote(self.options.images) if self.options.images else "frames/"
        model = next((a for a in self.artefacts if a.format == "tensorrt"), None) or next(
            (a for a in self.artefacts if a.format == "onnx"), None
        )
        target = _quote(model.path) if model else out
        return [
            f"bilalora bench --model {out}{images}",
            f"bilalora run --model {target} --input {inputs} --output dehazed/",
        ]

    def record(self, status: str, error: Optional[str] = None) -> dict[str, Any]:
        import bilalora

        artefacts = {}
        for artefact in self.artefacts:
            if not artefact.path.is_file():
                continue
            extra: dict[str, Any] = {
                "format": artefact.format,
                "precision": artefact.precision,
                "seconds": round(artefact.seconds, 3),
                "parameters": artefact.parameters,
                "parity": artefact.parity.as_dict() if artefact.parity else None,
            }
            if artefact.notes:
                extra["notes"] = list(artefact.notes)
            artefacts[artefact.name] = sidecar.file_entry(artefact.path, self.out_dir, **extra)
        timings = dict(self.timings)
        timings["total"] = round(time.perf_counter() - self.start, 3)
        return {
            "format_version": sidecar.FORMAT_VERSION,
            "producer": {"name": "bilalora", "version": bilalora.__version__, "command": "export"},
            "created": sidecar.now(),
            "status": status,
            "error": error,
            "source": {
                "mode": self.source.mode,
                "run": str(self.source.run) if self.source.run else None,
            },
            "backbone": self.source.backbone,
            "weights": self.weights_source,
            "base_fingerprint": self.base_fingerprint,
            "merged": bool(self.source.mode == "adapter" and self.options.merge),
            "input": dict(sidecar.INPUT_SPEC),
            "output": dict(sidecar.OUTPUT_SPEC),
            "shapes": self.profile.as_dict(),
            "opset": self.opset,
            "exporter": self.exporter,
            "onnxslim": self.slim,
            "artefacts": artefacts,
            "adapter": self.adapter_record,
            "cost": self.cost,
            "versions": sidecar.tool_versions(self.tensorrt_version),
            "trt": self.trt_record,
            "options": {
                "merge": self.options.merge,
                "fp16": self.options.fp16,
                "trt": self.options.trt,
                "refit": self.options.refit,
                "batch": self.options.batch,
                "images": str(self.options.images) if self.options.images else None,
                "workspace_gb": self.options.workspace_gb if self.options.trt else None,
            },
            "timings": timings,
            "warnings": list(self.warnings),
            "next": self.next_commands(),
        }

    def write(self, status: str, error: Optional[str] = None) -> Path:
        return sidecar.write_sidecar(self.out_dir, self.record(status, error))


def _quote(path) -> str:
    text = str(path)
    return f"'{text}'" if re.search(r"\s", text) else text


def run_export(options: ExportOptions, events: Optional[Events] = None) -> ExportResult:
    """Export as ``options`` say; returns what was written (see the module docstring).

    Raises:
        UserError: bad input (one line); ParityError: a gate failed;
        TensorRTMissing: ``trt`` without TensorRT (after the ONNX artefacts and model.json are written).
    """
    import torch

    from .parity import ParityError
    from .trt import make_profile

    events = events or Events()
    if options.refit and not options.trt:
        raise UserError("--refit makes a refittable TensorRT engine: add --trt")
    if options.opset is None:
        options = dataclasses.replace(options, opset=18 if options.dynamo else 17)
    if options.opset < 13:
        raise UserError(f"--opset {options.opset}: use opset 13 or newer (17 is the default)")
    profile = make_profile(
        options.shape, options.dynamic, options.min_hw, options.opt_hw, options.max_hw, options.batch
    )
    if options.images is not None:
        from bilalora.data import list_images

        list_images(options.images)  # one line now rather than after the export
    source = resolve_source(options.adapter, options.base, options.backbone, options.weights, options.runs_root)
    for line in source.picked:
        events.info(line)
    out_dir = Path(options.out) if options.out is not None else default_out_dir(source)
    if options.out is None:
        events.info(f"output: {out_dir} (--out DIR picks another)")
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _Run(options, source, out_dir, profile)
    try:
        with torch.no_grad():
            _export(state, events)
    except ParityError:
        raise  # the gate wrote model.json with the failing numbers
    except UserError as exc:
        if state.stage == "trt":  # the ONNX artefacts are complete and valid
            state.write("partial", exc.message)
        elif any(a.path.is_file() for a in state.artefacts):
            state.write("failed", exc.message)
        raise
    sidecar_path = state.write("ok")
    produced = {a.name for a in state.artefacts}
    for name in _MANAGED:
        if name not in produced and (out_dir / name).is_file():
            state.warnings.append(f"{out_dir / name} is left from an earlier export and is not part of this one")
            events.warn(state.warnings[-1])
    if state.warnings:
        sidecar_path = state.write("ok")
    record = json.loads(sidecar_path.read_text(encoding="utf-8"))
    return ExportResult(
        out_dir=out_dir,
        source=source,
        profile=profile,
        artefacts=state.artefacts,
        record=record,
        sidecar=sidecar_path,
        merge=state.merge_record,
        seconds=time.perf_counter() - state.start,
        next_commands=state.next_commands(),
        warnings=state.warnings,
    )


def _export(state: _Run, events: Events) -> None:
    from bilalora import backbones, lora
    from bilalora.adapter import Adapter, fingerprint

    from .merge import gated_copy, merge_adapter, save_merged
    from .onnx_export import ExportWrapper
    from .parity import image_cases, random_cases, reference_outputs

    options, source, profile = state.options, state.source, state.profile

    # -- load
    tick = time.perf_counter()
    adapter = Adapter.load(source.adapter) if source.adapter is not None else None
    base = backbones.load(source.backbone, weights=source.weights).eval()
    state.weights_source = (getattr(base, "bilalora_info", {}) or {}).get("weights", source.weights)
    state.base_fingerprint = fingerprint(base)
    if adapter is not None:
        adapter.verify(base)
    cases = _cases(options, profile, random_cases, image_cases)
    state.timed("load", time.perf_counter() - tick)

    # -- merge / gated graph
    wrap = ExportWrapper
    merged_outputs = None
    if adapter is None:
        model = base
        if options.merge is False:
            events.info("base: nothing to merge; --no-merge has no effect without an adapter")
    elif options.merge:
        events.step(
            f"Merge: starting with {len(adapter.sites)} site(s) of {source.adapter} ({source.backbone} base) ..."
        )
        tick = time.perf_counter()
        model, report = merge_adapter(adapter, base, cases, wrap=wrap)
        state.merge_record = report.as_dict()
        merged_outputs = report.outputs or None
        events.merge(state.merge_record)
        save_merged(model, state.out_dir / MERGED_NAME, _merged_metadata(source, adapter, report))
        seconds = time.perf_counter() - tick
        state.timed("merge", seconds)
        artefact = Artefact(
            MERGED_NAME,
            state.out_dir / MERGED_NAME,
            "safetensors",
            "fp32",
            seconds,
            report.parity,
            report.parameters_merged,
        )
        state.artefacts.append(artefact)
        events.artefact(artefact)
    else:
        model = gated_copy(adapter, base)
        gated_params, base_params = lora.count_parameters(model), lora.count_parameters(base)
        state.merge_record = {
            "merged": False,
            "parameters_base": base_params,
            "parameters_gated": gated_params,
            "lora_overhead": (gated_params - base_params) / base_params if base_params else None,
        }
        events.merge(state.merge_record)
    if adapter is not None:
        state.adapter_record = _adapter_record(source.adapter, adapter, state.merge_record)
    model.eval()

    # -- reference outputs (PyTorch fp32, clamped like the export)
    tick = time.perf_counter()
    if merged_outputs is not None:
        references = merged_outputs  # the merge gate ran the merged model on the same cases
    else:
        references = reference_outputs(wrap(model).eval(), cases)
    state.timed("parity", time.perf_counter() - tick)

    # -- ONNX
    fixed = None if profile.dynamic else (profile.min[0], profile.min[2], profile.min[3])
    fold = not (adapter is not None and not options.merge)
    meta = _onnx_metadata(state)
    _onnx_artefact(state, events, model, ONNX_NAME, "fp32", fixed, fold, meta, cases, references)
    if options.fp16:
        _onnx_artefact(state, events, model, FP16_NAME, "fp16", fixed, fold, meta, cases, references)

    # -- cost (parameters and FLOPs of the exported network)
    from bilalora.profile import measure_cost

    tick = time.perf_counter()
    state.cost = measure_cost(model, (256, 256)).as_dict()
    state.timed("cost", time.perf_counter() - tick)

    # -- TensorRT
    if options.trt:
        state.stage = "trt"
        state.write("partial", "TensorRT engine not built yet")
        _engine(state, events, model)


def _cases(options: ExportOptions, profile: ShapeProfile, random_cases, image_cases) -> list[Case]:
    if profile.dynamic:
        sizes = list(options.parity_sizes)
        batches = [2 if index == 0 else 1 for index in range(len(sizes))]
        cases = random_cases(sizes, batches)
        fixed = None
    else:
        batch, _, height, width = profile.min
        cases = random_cases([(height, width)], [batch])
        fixed = (batch, height, width)
    if options.images is not None:
        cases += image_cases(options.images, count=options.parity_images, fixed=fixed)
    return cases


def _onnx_artefact(state, events, model, name, precision, fixed, fold, meta, cases, references) -> None:
    import torch

    from .fp16 import export_fp16
    from .onnx_export import export_onnx
    from .parity import onnx_parity

    options = state.options
    path = state.out_dir / name
    if precision == "fp32":
        import onnx

        exporter_name = "dynamo (torch.export)" if options.dynamo else "TorchScript"
        events.step(
            f"ONNX: starting export with torch {torch.__version__}, onnx {onnx.__version__}, opset {options.opset} "
            f"({exporter_name} exporter) ..."
        )
    else:
        events.step("ONNX fp16: starting export (fp16 weights and compute, fp32 input and output) ...")
    exporter = export_fp16 if precision == "fp16" else export_onnx
    result = exporter(
        model,
        path,
        opset=options.opset,
        fixed=fixed,
        dynamo=options.dynamo,
        fold_constants=fold,
        slim=options.slim,
        metadata={**meta, "precision": precision},
        log=events.warn,
    )
    state.warnings.extend(result.warnings)
    state.timed("onnx" if precision == "fp32" else "fp16", result.seconds)
    state.opset = result.opset
    if precision == "fp32":
        state.slim = result.slim
    artefact = Artefact(name, path, "onnx", precision, result.seconds, None, result.parameters, [result.slim])
    state.artefacts.append(artefact)
    tick = time.perf_counter()
    artefact.parity = onnx_parity(path, precision, cases, references)
    state.timed("parity", time.perf_counter() - tick)
    _gate(state, artefact)
    events.artefact(artefact)


def _gate(state: _Run, artefact: Artefact) -> None:
    """Stop on a failed gate: the failing file is removed, model.json records the numbers and the error."""
    from .parity import ParityError

    try:
        artefact.parity.check()
    except ParityError as exc:
        message = f"{exc.message}; {artefact.name} was removed, the numbers are in {state.out_dir / 'model.json'}"
        record = state.record("failed", message)
        record["artefacts"].setdefault(artefact.name, {"path": artefact.name})["parity"] = artefact.parity.as_dict()
        record["artefacts"][artefact.name]["removed"] = True
        artefact.path.unlink(missing_ok=True)
        sidecar.write_sidecar(state.out_dir, record)
        raise ParityError(message) from None


def _engine(state: _Run, events: Events, model) -> None:
    from .trt import build_engine, gpu_info, import_tensorrt

    options = state.options
    trt = import_tensorrt(state.out_dir)
    state.tensorrt_version = str(getattr(trt, "__version__", "unknown"))
    gpu = gpu_info()
    precision = "fp16" if options.fp16 else "fp32"
    events.step(f"TensorRT: starting {precision} engine build with TensorRT {state.tensorrt_version} on {gpu[0]} ...")
    build = build_engine(
        state.out_dir,
        state.out_dir / ENGINE_NAME,
        state.profile,
        precision,
        refit=options.refit,
        workspace_gb=options.workspace_gb,
        state_keys=list(model.state_dict()),
        trt=trt,
        gpu=gpu,
        log=events.info,
    )
    state.trt_record = build.record
    state.timed("trt", build.seconds)
    artefact = Artefact(ENGINE_NAME, build.path, "tensorrt", precision, build.seconds)
    state.artefacts.append(artefact)
    artefact.parity = _engine_parity(state, model, build.path, precision, trt)
    if artefact.parity is not None:
        _gate(state, artefact)
    else:
        artefact.notes.append("parity not measured: no CUDA tensors in this process")
    events.artefact(artefact)


def _engine_parity(state: _Run, model, engine_path: Path, precision: str, trt) -> Optional[ParityResult]:
    """Engine vs PyTorch fp32 (on the GPU, TF32 off) at sizes inside the profile; None without CUDA."""
    import numpy as np
    import torch

    from .onnx_export import ExportWrapper
    from .parity import evaluate, gate_for, random_cases
    from .trt import run_engine

    if not torch.cuda.is_available():
        return None
    profile = state.profile
    if profile.dynamic:
        sizes = sorted({profile.clamp_hw(h, w) for h, w in state.options.parity_sizes} | {tuple(profile.opt[2:])})
        cases = random_cases(sizes, [profile.opt[0]] * len(sizes), seed=1)
    else:
        cases = random_cases([tuple(profile.min[2:])], [profile.min[0]], seed=1)
    tick = time.perf_counter()
    reference_model = ExportWrapper(copy.deepcopy(model)).cuda().eval()
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False), torch.no_grad():
            references = [reference_model(torch.from_numpy(c.array).cuda()).float().cpu().numpy() for c in cases]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    outputs = run_engine(engine_path, [c.array for c in cases], trt=trt)
    state.timed("parity", time.perf_counter() - tick)
    del reference_model
    torch.cuda.empty_cache()
    return evaluate(
        engine_path.name,
        precision,
        cases,
        [np.asarray(o) for o in outputs],
        references,
        gate_for("engine", precision),
        "PyTorch fp32 (CUDA, TF32 off)",
    )


# --------------------------------------------------------------------------- records


def _adapter_record(path: Path, adapter, merge_record: Optional[dict[str, Any]]) -> dict[str, Any]:
    return {
        "path": str(path),
        "sha256": sidecar.sha256_of(path),
        "backbone": adapter.backbone,
        "base_fingerprint": adapter.base_fingerprint,
        "rank": adapter.rank,
        "lora_alpha": adapter.lora_alpha,
        "method": adapter.meta.get("method"),
        "lora_parameters": sum(int(t.numel()) for t in adapter.tensors.values()),
        "sites": [{"name": n, "gate": g, "layers": adapter.layers_of(n)} for n, g in adapter.sites.items()],
        "merge": merge_record,
    }


def _merged_metadata(source: Source, adapter, report) -> dict[str, Any]:
    return {
        "format": "bilalora merged weights",
        "backbone": source.backbone,
        "base_weights": source.weights,
        "base_fingerprint": report.base_fingerprint,
        "merged_fingerprint": report.merged_fingerprint,
        "adapter": str(source.adapter),
        "sites": dict(adapter.sites),
        "rank": adapter.rank,
        "lora_alpha": adapter.lora_alpha,
        "created": sidecar.now(),
    }


def _onnx_metadata(state: _Run) -> dict[str, Any]:
    return {
        "backbone": state.source.backbone,
        "base_fingerprint": state.base_fingerprint,
        "adapter_fingerprint": state.adapter_record["base_fingerprint"] if state.adapter_record else None,
        "adapter_sha256": state.adapter_record["sha256"] if state.adapter_record else None,
        "merged": bool(state.source.mode == "adapter" and state.options.merge),
        "pad_multiple": sidecar.INPUT_SPEC["pad_multiple"],
        "input_range": sidecar.INPUT_SPEC["range"],
        "output_range": sidecar.OUTPUT_SPEC["range"],
    }
