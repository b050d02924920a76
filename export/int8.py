"""Calibrated INT8 (``--int8``): a QDQ ``model_int8.onnx`` that TensorRT builds INT8 engines from and OpenVINO runs.

    calib, held_out, origin = calibration_split(calib=None, run=Path("runs/adapt/exp"), count=16)
    result = quantize_int8(Path("model.onnx"), Path("model_int8.onnx"), calib_cases, check_cases, references)

How the file is made (onnxruntime's static quantisation):

1. ``quant_pre_process`` on ``model.onnx`` (shape inference and graph
   optimisation; onnxruntime's symbolic shape inference fails on this graph's
   dynamic Pad/Reshape, so it is skipped).
2. ``quantize_static`` in QDQ format on the convolutions (Conv and
   ConvTranspose: inputs and weights; element-wise ops, attention products and
   the residual stream stay float): weights int8 per output channel,
   activations int8, both symmetric (zero point 0, which TensorRT requires for
   its explicit-quantisation INT8 engines). Activation ranges are the
   99.999th percentile of each tensor's values over the calibration crops
   (:data:`CALIB_CROP` square crops of the real photos, downsized to at most
   512 px). Measured once on the shipped dea-net-s (6 real photos at 320 px,
   convolutions quantised): MinMax ranges gave 21.8-38.1 dB per image against
   fp32, percentile ranges 28.2-40.5 dB (better on 5 of 6).
   TensorRT and OpenVINO read the Q/DQ pairs and fuse them into their own int8
   kernels; onnxruntime runs them with its reference kernels.
3. Parts of the network are kept in float when quantising them costs too much
   accuracy. :data:`KEEP_FLOAT_LADDER` lists the sets tried, smallest first
   (nothing; the first and last convolutions; plus the convolutions of the
   attention and fusion sub-blocks); the first set whose graph passes the gate
   (PSNR >= 35 dB against the fp32 PyTorch output on every calibration *and*
   held-out image) is kept, and model.json lists it with every attempt's PSNR.
   (The sigmoid gates and their products are never quantised: only
   convolutions are.) Measured on the shipped dea-net-s with 16 real_day
   calibration photos (``benchmarks/openvino_int8.py``): the worst image reached
   27.6, 29.2 and 29.9 dB on the three sets (MinMax ranges: 16.5 dB), so
   ``--int8`` refuses that network; per-image PSNR ranged up to 40 dB.

Held-out images are the adapted run's validation/test images (``split.json``),
else the ``--images`` folder, else the calibration folder's images after the
first ``count``; with none the gate says so and runs on calibration images only.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from bilalora.errors import UserError

from .parity import Case, ParityResult, evaluate, gate_for, ort_session

__all__ = [
    "KEEP_FLOAT_LADDER",
    "Int8Result",
    "calibration_split",
    "calibration_crops",
    "keep_float_nodes",
    "quantize_once",
    "quantize_int8",
]

#: Sets of graph parts kept in float, tried in order until the INT8 gate passes.
KEEP_FLOAT_LADDER: tuple[tuple[str, ...], ...] = (
    (),
    ("first_conv", "last_conv"),
    ("first_conv", "last_conv", "attention"),
)

#: Side of the square calibration crops (percentile calibration needs equally sized inputs).
CALIB_CROP = 256

#: Percentile of |activation| used as the int8 range.
CALIB_PERCENTILE = 99.999

#: Operators whose inputs and weights are quantised.
QUANTIZED_OPS = ("Conv", "ConvTranspose")

#: Node-name patterns of the attention and fusion sub-blocks (DEA-Net's CGA ``pa``/``ca``/``sa`` and ``mix``).
_ATTENTION = re.compile(r"/(pa|ca|sa|mix\d*)/")


@dataclass
class Int8Result:
    """What :func:`quantize_int8` wrote.

    Attributes:
        path: model_int8.onnx.
        parity: its parity on calibration and held-out images (the kept attempt).
        kept_float: the graph parts kept in float (names from :data:`KEEP_FLOAT_LADDER`).
        float_nodes: names of the nodes excluded from quantisation.
        attempts: [{"kept_float": [...], "psnr_db": worst, "passed": bool, "seconds": s}] in order.
        seconds: total quantisation time (without parity).
    """

    path: Path
    parity: ParityResult
    kept_float: tuple[str, ...]
    float_nodes: list[str]
    attempts: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def calibration_split(
    calib: Optional[Path],
    run: Optional[Path],
    count: int,
    held_out_folder: Optional[Path] = None,
    held_out_count: int = 4,
) -> tuple[list[Path], list[Path], str]:
    """(calibration images, held-out images, one line saying where they came from).

    Raises:
        UserError: no calibration images (neither ``--calib`` nor an adapted run with a split.json).
    """
    from bilalora.images import list_images

    if count < 1:
        raise UserError(f"--calib-images {count}: use at least 1 calibration image")
    held: list[Path] = []
    if calib is not None:
        paths = list_images(calib)
        chosen = paths[:count]
        origin = f"{len(chosen)} image(s) of {calib} (--calib)"
        held = paths[count : count + held_out_count]
    elif run is not None and (Path(run) / "split.json").is_file():
        from bilalora.runs import read_split

        split = read_split(run)
        chosen = [p for p in split["train"] if Path(p).is_file()][:count]
        held = [p for p in split.get("val", []) + split.get("test", []) if Path(p).is_file()][:held_out_count]
        origin = f"{len(chosen)} training image(s) of {run}/split.json (--calib DIR picks others)"
        if not chosen:
            raise UserError(f"--int8: the training images of {run}/split.json are gone; pass --calib DIR")
    else:
        raise UserError(
            "--int8 needs calibration images: pass --calib DIR (real frames like the ones the model will see, "
            "e.g. the folder you adapted on)"
        )
    if held_out_folder is not None:
        held = list_images(held_out_folder)[:held_out_count]
    return chosen, held, origin


def calibration_crops(paths: Sequence[Path], crop: int = CALIB_CROP, max_side: int = 512,
                      fixed: Optional[tuple[int, int, int]] = None) -> list[Case]:  # fmt: skip
    """Equally sized (1, 3, crop, crop) calibration inputs: the centre crop of each image downsized to ``max_side``
    (reflect-padded when smaller); with ``fixed`` = (N, H, W) the images resized to H x W instead."""
    from .parity import image_cases

    cases = image_cases(list(paths), count=len(paths), max_side=max_side, fixed=fixed)
    if fixed is not None:
        return [Case(c.label, np.ascontiguousarray(c.array[:1])) for c in cases]
    out = []
    for case in cases:
        array = case.array[:1]
        height, width = array.shape[2:]
        pad_h, pad_w = max(0, crop - height), max(0, crop - width)
        if pad_h or pad_w:
            array = np.pad(array, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)), mode="reflect")
            height, width = array.shape[2:]
        top, left = (height - crop) // 2, (width - crop) // 2
        out.append(Case(case.label, np.ascontiguousarray(array[:, :, top : top + crop, left : left + crop])))
    return out


def keep_float_nodes(graph, parts: Sequence[str]) -> list[str]:
    """Names of the nodes of ``graph`` (an onnx GraphProto) that belong to ``parts``.

    Parts: "first_conv" (the convolution reading the graph input), "last_conv"
    (the last Conv/ConvTranspose), "sigmoid" (every Sigmoid and the Mul nodes
    that apply its output), "attention" (every node under an attention or fusion
    sub-block: ``/pa/``, ``/ca/``, ``/sa/``, ``/mixN/``).
    """
    nodes = list(graph.node)
    names: list[str] = []
    convs = [n for n in nodes if n.op_type in ("Conv", "ConvTranspose")]
    inputs = {i.name for i in graph.input}
    for part in parts:
        if part == "first_conv":
            names += [n.name for n in convs if any(i in inputs for i in n.input)][:1] or [convs[0].name] * bool(convs)
        elif part == "last_conv":
            names += [convs[-1].name] if convs else []
        elif part == "sigmoid":
            gates = {n.output[0] for n in nodes if n.op_type == "Sigmoid"}
            names += [n.name for n in nodes if n.op_type == "Sigmoid" or (n.op_type == "Mul" and gates & set(n.input))]
        elif part == "attention":
            names += [n.name for n in nodes if _ATTENTION.search(n.name)]
        else:
            raise ValueError(f"unknown graph part {part!r}")
    return sorted(set(names))


def quantize_once(prepared: Path, out: Path, calib_cases: Sequence[Case], exclude: Sequence[str],
                  method: str = "percentile") -> None:  # fmt: skip
    """One ``quantize_static`` run (QDQ on convolutions, per-channel symmetric int8 weights, symmetric int8
    activations with ``method`` ranges: "percentile" (:data:`CALIB_PERCENTILE`) or "minmax")."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        """One {"input": (1, 3, H, W) float32} feed per calibration image."""

        def __init__(self):
            self._arrays = iter([c.array for c in calib_cases])

        def get_next(self) -> Optional[dict[str, np.ndarray]]:
            array = next(self._arrays, None)
            return None if array is None else {"input": array}

    quantize_static(
        str(prepared),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.Percentile if method == "percentile" else CalibrationMethod.MinMax,
        op_types_to_quantize=list(QUANTIZED_OPS),
        nodes_to_exclude=list(exclude),
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "CalibPercentile": CALIB_PERCENTILE},
    )


def quantize_int8(
    fp32_onnx: Path,
    out: Path,
    calib_cases: Sequence[Case],
    check_cases: Sequence[Case],
    references: Sequence[np.ndarray],
    ladder: Sequence[Sequence[str]] = KEEP_FLOAT_LADDER,
    log=None,
    min_psnr: Optional[float] = None,
) -> Int8Result:
    """Quantise ``fp32_onnx`` into ``out``, keeping in float the first ladder set that passes the gate.

    Args:
        fp32_onnx: the exported fp32 model.onnx.
        out: model_int8.onnx (replaced by each attempt; the passing one stays).
        calib_cases: equally sized (1, 3, H, W) real-image crops for the activation ranges (:func:`calibration_crops`).
        check_cases: the gate's inputs (calibration and held-out images).
        references: fp32 PyTorch outputs of ``check_cases``.
        min_psnr: the gate in dB (None: :data:`.parity.INT8_MIN_PSNR`, 35 dB).

    Raises:
        ParityError: no ladder set passes (the file is removed; the message lists the PSNRs).
    """
    import onnx
    from onnxruntime.quantization import quant_pre_process

    from .parity import ParityError

    start = time.perf_counter()
    gate = {"psnr_db": float(min_psnr)} if min_psnr is not None else gate_for("onnx", "int8")
    attempts: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bilalora-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared), load_external_data=False).graph
        result: Optional[ParityResult] = None
        for parts in ladder:
            tick = time.perf_counter()
            exclude = keep_float_nodes(graph, parts)
            quantize_once(prepared, out, calib_cases, exclude)
            session = ort_session(out)
            outputs = [session.run(["output"], {"input": c.array})[0] for c in check_cases]
            result = evaluate(out.name, "int8", check_cases, outputs, references, gate)
            attempts.append(
                {
                    "kept_float": list(parts),
                    "excluded_nodes": len(exclude),
                    "psnr_db": result.psnr_db,
                    "passed": result.passed,
                    "seconds": round(time.perf_counter() - tick, 3),
                }
            )
            if log:
                log(f"INT8 keeping {', '.join(parts) or 'nothing'} in float: worst PSNR {result.psnr_db:.1f} dB")
            if result.passed:
                return Int8Result(out, result, tuple(parts), list(exclude), attempts, time.perf_counter() - start)
    out.unlink(missing_ok=True)
    tried = "; ".join(f"{'+'.join(a['kept_float']) or 'all int8'} {a['psnr_db']:.1f} dB" for a in attempts)
    raise ParityError(
        f"parity gate failed for {out.name} (int8): no quantisation reached PSNR {gate['psnr_db']:g} "
        f"dB against PyTorch fp32 ({tried}); the file was removed. More or more varied --calib images may help"
    )
