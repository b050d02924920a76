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
        "model_int8.onnx": {..., "precision": "int8",     # calibrated QDQ graph, fp32 input and output
                            "float_nodes": [...]},        # nodes kept in float (they broke the gate)
        "model.xml": {..., "format": "openvino", "precision": "fp16",   # OpenVINO IR (fp16-compressed weights)
                      "bin": {"path": "model.bin", "bytes": ..., "sha256": ...},
                      "parity": {..., "inference_precision": "bf16" | "f32"}},
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

Reading rules (:func:`load_record`, :func:`validate_record`, :func:`resolve_artefact`):
malformed fields are refused with one line naming the field; an artefact path must
stay inside the export folder (no ``..``, no absolute path, no symlink leading out);
its ``sha256`` (and the ``bin`` file's, for OpenVINO) is checked before the file is
used, so a swapped file is refused instead of run under the original's name.

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
    "load_record",
    "validate_record",
    "resolve_artefact",
    "artefact_passed",
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
        try:
            record = json.load(handle)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    version = record.get("format_version") if isinstance(record, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: model.json format {version!r}; this bilalora reads format {FORMAT_VERSION}")
    validate_record(record, where=str(path))
    return record


def load_record(folder: str | os.PathLike, required: bool = False) -> Optional[dict[str, Any]]:
    """The model.json of an export folder, validated; None when there is none (and not ``required``).

    Every problem (unreadable, bad JSON, other format, malformed field) is one
    :class:`~bilalora.errors.UserError` line naming the file.
    """
    from bilalora.errors import UserError

    folder = Path(folder)
    path = folder if folder.name == SIDECAR_NAME and not folder.is_dir() else folder / SIDECAR_NAME
    if not path.is_file():
        if required:
            raise UserError(f"{path.parent}: no {SIDECAR_NAME} (not an export folder; run `bilalora export`)")
        return None
    try:
        return read_sidecar(path)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shape_ok(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 4 and all(_is_int(v) and v > 0 for v in value)


def validate_record(record: Any, where: str = SIDECAR_NAME) -> None:
    """Check the fields the runtime relies on; raise ValueError with one line naming the first bad one.

    Checked: ``input`` (an object; ``pad_multiple`` a positive integer; ``pad_mode``
    reflect/edge/replicate/constant), ``shapes`` (an object; ``fixed``/``min``/``opt``/``max``
    null or ``[N, C, H, W]`` positive integers), ``artefacts`` (an object of objects with
    string ``path``, ``sha256``, ``format``, ``precision``; ``parity`` null or an object),
    ``trt`` (null or an object) and ``input_norm`` (null or ``{"mean": [3], "std": [3]}``).
    Absent fields are allowed (older or minimal records); unknown fields are ignored.
    """
    def bad(field: str, value: Any, want: str) -> ValueError:
        shown = json.dumps(value)[:60] if _jsonable(value) else type(value).__name__
        return ValueError(f"{where}: field {field} is {shown}; expected {want}")

    if not isinstance(record, dict):
        raise bad("(top level)", record, "an object")
    spec = record.get("input", {})
    if not isinstance(spec, dict):
        raise bad("input", spec, "an object")
    if "pad_multiple" in spec and not (_is_int(spec["pad_multiple"]) and 1 <= spec["pad_multiple"] <= 1024):
        raise bad("input.pad_multiple", spec["pad_multiple"], "an integer from 1 to 1024")
    if "pad_mode" in spec and spec["pad_mode"] not in ("reflect", "edge", "replicate", "constant"):
        raise bad("input.pad_mode", spec["pad_mode"], "reflect, edge, replicate or constant")
    shapes = record.get("shapes", {})
    if shapes is not None and not isinstance(shapes, dict):
        raise bad("shapes", shapes, "an object")
    for key in ("fixed", "min", "opt", "max"):
        value = (shapes or {}).get(key)
        if value is not None and not _shape_ok(value):
            raise bad(f"shapes.{key}", value, "null or [N, C, H, W] positive integers")
    if "artefacts" in record:
        artefacts = record["artefacts"]
        if not isinstance(artefacts, dict):
            raise bad("artefacts", artefacts, "an object keyed by file name")
        for name, entry in artefacts.items():
            if not isinstance(entry, dict):
                raise bad(f"artefacts.{name}", entry, "an object")
            for key in ("path", "sha256", "format", "precision"):
                if key in entry and not isinstance(entry[key], str):
                    raise bad(f"artefacts.{name}.{key}", entry[key], "a string")
            if entry.get("parity") is not None and not isinstance(entry["parity"], dict):
                raise bad(f"artefacts.{name}.parity", entry["parity"], "null or an object")
            if "bin" in entry and not isinstance(entry["bin"], (str, dict)):
                raise bad(f"artefacts.{name}.bin", entry["bin"], "a file name or a {path, sha256} object")
    if record.get("trt") is not None and not isinstance(record["trt"], dict):
        raise bad("trt", record["trt"], "null or an object")
    norm = record.get("input_norm")
    if norm is not None:
        ok = isinstance(norm, dict) and all(
            isinstance(norm.get(k), list) and len(norm[k]) == 3 and all(isinstance(v, (int, float)) for v in norm[k])
            for k in ("mean", "std")
        )
        if not ok:
            raise bad("input_norm", norm, 'null or {"mean": [3 numbers], "std": [3 numbers]}')


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


#: (resolved path, size, mtime_ns) -> sha256, so that a process opening the same artefact twice hashes it once
_VERIFIED: dict[tuple[str, int, int], str] = {}


def _confined(folder: Path, relative: str, field: str) -> Path:
    from bilalora.errors import UserError

    if not relative or Path(relative).is_absolute() or relative.startswith(("/", "\\")) or ":" in relative[:3]:
        raise UserError(f"{folder / SIDECAR_NAME}: {field} {relative!r} is not a path inside the export folder; refused")
    root = folder.resolve()
    path = (folder / relative).resolve()
    if path != root and root not in path.parents:
        raise UserError(f"{folder / SIDECAR_NAME}: {field} {relative!r} leads outside the export folder; refused")
    return path


def _verify(path: Path, expected: Optional[str], label: str) -> None:
    from bilalora.errors import UserError

    if not expected:
        return
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    actual = _VERIFIED.get(key) or sha256_of(path)
    if actual.lower() != expected.lower():
        raise UserError(
            f"{label}: sha256 {actual[:12]}... differs from model.json's {expected[:12]}... (file changed or swapped "
            "since export); re-export, or pass --no-verify to run it anyway"
        )
    _VERIFIED[key] = actual


def resolve_artefact(
    folder: str | os.PathLike, record: Optional[Mapping[str, Any]], name: str, verify: bool = True
) -> Optional[Path]:
    """The file of artefact ``name`` of an export folder, confined to the folder and hash-checked.

    Args:
        folder: the export folder (holding model.json).
        record: its model.json record (None: no record; then ``folder/name`` is taken as is,
            unverified, when it exists).
        name: the artefact's key (its file name, e.g. "model.onnx", "model.xml").
        verify: compare the file's sha256 with the record's (and the OpenVINO ``bin``'s).

    Returns:
        the resolved path; None when the record marks the artefact removed (failed gate),
        when the record lists other artefacts but not this one, or when the file is absent.

    Raises:
        UserError: the recorded path is absolute or leads outside the folder, or a sha256 differs.
    """
    folder = Path(folder)
    artefacts = (record or {}).get("artefacts")
    if record is None or artefacts is None:
        path = folder / name
        return path if path.is_file() else None
    entry = artefacts.get(name)
    if entry is None or entry.get("removed"):
        return None
    path = _confined(folder, entry.get("path", name), f"artefacts.{name}.path")
    if not path.is_file():
        return None
    if verify:
        _verify(path, entry.get("sha256"), str(path))
    bin_entry = entry.get("bin")
    if bin_entry is not None:
        bin_path_text = bin_entry if isinstance(bin_entry, str) else bin_entry.get("path", "")
        bin_path = _confined(folder, bin_path_text, f"artefacts.{name}.bin")
        if not bin_path.is_file():
            from bilalora.errors import UserError

            raise UserError(f"{path}: its weights file {bin_path.name} is missing; re-export")
        if verify:
            expected = entry.get("bin_sha256") if isinstance(bin_entry, str) else bin_entry.get("sha256")
            _verify(bin_path, expected, str(bin_path))
    return path


def artefact_passed(record: Optional[Mapping[str, Any]], name: str) -> Optional[bool]:
    """Whether artefact ``name`` passed its parity gate: True, False, or None (not measured / no record)."""
    entry = ((record or {}).get("artefacts") or {}).get(name) or {}
    parity = entry.get("parity")
    if not isinstance(parity, dict) or "passed" not in parity:
        return None
    return bool(parity["passed"])


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
