"""Inference backends of the runtime: onnxruntime for ``.onnx``, TensorRT for ``.engine``. No torch.

(OpenVINO, for ``model.xml`` and INT8 graphs on CPUs, is in :mod:`.ov_backend`.)

Both take and return float32 ``(N, 3, H, W)`` arrays (RGB, [0, 1]) and say which
input heights and widths they accept (``fixed_hw`` for a static graph,
``max_hw`` for an engine's optimisation profile) so that :class:`~.dehazer.Dehazer`
can tile frames that do not fit.

The TensorRT backend is written against the documented TensorRT 10 Python API
(``Runtime.deserialize_cuda_engine``, ``IExecutionContext.set_input_shape``,
``set_tensor_address``, ``execute_async_v3``, ``ICudaEngine.get_tensor_profile_shape``)
and NVIDIA's ``cuda-python`` runtime bindings for device memory and page-locked host
buffers (``cudaMallocHost``, so that the copies can run asynchronously). Before running,
it checks the engine's I/O tensors (exactly one input ``input`` and one output ``output``,
both FP32): an engine built elsewhere with other names or fp16 I/O is refused instead of
fed wrongly. :meth:`TensorRTBackend.close` frees buffers, the stream, the context, the
engine and the runtime explicitly, in that order. It is UNVERIFIED
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

from .providers import DEFAULT_PROVIDERS, session_providers

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
        fixed_batch: the N a static graph or engine requires (None: any N up to max_batch).
        precision: what it computes in ("fp32", "fp16", "bf16", "int8" or "default").
    """

    name = "backend"
    path: Path
    device = ""
    fixed_hw: Optional[tuple[int, int]] = None
    max_hw: Optional[tuple[int, int]] = None
    min_hw: Optional[tuple[int, int]] = None
    max_batch: Optional[int] = None
    fixed_batch: Optional[int] = None
    precision = "fp32"

    @abc.abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W) in [0, 1] -> float32 (N, 3, H, W) in [0, 1]."""

    def close(self) -> None:
        """Release device resources (idempotent)."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when empty), at most ``limit`` characters."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


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
        record: the export's model.json record: the TensorRT provider's profile shapes come from it.
        precision: "fp32", "fp16" or "int8": what the graph computes in; turns on the TensorRT
            provider's fp16 or int8 mode.
    """

    name = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        providers: Optional[Sequence[str]] = None,
        threads: int = 0,
        record: Optional[dict] = None,
        precision: str = "fp32",
    ):
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
            specs = session_providers(chosen, record, precision, int8=precision == "int8")
            self.session = ort.InferenceSession(str(self.path), options, providers=specs)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise UserError(f"{self.path}: onnxruntime cannot load it ({first_line(exc)})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise UserError(f"{self.path}: expected one image input, found {len(inputs)} inputs")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        if inputs[0].type != "tensor(float)" or outputs[0].type != "tensor(float)":
            raise UserError(
                f"{self.path}: input {inputs[0].type} -> output {outputs[0].type}; bilalora graphs take float32 -> float32"
            )
        shape = list(inputs[0].shape)
        if len(shape) != 4:
            raise UserError(f"{self.path}: input {self.input_name} has shape {shape}, expected (N, 3, H, W)")
        height, width = _static_dim(shape[2]), _static_dim(shape[3])
        self.fixed_hw = (height, width) if height and width else None
        self.max_batch = self.fixed_batch = _static_dim(shape[0])
        self.precision = precision
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


class _HostBuffer:
    """A host array for engine copies: page-locked (``cudaMallocHost``) when cuda-python offers it, else numpy."""

    def __init__(self, cudart, shape: tuple[int, ...]):
        import ctypes

        self.cudart, self.pointer = cudart, 0
        nbytes = int(np.prod(shape)) * 4
        allocate = getattr(cudart, "cudaMallocHost", None)
        try:
            self.pointer = int(_check(allocate(nbytes), "cudaMallocHost")) if allocate is not None else 0
        except RuntimeError:  # page-locked memory is scarce on small devices: pageable still works
            self.pointer = 0
        if self.pointer:
            raw = (ctypes.c_uint8 * nbytes).from_address(self.pointer)
            self.array = np.frombuffer(raw, dtype=np.float32).reshape(shape)
        else:
            self.array = np.empty(shape, dtype=np.float32)
        self.pinned = bool(self.pointer)

    def free(self) -> None:
        if self.pointer:
            self.array = None
            _check(self.cudart.cudaFreeHost(self.pointer), "cudaFreeHost")
            self.pointer = 0


def _check_io(engine, trt, path: Path) -> None:
    """Refuse an engine whose I/O is not exactly FP32 ``input`` -> FP32 ``output`` (TensorRT 10 tensor API)."""
    found = []
    for index in range(int(engine.num_io_tensors)):
        name = engine.get_tensor_name(index)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        found.append((name, mode, engine.get_tensor_dtype(name)))
    expected = [("input", "input", trt.DataType.FLOAT), ("output", "output", trt.DataType.FLOAT)]
    if sorted(found, key=lambda t: t[1]) != expected:
        shown = ", ".join(f"{mode} {name} ({dtype})" for name, mode, dtype in found)
        raise UserError(
            f"{path.name}: foreign engine I/O [{shown}]; bilalora engines take FP32 input -> FP32 output"
        )


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
        self._host: dict[str, _HostBuffer] = {}
        self.stream = self.context = self.engine = self.runtime = None
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
        _check_io(self.engine, self.trt, self.path)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise UserError(f"{self.path}: TensorRT cannot create an execution context (out of GPU memory?)")
        low, _, high = (tuple(int(v) for v in s) for s in self.engine.get_tensor_profile_shape("input", 0))
        self.min_hw, self.max_hw, self.max_batch = (low[2], low[3]), (high[2], high[3]), high[0]
        if low[2:] == high[2:]:
            self.fixed_hw = (high[2], high[3])
        if low[0] == high[0]:
            self.fixed_batch = high[0]
        self.precision = str(((record or {}).get("trt") or {}).get("precision", "fp32"))
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

    def _host_buffer(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        buffer = self._host.get(name)
        if buffer is None or buffer.array.shape != tuple(shape):
            if buffer is not None:
                buffer.free()
            buffer = self._host[name] = _HostBuffer(self.cudart, tuple(shape))
        return buffer.array

    def run(self, batch: np.ndarray) -> np.ndarray:
        cudart = self.cudart
        host_in = self._host_buffer("input", tuple(batch.shape))
        host_in[...] = batch
        if not self.context.set_input_shape("input", tuple(host_in.shape)):
            raise UserError(f"{self.path}: the engine does not take shape {tuple(host_in.shape)}")
        out_shape = tuple(int(v) for v in self.context.get_tensor_shape("output"))
        host_out = self._host_buffer("output", out_shape)
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
        return host_out.copy()  # the pinned buffer is reused by the next call

    def close(self) -> None:
        """Free device and pinned host buffers, the stream, then the context, engine and runtime (idempotent).

        Best effort: after a sticky CUDA error every call fails, so failures are kept in
        ``close_errors`` instead of raised, and every reference is dropped regardless.
        """
        self.close_errors: list[str] = []

        def attempt(action, *args) -> None:
            try:
                action(*args)
            except Exception as exc:  # noqa: BLE001 - see the docstring
                self.close_errors.append(str(exc))

        for pointer, _ in self._buffers.values():
            attempt(lambda p: _check(self.cudart.cudaFree(p), "cudaFree"), pointer)
        self._buffers.clear()
        for buffer in self._host.values():
            attempt(buffer.free)
        self._host.clear()
        if self.stream is not None:
            attempt(lambda: _check(self.cudart.cudaStreamDestroy(self.stream), "cudaStreamDestroy"))
            self.stream = None
        # TensorRT 10 objects are released when their last Python reference goes: drop them
        # in dependency order rather than leaving it to the garbage collector
        self.context = None
        self.engine = None
        self.runtime = None
