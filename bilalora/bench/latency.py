"""Latency of one forward pass per format: PyTorch, onnxruntime (fp32, fp16, int8), OpenVINO, TensorRT.

:data:`FORMATS` is the one table of what can be timed: each format names its
artefact in the export folder (model.json entry keyed by file name) and the
runtime backend that runs it. Each is timed on the same random ``(1, 3, H, W)``
input in [0, 1]: ``warmup`` untimed runs, then ``runs`` timed ones (CUDA work is
synchronised before the clock stops). Rows carry an Ultralytics-style status:
``OK``, ``skipped: why`` or ``failed: why``, so one missing backend never hides
the others. An artefact that failed its parity gate at export, or whose sha256
no longer matches model.json, is not timed (the row says why).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..errors import UserError

__all__ = ["Format", "FORMATS", "BACKENDS", "CUDA_ONLY", "default_formats", "Timing", "time_callable", "LatencyRow",
           "time_backend"]  # fmt: skip


@dataclass(frozen=True)
class Format:
    """A row kind of the latency table.

    Attributes:
        name: the ``--backends`` name and table label.
        artefact: file in the export folder (None: the PyTorch network itself).
        engine: "torch", "onnxruntime", "openvino" or "tensorrt".
        precision: what the row's numbers are computed in ("fp32", "fp16", "int8", "auto").
        hint: the export flag that writes the artefact.
    """

    name: str
    artefact: Optional[str]
    engine: str
    precision: str
    hint: str = ""


#: Formats in table order.
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("torch", None, "torch", "fp32"),
        Format("torch-fp16", None, "torch", "fp16"),
        Format("onnx", "model.onnx", "onnxruntime", "fp32", "bilalora export"),
        Format("onnx-fp16", "model_fp16.onnx", "onnxruntime", "fp16", "bilalora export --fp16"),
        Format("onnx-int8", "model_int8.onnx", "onnxruntime", "int8", "bilalora export --int8"),
        Format("openvino", "model.xml", "openvino", "auto", "bilalora export --openvino"),
        Format("openvino-int8", "model_int8.onnx", "openvino", "int8", "bilalora export --int8"),
        Format("tensorrt", "model.engine", "tensorrt", "auto", "bilalora export --trt"),
    )
}

#: Format name -> artefact file (None for PyTorch); kept for callers that only need the files.
BACKENDS = {name: f.artefact for name, f in FORMATS.items()}

#: Formats that only run on a CUDA device (left out of the default list elsewhere).
CUDA_ONLY = ("torch-fp16",)


def default_formats(device: str) -> list[str]:
    """The formats timed when ``--backends`` is not given: all, less the CUDA-only ones off CUDA."""
    return [name for name in FORMATS if device.startswith("cuda") or name not in CUDA_ONLY]


@dataclass
class Timing:
    """Milliseconds per call: mean, median, 90th percentile and minimum over ``runs`` calls."""

    mean: float
    p50: float
    p90: float
    min: float
    runs: int

    @property
    def fps(self) -> float:
        """Frames per second at the median latency."""
        return 1000.0 / self.p50 if self.p50 > 0 else float("inf")

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "p50": self.p50, "p90": self.p90, "min": self.min, "runs": self.runs,
                "fps": self.fps}  # fmt: skip


def time_callable(fn: Callable[[], Any], warmup: int = 3, runs: int = 20, sync: Optional[Callable[[], None]] = None
                  ) -> Timing:  # fmt: skip
    """Time ``fn()`` (``sync()`` after each call, e.g. ``torch.cuda.synchronize``)."""
    sync = sync or (lambda: None)
    for _ in range(max(0, warmup)):
        fn()
    sync()
    samples = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(1000.0 * (time.perf_counter() - start))
    values = np.asarray(samples)
    return Timing(float(values.mean()), float(np.percentile(values, 50)), float(np.percentile(values, 90)),
                  float(values.min()), len(samples))  # fmt: skip


@dataclass
class LatencyRow:
    """One line of the latency table."""

    subject: str
    backend: str
    status: str
    device: str = ""
    file: Optional[str] = None
    megabytes: Optional[float] = None
    parameters: Optional[int] = None
    gflops: Optional[float] = None
    timing: Optional[Timing] = None

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    def as_dict(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "backend": self.backend,
            "status": self.status,
            "device": self.device,
            "file": self.file,
            "megabytes": self.megabytes,
            "parameters": self.parameters,
            "gflops": self.gflops,
            "ms": self.timing.as_dict() if self.timing else None,
        }


def _torch_timing(model, size: tuple[int, int], device: str, warmup: int, runs: int, precision: str = "fp32"
                  ) -> tuple[Timing, str]:  # fmt: skip
    """Time ``model`` on a (1, 3, H, W) input; fp16 runs a half-precision copy (CUDA only), channels-last on CUDA."""
    import copy

    import torch

    from bilalora.devices import device_name

    cuda = device.startswith("cuda")
    if precision == "fp16":
        if not cuda:
            raise UserError("fp16 PyTorch is timed on CUDA only (use --device cuda)")
        model = copy.deepcopy(model).half()
    model = model.to(device).eval()
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed input shape: let cuDNN pick its kernels in the warm-up
        model = model.to(memory_format=torch.channels_last)
    dtype = torch.float16 if precision == "fp16" else torch.float32
    probe = torch.rand(1, 3, *size, device=device, dtype=dtype)
    if cuda:
        probe = probe.contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if cuda else None

    def forward():
        with torch.no_grad():
            model(probe)

    try:
        timing = time_callable(forward, warmup, runs, sync)
    finally:
        model.to("cpu", memory_format=torch.contiguous_format)
    layout = ", channels-last" if cuda else ""
    return timing, f"PyTorch {torch.__version__} on {device_name(device)} ({precision}{layout})"


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def _gate_failure(entry: Any) -> Optional[str]:
    """Why a model.json artefact entry must not be timed (removed, or its parity gate failed), else None."""
    if not isinstance(entry, dict):
        return "its model.json entry is not an object"
    parity = entry.get("parity")
    failed = entry.get("removed") or (isinstance(parity, dict) and parity.get("passed") is False)
    if not failed:
        return None
    psnr = parity.get("psnr_db") if isinstance(parity, dict) else None
    detail = f" ({psnr:.1f} dB)" if isinstance(psnr, (int, float)) else ""
    return f"failed its parity gate at export{detail}; not shipped"


def _open_engine(fmt: Format, path: Path, record: dict, providers: Optional[list[str]], threads: int):
    """The runtime backend that runs ``fmt``'s artefact at ``path``."""
    from bilalora.runtime import backends

    if fmt.engine == "tensorrt":
        return backends.TensorRTBackend(path, record=record)
    if fmt.engine == "openvino":
        from bilalora.runtime.ov_backend import OpenVinoBackend, cpu_has_bf16

        # int8 graphs keep OpenVINO's default; float IR runs in bf16 where the CPU computes it natively
        precision = None if fmt.precision == "int8" else ("bf16" if cpu_has_bf16() else "f32")
        return OpenVinoBackend(path, precision=precision, threads=threads)
    onnx_precision = fmt.precision if fmt.precision in ("fp16", "int8") else "fp32"  # the TensorRT provider's flags
    return backends.OnnxBackend(path, providers=providers, threads=threads, record=record, precision=onnx_precision)


