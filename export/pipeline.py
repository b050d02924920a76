"""The export pipeline behind ``bilalora export``: source -> merge -> ONNX (fp32, fp16, int8) -> OpenVINO -> TensorRT.

    result = run_export(ExportOptions(merge=True, openvino=True, int8=True))   # newest run under runs/adapt/

What is built, how it is labelled and how it is checked comes from the table
in :mod:`.formats`. Steps, each timed and recorded in ``model.json``
(:mod:`bilalora.runtime.model_json`):

1. **Source** (:mod:`bilalora.sources`): an adapter file, the base, or the newest
   adapt run's adapter. A backbone without weights (no ``--weights``, none
   shipped) is refused unless ``random_weights`` is set.
2. **Merge** (adapter, ``merge=True``): top-k deltas into the base weights, same
   keys/shapes/parameters/FLOPs, gated-vs-merged max abs error <= 1e-5;
   ``merged.safetensors``. ``merge=False`` exports the gated LoRA graph.
3. **ONNX** ``model.onnx`` (and ``model_fp16.onnx`` with ``fp16``), run with
   onnxruntime against PyTorch on random inputs at two sizes (and real images).
   ``refit`` keeps every weight a named initializer (no constant folding, no
   onnxslim) and records the initializer -> state-dict map.
4. **INT8** (``int8``): calibrated QDQ ``model_int8.onnx`` (:mod:`.int8`).
5. **OpenVINO** (``openvino``): ``model.xml``/``model.bin`` (:mod:`.openvino_export`).
6. **TensorRT** (``trt``): ``model.engine`` (:mod:`.engine`); without TensorRT the
   other artefacts stay and :class:`.trt.TensorRTMissing` is raised after
   model.json is written (status "partial").

Every gate failure stops the export with one line (the failing file is
removed; model.json records the numbers). Every gate also fails on degenerate
outputs (saturated, constant, not finite: see :mod:`.parity`).

The export is written into ``<out>.partial/`` and swapped into the output
folder at the end (:mod:`.staging`): a killed export leaves the earlier export
intact. Output folder: ``--out``, else :func:`bilalora.sources.default_out_dir`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Optional

from bilalora.errors import UserError
from bilalora.runtime.model_json import read_sidecar
from bilalora.sources import Source, default_out_dir, resolve_source

from .formats import by_key
from .options import Artefact, Events, ExportOptions, ExportResult
from .parity import Case, ParityError
from .record import ExportState, adapter_record, merged_metadata, onnx_metadata
from .staging import Staging
from .trt import ShapeProfile, make_profile

__all__ = ["ExportOptions", "Artefact", "ExportResult", "Events", "run_export", "check_weights"]

#: Seed of the initialisation with ``random_weights`` (exports of a random network are reproducible).
RANDOM_WEIGHTS_SEED = 0


def check_weights(source: Source, random_weights: bool) -> None:
    """Refuse a base network that would get random weights unless ``random_weights`` says so.

    Raises:
        UserError: no ``--weights``, no weights in the run's summary and none shipped for the backbone.
    """
    from bilalora.backbones import shipped_weights

    if random_weights:
        return
    if source.weights == "random" or (source.weights is None and shipped_weights(source.backbone) is None):
        raise UserError(
            f"backbone {source.backbone} has no weights here (none shipped, no --weights): pass --weights FILE, "
            "or --random-weights to export a randomly initialised network (for tests only)"
        )


def run_export(options: ExportOptions, events: Optional[Events] = None) -> ExportResult:
    """Export as ``options`` say; returns what was written (see the module docstring).

    Raises:
        UserError: bad input (one line); ParityError: a gate failed;
        TensorRTMissing: ``trt`` without TensorRT (after the other artefacts and model.json are written).
    """
    import torch

    events = events or Events()
    if options.opset is None:
        options = dataclasses.replace(options, opset=18 if options.dynamo else 17)
    if options.opset < 13:
        raise UserError(f"--opset {options.opset}: use opset 13 or newer (17 is the default)")
    if options.refit and options.adapter is not None and not options.merge:
        raise UserError("--refit swaps merged adapters into the graph: drop --no-merge")
    profile = make_profile(
        options.shape, options.dynamic, options.min_hw, options.opt_hw, options.max_hw, options.batch
    )
    for folder in (options.images, options.calib):
        if folder is not None:
            from bilalora.images import list_images

            list_images(folder)  # one line now rather than after the export
    if options.openvino:
        from .openvino_export import import_openvino

        import_openvino()
    source = resolve_source(options.adapter, options.base, options.backbone, options.weights, options.runs_root,
                            input_norm=options.input_norm)
    check_weights(source, options.random_weights)
    if options.int8_min_psnr is not None and not (0 < options.int8_min_psnr <= 100):
        raise UserError(f"--int8-min-psnr {options.int8_min_psnr}: give a PSNR in dB between 0 and 100")
    if options.int8_min_psnr is not None and options.int8_min_psnr < 35:
        events.warn(f"--int8-min-psnr {options.int8_min_psnr:g}: the INT8 gate is lowered below 35 dB "
                    "(recorded in model.json); outputs may differ visibly from the fp32 model")  # fmt: skip
    if options.int8:
        from .int8 import calibration_split

        calibration_split(options.calib, source.run, options.calib_images, options.images)  # one line now
    for line in source.picked:
        events.info(line)
    out_dir = Path(options.out) if options.out is not None else default_out_dir(source)
    if options.out is None:
        events.info(f"output: {out_dir} (--out DIR picks another)")
    staging = Staging(out_dir)
    for note in staging.open():
        events.warn(note)
    state = ExportState(options, source, out_dir, staging.dir, profile)
    try:
        with torch.no_grad():
            _export(state, events)
        sidecar_path = _commit(state, staging, "ok", None)
    except UserError as exc:
        if isinstance(exc, ParityError) or any(a.path.is_file() for a in state.artefacts):
            status = "partial" if state.stage == "trt" else "failed"
            _commit(state, staging, status, exc.message, getattr(exc, "record", None))
        else:
            staging.discard()
        raise
    except BaseException:
        staging.discard()  # Ctrl-C or a crash: the earlier export stays as it was
        raise
    record = read_sidecar(sidecar_path)
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


def _commit(state: ExportState, staging: Staging, status: str, error: Optional[str], record=None) -> Path:
    """Write model.json into the staging folder and swap it in; artefact paths then point into the output."""
    state.write(status, error, record)
    path = staging.commit()
    for artefact in state.artefacts:
        artefact.path = artefact.destination = state.out_dir / artefact.name
    state.work_dir = state.out_dir
    return path


def _export(state: ExportState, events: Events) -> None:
    from bilalora.profile import measure_cost

    from .onnx_export import ExportWrapper
    from .parity import reference_outputs

    options = state.options
    tick = time.perf_counter()
    adapter, base = _load(state)
    model = base
    cases = build_cases(options, state.profile, state.source.run)
    state.timed("load", time.perf_counter() - tick)

    model, references = _merge_step(state, events, model, adapter, base, cases)
    if references is None:
        tick = time.perf_counter()
        references = reference_outputs(ExportWrapper(model).eval(), cases)
        state.timed("parity", time.perf_counter() - tick)

    fixed = None if state.profile.dynamic else (state.profile.min[0], state.profile.min[2], state.profile.min[3])
    fold = not (adapter is not None and not options.merge) and not options.refit
    meta = onnx_metadata(state)
    _onnx_step(state, events, model, "onnx", fixed, fold, meta, cases, references)
    if options.refit:
        from .refit import check_refit_names

        state.refit_map = check_refit_names(state.path(by_key("onnx").file), model.state_dict())
        events.info(f"refit: {len(state.refit_map)} ONNX initializers carry state-dict names")
    if options.fp16:
        _onnx_step(state, events, model, "onnx-fp16", fixed, fold, meta, cases, references)
    if options.int8:
        _int8_step(state, events, model)
    if options.openvino:
        _openvino_step(state, events, cases, references)

    tick = time.perf_counter()
    state.cost = measure_cost(model, (256, 256)).as_dict()
    state.timed("cost", time.perf_counter() - tick)

    if options.trt:
        from .engine import build_engine_artefact

        state.stage = "trt"
        artefact = build_engine_artefact(state, events, model)
        if artefact.parity is not None:
            _gate(state, artefact)
        _announce(state, events, artefact)


def _load(state: ExportState):
    """(adapter or None, base network in eval mode); the adapter's base fingerprint is checked."""
    from bilalora.adapter import Adapter, fingerprint

    source = state.source
    adapter = Adapter.load(source.adapter) if source.adapter is not None else None
    if state.options.random_weights:
        import torch

        with torch.random.fork_rng(devices=[]):  # --random-weights: the same network on every export
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            base = source.load_base().eval()
    else:
        base = source.load_base().eval()
    info = getattr(base, "bilalora_info", {}) or {}
    state.weights_source = info.get("weights", source.weights)
    state.input_norm = info.get("input_norm")
    state.base_fingerprint = fingerprint(base)
    if adapter is not None:
        adapter.verify(base)
    return adapter, base


