"""The OpenVINO backend of the runtime: ``model.xml`` (OpenVINO IR) or an ``.onnx`` graph on the CPU. No torch.

On CPUs with bfloat16 units (Intel AMX or AVX512-BF16: OpenVINO lists ``"BF16"`` in the
CPU's ``OPTIMIZATION_CAPABILITIES``) the network runs in bf16 when asked
(``INFERENCE_PRECISION_HINT``); elsewhere in f32. The INT8 QDQ graph (``model_int8.onnx``)
is read directly by OpenVINO's ONNX front end and runs with its int8 kernels.

Takes and returns float32 ``(N, 3, H, W)`` RGB in [0, 1], like every :class:`~.backends.Backend`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import numpy as np

from bilalora.errors import UserError

from .backends import Backend, first_line

__all__ = ["OpenVinoBackend", "cpu_has_bf16", "import_openvino"]

OPENVINO_INSTALL_HINT = "pip install 'bilalora[openvino]'"


def import_openvino(purpose: str = "model.xml needs OpenVINO"):
    """Import ``openvino`` lazily; its absence is a one-line :class:`UserError` starting with ``purpose``."""
    try:
        import openvino
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken install
        raise UserError(f"{purpose} ({type(exc).__name__}): run {OPENVINO_INSTALL_HINT}") from None
    return openvino


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AMX or AVX512-BF16), as OpenVINO reports it."""
    try:
        core = import_openvino().Core()
        return "BF16" in list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # noqa: BLE001 - no OpenVINO, no CPU plugin: no bf16 here
        return False


def _static(dim) -> Optional[int]:
    return int(dim.get_length()) if dim.is_static and dim.get_length() > 0 else None


class OpenVinoBackend(Backend):
    """A model in OpenVINO on the CPU.

    Args:
        path: ``model.xml`` (its ``model.bin`` beside it) or an ``.onnx`` file.
        precision: "bf16" (only where :func:`cpu_has_bf16`) or "f32": the inference precision hint;
            None keeps OpenVINO's default (for INT8 graphs).
        threads: CPU threads (0: OpenVINO's default).
        device: OpenVINO device name ("CPU").
    """

    name = "openvino"

    def __init__(self, path: str | Path, precision: Optional[str] = "f32", threads: int = 0, device: str = "CPU"):
        ov = import_openvino()
        self.path = Path(path)
        if precision == "bf16" and not cpu_has_bf16():
            raise UserError(f"{self.path.name}: bf16 asked, but this CPU has no bf16 units (AMX or AVX512-BF16)")
        core = ov.Core()
        config: dict[str, str] = {"PERFORMANCE_HINT": "LATENCY"}
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(int(threads))
        try:
            model = core.read_model(str(self.path))
            if len(model.inputs) != 1 or len(model.outputs) < 1:
                raise UserError(f"{self.path}: expected one image input, found {len(model.inputs)} inputs")
            self.compiled = core.compile_model(model, device, config)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError with long texts
            raise UserError(f"{self.path}: OpenVINO cannot load it ({first_line(exc, 160)})") from None
        self.request = self.compiled.create_infer_request()
        shape = self.compiled.input(0).get_partial_shape()
        if shape.rank.is_static and shape.rank.get_length() != 4:
            raise UserError(f"{self.path}: input has rank {shape.rank.get_length()}, expected (N, 3, H, W)")
        height, width = _static(shape[2]), _static(shape[3])
        self.fixed_hw = (height, width) if height and width else None
        self.max_batch = _static(shape[0])
        self.precision = precision or "default"
        self.device = f"{device}, OpenVINO {ov.__version__.split('-')[0]}, {precision or 'default'} inference"

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        # infer() copies its outputs (share_outputs=False, the default): the arrays returned stay valid
        # after the next call, as tiles kept until they are blended need
        result = self.request.infer({0: batch})
        return np.asarray(result[self.compiled.output(0)], dtype=np.float32)

    def close(self) -> None:
        self.request = None
        self.compiled = None
