"""Export adapted dehazing networks: merge -> ONNX (fp32, fp16) -> TensorRT, with parity gates.

    from bilalora.export import ExportOptions, run_export
    result = run_export(ExportOptions(adapter="day.safetensors", fp16=True))
    result.artefacts          # merged.safetensors, model.onnx, model_fp16.onnx (+ model.engine with trt=True)
    result.record             # the model.json record (schema: bilalora.runtime.model_json)

Building blocks (each usable alone):

* :func:`merge_adapter` / :func:`save_merged` (:mod:`.merge`): top-k gated deltas into the base weights.
* :func:`export_onnx` / :func:`export_fp16` (:mod:`.onnx_export`, :mod:`.fp16`): the ONNX graphs.
* :func:`onnx_parity`, :func:`random_cases`, :func:`image_cases` (:mod:`.parity`): the gates.
* :func:`make_profile`, :func:`build_engine`, :func:`engine_plan` (:mod:`.trt`): TensorRT.
The ``model.json`` schema belongs to the runtime that reads it
(:mod:`bilalora.runtime.model_json`); the exporter writes through it.
Attributes are imported on first use.
"""

from __future__ import annotations

from bilalora.lazy import lazy_exports

_EXPORTS = {
    "ExportOptions": "pipeline",
    "ExportResult": "pipeline",
    "Artefact": "pipeline",
    "Events": "pipeline",
    "run_export": "pipeline",
    "MergeReport": "merge",
    "merge_adapter": "merge",
    "gated_copy": "merge",
    "save_merged": "merge",
    "ExportWrapper": "onnx_export",
    "OnnxExport": "onnx_export",
    "export_onnx": "onnx_export",
    "DEFAULT_OPSET": "onnx_export",
    "export_fp16": "fp16",
    "Case": "parity",
    "ParityError": "parity",
    "ParityResult": "parity",
    "random_cases": "parity",
    "image_cases": "parity",
    "onnx_parity": "parity",
    "ShapeProfile": "trt",
    "TensorRTMissing": "trt",
    "make_profile": "trt",
    "engine_plan": "trt",
    "build_engine": "trt",
    "refit_map": "trt",
    "TRT_INSTALL_HINT": "trt",
}

__all__ = list(_EXPORTS)  # noqa: PLE0605 - the lazily imported names

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