def build_cases(options: ExportOptions, profile: ShapeProfile, run: Optional[Path] = None) -> list[Case]:
    """The parity inputs: random batches at ``parity_sizes`` (or the fixed shape), plus ``images`` (else
    ``parity_images`` of the adapt ``run``'s held-out photos)."""
    from .parity import image_cases, random_cases

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
    elif run is not None and (Path(run) / "split.json").is_file():
        cases += _held_out_cases(Path(run), options.parity_images, fixed)
    return cases


def _held_out_cases(run: Path, count: int, fixed) -> list[Case]:
    """Real photos for the gates when no --images is given: the run's held-out (test, then val) images."""
    from bilalora.runs import read_split

    from .parity import image_cases

    try:
        split = read_split(run)
    except UserError:
        return []
    paths = [p for p in split.get("test", []) + split.get("val", []) if Path(p).is_file()][:count]
    try:
        return image_cases(paths, count=count, fixed=fixed) if paths else []
    except UserError:
        return []


def _merge_step(state: ExportState, events: Events, model, adapter, base, cases):
    """Merge the adapter (or build the gated graph); returns (network to export, references or None)."""
    from bilalora import lora

    from .merge import gated_copy, merge_adapter, save_merged
    from .onnx_export import ExportWrapper

    options, source = state.options, state.source
    references = None
    if adapter is None:
        if options.merge is False:
            events.info("base: nothing to merge; --no-merge has no effect without an adapter")
    elif options.merge:
        row = by_key("merged")
        events.step(f"Merge: starting with {len(adapter.sites)} site(s) of {source.adapter} ({source.backbone} base) ...")
        tick = time.perf_counter()
        model, report = merge_adapter(adapter, base, cases, wrap=ExportWrapper)
        state.merge_record = report.as_dict()
        references = report.outputs or None  # the merge gate ran the merged model on the same cases
        events.merge(state.merge_record)
        path = state.path(row.file)
        save_merged(model, path, merged_metadata(source, adapter, report, state.input_norm))
        seconds = time.perf_counter() - tick
        state.timed("merge", seconds)
        artefact = Artefact(row.file, path, row.format, row.precision, seconds, report.parity, report.parameters_merged)
        state.artefacts.append(artefact)
        _announce(state, events, artefact)
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
        state.adapter_record = adapter_record(source.adapter, adapter, state.merge_record)
    return model.eval(), references


