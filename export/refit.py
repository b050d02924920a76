"""Swap another merged adapter into an existing export without re-exporting: ONNX initializers and TensorRT refit.

    names = check_refit_names(Path("export/model.onnx"), model.state_dict())   # at export time (--refit)
    swap_onnx_weights(Path("export/model.onnx"), merged.state_dict(), Path("b/model.onnx"))
    result = refit_export(Path("export"), Path("night.safetensors"), out=Path("night-export"))

A ``--refit`` export keeps every weight of the network as an ONNX initializer
named after its state-dict key (no constant folding, no onnxslim), so a merged
adapter for the same base is the same graph with other initializer values:

* **ONNX** (:func:`swap_onnx_weights`, testable on any machine): the
  initializers named by the recorded map are replaced by the new state dict's
  tensors (same shape, the graph's dtype); swapping adapter B into A's graph
  equals B's own export.
* **TensorRT** (:func:`refit_engine`): ``tensorrt.Refitter(engine, logger)``,
  ``set_named_weights(name, Weights)`` for every refittable weight (the ONNX
  parser names engine weights after the initializers), ``get_missing_weights()``
  must be empty, then ``refit_cuda_engine()`` and the engine is serialised again.
  UNVERIFIED HERE: written against TensorRT 10's documented Python API
  (``Refitter.set_named_weights``, ``get_all_weights``, ``get_missing_weights``,
  ``refit_cuda_engine``), exercised against the stand-in in
  ``tests/test_trt_contract.py``.

:func:`refit_export` does both for an export folder: merge the adapter into the
recorded base, swap it into model.onnx (and model_fp16.onnx), refit
model.engine where TensorRT and CUDA are present (else the engine is left out
with a note), re-convert OpenVINO if present, run every parity gate, and write
the new folder through the same staging swap as an export. INT8 files are not
carried over: their scales were calibrated for the old weights.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from bilalora.errors import UserError

__all__ = ["check_refit_names", "swap_onnx_weights", "onnx_weights", "refit_engine", "RefitResult", "refit_export"]


def check_refit_names(onnx_path: Path, state_dict: Mapping[str, Any]) -> dict[str, str]:
    """{initializer name: state-dict key} of a ``--refit`` graph; every floating-point weight must be named.

    Raises:
        UserError: a floating-point state-dict tensor of the network is not an initializer of the graph
            (it was folded into a constant), so refitting could not reach it.
    """
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    names = {init.name for init in proto.graph.initializer}
    floats = {k for k, v in state_dict.items() if getattr(v, "is_floating_point", lambda: False)()}
    used = {k: k for k in sorted(names & floats)}
    # Buffers that the traced forward never reads (e.g. BatchNorm's num_batches_tracked) are not in the graph;
    # a floating-point weight missing from it was folded away.
    missing = sorted(k for k in floats - names if k.endswith(("weight", "bias")))
    if missing:
        raise UserError(
            f"--refit: {len(missing)} weight(s) are not named initializers of {onnx_path.name} "
            f"(e.g. {missing[0]}); this network folds them into constants, so it cannot be refitted"
        )
    return used


def onnx_weights(onnx_path: Path) -> dict[str, np.ndarray]:
    """Every initializer of an ONNX file as numpy arrays (the full set a TensorRT refit may ask for)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(onnx_path))
    return {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}


def swap_onnx_weights(onnx_path: Path, state_dict: Mapping[str, Any], out_path: Path,
                      names: Optional[Mapping[str, str]] = None) -> int:  # fmt: skip
    """Write ``onnx_path`` with the initializers in ``names`` replaced by ``state_dict`` tensors; returns how many.

    Args:
        onnx_path: a ``--refit`` export's graph (fp32 or fp16).
        state_dict: the new network's state dict (torch tensors or numpy arrays).
        out_path: where to write (atomically); may equal ``onnx_path``.
        names: {initializer: state-dict key}; None: every initializer whose name is a key.

    Raises:
        UserError: a named key is missing from ``state_dict`` or has another shape.
    """
    import onnx
    from onnx import numpy_helper

    from bilalora.io import atomic_path

    proto = onnx.load(str(onnx_path))
    swapped = 0
    for init in proto.graph.initializer:
        key = names.get(init.name) if names is not None else (init.name if init.name in state_dict else None)
        if key is None:
            continue
        if key not in state_dict:
            raise UserError(f"refit: {key} (initializer {init.name} of {onnx_path.name}) is not in the new weights")
        value = state_dict[key]
        array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        old = numpy_helper.to_array(init)
        if tuple(array.shape) != tuple(old.shape):
            raise UserError(f"refit: {key} has shape {tuple(array.shape)}, the graph's {init.name} {tuple(old.shape)}")
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array.astype(old.dtype)), init.name))
        swapped += 1
    with atomic_path(Path(out_path)) as tmp:
        onnx.save(proto, str(tmp))
    return swapped


