"""Parity gates: every exported artefact is run and compared with the PyTorch model it came from.

The reference is the PyTorch model in float32 on the CPU, wrapped like the
export (output clamped to [0, 1]). Inputs are *cases*: random batches at a few
sizes (multiples of 4, deliberately not square or powers of two) and, with
``--images``, real photos padded to a multiple of 4. Gates:

* fp32 ONNX: max |onnx - torch| <= :data:`FP32_MAX_ABS` (1e-4) on every case;
* fp16 ONNX: PSNR(onnx, torch fp32) >= :data:`FP16_MIN_PSNR` (40 dB) on every case;
* INT8 ONNX (calibrated QDQ): PSNR >= :data:`INT8_MIN_PSNR` (35 dB), on the
  calibration images and on held-out real images;
* OpenVINO (fp16-compressed weights, run in bf16 where the CPU has it):
  PSNR >= :data:`OPENVINO_MIN_PSNR` (40 dB);
* TensorRT engines: PSNR >= :data:`ENGINE_MIN_PSNR` (40 dB; TensorRT uses TF32
  for fp32 engines on Ampere and later, so a max-abs gate of 1e-4 would not hold);
  INT8 engines: 35 dB;
* merge: max |gated - merged| <= :data:`MERGE_MAX_ABS` (1e-5).

Every gate also fails a *degenerate* case, whatever the error: an output (or
reference) that is not finite, is constant, or has at least
:data:`SATURATED_FRACTION` of its values at exactly 0 or 1. Two saturated
outputs agree perfectly, so without this check a corrupted adapter (one
flipped exponent bit makes a weight 4.6e35 and every pixel 0 or 1) would pass
every error gate.

A failed gate raises :class:`ParityError`, a one-line :class:`UserError` naming
the artefact, the case and the error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from bilalora.errors import UserError

__all__ = [
    "FP32_MAX_ABS",
    "FP16_MIN_PSNR",
    "ENGINE_MIN_PSNR",
    "INT8_MIN_PSNR",
    "OPENVINO_MIN_PSNR",
    "MERGE_MAX_ABS",
    "degenerate",
    "ort_session",
    "DEFAULT_SIZES",
    "Case",
    "ParityError",
    "ParityResult",
    "random_cases",
    "image_cases",
    "compare",
    "psnr",
    "gate_for",
    "evaluate",
    "reference_outputs",
    "onnx_parity",
]

FP32_MAX_ABS = 1e-4
FP16_MIN_PSNR = 40.0
ENGINE_MIN_PSNR = 40.0
INT8_MIN_PSNR = 35.0
OPENVINO_MIN_PSNR = 40.0
MERGE_MAX_ABS = 1e-5
#: A case whose output has at least this fraction of values at exactly 0 or 1 is degenerate.
SATURATED_FRACTION = 0.98
#: A case whose output spans less than this (max - min) is degenerate (constant).
CONSTANT_RANGE = 1e-3

#: Default (H, W) of the random cases: small and odd-ish (multiples of 4, not of 8 or 32).
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((64, 96), (260, 348))


class ParityError(UserError):
    """An artefact's output differs from PyTorch by more than its gate allows."""


@dataclass
class Case:
    """One parity input.

    Attributes:
        label: "random" or the image file name.
        array: float32 (N, 3, H, W) RGB in [0, 1], H and W multiples of 4 (numpy, C-contiguous).
    """

    label: str
    array: np.ndarray

    @property
    def shape(self) -> list[int]:
        return [int(v) for v in self.array.shape]

    def describe(self) -> str:
        return f"{self.label} {'x'.join(str(v) for v in self.shape)}"


def random_cases(sizes: Sequence[tuple[int, int]], batches: Sequence[int], seed: int = 0) -> list[Case]:
    """Uniform random inputs in [0, 1]: one case per (size, batch) pair.

    Args:
        sizes: (H, W) pairs, multiples of 4.
        batches: batch size of each case (same length as ``sizes``).
    """
    rng = np.random.default_rng(seed)
    cases = []
    for (height, width), batch in zip(sizes, batches):
        array = rng.random((batch, 3, height, width), dtype=np.float32)
        cases.append(Case("random", np.ascontiguousarray(array)))
    return cases