def _onnx_step(state, events, model, key, fixed, fold, meta, cases, references) -> None:
    import onnx
    import torch

    from .onnx_export import export_onnx
    from .parity import onnx_parity

    options, row = state.options, by_key(key)
    path = state.path(row.file)
    if row.precision == "fp32":
        exporter_name = "dynamo (torch.export)" if options.dynamo else "TorchScript"
        events.step(
            f"ONNX: starting export with torch {torch.__version__}, onnx {onnx.__version__}, opset {options.opset} "
            f"({exporter_name} exporter) ..."
        )
    else:
        events.step("ONNX fp16: starting export (fp16 weights and compute, fp32 input and output) ...")
    result = export_onnx(
        model,
        path,
        opset=options.opset,
        fixed=fixed,
        dynamo=options.dynamo,
        half=row.precision == "fp16",
        fold_constants=fold,
        slim=options.slim and not options.refit,
        metadata={**meta, "precision": row.precision},
        log=events.warn,
    )
    state.warnings.extend(result.warnings)
    state.timed("onnx" if row.precision == "fp32" else "fp16", result.seconds)
    state.opset = result.opset
    if row.precision == "fp32":
        state.slim = result.slim if not options.refit else "skipped: --refit keeps every weight named"
    artefact = Artefact(row.file, path, row.format, row.precision, result.seconds, None, result.parameters, [result.slim])
    state.artefacts.append(artefact)
    tick = time.perf_counter()
    artefact.parity = onnx_parity(path, row.precision, cases, references)
    state.timed("parity", time.perf_counter() - tick)
    _gate(state, artefact)
    _announce(state, events, artefact)


