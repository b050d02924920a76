"""Export adapted dehazing networks: merge -> ONNX (fp32, fp16, int8) -> OpenVINO -> TensorRT, with parity gates.

    from bilalora.export import ExportOptions, run_export
    result = run_export(ExportOptions(adapter="day.safetensors", fp16=True))
    result.artefacts          # merged.safetensors, model.onnx, model_fp16.onnx (+ model_int8.onnx, model.xml,
                              #   model.engine with int8/openvino/trt=True)
    result.record             # the model.json record (schema: bilalora.runtime.model_json)

Building blocks (each usable alone; the table of formats is :mod:`.formats`):

* :func:`merge_adapter` / :func:`save_merged` (:mod:`.merge`): top-k gated deltas into the base weights.
* :func:`export_onnx` / :func:`export_fp16` (:mod:`.onnx_export`, :mod:`.fp16`): the ONNX graphs.
* :func:`onnx_parity`, :func:`random_cases`, :func:`image_cases` (:mod:`.parity`): the gates.
* :func:`quantize_int8` (:mod:`.int8`), :func:`export_openvino` (:mod:`.openvino_export`).
* :func:`swap_onnx_weights`, :func:`refit_engine`, :func:`refit_export` (:mod:`.refit`): adapters swapped in.
* :func:`make_profile`, :func:`build_engine`, :func:`engine_plan` (:mod:`.trt`): TensorRT.
* :class:`Staging` (:mod:`.staging`): the export is built beside its folder and swapped in.
Source resolution lives in :mod:`bilalora.sources` (shared with the bench).
The ``model.json`` schema belongs to the runtime that reads it
(:mod:`bilalora.runtime.model_json`); the exporter writes through it.
Attributes are imported on first use.
"""

from __future__ import annotations

from bilalora.lazy import lazy_exports

_EXPORTS = {
    "ExportOptions": "options",
    "ExportResult": "options",
    "Artefact": "options",
    "Events": "options",
    "run_export": "pipeline",
    "Format": "formats",
    "FORMATS": "formats",
    "Staging": "staging",
    "quantize_int8": "int8",
    "export_openvino": "openvino_export",
    "swap_onnx_weights": "refit",
    "refit_engine": "refit",
    "refit_export": "refit",
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
