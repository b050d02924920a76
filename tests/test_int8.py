"""INT8 export: the sensitivity-ranked keep-float search, the QDQ writer and the one-pass activation ranges.

Tiny graphs built here (seconds); the shipped network's numbers come from benchmarks/openvino_int8.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from bilalora.export.int8 import (
    SearchGraph,
    activation_ranges,
    greedy_order,
    quant_convs,
    quantize_int8,
    write_qdq,
)
from bilalora.export.parity import Case, ParityError, ort_session, psnr


class OutlierNet(torch.nn.Module):
    """Three convolutions; the middle one's input has one channel a thousand times larger than the others (its
    weights a thousand times smaller), so a per-tensor int8 range rounds the other channels' values to zero."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.c = torch.nn.Conv2d(8, 3, 3, padding=1)
        gain = torch.ones(1, 8, 1, 1)
        gain[:, 0] = 1000.0
        self.register_buffer("gain", gain)
        with torch.no_grad():
            self.b.weight[:, 0] /= 1000.0

    def forward(self, x):
        h = torch.relu(self.a(x)) * self.gain
        return (x + 0.5 * torch.tanh(4 * self.c(torch.relu(self.b(h))))).clamp(0, 1)


def _images(count: int, size=(48, 64), seed: int = 0) -> list[Case]:
    """Smooth textured frames in [0, 1] (not random noise: like photos, neighbouring pixels agree)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]] / max(size)
    cases = []
    for index in range(count):
        planes = [0.5 + 0.4 * np.sin(2 * np.pi * (xx * rng.uniform(1, 4) + yy * rng.uniform(1, 4) + rng.uniform()))
                  for _ in range(3)]  # fmt: skip
        array = np.stack(planes)[None].astype(np.float32)
        cases.append(Case(f"frame{index}", np.ascontiguousarray(array)))
    return cases


def _export(module: torch.nn.Module, path) -> None:
    torch.onnx.export(module.eval(), torch.rand(1, 3, 48, 64), str(path), input_names=["input"],
                      output_names=["output"], opset_version=17, dynamo=False,
                      dynamic_axes={"input": {2: "h", 3: "w"}, "output": {2: "h", 3: "w"}})  # fmt: skip


def _references(module, cases):
    with torch.no_grad():
        return [module(torch.from_numpy(c.array)).numpy() for c in cases]


@pytest.fixture(scope="module")
def outlier(tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8")
    module = OutlierNet().eval()
    _export(module, folder / "model.onnx")
    return module, folder


def test_search_keeps_the_conv_that_breaks_the_gate_float(outlier):
    module, folder = outlier
    calib, check = _images(6, seed=1), _images(4, seed=2)
    references = _references(module, check)
    model = onnx.load(str(folder / "model.onnx"))
    convs = quant_convs(model.graph)
    assert len(convs) == 3
    middle = convs[1].name
    # every conv int8 breaks the gate (so the search has something to find) ...
    ranges = activation_ranges(model, convs, calib)[99.99]
    onnx.save(write_qdq(model, convs, ranges), str(folder / "all.onnx"))
    session = ort_session(folder / "all.onnx", 1)
    assert min(psnr(session.run(["output"], {"input": c.array})[0], r) for c, r in zip(check, references)) < 35
    # ... and the search keeps exactly the middle conv float
    lines = []
    result = quantize_int8(folder / "model.onnx", folder / "model_int8.onnx", calib, check, references,
                           log=lines.append, threads=1)  # fmt: skip
    assert result.float_nodes == [middle] and result.convs == 3 and result.int8_convs == 2
    assert result.parity.passed and result.parity.psnr_db >= 35
    assert any(middle in line for line in lines)
    # the written file: QDQ on the two other convs only, symmetric, and >= 35 dB against PyTorch on unseen frames
    graph = onnx.load(str(folder / "model_int8.onnx")).graph
    quantized = {n.name for n in graph.node if n.op_type == "Conv" and any(i.endswith("_int8_dq") for i in n.input)}
    assert quantized == {convs[0].name, convs[2].name}
    zero_points = [i for i in graph.initializer if i.name.endswith("_zero_point")]
    assert zero_points and all(not onnx.numpy_helper.to_array(z).any() for z in zero_points)
    session = ort_session(folder / "model_int8.onnx", 1)
    unseen = _images(3, size=(64, 80), seed=9)
    for case, reference in zip(unseen, _references(module, unseen)):
        assert psnr(session.run(["output"], {"input": case.array})[0], reference) >= 35


def test_record_lists_the_float_set_the_attempts_and_the_cost(outlier):
    module, folder = outlier
    calib, check = _images(4, seed=3), _images(3, seed=4)
    result = quantize_int8(folder / "model.onnx", folder / "rec.onnx", calib, check, _references(module, check),
                           threads=1)  # fmt: skip
    record = result.record()
    assert record["kept_float"] == record["float_nodes"] == result.float_nodes
    assert (record["convs"], record["int8_convs"]) == (3, 2) and 0 < record["int8_macs_share"] < 1
    stages = [a["stage"] for a in record["attempts"]]
    assert stages[:4] == ["ranges"] * 4 and set(stages[4:]) == {"search"}
    assert all({"psnr_db", "passed", "seconds", "kept_float"} <= set(a) for a in record["attempts"])
    passed = [a["kept_float"] for a in record["attempts"] if a["passed"] and a["stage"] == "search"]
    assert min(passed) == 1 and result.parity.psnr_db == pytest.approx(
        next(a["psnr_db"] for a in record["attempts"] if a["stage"] == "search" and a["kept_float"] == 1), abs=0.01)
    assert record["search"]["seconds"] > 0 and record["search"]["sensitivity"]["forwards"] == 3 * 3
    assert record["activation_percentile"] in (99.99, 99.999, 99.9999, 100.0)
    assert "per-tensor" in record["scheme"] and "per-output-channel" in record["scheme"]


def test_refusal_is_one_line_and_leaves_no_file(outlier):
    module, folder = outlier
    calib, check = _images(3, seed=5), _images(2, seed=6)
    out = folder / "refused.onnx"
    with pytest.raises(ParityError) as info:
        quantize_int8(folder / "model.onnx", out, calib, check, _references(module, check), min_psnr=200.0,
                      threads=1, max_float_share=0.34)  # fmt: skip
    message = str(info.value)
    assert "\n" not in message and "no quantisation reached PSNR 200 dB" in message
    assert "every conv int8" in message and "at most 1 may stay float" in message
    assert not out.exists()


def test_search_graph_equals_the_written_qdq_graph(tmp_path, tiny_dea):
    """The switchable search graph and write_qdq's file give the same outputs for the same keep-float set."""
    from bilalora.export.onnx_export import ExportWrapper

    _export(ExportWrapper(tiny_dea).eval(), tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    convs = quant_convs(model.graph)
    assert len(convs) > 10
    calib = _images(2, size=(32, 32), seed=7)
    ranges = activation_ranges(model, convs, calib)[99.999]
    keep = [convs[0].name, convs[len(convs) // 2].name, convs[-1].name]
    onnx.save(write_qdq(model, convs, ranges, keep), str(tmp_path / "q.onnx"))
    x = _images(1, size=(40, 56), seed=8)[0].array
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # QDQ as written (no int8 fusion)
    qdq = ort.InferenceSession(str(tmp_path / "q.onnx"), options).run(["output"], {"input": x})[0]
    fused = ort_session(tmp_path / "q.onnx", 1).run(["output"], {"input": x})[0]  # onnxruntime's int8 kernels
    search = SearchGraph(model, convs, threads=1)
    try:
        scales = search.scales(ranges)
        switched = search.run(x, search.mask(keep), scales)
        plain = search.run(x, search.mask([c.name for c in convs]), scales)
    finally:
        search.close()
    fp32 = ort_session(tmp_path / "m.onnx", 1).run(["output"], {"input": x})[0]
    assert np.abs(switched - qdq).max() < 1e-5
    assert psnr(fused, qdq) > 45  # int8 kernels round differently, slightly
    assert np.abs(plain - fp32).max() < 1e-6  # every conv float: the fp32 graph
    assert np.abs(qdq - fp32).max() > 1e-4  # and the quantisation does change the output


def test_activation_ranges_are_exact_percentiles(tmp_path):
    """One conv reading the graph input: its ranges are the exact percentiles of |input| over all cases."""
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1))
    _export(module, tmp_path / "one.onnx")
    model = onnx.load(str(tmp_path / "one.onnx"))
    convs = quant_convs(model.graph)
    rng = np.random.default_rng(0)
    cases = [Case(str(i), rng.standard_normal((1, 3, 48, 64)).astype(np.float32)) for i in range(3)]
    ranges = activation_ranges(model, convs, cases, (99.0, 99.99, 100.0))
    values = np.sort(np.abs(np.concatenate([c.array.ravel() for c in cases])))[::-1]
    for p in (99.0, 99.99):
        assert ranges[p]["input"] == pytest.approx(values[int((1 - p / 100) * values.size)])
    assert ranges[100.0]["input"] == pytest.approx(values[0])
    assert convs[0].macs == 3 * 3 * 48 * 64


def test_greedy_order_follows_the_worst_image():
    """Image 1 is the worst and conv 2 hurts it most; then image 0 is the worst and conv 1 is its cause."""
    errors = np.array([[0.0, 2.0], [5.0, 0.0], [0.0, 6.0]])
    assert greedy_order(errors, errors.sum(0)) == [2, 1, 0]


def test_static_shape_graph_measures_sensitivity_at_its_own_size(tmp_path):
    """A graph with a fixed input size: the sensitivity runs use the gate images as they are (no downsizing)."""
    module = OutlierNet().eval()
    torch.onnx.export(module, torch.rand(1, 3, 48, 64), str(tmp_path / "static.onnx"), input_names=["input"],
                      output_names=["output"], opset_version=17, dynamo=False)  # fmt: skip
    calib, check = _images(3, seed=12), _images(2, seed=13)
    result = quantize_int8(tmp_path / "static.onnx", tmp_path / "static_int8.onnx", calib, check,
                           _references(module, check), threads=1, sensitivity_side=16)  # fmt: skip
    assert result.parity.passed and result.int8_convs == 2