def _int8_step(state: ExportState, events: Events, model) -> None:
    from .int8 import calibration_crops, calibration_split, quantize_int8
    from .onnx_export import ExportWrapper
    from .parity import image_cases, reference_outputs

    options, row = state.options, by_key("onnx-int8")
    fixed = None if state.profile.dynamic else (state.profile.min[0], state.profile.min[2], state.profile.min[3])
    calib, held, origin = calibration_split(options.calib, state.source.run, options.calib_images, options.images)
    events.step(f"ONNX INT8: calibrating on {origin} ...")
    calib_cases = calibration_crops(calib, fixed=fixed)
    check_calib = image_cases(calib, count=min(4, len(calib)), fixed=fixed)
    held_cases = image_cases(held, count=len(held), fixed=fixed) if held else []
    if not held_cases:
        state.warnings.append("INT8 gate: no held-out images (no run split, --images, or spare --calib images)")
        events.warn(state.warnings[-1])
    for case in held_cases:
        case.label = f"held-out {case.label}"
    check = check_calib + held_cases
    state.real_cases = check
    tick = time.perf_counter()
    references = reference_outputs(ExportWrapper(model).eval(), check)
    state.timed("parity", time.perf_counter() - tick)
    path = state.path(row.file)
    artefact = Artefact(row.file, path, row.format, row.precision, 0.0)
    try:
        result = quantize_int8(state.path(by_key("onnx").file), path, calib_cases, check, references,
                               log=events.info, min_psnr=options.int8_min_psnr)  # fmt: skip
    except ParityError:
        state.artefacts.append(artefact)
        raise
    artefact.seconds, artefact.parity = result.seconds, result.parity
    from .onnx_export import onnx_parameter_count

    artefact.parameters = onnx_parameter_count(path)
    artefact.extra = {
        **result.record(),  # kept_float/float_nodes, convs, int8_convs, attempts, search, scheme
        "calibration": {"origin": origin, "images": [p.name for p in calib], "held_out": [p.name for p in held]},
    }
    state.timed("int8", result.seconds)
    state.artefacts.append(artefact)
    _gate(state, artefact)
    _announce(state, events, artefact)


def _openvino_step(state: ExportState, events: Events, cases: list[Case], references) -> None:
    from .openvino_export import export_openvino, openvino_parity

    row = by_key("openvino")
    path = state.path(row.file)
    events.step("OpenVINO: converting model.onnx (fp16-compressed weights) ...")
    seconds = export_openvino(state.path(by_key("onnx").file), path)
    state.timed("openvino", seconds)
    artefact = Artefact(row.file, path, row.format, row.precision, seconds)
    state.artefacts.append(artefact)
    tick = time.perf_counter()
    result = openvino_parity(path, cases, references)
    if not result.passed and result.details.get("inference_precision") == "bf16":
        fallback = openvino_parity(path, cases, references, precision="f32")
        if fallback.passed:
            worst = min(result.cases, key=lambda c: c["psnr_db"])
            fallback.details["bf16"] = {"passed": False, "psnr_db": result.psnr_db, "worst_input": worst["input"]}
            state.warnings.append(
                f"OpenVINO bf16 failed its gate ({result.psnr_db:.1f} dB on {worst['input']}); model.xml is gated "
                "in f32, so the runtime does not pick it in bf16 unless asked (--precision bf16)"
            )
            events.warn(state.warnings[-1])
            result = fallback
    if result.details.get("inference_precision") == "bf16" and all(c.label == "random" for c in cases):
        state.warnings.append(
            "OpenVINO bf16 was gated on random inputs only; bf16 error depends on the scene (one real 720p frame "
            "of dea-net-s fell to 28 dB): pass --images DIR to gate it on real frames"
        )
        events.warn(state.warnings[-1])
    artefact.parity = result
    artefact.extra = {"weights": "fp16"}
    state.timed("parity", time.perf_counter() - tick)
    _gate(state, artefact)
    _announce(state, events, artefact)


def _announce(state: ExportState, events: Events, artefact: Artefact) -> None:
    """Tell the caller an artefact passed its gate, naming where it will be once the export is swapped in."""
    artefact.destination = state.out_dir / artefact.name
    events.artefact(artefact)


def _gate(state: ExportState, artefact: Artefact) -> None:
    """Stop on a failed gate: the failing file is removed, model.json records the numbers and the error."""
    try:
        artefact.parity.check()
    except ParityError as exc:
        message = f"{exc.message}; {artefact.name} was removed, the numbers are in {state.out_dir / 'model.json'}"
        artefact.path.unlink(missing_ok=True)
        for companion in artefact.companions:
            (artefact.path.parent / companion).unlink(missing_ok=True)
        record = state.record("failed", message)
        entry: dict[str, Any] = record["artefacts"].setdefault(artefact.name, {"path": artefact.name})
        entry.update({"parity": artefact.parity.as_dict(), "removed": True, **artefact.extra})
        error = ParityError(message)
        error.record = record
        raise error from None