def refit_engine(engine_path: Path, weights: Mapping[str, np.ndarray], out_path: Path, trt=None) -> dict[str, Any]:
    """Refit a REFIT-built engine with ``weights`` ({engine weight name: array}) and write it to ``out_path``.

    UNVERIFIED against a real TensorRT here (see the module docstring).

    Raises:
        UserError: the engine does not load or is not refittable, a weight is rejected, weights are missing,
            or ``refit_cuda_engine`` fails.
    """
    from bilalora.io import write_bytes_atomic

    from .trt import import_tensorrt

    trt = trt or import_tensorrt()
    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise UserError(f"TensorRT could not load {engine_path} (built for another TensorRT version or GPU?)")
    refitter = trt.Refitter(engine, logger)
    refittable = list(refitter.get_all_weights())
    if not refittable:
        raise UserError(f"{Path(engine_path).name} has no refittable weights: export it with --trt --refit")
    given = 0
    for name in refittable:
        if name not in weights:
            continue
        array = np.ascontiguousarray(weights[name])
        if not refitter.set_named_weights(name, trt.Weights(array)):
            raise UserError(f"TensorRT refused the new weights {name} {tuple(array.shape)} for {Path(engine_path).name}")
        given += 1
    missing = list(refitter.get_missing_weights())
    if missing:
        raise UserError(f"refit of {Path(engine_path).name}: {len(missing)} weight(s) not supplied (e.g. {missing[0]})")
    if not refitter.refit_cuda_engine():
        raise UserError(f"TensorRT could not refit {Path(engine_path).name}")
    write_bytes_atomic(Path(out_path), bytes(engine.serialize()))
    return {"refitted_weights": given, "refittable": len(refittable), "seconds": round(time.perf_counter() - start, 3)}


@dataclass
class RefitResult:
    """What :func:`refit_export` wrote.

    Attributes:
        out_dir: the new export folder.
        record: its model.json record.
        swapped: {file name: number of weights swapped}.
        dropped: one-line notes on artefacts that were not carried over and why.
        parity: {file name: parity summary line}.
    """

    out_dir: Path
    record: dict[str, Any]
    swapped: dict[str, int] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    parity: dict[str, str] = field(default_factory=dict)


def refit_export(model_dir: Path, adapter_path: Path, out: Optional[Path] = None,
                 require_engine: bool = False) -> RefitResult:  # fmt: skip
    """Swap the merged ``adapter_path`` into the ``--refit`` export ``model_dir``, gated, into ``out``.

    Args:
        model_dir: an export folder made with ``--refit``.
        adapter_path: an adapter for the same base (fingerprint checked).
        out: the new folder (default: ``model_dir`` itself, swapped in at the end).
        require_engine: fail when model.engine cannot be refitted here (``--refit-engine``).

    Raises:
        UserError: not a refit export, another base, a gate failure (one line).
    """
    import torch

    from bilalora import backbones
    from bilalora.adapter import Adapter, fingerprint
    from bilalora.runtime import model_json as sidecar

    from .formats import by_key
    from .merge import merge_adapter, save_merged
    from .onnx_export import ExportWrapper
    from .parity import random_cases, reference_outputs
    from .staging import Staging

    model_dir = Path(model_dir)
    try:
        record = sidecar.read_sidecar(model_dir)
    except (OSError, ValueError) as exc:
        raise UserError(f"{model_dir}: no readable model.json ({exc})") from None
    mapping = (record.get("refit") or {}).get("onnx_to_state_dict")
    if not mapping:
        raise UserError(f"{model_dir} was not exported with --refit: re-export it with --refit to swap adapters")
    if record.get("weights") in (None, "random"):
        raise UserError(f"{model_dir}/model.json does not name base weights a new adapter could be merged into")
    name = backbones.registered_name(record.get("backbone"), f"{model_dir}/model.json")  # never imports a factory
    base = backbones.load(name, weights=record["weights"], input_norm=record.get("input_norm") or "none").eval()
    if fingerprint(base) != record.get("base_fingerprint"):
        raise UserError(f"the base weights {record['weights']} changed since {model_dir} was exported")
    adapter = Adapter.load(adapter_path)
    adapter.verify(base)
    result = RefitResult(Path(out) if out is not None else model_dir, {})
    staging = Staging(result.out_dir)
    staging.open()
    try:
        with torch.no_grad():
            cases = random_cases([(64, 96), (68, 92)], [2, 1], seed=7)
            merged, report = merge_adapter(adapter, base, cases, wrap=ExportWrapper)
            references = report.outputs or reference_outputs(ExportWrapper(merged).eval(), cases)
            new = _refit_files(model_dir, staging.dir, record, mapping, merged, cases, references, result,
                               require_engine)  # fmt: skip
            save_merged(merged, staging.dir / by_key("merged").file, {"format": "bilalora merged weights",
                        "backbone": record["backbone"], "adapter": str(adapter_path)})  # fmt: skip
            new["merged.safetensors"] = {"format": "safetensors", "precision": "fp32",
                                         "parity": report.parity.as_dict() if report.parity else None}  # fmt: skip
        from .record import adapter_record

        merge = report.as_dict()
        updated = json.loads(json.dumps(record))
        updated["created"] = sidecar.now()
        updated["merged"] = True
        updated["source"] = {"mode": "adapter", "run": None, "refit_from": str(model_dir)}
        updated["adapter"] = adapter_record(Path(adapter_path), adapter, merge)
        updated["artefacts"] = {
            name: sidecar.file_entry(staging.dir / name, staging.dir, **fields) for name, fields in new.items()
        }
        if "model.engine" not in new:
            updated["trt"] = None
        updated["warnings"] = list(result.dropped)
        sidecar.write_sidecar(staging.dir, updated)
        staging.commit()
    except BaseException:
        staging.discard()
        raise
    result.record = updated
    return result