def _artefact(subject, fmt: Format, row: "LatencyRow") -> Optional[tuple[Path, dict]]:
    """The verified artefact path and the export's record, or None with ``row.status`` saying why."""
    from bilalora.runtime.model_json import load_record, resolve_artefact

    if subject.export is None:
        hint = "bilalora export --base" if subject.role == "base" else "bilalora export --merge"
        row.status = f"skipped: no export (run `{hint}`)"
        return None
    try:
        record = load_record(subject.export, required=True)
    except UserError as exc:
        row.status = f"failed: {_first_line(exc)}"
        return None
    entries = record.get("artefacts") if isinstance(record.get("artefacts"), dict) else {}
    entry = entries.get(fmt.artefact)
    if entry is None:
        row.status = f"skipped: no {fmt.artefact} in {subject.export} (run `{fmt.hint}`)"
        return None
    reason = _gate_failure(entry)
    if reason:
        row.status = f"skipped: {fmt.artefact} {reason}"
        return None
    try:
        path = resolve_artefact(subject.export, record, fmt.artefact, verify=True)
    except UserError as exc:
        row.status = f"failed: {_first_line(exc)}"
        return None
    if path is None:
        row.status = f"skipped: model.json lists {fmt.artefact} but the file is gone (re-run `{fmt.hint}`)"
        return None
    return Path(path), record


