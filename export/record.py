"""The state of one export and the ``model.json`` record built from it (schema: :mod:`bilalora.runtime.model_json`)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Optional

from bilalora.runtime import model_json as sidecar
from bilalora.sources import Source

from .options import Artefact, ExportOptions
from .trt import ShapeProfile

__all__ = ["ExportState", "adapter_record", "merged_metadata", "onnx_metadata"]


class ExportState:
    """What one export has done so far, accumulated into the model.json record.

    Attributes:
        options, source, profile: what was asked for.
        out_dir: the export folder the user sees.
        work_dir: where files are written during the export (the staging folder, see :mod:`.staging`).
        artefacts: written files in order (paths inside ``work_dir`` until the commit).
        input_norm: {"mean": [...], "std": [...]} folded into the graph, or None.
        refit_map: {ONNX initializer: state-dict key} with ``--refit``.
    """

    def __init__(self, options: ExportOptions, source: Source, out_dir: Path, work_dir: Path, profile: ShapeProfile):
        self.options = options
        self.source = source
        self.out_dir = out_dir
        self.work_dir = work_dir
        self.profile = profile
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.artefacts: list[Artefact] = []
        self.warnings: list[str] = []
        self.adapter_record: Optional[dict[str, Any]] = None
        self.merge_record: Optional[dict[str, Any]] = None
        self.base_fingerprint: Optional[str] = None
        self.weights_source: Optional[str] = None
        self.input_norm: Optional[dict[str, list[float]]] = None
        self.cost: Optional[dict[str, Any]] = None
        self.trt_record: Optional[dict[str, Any]] = None
        self.tensorrt_version: Optional[str] = None
        self.refit_map: Optional[dict[str, str]] = None
        self.real_cases: list = []  # real-image parity cases (the INT8 gate's; reused by an INT8 engine)
        self.exporter = "dynamo" if options.dynamo else "torchscript"
        self.opset = options.opset  # resolved by run_export
        self.slim: Optional[str] = None
        self.stage = "start"

    def timed(self, key: str, seconds: float) -> None:
        self.timings[key] = round(self.timings.get(key, 0.0) + seconds, 3)

    def path(self, name: str) -> Path:
        """Where the artefact ``name`` is written during the export."""
        return self.work_dir / name

    def next_commands(self) -> list[str]:
        out = _quote(self.out_dir)
        images = f" --images {_quote(self.options.images)}" if self.options.images else ""
        inputs = _quote(self.options.images) if self.options.images else "frames/"
        # the folder, not one file: the runtime then picks the fastest artefact that passed its gate here
        return [
            f"bilalora bench --model {out}{images}",
            f"bilalora run --model {out} --input {inputs} --output dehazed/",
        ]

    def artefact_entries(self) -> dict[str, Any]:
        """The ``artefacts`` section: every written file with bytes and sha256 (companions too)."""
        entries = {}
        for artefact in self.artefacts:
            if not artefact.path.is_file():
                continue
            fields: dict[str, Any] = {
                "format": artefact.format,
                "precision": artefact.precision,
                "seconds": round(artefact.seconds, 3),
                "parameters": artefact.parameters,
                "parity": artefact.parity.as_dict() if artefact.parity else None,
            }
            for companion in artefact.companions:
                key = Path(companion).suffix.lstrip(".") or companion
                fields[key] = sidecar.file_entry(artefact.path.parent / companion, self.work_dir)
            fields.update(artefact.extra)
            if artefact.notes:
                fields["notes"] = list(artefact.notes)
            entries[artefact.name] = sidecar.file_entry(artefact.path, self.work_dir, **fields)
        return entries

    def record(self, status: str, error: Optional[str] = None) -> dict[str, Any]:
        import bilalora

        timings = dict(self.timings)
        timings["total"] = round(time.perf_counter() - self.start, 3)
        options = self.options
        return {
            "format_version": sidecar.FORMAT_VERSION,
            "producer": {"name": "bilalora", "version": bilalora.__version__, "command": "export"},
            "created": sidecar.now(),
            "status": status,
            "error": error,
            "source": {"mode": self.source.mode, "run": str(self.source.run) if self.source.run else None},
            "backbone": self.source.backbone,
            "weights": self.weights_source,
            "base_fingerprint": self.base_fingerprint,
            "merged": bool(self.source.mode == "adapter" and options.merge),
            "input": dict(sidecar.INPUT_SPEC),
            "input_norm": self.input_norm,
            "output": dict(sidecar.OUTPUT_SPEC),
            "shapes": self.profile.as_dict(),
            "opset": self.opset,
            "exporter": self.exporter,
            "onnxslim": self.slim,
            "artefacts": self.artefact_entries(),
            "adapter": self.adapter_record,
            "refit": {"onnx_to_state_dict": self.refit_map} if self.refit_map is not None else None,
            "cost": self.cost,
            "versions": sidecar.tool_versions(self.tensorrt_version),
            "trt": self.trt_record,
            "options": {
                "merge": options.merge,
                "fp16": options.fp16,
                "int8": options.int8,
                "openvino": options.openvino,
                "trt": options.trt,
                "refit": options.refit,
                "batch": options.batch,
                "images": str(options.images) if options.images else None,
                "calib": str(options.calib) if options.calib else None,
                "int8_min_psnr": options.int8_min_psnr,
                "workspace_gb": options.workspace_gb if options.trt else None,
            },
            "timings": timings,
            "warnings": list(self.warnings),
            "next": self.next_commands(),
        }

    def write(self, status: str, error: Optional[str] = None, record: Optional[dict[str, Any]] = None) -> Path:
        """Write model.json into the work folder (the staging folder marks the export complete with it)."""
        return sidecar.write_sidecar(self.work_dir, record if record is not None else self.record(status, error))


def _quote(path) -> str:
    text = str(path)
    return f"'{text}'" if re.search(r"\s", text) else text


def adapter_record(path: Path, adapter, merge_record: Optional[dict[str, Any]]) -> dict[str, Any]:
    """model.json's ``adapter`` section."""
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


def merged_metadata(source: Source, adapter, report, input_norm) -> dict[str, Any]:
    """The ``bilalora`` metadata of merged.safetensors."""
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
        "input_norm": input_norm,
        "created": sidecar.now(),
    }


def onnx_metadata(state: ExportState) -> dict[str, Any]:
    """The ``bilalora`` metadata property stored in every ONNX file."""
    return {
        "backbone": state.source.backbone,
        "base_fingerprint": state.base_fingerprint,
        "adapter_base_fingerprint": state.adapter_record["base_fingerprint"] if state.adapter_record else None,
        "adapter_sha256": state.adapter_record["sha256"] if state.adapter_record else None,
        "merged": bool(state.source.mode == "adapter" and state.options.merge),
        "pad_multiple": sidecar.INPUT_SPEC["pad_multiple"],
        "input_range": sidecar.INPUT_SPEC["range"],
        "input_norm": state.input_norm,
        "output_range": sidecar.OUTPUT_SPEC["range"],
    }
