"""The table of export formats: what is built, how it is labelled, which flag asks for it, which gate checks it.

One row per artefact (after Ultralytics' ``export_formats()``); the pipeline,
the CLI's output lines, the managed-file list of an export folder and the
parity gates all read this table, so a new format is one row plus its builder.

    ========== ================== ============= =========== ========= ==================
    key        file               flag          format      precision gate (vs PyTorch)
    ========== ================== ============= =========== ========= ==================
    merged     merged.safetensors (adapter)     safetensors fp32      max abs <= 1e-5 (vs gated)
    onnx       model.onnx         (always)      onnx        fp32      max abs <= 1e-4
    onnx-fp16  model_fp16.onnx    --fp16        onnx        fp16      PSNR >= 40 dB
    onnx-int8  model_int8.onnx    --int8        onnx        int8      PSNR >= 35 dB
    openvino   model.xml (+.bin)  --openvino    openvino    fp16 w.   PSNR >= 40 dB (bf16 run)
    tensorrt   model.engine       --trt         tensorrt    fp32/fp16 PSNR >= 40 dB
    ========== ================== ============= =========== ========= ==================

The gate values live in :mod:`.parity` (``gate_for``); a row names its kind
and precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["Format", "FORMATS", "by_key", "by_file", "managed_files", "label_of"]


@dataclass(frozen=True)
class Format:
    """One export format.

    Attributes:
        key: short name used in code and ``bench`` rows ("onnx-int8").
        label: what the CLI prints ("ONNX INT8").
        file: the artefact's file name in the export folder.
        flag: the ``bilalora export`` flag that asks for it ("" when always built).
        format: ``model.json`` "format" value.
        precision: ``model.json`` "precision" value (the engine's is decided at build time).
        gate_kind: the kind passed to :func:`.parity.gate_for` ("merge", "onnx", "engine", "openvino").
        companions: other files that belong to the artefact ("model.bin").
    """

    key: str
    label: str
    file: str
    flag: str
    format: str
    precision: str
    gate_kind: str
    companions: tuple[str, ...] = ()

    def gate(self, precision: Optional[str] = None) -> dict[str, float]:
        """The parity gate of this artefact (read from :mod:`.parity` at call time)."""
        from .parity import gate_for

        return gate_for(self.gate_kind, precision or self.precision)

    @property
    def files(self) -> tuple[str, ...]:
        return (self.file, *self.companions)


FORMATS: tuple[Format, ...] = (
    Format("merged", "PyTorch", "merged.safetensors", "", "safetensors", "fp32", "merge"),
    Format("onnx", "ONNX", "model.onnx", "", "onnx", "fp32", "onnx"),
    Format("onnx-fp16", "ONNX fp16", "model_fp16.onnx", "--fp16", "onnx", "fp16", "onnx"),
    Format("onnx-int8", "ONNX INT8", "model_int8.onnx", "--int8", "onnx", "int8", "onnx"),
    Format("openvino", "OpenVINO", "model.xml", "--openvino", "openvino", "fp16", "openvino", ("model.bin",)),
    Format("tensorrt", "TensorRT", "model.engine", "--trt", "tensorrt", "fp32", "engine"),
)


def by_key(key: str) -> Format:
    """The row named ``key``."""
    for row in FORMATS:
        if row.key == key:
            return row
    raise KeyError(key)


def by_file(name: str) -> Optional[Format]:
    """The row whose artefact (or companion) file is ``name``; None for other files."""
    return next((row for row in FORMATS if name in row.files), None)


def managed_files() -> tuple[str, ...]:
    """Every file name an export may write besides model.json (what a re-export replaces)."""
    return tuple(name for row in FORMATS for name in row.files)


def label_of(format_: str, precision: str) -> str:
    """The printed label of an artefact ("ONNX fp16", "TensorRT fp16", "OpenVINO")."""
    for row in FORMATS:
        if row.format == format_ and (row.precision == precision or row.format in ("tensorrt", "openvino")):
            if row.format == "tensorrt" and precision != "fp32":
                return f"{row.label} {precision}"
            return row.label
    return format_
