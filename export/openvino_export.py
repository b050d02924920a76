"""OpenVINO IR from the exported ONNX graph (``--openvino``): ``model.xml`` + ``model.bin``.

    xml = export_openvino(Path("export/model.onnx"), Path("export/model.xml"))
    result = openvino_parity(xml, cases, references)      # PSNR >= 40 dB, run in bf16 where the CPU has it

The IR comes from OpenVINO's own converter (``openvino.convert_model`` on
``model.onnx``, so the graph, its names and its dynamic N/H/W are the ONNX
graph's) saved with fp16-compressed weights (``openvino.save_model(...,
compress_to_fp16=True)``: half the file; the CPU plugin decompresses them at
load time). The inference precision is a property of the device, not of the
file: :func:`inference_config` asks the CPU plugin for bf16
(``INFERENCE_PRECISION_HINT``) where it reports the ``BF16`` optimisation
capability (AVX512-BF16 or AMX), and f32 elsewhere. The parity gate runs the
IR exactly that way on this machine, and records the precision it ran in.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from bilalora.errors import UserError
from bilalora.runtime.ov_backend import OPENVINO_INSTALL_HINT
from bilalora.runtime.ov_backend import import_openvino as _import_openvino

from .parity import Case, ParityError, ParityResult, evaluate, gate_for

__all__ = ["import_openvino", "export_openvino", "inference_config", "openvino_parity", "OPENVINO_HINT"]

OPENVINO_HINT = OPENVINO_INSTALL_HINT


def import_openvino():
    """``import openvino``; a one-line :class:`UserError` with the install command when it is missing."""
    return _import_openvino("--openvino: OpenVINO cannot be imported")


def export_openvino(onnx_path: Path, xml_path: Path) -> float:
    """Convert ``onnx_path`` to ``xml_path`` (and the ``.bin`` beside it, fp16 weights); returns seconds.

    Raises:
        UserError: OpenVINO missing, or its converter refused the graph (one line).
    """
    ov = import_openvino()
    start = time.perf_counter()
    try:
        model = ov.convert_model(str(onnx_path))
        ov.save_model(model, str(xml_path), compress_to_fp16=True)
    except Exception as exc:  # noqa: BLE001 - converter errors become one line
        raise UserError(f"OpenVINO {ov.get_version()} could not convert {onnx_path.name}: {_first_line(exc)}") from None
    return time.perf_counter() - start


def inference_config(core, precision: Optional[str] = None, threads: int = 0) -> tuple[dict[str, Any], str]:
    """CPU plugin properties and the precision they give: bf16 where the CPU reports BF16, else f32.

    Args:
        core: an ``openvino.Core``.
        precision: "bf16", "f32" or None (bf16 when available).
        threads: ``INFERENCE_NUM_THREADS`` (0: the plugin's default).
    """
    capabilities = [str(c).upper() for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    if precision is None:
        precision = "bf16" if "BF16" in capabilities else "f32"
    if precision == "bf16" and "BF16" not in capabilities:
        raise UserError("this CPU has no bf16 support (OpenVINO reports no BF16 capability); use f32")
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config, precision


def openvino_parity(
    xml_path: Path,
    cases: Sequence[Case],
    references: Sequence[np.ndarray],
    precision: Optional[str] = None,
    threads: int = 0,
) -> ParityResult:
    """Run the IR on the CPU (bf16 where available) on every case and gate it (PSNR >= 40 dB).

    The result's ``precision`` is the inference precision it ran in ("bf16" or "f32").
    """
    ov = import_openvino()
    core = ov.Core()
    config, used = inference_config(core, precision, threads)
    try:
        compiled = core.compile_model(str(xml_path), "CPU", config)
        output = compiled.output(0)
        outputs = [np.asarray(compiled({"input": case.array})[output], dtype=np.float32) for case in cases]
    except Exception as exc:  # noqa: BLE001 - any runtime failure stops the export with one line
        raise ParityError(f"OpenVINO could not run {xml_path.name}: {_first_line(exc)}") from None
    gate = gate_for("openvino", used)
    result = evaluate(xml_path.name, used, cases, outputs, references, gate, f"PyTorch fp32 (OpenVINO CPU in {used})")
    result.details["inference_precision"] = used
    return result


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
