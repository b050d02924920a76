"""Calibrated INT8 (``--int8``): a QDQ ``model_int8.onnx`` that TensorRT builds INT8 engines from and OpenVINO runs.

    calib, held_out, origin = calibration_split(calib=None, run=Path("runs/adapt/exp"), count=16)
    result = quantize_int8(Path("model.onnx"), Path("model_int8.onnx"), calib_cases, check_cases, references)

How the file is made (:func:`quantize_int8`):

1. **What is quantised** (:func:`quant_convs`, :func:`write_qdq`): every Conv
   and ConvTranspose whose weight is an initializer. Its input activation gets a
   QuantizeLinear/DequantizeLinear pair (int8, per tensor, symmetric: zero point
   0, scale = range / 127, what TensorRT's explicit-quantisation INT8 engines
   require) and its weight becomes int8 with a DequantizeLinear (per output
   channel, symmetric, [-127, 127]); bias and the convolution's output stay
   float, as do the element-wise ops, the sigmoid gates and their products,
   attention pooling and the residual stream. (onnxruntime's
   ``quantize_static``, used before, also put a Q/DQ pair on every convolution
   output: twice the rounding points. The QDQ graph is now written here.)
   TensorRT and OpenVINO fuse each Q/DQ pair into their own int8 kernels;
   onnxruntime runs the file with its int8 kernels.
2. **Calibration, once** (:func:`activation_ranges`): one onnxruntime fp32 pass
   over :data:`CALIB_CROP` px square crops of the calibration photos records
   each quantised activation's exact |x| percentiles
   (:data:`CALIB_PERCENTILES`: 99.99, 99.999, 99.9999 and the maximum).
3. **Search** (:class:`SearchGraph`): one onnxruntime session of the fp32 graph
   in which every convolution's int8 rounding is switched on or off by a
   run-time mask and its activation scale is a run-time input, so any keep-float
   set and any ranges are measured without rebuilding or recalibrating (with
   the same set it computes exactly what the QDQ graph computes before
   onnxruntime's int8 kernels round differently, ~55 dB apart). (a) Every
   convolution int8, once per percentile, on the gate images: the percentile
   with the best worst image is used. (b) Sensitivity: each convolution alone in
   int8 on the gate images downsized to :data:`SENSITIVITY_SIDE` px (one run
   per convolution and image); its MSE per image. (c) :func:`greedy_order`:
   repeatedly the convolution whose float-keeping lowers the predicted worst
   image's error most (errors taken as additive, scaled per image to the
   measured every-conv-int8 error). (d) Verification: a prefix of that order
   is written as a QDQ file and gated as it is (onnxruntime's int8 kernels,
   every full-size gate image against PyTorch fp32, PSNR >= 35 dB): first the
   prefix predicted to pass with :data:`SEARCH_MARGIN_DB` to spare, then
   doubling or bisection to the smallest passing prefix, whose file and parity
   are kept; at most :data:`MAX_ATTEMPTS` files and at most
   :data:`MAX_FLOAT_SHARE` of the convolutions float, else the export refuses in
   one line with every attempt's PSNR. (onnxruntime's int8 kernels round
   differently from the exact QDQ arithmetic of the search graph: up to about
   1 dB on the worst image, either way; TensorRT and OpenVINO have their own.)

model.json (``artefacts["model_int8.onnx"]``) lists ``float_nodes`` (=
``kept_float``, most damaging first), ``convs`` and ``int8_convs``,
``int8_macs_share``, ``activation_percentile``, every attempt
(``{"stage": "ranges" | "search", "percentile", "kept_float": n,
"psnr_db": worst, "passed", "seconds"}``) and ``search`` (its seconds, the
sensitivity runs, each convolution's PSNR alone in int8, the order).

The search chooses on the gate images, held-out ones included, so they are no
longer unseen; ``benchmarks/openvino_int8.py`` also measures photos that
neither calibration nor the search saw.

Measured on the shipped dea-net-s (``benchmarks/openvino_int8.py``: 16
real_day calibration photos; gate: 4 of them and the next 4 photos, 512 px):
every convolution int8 reached at worst 30.8 dB with 99.99th-percentile ranges
(29.3, 27.6 and 26.6 dB with the 99.999th, 99.9999th and the maximum;
onnxruntime's ``quantize_static`` graph with quantised outputs and
99.999th-percentile ranges, used before: 27.6 dB). Keeping float the 9 most
damaging of 98 convolutions (the first one, ``fe_level_2`` and
``fe_level_3``, up2's ConvTranspose, up3, down3, the ``conv2`` of the first two
level-2 blocks and ``level3_block6/ca``; 90 % of the multiply-adds stay int8)
the file reaches 36.3 dB on its worst gate image (``ridcp_TS_Baidu_504.jpg``,
where OpenVINO bf16 is also at its worst, 39.4 dB), in about 2 minutes of
search on a shared 2-core CPU (the old three-set ladder: about 8). Not
solved: on 8 photos that neither calibration nor the search saw one reaches
only 30.7 dB (``ridcp_cityscape_input.png``); keeping more of the order
float (search graph, 16, 24 or 49 convolutions), all 8 pass from 24.

Held-out images are the adapted run's validation/test images (``split.json``),
else the ``--images`` folder, else the calibration folder's images after the
first ``count``; with none the gate says so and runs on calibration images only.
"""