def _refit_files(model_dir, work, record, mapping, merged, cases, references, result, require_engine):
    """Swap/refit/convert each artefact of ``record`` into ``work``; returns {name: model.json fields}."""
    from .formats import by_file
    from .parity import onnx_parity

    state = merged.state_dict()
    new: dict[str, dict[str, Any]] = {}
    for name, entry in (record.get("artefacts") or {}).items():
        row = by_file(name)
        if row is None or entry.get("removed") or row.key == "merged":
            continue
        if row.key in ("onnx", "onnx-fp16"):
            count = swap_onnx_weights(model_dir / name, state, work / name, mapping)
            parity = onnx_parity(work / name, row.precision, cases, references).check()
            result.swapped[name], result.parity[name] = count, parity.summary()
            new[name] = {"format": "onnx", "precision": row.precision, "parity": parity.as_dict()}
        elif row.key == "onnx-int8":
            result.dropped.append(f"{name} not carried over: its INT8 scales were calibrated for the old weights "
                                  "(export the new adapter with --int8)")  # fmt: skip
        elif row.key == "openvino":
            from .openvino_export import export_openvino, openvino_parity

            export_openvino(work / "model.onnx", work / name)
            parity = openvino_parity(work / name, cases, references).check()
            result.parity[name] = parity.summary()
            from bilalora.runtime import model_json as sidecar

            new[name] = {"format": "openvino", "precision": "fp16", "parity": parity.as_dict(),
                         "bin": sidecar.file_entry(work / "model.bin", work)}  # fmt: skip
        elif row.key == "tensorrt":
            _refit_engine_file(model_dir, work, name, record, result, require_engine, new, cases, references)
    return new


def _refit_engine_file(model_dir, work, name, record, result, require_engine, new, cases, references) -> None:
    """Refit model.engine where TensorRT and CUDA are present; otherwise leave it out with a note."""
    trt_record = record.get("trt") or {}
    try:
        from .trt import import_tensorrt

        trt = import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise UserError("no CUDA GPU is visible")
        if not trt_record.get("refittable"):
            raise UserError(f"{name} was not built refittable (export with --trt --refit)")
        if trt_record.get("precision") == "int8":
            raise UserError(f"{name} is an INT8 engine: its scales were calibrated for the old weights "
                            "(refit an fp32/fp16 engine, or export the adapter with --int8 --trt)")  # fmt: skip
        source = work / trt_record.get("built_from", "model.onnx")
        if not source.is_file():
            raise UserError(f"{source.name}, which {name} was built from, is not part of this export")
        info = refit_engine(model_dir / name, onnx_weights(source), work / name, trt=trt)
    except UserError as exc:
        if require_engine:
            raise
        result.dropped.append(f"{name} not carried over ({exc.message}); refit it on the GPU with "
                              f"`bilalora export --refit-engine {model_dir / name} --adapter FILE`")  # fmt: skip
        return
    from .parity import evaluate, gate_for
    from .trt import run_engine

    precision = trt_record.get("precision", "fp32")
    outputs = run_engine(work / name, [c.array for c in cases], trt=trt)
    parity = evaluate(name, precision, cases, outputs, references, gate_for("engine", precision),
                      "PyTorch fp32 (CPU)").check()  # fmt: skip
    result.swapped[name], result.parity[name] = info["refitted_weights"], parity.summary()
    new[name] = {"format": "tensorrt", "precision": precision, "parity": parity.as_dict(), "refit": info}