def image_cases(
    folder: str | Path | Sequence[Path],
    count: int = 2,
    max_side: int = 512,
    fixed: Optional[tuple[int, int, int]] = None,
    multiple: int = 4,
) -> list[Case]:
    """Real photos from ``folder`` (or a list of image paths) as parity cases (first ``count`` decodable images).

    Each image is downsized so its longer side is at most ``max_side`` and
    reflect-padded (bottom/right) to a multiple of ``multiple``; with ``fixed``
    = (N, H, W) it is resized to H x W and repeated N times instead.
    """
    import cv2
    import torch

    from bilalora.images import ImageDecodeError, list_images, load_image
    from bilalora.padding import pad_to_multiple

    loaded = []
    paths = list_images(folder) if isinstance(folder, (str, Path)) else [Path(p) for p in folder]
    for path in paths:  # decode only the first ``count`` readable images of a large folder
        try:
            image = load_image(path)  # float32 (H, W, 3) RGB in [0, 1]
        except ImageDecodeError:
            continue
        height, width = image.shape[:2]
        if max(height, width) > max_side:
            scale = max_side / max(height, width)
            size = (max(4, round(width * scale)), max(4, round(height * scale)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        loaded.append((path, np.ascontiguousarray(image, dtype=np.float32)))
        if len(loaded) == count:
            break
    if not loaded:
        raise UserError(f"no decodable images in {folder} (--images)")
    cases = []
    for path, image in loaded:
        if fixed is not None:
            batch, height, width = fixed
            resized = cv2.resize(np.asarray(image), (width, height), interpolation=cv2.INTER_AREA)
            array = np.repeat(resized.transpose(2, 0, 1)[None], batch, axis=0)
        else:
            tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
            array = pad_to_multiple(tensor, multiple)[0].numpy()
        cases.append(Case(path.name, np.ascontiguousarray(array, dtype=np.float32)))
    return cases


def psnr(output: np.ndarray, reference: np.ndarray, peak: float = 1.0) -> float:
    """PSNR in dB of ``output`` against ``reference`` (inf when identical)."""
    mse = float(np.mean((output.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def compare(output: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """{max_abs, mean_abs, psnr_db} of ``output`` against ``reference`` (same shape)."""
    if tuple(output.shape) != tuple(reference.shape):
        raise ValueError(f"output shape {tuple(output.shape)} != reference shape {tuple(reference.shape)}")
    diff = np.abs(output.astype(np.float64) - reference.astype(np.float64))
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "psnr_db": psnr(output, reference)}


def gate_for(kind: str, precision: str) -> dict[str, float]:
    """The gate of an artefact: {"max_abs": x} or {"psnr_db": y}.

    Args:
        kind: "onnx", "engine", "openvino" or "merge".
        precision: "fp32", "fp16", "bf16" or "int8".
    """
    if kind == "merge":
        return {"max_abs": MERGE_MAX_ABS}
    if precision == "int8":
        return {"psnr_db": INT8_MIN_PSNR}
    if kind == "engine":
        return {"psnr_db": ENGINE_MIN_PSNR}
    if kind == "openvino":
        return {"psnr_db": OPENVINO_MIN_PSNR}
    return {"max_abs": FP32_MAX_ABS} if precision == "fp32" else {"psnr_db": FP16_MIN_PSNR}


def degenerate(array: np.ndarray) -> Optional[str]:
    """Why an output in [0, 1] is degenerate ("not finite", "constant", "saturated"), or None.

    Args:
        array: float (N, 3, H, W) output of a network (clamped to [0, 1] by the export wrapper).
    """
    values = np.asarray(array, dtype=np.float64)
    if values.size == 0:
        return "empty"
    if not np.isfinite(values).all():
        return "not finite"
    if float(values.max() - values.min()) < CONSTANT_RANGE:
        return "constant"
    if float(np.mean((values <= 0.0) | (values >= 1.0))) >= SATURATED_FRACTION:
        return "saturated (all 0 or 1)"
    return None


def _passes(numbers: dict[str, Any], gate: dict[str, float]) -> bool:
    if numbers.get("degenerate"):
        return False
    if "max_abs" in gate and not numbers["max_abs"] <= gate["max_abs"]:
        return False
    return not ("psnr_db" in gate and not numbers["psnr_db"] >= gate["psnr_db"])


@dataclass
class ParityResult:
    """Parity of one artefact over all cases.

    Attributes:
        artefact: file name (``model.onnx``) or "merge".
        precision: "fp32" or "fp16".
        reference: what the outputs were compared with.
        gate: {"max_abs": x} or {"psnr_db": y}.
        cases: per case {input, shape, max_abs, mean_abs, psnr_db, passed}.
        details: further fields of the record (OpenVINO: {"inference_precision": "bf16"}).
    """

    artefact: str
    precision: str
    reference: str
    gate: dict[str, float]
    cases: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(case["passed"] for case in self.cases)

    @property
    def max_abs(self) -> float:
        return max((case["max_abs"] for case in self.cases), default=0.0)

    @property
    def mean_abs(self) -> float:
        return float(np.mean([case["mean_abs"] for case in self.cases])) if self.cases else 0.0

    @property
    def psnr_db(self) -> float:
        """The worst (lowest) PSNR over the cases."""
        return min((case["psnr_db"] for case in self.cases), default=math.inf)

    def as_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "gate": dict(self.gate),
            "passed": self.passed,
            "max_abs": self.max_abs,
            "mean_abs": self.mean_abs,
            "psnr_db": self.psnr_db,
            "cases": [dict(case) for case in self.cases],
            **self.details,
        }

    def summary(self) -> str:
        """One line: the worst numbers against the gate, and the cases."""
        gate = f"<= {self.gate['max_abs']:.0e}" if "max_abs" in self.gate else f"PSNR >= {self.gate['psnr_db']:g} dB"
        shapes = ", ".join(f"{c['input']} {'x'.join(map(str, c['shape']))}" for c in self.cases)
        worst_psnr = "inf" if math.isinf(self.psnr_db) else f"{self.psnr_db:.1f}"
        return f"max abs {self.max_abs:.2e}, PSNR {worst_psnr} dB (gate {gate}; {shapes})"

    def check(self) -> "ParityResult":
        """Raise :class:`ParityError` naming the artefact and the first failing case, else return self."""
        for case in self.cases:
            if not case["passed"]:
                shape = "x".join(map(str, case["shape"]))
                if case.get("degenerate"):
                    what = f"degenerate output: {case['degenerate']} (a corrupted adapter or weights?)"
                elif "max_abs" in self.gate:
                    what = f"max abs error {case['max_abs']:.3e} > {self.gate['max_abs']:.0e}"
                else:
                    what = f"PSNR {case['psnr_db']:.2f} dB < {self.gate['psnr_db']:g} dB"
                raise ParityError(
                    f"parity gate failed for {self.artefact} ({self.precision}): {what} against {self.reference} "
                    f"on {case['input']} {shape}"
                )
        return self


def evaluate(
    artefact: str,
    precision: str,
    cases: Sequence[Case],
    outputs: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    gate: dict[str, float],
    reference: str = "PyTorch fp32",
) -> ParityResult:
    """Compare ``outputs[i]`` with ``references[i]`` for every case under ``gate``.

    A case fails when either side is :func:`degenerate`, whatever the error.
    """
    result = ParityResult(artefact, precision, reference, dict(gate))
    for case, output, expected in zip(cases, outputs, references):
        numbers: dict[str, Any] = compare(np.asarray(output), np.asarray(expected))
        bad = degenerate(expected) or degenerate(output)
        if bad:
            side = "reference" if degenerate(expected) else "output"
            numbers["degenerate"] = f"{side} {bad}"
        result.cases.append({"input": case.label, "shape": case.shape, **numbers, "passed": _passes(numbers, gate)})
    return result


def reference_outputs(model, cases: Sequence[Case]) -> list[np.ndarray]:
    """Run the (export-wrapped) PyTorch ``model`` on every case on the CPU in float32; numpy outputs."""
    import torch

    outputs = []
    with torch.no_grad():
        for case in cases:
            outputs.append(model(torch.from_numpy(case.array)).float().numpy())
    return outputs


def _torch_threads() -> int:
    """The CPU threads torch is set to use (the parity check uses as many for onnxruntime); 0: ORT's default."""
    try:
        import torch

        return int(torch.get_num_threads())
    except ImportError:  # pragma: no cover - the export side always has torch
        return 0


def ort_session(path: str | Path, threads: Optional[int] = None):
    """An onnxruntime CPU session for ``path`` (quiet, no spinning; ``threads`` None: as many as torch uses)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = _torch_threads() if threads is None else int(threads)
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_parity(
    path: str | Path,
    precision: str,
    cases: Sequence[Case],
    references: Sequence[np.ndarray],
) -> ParityResult:
    """Run the ONNX file with onnxruntime (CPU provider) on every case and gate it.

    CPU onnxruntime runs fp16 graphs too (nodes without an fp16 kernel get casts
    inserted around them), so the fp16 gate measures fp16 storage of weights and
    activations between nodes; INT8 (QDQ) graphs run with onnxruntime's reference
    quantised kernels, which define the QDQ semantics TensorRT and OpenVINO follow.
    """
    path = Path(path)
    try:
        session = ort_session(path)
        outputs = [session.run(["output"], {"input": case.array})[0] for case in cases]
    except Exception as exc:  # noqa: BLE001 - any runtime failure stops the export with one line
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ParityError(f"onnxruntime could not run {path.name}: {message}") from None
    return evaluate(path.name, precision, cases, outputs, references, gate_for("onnx", precision))