from __future__ import annotations

import copy
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from bilalora.errors import UserError

from .parity import Case, ParityResult, evaluate, gate_for, ort_session

__all__ = [
    "CALIB_PERCENTILES",
    "Int8Result",
    "QuantConv",
    "SearchGraph",
    "activation_ranges",
    "calibration_crops",
    "calibration_split",
    "quant_convs",
    "quantize_int8",
    "write_qdq",
]

#: Side of the square calibration crops.
CALIB_CROP = 256

#: Percentiles of |activation| tried as the int8 range (one calibration pass gives all of them); 100 = the maximum.
CALIB_PERCENTILES: tuple[float, ...] = (99.99, 99.999, 99.9999, 100.0)

#: Operators whose input activation and weights are quantised.
QUANTIZED_OPS = ("Conv", "ConvTranspose")

#: Verification runs of the keep-float search (each runs every gate image at full size).
MAX_ATTEMPTS = 8

#: Longer side of the gate images when measuring each convolution's sensitivity (cheaper than full size).
SENSITIVITY_SIDE = 128

#: The search aims this many dB above the gate when it predicts from the sensitivities (then verifies).
SEARCH_MARGIN_DB = 0.5

#: Refuse when passing the gate needs more than this share of the convolutions kept in float.
MAX_FLOAT_SHARE = 0.5

_QMAX = 127  # symmetric narrow int8 range [-127, 127] with zero point 0 (what TensorRT's explicit quantisation uses)


@dataclass
class QuantConv:
    """A convolution that can be quantised: node name, activation input, weight initializer, per-channel axis, MACs
    per calibration crop (for the int8 share)."""

    name: str
    activation: str
    weight: str
    axis: int
    macs: float = 0.0


