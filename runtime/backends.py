"""Inference backends of the runtime: onnxruntime for ``.onnx``, TensorRT for ``.engine``. No torch.

Both take and return float32 ``(N, 3, H, W)`` arrays (RGB, [0, 1]) and say which
input heights and widths they accept (``fixed_hw`` for a static graph,
``max_hw`` for an engine's optimisation profile) so that :class:`~.dehazer.Dehazer`
can tile frames that do not fit.

The TensorRT backend is written against the documented TensorRT 10 Python API
(``Runtime.deserialize_cuda_engine``, ``IExecutionContext.set_input_shape``,
``set_tensor_address``, ``execute_async_v3``, ``ICudaEngine.get_tensor_profile_shape``)
and NVIDIA's ``cuda-python`` runtime bindings for device memory. It is UNVERIFIED
on real hardware here (no TensorRT, no GPU on the development machine); the tests
drive it with stand-in ``tensorrt`` and ``cudart`` modules that record the calls.
"""

from __future__ import annotations

import abc
import importlib
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from bilalora.errors import UserError

__all__ = [
    "DEFAULT_PROVIDERS",
    "TRT_INSTALL_HINT",
    "Backend",
    "OnnxBackend",
    "TensorRTBackend",
    "import_tensorrt",
    "import_cudart",
]

#: onnxruntime providers in order of preference; those not available are skipped.
DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
TRT_INSTALL_HINT = "pip install 'bilalora[trt]'"


