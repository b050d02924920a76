"""Latency of one forward pass per backend: PyTorch, onnxruntime (fp32, fp16 graphs), TensorRT.

Each backend is timed on the same random ``(1, 3, H, W)`` input: ``warmup``
untimed runs, then ``runs`` timed ones (CUDA work is synchronised before the
clock stops). Rows carry an Ultralytics-style status: ``OK``, ``skipped: why``
or ``failed: why``, so one missing backend never hides the others.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

__all__ = ["BACKENDS", "Timing", "time_callable", "LatencyRow", "time_backend"]

#: Backends in table order: (name, artefact in the export folder or None for PyTorch).
BACKENDS = {
    "torch": None,
    "onnx": "model.onnx",
    "onnx-fp16": "model_fp16.onnx",
    "tensorrt": "model.engine",
}


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


def _torch_timing(model, size: tuple[int, int], device: str, warmup: int, runs: int) -> tuple[Timing, str]:
    import torch

    model = model.to(device).eval()
    probe = torch.rand(1, 3, *size, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None

    def forward():
        with torch.no_grad():
            model(probe)

    timing = time_callable(forward, warmup, runs, sync)
    model.to("cpu")
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = f"CPU, {torch.get_num_threads()} thread(s)"
    return timing, f"PyTorch {torch.__version__} on {name}"


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
    """Time ``subject`` (a :class:`~.subjects.Subject`) on one backend of :data:`BACKENDS`.

    Args:
        size: (H, W) of the timed input; a multiple of the pad multiple (4).
        device: torch device for the PyTorch backend.
        providers: onnxruntime providers (None: the runtime's default order).
        cost: ``{"parameters", "gflops"}`` of the network, copied into the row.
        threads: onnxruntime intra-op threads (0: its default; PyTorch's are set by the caller).
    """
    from bilalora.runtime.backends import OnnxBackend, TensorRTBackend

    row = LatencyRow(subject.name, backend, "OK", parameters=(cost or {}).get("parameters"),
                     gflops=(cost or {}).get("gflops"))  # fmt: skip
    artefact = BACKENDS[backend]
    if artefact is None:
        if subject.model is None:
            row.status = "skipped: no PyTorch weights for this export"
            return row
        row.megabytes = round(sum(p.numel() * p.element_size() for p in subject.model.parameters()) / 2**20, 2)
        try:
            row.timing, row.device = _torch_timing(subject.model, size, device, warmup, runs)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other backends
            row.status = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        return row
    if subject.export is None:
        hint = "bilalora export --base" if subject.role == "base" else "bilalora export --merge"
        row.status = f"skipped: no export (run `{hint}`)"
        return row
    path = Path(subject.export) / artefact
    if not path.is_file():
        row.status = f"skipped: no {artefact} in {subject.export}"
        return row
    row.file = str(path)
    row.megabytes = round(path.stat().st_size / 2**20, 2)
    probe = np.random.default_rng(0).random((1, 3, *size), dtype=np.float32)
    engine = None
    try:
        if backend == "tensorrt":
            from bilalora.runtime.model_json import read_sidecar

            engine = TensorRTBackend(path, record=read_sidecar(subject.export))
        else:
            engine = OnnxBackend(path, providers=providers, threads=threads)
        row.device = engine.device
        if engine.fixed_hw and tuple(engine.fixed_hw) != tuple(size):
            row.status = f"skipped: static {engine.fixed_hw[0]}x{engine.fixed_hw[1]} graph, not {size[0]}x{size[1]}"
        else:
            row.timing = time_callable(lambda: engine.run(probe), warmup, runs)
    except Exception as exc:  # noqa: BLE001 - UserError (TensorRT missing), onnxruntime errors
        message = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        row.status = f"skipped: {message}" if type(exc).__name__ == "UserError" else f"failed: {message}"
    finally:
        if engine is not None:
            engine.close()
    return row