@dataclass
class Int8Result:
    """What :func:`quantize_int8` wrote.

    Attributes:
        path: model_int8.onnx.
        parity: its parity on calibration and held-out images (the written file, run by onnxruntime).
        float_nodes: names of the convolutions kept in float (most damaging first).
        convs: number of quantisable convolutions; ``int8_convs`` of them are int8.
        int8_macs_share: share of the convolutions' multiply-adds that run in int8.
        percentile: the activation-range percentile used (100 = maximum).
        attempts: [{"stage", "percentile", "kept_float", "psnr_db", "passed", "seconds"}] in order: "ranges" (every
            conv int8, measured with the search graph), "search" (a written QDQ file, gated by onnxruntime).
        search: {"seconds", "sensitivity": {...}, "order": [...]} (how the float set was found).
        seconds: total time (calibration, search, writing, gate).
    """

    path: Path
    parity: ParityResult
    float_nodes: list[str]
    convs: int
    int8_convs: int
    int8_macs_share: float
    percentile: float
    attempts: list[dict[str, Any]] = field(default_factory=list)
    search: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        """The model.json fields of model_int8.onnx (besides parity and calibration images)."""
        return {
            "kept_float": list(self.float_nodes),
            "float_nodes": list(self.float_nodes),
            "convs": self.convs,
            "int8_convs": self.int8_convs,
            "int8_macs_share": round(self.int8_macs_share, 4),
            "activation_percentile": self.percentile,
            "attempts": self.attempts,
            "search": self.search,
            "scheme": "QDQ on Conv/ConvTranspose inputs: int8 symmetric per-output-channel weights, int8 symmetric "
            f"per-tensor activations ({_describe(self.percentile)} of |x| over the calibration crops), "
            "bias and outputs float",
        }


def _describe(percentile: float) -> str:
    return "maximum" if percentile >= 100 else f"{percentile:g}th percentile"


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


def quant_convs(graph) -> list[QuantConv]:
    """The quantisable convolutions of ``graph`` (an onnx GraphProto): Conv/ConvTranspose nodes whose weight is an
    initializer, in graph order."""
    inits = {init.name for init in graph.initializer}
    out = []
    for node in graph.node:
        if node.op_type in QUANTIZED_OPS and len(node.input) >= 2 and node.input[1] in inits and node.name:
            out.append(QuantConv(node.name, node.input[0], node.input[1], 1 if node.op_type == "ConvTranspose" else 0))
    return out


def activation_ranges(
    model, convs: Sequence[QuantConv], cases: Sequence[Case], percentiles: Sequence[float] = CALIB_PERCENTILES,
    threads: Optional[int] = None,
) -> dict[float, dict[str, float]]:  # fmt: skip
    """{percentile: {activation name: |x| range}} from ONE onnxruntime fp32 pass over ``cases``.

    Exact percentiles of |x| (each tensor's largest values are kept across the cases); 100 is the maximum.
    Also fills each conv's ``macs`` (per case, from the activation shape).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    names = list(dict.fromkeys(c.activation for c in convs))
    inputs = {i.name for i in model.graph.input}
    augmented = copy.deepcopy(model)
    present = {o.name for o in augmented.graph.output}
    for name in names:
        if name not in inputs and name not in present:
            augmented.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    fetch = [n for n in names if n not in inputs]
    lowest = min(percentiles)
    tops: dict[str, np.ndarray] = {}
    counts = dict.fromkeys(names, 0)
    shapes: dict[str, tuple[int, ...]] = {}
    with tempfile.TemporaryDirectory(prefix="bilalora-int8-cal-") as tmp:
        path = Path(tmp) / "augmented.onnx"
        onnx.save(augmented, str(path))
        session = ort_session(path, threads)
        for case in cases:
            values = dict(zip(fetch, session.run(fetch, {"input": case.array}))) if fetch else {}
            values.update({n: case.array for n in names if n in inputs})
            for name in names:
                flat = np.abs(values[name].astype(np.float32, copy=False)).ravel()
                shapes.setdefault(name, tuple(values[name].shape))
                counts[name] += flat.size
                keep = min(flat.size, int(math.ceil(flat.size * len(cases) * (1 - lowest / 100))) + 1)
                top = np.partition(flat, flat.size - keep)[flat.size - keep :] if keep < flat.size else flat
                merged = np.concatenate([tops[name], top]) if name in tops else top
                if merged.size > keep:
                    merged = np.partition(merged, merged.size - keep)[merged.size - keep :]
                tops[name] = merged
    ranges: dict[float, dict[str, float]] = {}
    for p in percentiles:
        ranges[p] = {}
        for name in names:
            top = np.sort(tops[name])[::-1]
            index = min(top.size - 1, int((1 - p / 100) * counts[name]))
            ranges[p][name] = float(max(top[index], 1e-8))
    inits = {i.name: i for i in model.graph.initializer}
    strides = {n.name: next((list(a.ints) for a in n.attribute if a.name == "strides"), [1, 1]) for n in model.graph.node}
    for conv in convs:
        shape = shapes.get(conv.activation)
        weight = int(np.prod(inits[conv.weight].dims))
        if shape is not None and len(shape) == 4:
            pixels = shape[2] * shape[3] / (1 if conv.axis else float(np.prod(strides.get(conv.name, [1, 1]))))
            conv.macs = float(weight * pixels)
    del numpy_helper
    return ranges


def _weight_quant(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weights, per-channel scales along ``axis``): symmetric, narrow range [-127, 127]."""
    other = tuple(i for i in range(weight.ndim) if i != axis)
    amax = np.abs(weight).max(axis=other)
    scale = np.where(amax > 0, amax / _QMAX, 1.0).astype(np.float32)
    shape = [1] * weight.ndim
    shape[axis] = -1
    q = np.clip(np.round(weight / scale.reshape(shape)), -_QMAX, _QMAX).astype(np.int8)
    return q, scale