class Backend(abc.ABC):
    """What the :class:`~.dehazer.Dehazer` needs from an inference engine.

    Attributes:
        name: "onnxruntime" or "tensorrt".
        path: the model file.
        device: where it runs, in words (provider list or GPU).
        fixed_hw: (H, W) a static graph requires, else None.
        max_hw: (H, W) the largest input accepted, else None (no limit).
        min_hw: (H, W) the smallest input accepted, else None.
        max_batch: largest N accepted (None: any).
    """

    name = "backend"
    path: Path
    device = ""
    fixed_hw: Optional[tuple[int, int]] = None
    max_hw: Optional[tuple[int, int]] = None
    min_hw: Optional[tuple[int, int]] = None
    max_batch: Optional[int] = None

    @abc.abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W) in [0, 1] -> float32 (N, 3, H, W) in [0, 1]."""

    def close(self) -> None:
        """Release device resources (idempotent)."""


def _static_dim(value: Any) -> Optional[int]:
    return int(value) if isinstance(value, (int, np.integer)) and int(value) > 0 else None


class OnnxBackend(Backend):
    """An ``.onnx`` graph in an onnxruntime session.

    Args:
        path: the ONNX file.
        providers: onnxruntime execution providers in order of preference (None:
            :data:`DEFAULT_PROVIDERS` that this onnxruntime has). Naming a provider
            this onnxruntime lacks is an error.
        threads: intra-op threads (0: onnxruntime's default).
    """

    name = "onnxruntime"

    def __init__(self, path: str | Path, providers: Optional[Sequence[str]] = None, threads: int = 0):
        import onnxruntime as ort

        self.path = Path(path)
        available = ort.get_available_providers()
        if providers:
            missing = [p for p in providers if p not in available]
            if missing:
                raise UserError(
                    f"--providers: this onnxruntime has no {', '.join(missing)} (available: {', '.join(available)})"
                )
            chosen = list(providers)
        else:
            chosen = [p for p in DEFAULT_PROVIDERS if p in available] or list(available)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=chosen)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{self.path}: onnxruntime cannot load it ({first})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise UserError(f"{self.path}: expected one image input, found {len(inputs)} inputs")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        shape = list(inputs[0].shape)
        if len(shape) != 4:
            raise UserError(f"{self.path}: input {self.input_name} has shape {shape}, expected (N, 3, H, W)")
        height, width = _static_dim(shape[2]), _static_dim(shape[3])
        self.fixed_hw = (height, width) if height and width else None
        self.max_batch = _static_dim(shape[0])
        self.device = ", ".join(self.session.get_providers())

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: batch})[0].astype(np.float32, copy=False)

    def close(self) -> None:
        self.session = None


# --------------------------------------------------------------------------- TensorRT


def import_tensorrt():
    """Import ``tensorrt`` lazily; its absence is a one-line :class:`UserError`."""
    try:
        return importlib.import_module("tensorrt")
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install (missing libnvinfer)
        reason = "is not installed" if isinstance(exc, ImportError) else f"cannot be imported ({type(exc).__name__})"
        raise UserError(
            f"a .engine needs TensorRT, which {reason}: run {TRT_INSTALL_HINT} on the CUDA machine, "
            "or run the model.onnx beside the engine"
        ) from None


def import_cudart():
    """NVIDIA's cuda-python runtime bindings (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise UserError(f"a .engine needs cuda-python for device memory: run {TRT_INSTALL_HINT} (it installs cuda-python)")


def _check(result: Any, what: str) -> Any:
    """Unpack a cuda-python call's ``(error, *values)`` tuple; raise on an error code."""
    values = result if isinstance(result, tuple) else (result,)
    error, rest = values[0], values[1:]
    if int(error) != 0:
        raise RuntimeError(f"CUDA {what} failed: {error}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


class TensorRTBackend(Backend):
    """A serialised TensorRT engine (UNVERIFIED on real hardware here, see the module docstring).

    Args:
        path: the ``.engine`` file.
        record: the export's model.json record; when given, an engine built by another
            TensorRT version or for another GPU is refused with the reason before loading.
        trt, cudart: modules to use instead of importing ``tensorrt`` and cuda-python (tests).
    """

    name = "tensorrt"

    def __init__(self, path: str | Path, record: Optional[dict] = None, trt=None, cudart=None):
        self.path = Path(path)
        self.trt = trt or import_tensorrt()
        self.cudart = cudart or import_cudart()
        self._buffers: dict[str, tuple[int, int]] = {}
        self.stream = None
        device = _check(self.cudart.cudaGetDevice(), "cudaGetDevice")
        props = _check(self.cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        gpu = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        capability = (int(props.major), int(props.minor))
        if record is not None and record.get("trt"):
            from bilalora.runtime.model_json import engine_mismatch

            problem = engine_mismatch(record, self.trt.__version__, capability)
            if problem:
                raise UserError(f"{self.path}: {problem}")
        logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise UserError(f"{self.path}: TensorRT {self.trt.__version__} cannot load it (built elsewhere?)")
        self.context = self.engine.create_execution_context()
        low, _, high = (tuple(int(v) for v in s) for s in self.engine.get_tensor_profile_shape("input", 0))
        self.min_hw, self.max_hw, self.max_batch = (low[2], low[3]), (high[2], high[3]), high[0]
        if low[2:] == high[2:]:
            self.fixed_hw = (high[2], high[3])
        self.stream = _check(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.device = f"{gpu} (sm_{capability[0]}{capability[1]}), TensorRT {self.trt.__version__}"

    def _buffer(self, name: str, nbytes: int) -> int:
        pointer, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if pointer:
                _check(self.cudart.cudaFree(pointer), "cudaFree")
            pointer = int(_check(self.cudart.cudaMalloc(nbytes), "cudaMalloc"))
            self._buffers[name] = (pointer, nbytes)
        return pointer

    def run(self, batch: np.ndarray) -> np.ndarray:
        cudart = self.cudart
        host_in = np.ascontiguousarray(batch, dtype=np.float32)
        if not self.context.set_input_shape("input", tuple(host_in.shape)):
            raise UserError(f"{self.path}: the engine does not take shape {tuple(host_in.shape)}")
        out_shape = tuple(int(v) for v in self.context.get_tensor_shape("output"))
        host_out = np.empty(out_shape, dtype=np.float32)
        device_in = self._buffer("input", host_in.nbytes)
        device_out = self._buffer("output", host_out.nbytes)
        to_device, to_host = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(
            cudart.cudaMemcpyAsync(device_in, host_in.ctypes.data, host_in.nbytes, to_device, self.stream),
            "copy to device",
        )
        self.context.set_tensor_address("input", device_in)
        self.context.set_tensor_address("output", device_out)
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError(f"TensorRT failed to run {self.path.name} on shape {tuple(host_in.shape)}")
        _check(
            cudart.cudaMemcpyAsync(host_out.ctypes.data, device_out, host_out.nbytes, to_host, self.stream),
            "copy to host",
        )
        _check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return host_out

    def close(self) -> None:
        for pointer, _ in self._buffers.values():
            _check(self.cudart.cudaFree(pointer), "cudaFree")
        self._buffers.clear()
        if self.stream is not None:
            _check(self.cudart.cudaStreamDestroy(self.stream), "cudaStreamDestroy")
            self.stream = None
