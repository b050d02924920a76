"""Which artefact of an export to run on this machine, in which backend, and what to fall back to. No torch.

    candidates, record = resolve_model("runs/adapt/exp/export", prefer="auto", precision="auto")
    # [Candidate(model.engine, tensorrt), Candidate(model.xml, openvino, bf16), Candidate(model.onnx, onnxruntime)]

The :class:`~.dehazer.Dehazer` opens the first candidate that loads and falls back along the
list when one fails to open or to run. The order is the expected speed on this machine,
among the artefacts that passed their parity gate in model.json (an artefact whose gate
failed is never run; one whose gate was not measured, e.g. an engine built without a GPU,
is tried):

* ``engine`` (TensorRT), with ``prefer`` auto or engine, when its precision fits ``precision``;
* OpenVINO ``model.xml`` in bf16, for ``auto`` and ``bf16``, only on CPUs with bf16 units
  (AMX or AVX512-BF16): in fp32, onnxruntime is as fast on the CPUs measured. ``auto`` takes
  it only when its parity gate ran in bf16 (model.json ``inference_precision``; an export
  made on a CPU without bf16 gated f32), ``bf16`` takes it with a note;
* for ``int8``: ``model_int8.onnx`` in OpenVINO (onnxruntime's CPU kernels run that QDQ
  graph slower than fp32; with onnxruntime's TensorRT provider it goes first instead);
* the ONNX graphs in onnxruntime: ``model.onnx`` (fp32), ``model_fp16.onnx`` first for fp16,
  ``model_int8.onnx`` first for int8.

Artefact paths come from :func:`~.model_json.resolve_artefact`: confined to the folder and
sha256-checked unless ``verify=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from bilalora.errors import UserError

from .model_json import artefact_passed, load_record, resolve_artefact

__all__ = ["PREFER", "PRECISIONS", "Candidate", "resolve_model"]

PREFER = ("auto", "engine", "onnx")
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
_ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


@dataclass(frozen=True)
class Candidate:
    """One way to run the model: ``path`` in ``backend`` ("tensorrt", "openvino", "onnxruntime") at ``precision``."""

    path: Path
    backend: str
    precision: str = "fp32"

    def label(self) -> str:
        return f"{self.path.name} ({self.backend}, {self.precision})"


def _onnx_precision(name: str) -> str:
    return "fp16" if "fp16" in name else "int8" if "int8" in name else "fp32"


def _usable(folder: Path, record: Optional[dict], name: str, verify: bool, notes: list[str]) -> Optional[Path]:
    entry = ((record or {}).get("artefacts") or {}).get(name) or {}
    path = resolve_artefact(folder, record, name, verify=verify)
    if entry.get("removed") or (path is not None and artefact_passed(record, name) is False):
        notes.append(f"skipped {name}: it failed its parity gate at export")
        return None
    return path


def _listed(record: Optional[dict], name: str) -> bool:
    return name in ((record or {}).get("artefacts") or {})


def resolve_model(
    model: str | Path,
    prefer: str = "auto",
    precision: str = "auto",
    verify: bool = True,
    providers: Optional[list[str]] = None,
    notes: Optional[list[str]] = None,
) -> tuple[list[Candidate], Optional[dict[str, Any]]]:
    """The candidates to try, in order, and the model.json record (None when there is none).

    Args:
        model: an export folder (with model.json), or a ``.onnx`` / ``.xml`` / ``.engine`` file.
        prefer: "auto" (engine, then the rest), "engine" (only engines) or "onnx" (no engine).
        precision: "auto", "fp32", "fp16", "bf16" or "int8" (see the module docstring).
        verify: check each artefact's sha256 against model.json.
        providers: onnxruntime providers asked for (decides where an INT8 graph runs first).
        notes: receives one line per artefact passed over and why.
    """
    from .ov_backend import cpu_has_bf16

    notes = notes if notes is not None else []
    if prefer not in PREFER:
        raise UserError(f"--prefer {prefer}: use one of {', '.join(PREFER)}")
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision}: use one of {', '.join(PRECISIONS)}")
    path = Path(model)
    if not path.exists():
        raise UserError(f"--model {path}: no such file or folder (an export folder, a .onnx or a .engine)")
    if path.is_file():
        return _single_file(path, prefer, verify, notes), load_record(path.parent)
    record = load_record(path)
    if record is not None and record.get("status") in ("failed", "partial"):
        notes.append(f"this export is {record['status']}: {record.get('error') or 'see model.json'}")
    engines: list[Candidate] = []
    openvino: list[Candidate] = []
    if prefer in ("auto", "engine"):
        engine = _usable(path, record, "model.engine", verify, notes)
        engine_precision = str(((record or {}).get("trt") or {}).get("precision", "fp16"))
        if engine is not None and precision in ("auto", engine_precision):
            engines.append(Candidate(engine, "tensorrt", engine_precision))
    if prefer == "engine":
        if not engines:
            raise UserError(f"--model {path}: no usable model.engine in this folder (run `bilalora export --trt`)")
        return engines, record
    graph_names = {
        "fp16": ["model_fp16.onnx", "model.onnx"],
        "int8": ["model_int8.onnx", "model.onnx"],
    }.get(precision, ["model.onnx", "model_fp16.onnx"])
    graphs = [Candidate(p, "onnxruntime", _onnx_precision(n)) for n in graph_names if (p := _usable(path, record, n, verify, notes))]
    if precision in ("auto", "bf16"):
        xml = _usable(path, record, "model.xml", verify, notes)
        gated = _gated_precision(record, "model.xml")
        if xml is not None and cpu_has_bf16() and precision == "auto" and gated not in ("bf16", None):
            notes.append(f"model.xml not chosen: its gate ran in {gated}, not bf16 (ask --precision bf16 to run it anyway)")
        elif xml is not None and cpu_has_bf16():
            if gated not in ("bf16", None):
                notes.append(f"model.xml runs in bf16 here; its parity gate ran in {gated} at export")
            openvino.append(Candidate(xml, "openvino", "bf16"))
        elif xml is not None and precision == "bf16":
            notes.append("skipped model.xml in bf16: this CPU has no bf16 units (AMX or AVX512-BF16); fp32 instead")
        elif precision == "bf16" and not _listed(record, "model.xml"):
            notes.append("no model.xml in this folder (`bilalora export --openvino`): bf16 needs it; fp32 instead")
    if precision == "int8":
        int8 = next((c for c in graphs if c.precision == "int8"), None)
        if int8 is None:
            if not _listed(record, "model_int8.onnx"):
                notes.append("no model_int8.onnx in this folder (`bilalora export --int8`); fp32 instead")
        elif "TensorrtExecutionProvider" not in (providers or []) and _has_openvino():
            openvino.append(Candidate(int8.path, "openvino", "int8"))
    if record is None and not graphs and not engines:
        graphs = [Candidate(p, "onnxruntime", _onnx_precision(p.name)) for p in sorted(path.glob("*.onnx"))]
        engines = [Candidate(p, "tensorrt", "unknown") for p in sorted(path.glob("*.engine"))] if prefer == "auto" else []
    order = engines + openvino + graphs
    if not order:
        raise UserError(f"--model {path}: no model.onnx or model.engine in this folder (run `bilalora export` to make one)")
    return order, record


def _gated_precision(record: Optional[dict], name: str) -> Optional[str]:
    """The inference precision the artefact's parity gate ran in ("bf16", "f32"), None when not recorded."""
    entry = ((record or {}).get("artefacts") or {}).get(name) or {}
    value = entry.get("inference_precision") or (entry.get("parity") or {}).get("inference_precision")
    return str(value) if value else None


def _has_openvino() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def _single_file(path: Path, prefer: str, verify: bool, notes: list[str]) -> list[Candidate]:
    """A file given directly; an engine falls back to the export's model.onnx beside it."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return [Candidate(path, "onnxruntime", _onnx_precision(path.name))]
    if suffix == ".xml":
        return [Candidate(path, "openvino", "fp32")]
    if suffix not in _ENGINE_SUFFIXES:
        raise UserError(f"--model {path}: not a .onnx, .xml or .engine file")
    candidates = [Candidate(path, "tensorrt", "unknown")]
    if prefer == "auto":
        record = load_record(path.parent)
        beside = _usable(path.parent, record, "model.onnx", verify, notes)
        if beside is not None:
            candidates.append(Candidate(beside, "onnxruntime", "fp32"))
    return candidates
