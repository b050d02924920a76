"""``model.json``: the runtime's contract with an export (the exporter writes through this module).

This module imports neither torch nor onnx: it is the one place where
``model.json`` is read (:func:`read_sidecar`) and written (:func:`write_sidecar`).

Schema (``format_version`` 1). Paths are relative to the folder holding
``model.json``; sizes are ``[N, C, H, W]`` lists; numbers are JSON numbers::

    {
      "format_version": 1,
      "producer": {"name": "bilalora", "version": "0.1.0", "command": "export"},
      "created": "2026-05-01T12:00:00+00:00",
      "status": "ok" | "partial" | "failed",     # partial: ONNX fine, TensorRT missing or failed
      "error": null | "one line",                 # why status is not ok
      "source": {"mode": "adapter" | "base", "run": "runs/adapt/exp" | null},
      "backbone": "dea-net-t",                    # registry name or "pkg.mod:factory"
      "weights": "path" | "random" | null,        # base weights the export started from
      "base_fingerprint": "16 hex",               # bilalora.adapter.fingerprint of the base
      "merged": true,                             # LoRA baked into the weights (false: gated graph)
      "input":  {"name": "input", "layout": "NCHW", "dtype": "float32", "range": [0, 1],
                 "color": "RGB", "pad_multiple": 4, "pad_mode": "reflect", "pad_where": "bottom-right"},
      "output": {"name": "output", "layout": "NCHW", "dtype": "float32", "range": [0, 1],
                 "color": "RGB", "clamped": true},
      "shapes": {"dynamic": true,                 # false: every artefact takes exactly "fixed"
                 "fixed": null | [N, 3, H, W],
                 "min": [1, 3, 64, 64], "opt": [1, 3, 720, 1280], "max": [1, 3, 1080, 1920],
                 "multiple": 4},                  # min/opt/max: the engine profile (ONNX takes any
                                                  # N and any H, W >= 16 that are multiples of 4)
      "opset": 17,                                # the opset actually written
      "exporter": "torchscript" | "dynamo",
      "onnxslim": "onnxslim 0.1.98" | "not installed" | "skipped: ..." | "failed: ...",
      "artefacts": {                              # keyed by file name; only files that exist
                                                  # (plus, on a failed gate, the removed file with
                                                  # "removed": true and its parity numbers)
        "model.onnx": {"path": "model.onnx", "format": "onnx", "precision": "fp32",
                       "bytes": 123, "sha256": "...", "parameters": 229000, "seconds": 2.1,
                       "parity": {"reference": "...", "passed": true,
                                  "gate": {"max_abs": 1e-4} | {"psnr_db": 40.0},
                                  "max_abs": 3e-7, "mean_abs": 1e-8,
                                  "psnr_db": 130.1,  # worst case; null = identical (infinite)
                                  "cases": [{"input": "random" | "<image name>", "shape": [2, 3, 64, 96],
                                             "max_abs": ..., "mean_abs": ..., "psnr_db": ...}]}},
        "model_fp16.onnx": {..., "precision": "fp16"},   # fp16 inside, fp32 input and output
        "model.engine": {..., "format": "tensorrt", "precision": "fp16" | "fp32",
                         "parity": {...} | null},        # null: not measured (no CUDA in the build process)
        "merged.safetensors": {"path": ..., "format": "safetensors", "precision": "fp32", ...}
      },
      "adapter": null | {"path": ..., "sha256": ..., "base_fingerprint": ..., "backbone": ...,
                         "rank": 8, "lora_alpha": 16.0, "method": ..., "lora_parameters": ...,
                         "sites": [{"name": "level3_block2", "gate": 0.73, "layers": [...]}],
                         "merge": {"sites": {name: gate}, "layers": 6, "parameters_base": ...,
                                   "parameters_gated": ..., "parameters_merged": ...,
                                   "base_fingerprint": ..., "merged_fingerprint": ...,
                                   "max_abs": 0.0, "gate": 1e-5, "seconds": ...}
                                  | {"merged": false, "parameters_base": ..., "parameters_gated": ...,
                                     "lora_overhead": 0.041}},            # --no-merge
      "cost": {"parameters": ..., "gflops": ..., "gmacs": ..., "input_hw": [256, 256]},
      "versions": {"python": ..., "bilalora": ..., "torch": ..., "onnx": ..., "onnxruntime": ...,
                   "onnxslim": null | ..., "tensorrt": null | ...},
      "trt": null | {"version": "10.9.0.34", "major": 10, "gpu": "NVIDIA H100 80GB HBM3",
                     "compute_capability": "9.0", "built_from": "model.onnx", "precision": "fp16",
                     "strongly_typed": false, "builder_flags": ["FP16", "REFIT"],
                     "workspace_bytes": 4294967296, "timing_cache": "timing-....cache",
                     "profile": {"input": {"min": [...], "opt": [...], "max": [...]}},
                     "refittable": false,
                     "refittable_weights": {"<engine weight name>": "<state-dict key>" | null},
                     "refit_dtype": "float32" | "float16"},
      "options": {"merge", "fp16", "trt", "refit", "batch", "images", "workspace_gb"},  # the flags used
      "timings": {"load": s, "merge": s, "onnx": s, "fp16": s, "parity": s, "cost": s, "trt": s, "total": s},
      "warnings": ["one line", ...],
      "next": ["bilalora bench ...", "bilalora run ..."]
    }

An engine only runs with the TensorRT version and the GPU architecture it was
built for: :func:`engine_mismatch` compares a record with the running
TensorRT and GPU and says what differs.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata as _metadata
import json
import os
import platform
from pathlib import Path
from typing import Any, Mapping, Optional

__all__ = [
    "FORMAT_VERSION",
    "SIDECAR_NAME",
    "INPUT_SPEC",
    "OUTPUT_SPEC",
    "file_entry",
    "sha256_of",
    "tool_versions",
    "now",
    "write_sidecar",
    "read_sidecar",
    "engine_mismatch",
]

FORMAT_VERSION = 1
SIDECAR_NAME = "model.json"

#: The graph input every exported model takes.
INPUT_SPEC: dict[str, Any] = {
    "name": "input",
    "layout": "NCHW",
    "dtype": "float32",
    "range": [0.0, 1.0],
    "color": "RGB",
    "pad_multiple": 4,
    "pad_mode": "reflect",
    "pad_where": "bottom-right",
}

#: The graph output of every exported model (clamped to [0, 1] inside the graph).
OUTPUT_SPEC: dict[str, Any] = {
    "name": "output",
    "layout": "NCHW",
    "dtype": "float32",
    "range": [0.0, 1.0],
    "color": "RGB",
    "clamped": True,
}

_DISTRIBUTIONS = {
    "bilalora": "bilalora",
    "torch": "torch",
    "onnx": "onnx",
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "onnxscript": "onnxscript",
    "onnxslim": "onnxslim",
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu11"),
}


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: str | os.PathLike, root: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """An ``artefacts`` entry: path relative to ``root``, bytes, sha256, plus ``fields``."""
    path = Path(path)
    try:
        relative = path.resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        relative = str(path)
    return {"path": relative, "bytes": path.stat().st_size, "sha256": sha256_of(path), **fields}


def _dist_version(names: str | tuple[str, ...]) -> Optional[str]:
    for name in (names,) if isinstance(names, str) else names:
        try:
            return _metadata.version(name)
        except _metadata.PackageNotFoundError:
            continue
    return None


def tool_versions(tensorrt_version: Optional[str] = None) -> dict[str, Optional[str]]:
    """Versions of Python and the export tool chain (None for a package that is not installed).

    ``tensorrt_version`` overrides the installed distribution's version (the
    version reported by the imported module is the one that built the engine).
    """
    versions: dict[str, Optional[str]] = {"python": platform.python_version()}
    for key, dists in _DISTRIBUTIONS.items():
        versions[key] = _dist_version(dists)
    if tensorrt_version:
        versions["tensorrt"] = tensorrt_version
    return versions


def write_sidecar(folder: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Write ``record`` as ``folder/model.json`` atomically; returns the path."""
    from bilalora.io import write_json

    return write_json(Path(folder) / SIDECAR_NAME, dict(record))


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """Read ``model.json`` (a folder is taken to hold one); refuses unknown format versions.

    Raises:
        ValueError: the file is not a bilalora export record this code can read.
    """
    path = Path(path)
    if path.is_dir():
        path = path / SIDECAR_NAME
    with open(path, encoding="utf-8") as handle:
        record = json.load(handle)
    version = record.get("format_version") if isinstance(record, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: model.json format {version!r}; this bilalora reads format {FORMAT_VERSION}")
    return record


def engine_mismatch(
    record: Mapping[str, Any], tensorrt_version: str, compute_capability: str | tuple[int, int]
) -> Optional[str]:
    """Why an engine recorded in ``record`` cannot run here, or None when it can.

    TensorRT engines are tied to the exact TensorRT version that built them and
    (unless built hardware-compatible, which bilalora does not do) to the GPU's
    compute capability.

    Args:
        record: a model.json record (its ``trt`` section).
        tensorrt_version: the running ``tensorrt.__version__``.
        compute_capability: "8.9" or (8, 9) of the GPU that would run it.
    """
    trt = record.get("trt") if isinstance(record, Mapping) else None
    if not trt:
        return "model.json records no TensorRT engine"
    if isinstance(compute_capability, (tuple, list)):
        compute_capability = f"{compute_capability[0]}.{compute_capability[1]}"
    problems = []
    if str(trt.get("version")) != str(tensorrt_version):
        problems.append(f"built with TensorRT {trt.get('version')}, this is TensorRT {tensorrt_version}")
    if str(trt.get("compute_capability")) != str(compute_capability):
        problems.append(
            f"built for compute capability {trt.get('compute_capability')} ({trt.get('gpu')}), "
            f"this GPU has {compute_capability}"
        )
    if not problems:
        return None
    return "; ".join(problems) + "; rebuild it here with `bilalora export --trt` (the ONNX beside it still runs)"