def _activation_scale(limit: float) -> np.float32:
    return np.float32(limit / _QMAX)


def write_qdq(model, convs: Sequence[QuantConv], ranges: dict[str, float], exclude: Sequence[str] = ()):
    """A copy of ``model`` (onnx ModelProto) with QuantizeLinear/DequantizeLinear on the activation input and
    DequantizeLinear on the int8 weight of every conv in ``convs`` not named in ``exclude``.

    Activations: per-tensor symmetric int8 (scale = range / 127, zero point 0); weights: per output channel
    symmetric int8; bias and outputs stay float (TensorRT and OpenVINO fuse each Q/DQ pair into an int8 kernel).
    """
    from onnx import helper, numpy_helper

    out = copy.deepcopy(model)
    graph = out.graph
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise UserError(f"--int8 needs an ONNX opset of at least 13 (per-channel QDQ); model.onnx has {opset}")
    skip = set(exclude)
    todo = {c.name: c for c in convs if c.name not in skip}
    inits = {i.name: i for i in graph.initializer}
    new_inits, nodes, dq_of = [], [], {}
    for node in graph.node:
        conv = todo.get(node.name)
        if conv is not None:
            x = node.input[0]
            if x not in dq_of:
                scale, zero = f"{x}_int8_scale", f"{x}_int8_zero_point"
                new_inits += [numpy_helper.from_array(np.array(_activation_scale(ranges[x]), np.float32), scale),
                              numpy_helper.from_array(np.array(0, np.int8), zero)]  # fmt: skip
                nodes.append(helper.make_node("QuantizeLinear", [x, scale, zero], [f"{x}_int8_q"], name=f"{x}_int8_Q"))
                nodes.append(helper.make_node("DequantizeLinear", [f"{x}_int8_q", scale, zero], [f"{x}_int8_dq"],
                                              name=f"{x}_int8_DQ"))  # fmt: skip
                dq_of[x] = f"{x}_int8_dq"
            weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
            q, scale = _weight_quant(weight, conv.axis)
            base = f"{node.name}_weight_int8"
            new_inits += [numpy_helper.from_array(q, base), numpy_helper.from_array(scale, f"{base}_scale"),
                          numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{base}_zero_point")]  # fmt: skip
            nodes.append(helper.make_node("DequantizeLinear", [base, f"{base}_scale", f"{base}_zero_point"],
                                          [f"{base}_dq"], name=f"{base}_DQ", axis=conv.axis))  # fmt: skip
            node.input[0] = dq_of[x]
            node.input[1] = f"{base}_dq"
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    return out


class SearchGraph:
    """The fp32 graph with every quantisable conv's int8 rounding switchable at run time.

    ``run(x, mask, scales)``: ``mask[k]`` 1 quantises conv k (activation Q/DQ with range ``scales[k] * 127`` and its
    per-channel int8 weights), 0 keeps it float, so one onnxruntime session measures any keep-float set and any
    activation ranges without rebuilding or recalibrating. Numerically the QDQ graph of :func:`write_qdq`
    (outputs agree to float rounding).
    """

    def __init__(self, model, convs: Sequence[QuantConv], threads: Optional[int] = None, workdir: Optional[Path] = None):
        from onnx import TensorProto, helper, numpy_helper

        self.convs = list(convs)
        out = copy.deepcopy(model)
        graph = out.graph
        inits = {i.name: i for i in graph.initializer}
        index = {c.name: k for k, c in enumerate(self.convs)}
        graph.input.extend([helper.make_tensor_value_info(name, TensorProto.FLOAT, [len(self.convs)])
                            for name in ("int8_mask", "int8_keep", "int8_scale")])  # fmt: skip
        nodes, new_inits = [], []
        for node in graph.node:
            k = index.get(node.name)
            if k is not None:
                conv, p = self.convs[k], f"int8_search_{k}"
                weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
                q, scale = _weight_quant(weight, conv.axis)
                shape = [1] * weight.ndim
                shape[conv.axis] = -1
                dequantised = (q.astype(np.float32) * scale.reshape(shape)).astype(np.float32)
                new_inits += [numpy_helper.from_array(np.array(k, np.int64), f"{p}_k"),
                              numpy_helper.from_array(dequantised, f"{p}_wdq"),
                              numpy_helper.from_array(np.array(0, np.int8), f"{p}_zero")]  # fmt: skip
                x = node.input[0]
                # m * quantised + (1 - m) * float: exactly one or the other for m in {0, 1}
                nodes += [
                    helper.make_node("Gather", ["int8_mask", f"{p}_k"], [f"{p}_m"], axis=0),
                    helper.make_node("Gather", ["int8_keep", f"{p}_k"], [f"{p}_f"], axis=0),
                    helper.make_node("Gather", ["int8_scale", f"{p}_k"], [f"{p}_s"], axis=0),
                    helper.make_node("QuantizeLinear", [x, f"{p}_s", f"{p}_zero"], [f"{p}_xq"]),
                    helper.make_node("DequantizeLinear", [f"{p}_xq", f"{p}_s", f"{p}_zero"], [f"{p}_xdq"]),
                    helper.make_node("Mul", [f"{p}_xdq", f"{p}_m"], [f"{p}_xa"]),
                    helper.make_node("Mul", [x, f"{p}_f"], [f"{p}_xb"]),
                    helper.make_node("Add", [f"{p}_xa", f"{p}_xb"], [f"{p}_x"]),
                    helper.make_node("Mul", [f"{p}_wdq", f"{p}_m"], [f"{p}_wa"]),
                    helper.make_node("Mul", [node.input[1], f"{p}_f"], [f"{p}_wb"]),
                    helper.make_node("Add", [f"{p}_wa", f"{p}_wb"], [f"{p}_w"]),
                ]
                node.input[0], node.input[1] = f"{p}_x", f"{p}_w"
            nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(new_inits)
        self._tmp = tempfile.TemporaryDirectory(prefix="bilalora-int8-search-", dir=workdir)
        path = Path(self._tmp.name) / "search.onnx"
        import onnx

        onnx.save(out, str(path))
        self.session = ort_session(path, threads)
        self.forwards = 0

    def scales(self, ranges: dict[str, float]) -> np.ndarray:
        return np.array([_activation_scale(ranges[c.activation]) for c in self.convs], np.float32)

    def mask(self, float_nodes: Sequence[str] = (), only: Optional[str] = None) -> np.ndarray:
        """1 for every conv quantised: all but ``float_nodes``, or only the conv named ``only``."""
        if only is not None:
            return np.array([1.0 if c.name == only else 0.0 for c in self.convs], np.float32)
        skip = set(float_nodes)
        return np.array([0.0 if c.name in skip else 1.0 for c in self.convs], np.float32)

    def run(self, x: np.ndarray, mask: np.ndarray, scales: np.ndarray) -> np.ndarray:
        self.forwards += 1
        feed = {"input": x, "int8_mask": mask, "int8_keep": (1 - mask).astype(np.float32), "int8_scale": scales}
        return self.session.run(["output"], feed)[0]

    def close(self) -> None:
        self.session = None
        self._tmp.cleanup()


def _downsized(cases: Sequence[Case], side: int) -> list[Case]:
    """The cases resized so the longer side is at most ``side`` (multiples of 4)."""
    import cv2

    out = []
    for case in cases:
        array = case.array[:1]
        height, width = array.shape[2:]
        scale = min(1.0, side / max(height, width))
        h, w = max(4, int(round(height * scale / 4)) * 4), max(4, int(round(width * scale / 4)) * 4)
        if (h, w) != (height, width):
            image = cv2.resize(array[0].transpose(1, 2, 0), (w, h), interpolation=cv2.INTER_AREA)
            array = image.transpose(2, 0, 1)[None]
        out.append(Case(case.label, np.ascontiguousarray(array, dtype=np.float32)))
    return out


def _static_size(model) -> bool:
    """Whether the graph input has a fixed batch, height or width (then the gate images are used as they are)."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return any(d.dim_value > 0 for i, d in enumerate(dims) if i in (0, 2, 3))


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def _db(mse: float) -> float:
    return math.inf if mse <= 0 else -10.0 * math.log10(mse)


def greedy_order(errors: np.ndarray, total: np.ndarray) -> list[int]:
    """Order in which to keep convs float: each step the conv whose removal lowers the predicted worst image's error
    most. ``errors[k, i]``: MSE of image i with only conv k quantised; ``total[i]``: MSE with every conv quantised
    (the sum of ``errors`` is scaled per image to match it)."""
    count = errors.shape[0]
    factor = np.where(errors.sum(0) > 0, total / np.maximum(errors.sum(0), 1e-30), 1.0)
    scaled = errors * factor
    left = scaled.sum(0)
    order, remaining = [], set(range(count))
    while remaining:
        best = min(remaining, key=lambda k: (float(np.max(left - scaled[k])), -float(scaled[k].sum())))
        order.append(best)
        remaining.discard(best)
        left = left - scaled[best]
    return order


def predicted_db(errors: np.ndarray, total: np.ndarray, order: Sequence[int]) -> list[float]:
    """Predicted worst-image PSNR after keeping float the first n of ``order``, for n = 0..len(order)."""
    factor = np.where(errors.sum(0) > 0, total / np.maximum(errors.sum(0), 1e-30), 1.0)
    left = (errors * factor).sum(0)
    out = [_db(float(left.max()))]
    for k in order:
        left = left - errors[k] * factor
        out.append(_db(float(max(left.max(), 0.0))))
    return out


def quantize_int8(
    fp32_onnx: Path,
    out: Path,
    calib_cases: Sequence[Case],
    check_cases: Sequence[Case],
    references: Sequence[np.ndarray],
    log: Optional[Callable[[str], None]] = None,
    min_psnr: Optional[float] = None,
    percentiles: Sequence[float] = CALIB_PERCENTILES,
    max_attempts: int = MAX_ATTEMPTS,
    sensitivity_side: int = SENSITIVITY_SIDE,
    max_float_share: float = MAX_FLOAT_SHARE,
    threads: Optional[int] = None,
) -> Int8Result:
    """Quantise ``fp32_onnx`` into ``out``, keeping in float the fewest convolutions (by a sensitivity-ranked search)
    with which the written file passes the gate on every ``check_cases`` image.

    Args:
        fp32_onnx: the exported fp32 model.onnx.
        out: model_int8.onnx.
        calib_cases: equally sized (1, 3, H, W) real-image crops for the activation ranges (:func:`calibration_crops`).
        check_cases: the gate's inputs (calibration and held-out images).
        references: fp32 PyTorch outputs of ``check_cases``.
        min_psnr: the gate in dB (None: :data:`.parity.INT8_MIN_PSNR`, 35 dB).
        percentiles: activation-range percentiles to measure (the best worst-image PSNR with every conv int8 wins).
        max_attempts: verification runs of the search on the full-size gate images.
        sensitivity_side: longer side of the gate images for the per-conv sensitivity runs.
        max_float_share: refuse when more than this share of the convs must stay float.

    Raises:
        ParityError: no keep-float set within the caps passes (no file is left; the one-line message has the PSNRs).
        UserError: the graph has no quantisable convolution.
    """
    import onnx

    from .parity import ParityError

    start = time.perf_counter()
    say = log or (lambda _line: None)
    gate = {"psnr_db": float(min_psnr)} if min_psnr is not None else gate_for("onnx", "int8")
    target = gate["psnr_db"]
    model = onnx.load(str(fp32_onnx))
    convs = quant_convs(model.graph)
    if not convs:
        raise UserError(f"--int8: {Path(fp32_onnx).name} has no convolution with constant weights to quantise")
    attempts: list[dict[str, Any]] = []
    out.unlink(missing_ok=True)

    def worst(outputs) -> tuple[float, list[float]]:
        scores = [_db(_mse(o, r)) for o, r in zip(outputs, references)]
        return min(scores), scores

    tick = time.perf_counter()
    all_ranges = activation_ranges(model, convs, calib_cases, percentiles, threads)
    calib_seconds = time.perf_counter() - tick
    search = SearchGraph(model, convs, threads)
    work = tempfile.TemporaryDirectory(prefix="bilalora-int8-")
    try:
        # 1. activation ranges: every conv int8, each percentile, on the full gate images
        best: Optional[tuple[float, float]] = None
        for p in percentiles:
            tick = time.perf_counter()
            scales = search.scales(all_ranges[p])
            low, _ = worst([search.run(c.array, search.mask(), scales) for c in check_cases])
            attempts.append({"stage": "ranges", "percentile": p, "kept_float": 0, "psnr_db": round(low, 2),
                             "passed": low >= target, "seconds": round(time.perf_counter() - tick, 2)})  # fmt: skip
            say(f"INT8 {_describe(p)} ranges, every conv int8: worst PSNR {low:.1f} dB")
            if best is None or low > best[1]:
                best = (p, low)
        percentile = best[0]
        ranges = all_ranges[percentile]
        scales = search.scales(ranges)
        # 2. sensitivity: each conv alone in int8, on the gate images downsized
        tick = time.perf_counter()
        small = list(check_cases) if _static_size(model) else _downsized(check_cases, sensitivity_side)
        zero = np.zeros(len(convs), np.float32)
        base = [search.run(c.array, zero, scales) for c in small]
        full = np.array([_mse(search.run(c.array, search.mask(), scales), b) for c, b in zip(small, base)])
        errors = np.zeros((len(convs), len(small)))
        for k, conv in enumerate(convs):
            only = search.mask(only=conv.name)
            errors[k] = [_mse(search.run(c.array, only, scales), b) for c, b in zip(small, base)]
        order = greedy_order(errors, full)
        predicted = predicted_db(errors, full, order)
        sensitivity = {"side": sensitivity_side, "images": len(small), "forwards": len(convs) * len(small),
                       "seconds": round(time.perf_counter() - tick, 2),
                       "psnr_db_alone": {convs[k].name: round(_db(float(errors[k].max())), 2) for k in order}}  # fmt: skip
        say(f"INT8 sensitivity of {len(convs)} convs measured ({sensitivity['seconds']:.0f} s); "
            f"most damaging: {convs[order[0]].name}")  # fmt: skip
        # 3. smallest prefix of the ranked order whose written file passes the gate (prediction first, then
        #    doubling or bisection); each candidate is written as QDQ and run by onnxruntime on the full gate
        limit = int(math.floor(max_float_share * len(convs)))
        guess = next((n for n, db in enumerate(predicted) if db >= target + SEARCH_MARGIN_DB), len(convs))
        # largest failing / smallest passing prefix (prefix 0, every conv int8, was measured above)
        lo, hi = (-1, None) if best[1] >= target else (0, None)
        n, tried = (0 if best[1] >= target else min(guess, limit)), set()
        results: dict[int, ParityResult] = {}
        for _ in range(max(1, max_attempts)):
            if n in tried:
                break
            tried.add(n)
            tick = time.perf_counter()
            candidate = Path(work.name) / f"int8_{n}.onnx"
            onnx.save(write_qdq(model, convs, ranges, [convs[k].name for k in order[:n]]), str(candidate))
            session = ort_session(candidate, threads)
            outputs = [session.run(["output"], {"input": c.array})[0] for c in check_cases]
            del session
            results[n] = evaluate(out.name, "int8", check_cases, outputs, references, gate)
            low = results[n].psnr_db
            attempts.append({"stage": "search", "percentile": percentile, "kept_float": n, "psnr_db": round(low, 2),
                             "predicted_db": round(predicted[n], 2), "passed": results[n].passed,
                             "seconds": round(time.perf_counter() - tick, 2)})  # fmt: skip
            say(f"INT8 keeping the {n} most damaging convs float: worst PSNR {low:.1f} dB")
            if results[n].passed:
                hi = n
            else:
                lo = max(lo, n)
            if hi is None:
                if n >= limit:
                    break
                n = min(limit, max(n + 1, 2 * n if n else 1))
            else:
                if hi - lo <= 1:
                    break
                n = (lo + hi) // 2 if lo >= 0 else hi // 2
        search_seconds = time.perf_counter() - start
        summary = "; ".join(f"{a['kept_float']} float {a['psnr_db']:.1f} dB" for a in attempts if a["stage"] == "search")
        if hi is None:
            raise ParityError(
                f"parity gate failed for {out.name} (int8): no quantisation reached PSNR {target:g} dB against "
                f"PyTorch fp32 (every conv int8: {max(a['psnr_db'] for a in attempts if a['stage'] == 'ranges'):.1f}"
                f" dB; keeping the most damaging of {len(convs)} convs float: {summary or 'not tried'}; at most "
                f"{limit} may stay float); no file was written. More or more varied --calib images may help"
            )
        shutil.move(str(Path(work.name) / f"int8_{hi}.onnx"), str(out))
    finally:
        search.close()
        work.cleanup()
    result = results[hi]
    float_nodes = [convs[k].name for k in order[:hi]]
    say(f"INT8 {out.name}: {len(convs) - hi} of {len(convs)} convs int8, worst PSNR {result.psnr_db:.1f} dB")
    macs = sum(c.macs for c in convs) or 1.0
    skip = set(float_nodes)
    return Int8Result(
        path=out,
        parity=result,
        float_nodes=float_nodes,
        convs=len(convs),
        int8_convs=len(convs) - len(float_nodes),
        int8_macs_share=sum(c.macs for c in convs if c.name not in skip) / macs,
        percentile=percentile,
        attempts=attempts,
        search={"seconds": round(search_seconds, 2), "calibration_seconds": round(calib_seconds, 2),
                "max_attempts": max_attempts, "max_float_share": max_float_share,
                "margin_db": SEARCH_MARGIN_DB, "sensitivity": sensitivity,
                "order": [convs[k].name for k in order[: max(hi, 1) + 4]]},  # fmt: skip
        seconds=time.perf_counter() - start,
    )