def time_backend(
    subject,
    backend: str,
    size: tuple[int, int],
    device: str,
    warmup: int = 3,
    runs: int = 20,
    providers: Optional[list[str]] = None,
    cost: Optional[dict[str, Any]] = None,
    threads: int = 0,
) -> LatencyRow:
    """Time ``subject`` (a :class:`~.subjects.Subject`) in one format of :data:`FORMATS`.

    Args:
        backend: a :data:`FORMATS` name.
        size: (H, W) of the timed input; a multiple of the pad multiple (4).
        device: torch device for the PyTorch row.
        providers: onnxruntime providers (None: the runtime's default order).
        cost: ``{"parameters", "gflops"}`` of the network, copied into the row.
        threads: onnxruntime/OpenVINO threads (0: their default; PyTorch's are set by the caller).
    """
    fmt = FORMATS[backend]
    row = LatencyRow(subject.name, backend, "OK", parameters=(cost or {}).get("parameters"),
                     gflops=(cost or {}).get("gflops"))  # fmt: skip
    if fmt.artefact is None:
        if subject.model is None:
            row.status = "skipped: no PyTorch weights for this export"
            return row
        row.megabytes = round(sum(p.numel() * p.element_size() for p in subject.model.parameters()) / 2**20, 2)
        try:
            row.timing, row.device = _torch_timing(subject.model, size, device, warmup, runs, fmt.precision)
        except UserError as exc:
            row.status = f"skipped: {_first_line(exc)}"
        except Exception as exc:  # noqa: BLE001 - report and go on with the other backends
            row.status = f"failed: {type(exc).__name__}: {_first_line(exc, 120)}"
        return row
    found = _artefact(subject, fmt, row)
    if found is None:
        return row
    path, record = found
    row.file = str(path)
    row.megabytes = round(path.stat().st_size / 2**20, 2)
    weights = path.with_suffix(".bin")
    if path.suffix == ".xml" and weights.is_file():  # OpenVINO IR: the graph and its weights file
        row.megabytes = round((path.stat().st_size + weights.stat().st_size) / 2**20, 2)
    probe = np.random.default_rng(0).random((1, 3, *size), dtype=np.float32)
    engine = None
    try:
        engine = _open_engine(fmt, path, record, providers, threads)
        row.device = engine.device
        if engine.fixed_hw and tuple(engine.fixed_hw) != tuple(size):
            row.status = f"skipped: static {engine.fixed_hw[0]}x{engine.fixed_hw[1]} graph, not {size[0]}x{size[1]}"
        else:
            row.timing = time_callable(lambda: engine.run(probe), warmup, runs)
    except UserError as exc:  # a missing package or driver (TensorRT, OpenVINO): the row is skipped
        row.status = f"skipped: {_first_line(exc)}"
    except Exception as exc:  # noqa: BLE001 - onnxruntime/OpenVINO/CUDA errors: report, time the others
        row.status = f"failed: {type(exc).__name__}: {_first_line(exc)}"
    finally:
        if engine is not None:
            engine.close()
    return row
