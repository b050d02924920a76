"""Export library: merge parity and structure, ONNX (merged, unmerged, fp16, fixed), parity gates, model.json.

Everything runs on the CPU with the width-8 DEA-Net ("dea-net-t") and small inputs.
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from bilalora.runtime import model_json as sidecar
from bilalora.export.fp16 import export_fp16, fp32_initializers
from bilalora.export.merge import gated_copy, merge_adapter, save_merged
from bilalora.export.onnx_export import ExportWrapper, export_onnx, initializer_names
from bilalora.export.parity import (
    ParityError,
    evaluate,
    gate_for,
    image_cases,
    onnx_parity,
    psnr,
    random_cases,
    reference_outputs,
)

from bilalora import backbones, lora, sites
from bilalora.adapter import Adapter, fingerprint
from bilalora.errors import UserError
from bilalora.profile import measure_cost
from conftest import run_without_torch  # tests/ is on sys.path under pytest

SITES = ("level3_block2", "down_level1_block3", "level3_block7")


def make_adapter(seed: int = 0, sites_: tuple[str, ...] = SITES) -> tuple[torch.nn.Module, Adapter]:
    """A width-8 base network and a 3-site adapter with random B factors and gates (built here)."""
    torch.manual_seed(seed)
    base = backbones.create("dea-net-t").eval()
    model = backbones.create("dea-net-t").eval()
    model.load_state_dict(base.state_dict())
    lora.inject(model, sites.default_sites(model), rank=4, lora_alpha=8)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.05)
        for gate in lora.site_gates(model).values():
            gate.logit.copy_(torch.randn((), generator=generator))
    return base, Adapter.from_model(model, list(sites_), method="bilevel", seed=seed)


def make_adapter_run(run_dir: Path, seed: int = 0, weights_in_summary: bool = True) -> tuple[torch.nn.Module, Path]:
    """``run_dir/adapter.safetensors`` (+ the base weights file and summary.json naming it)."""
    from safetensors.torch import save_file

    base, adapter = make_adapter(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    weights = run_dir / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(weights))
    summary = {"backbone": "dea-net-t", "weights": str(weights) if weights_in_summary else None}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    adapter.save(run_dir / "adapter.safetensors")
    return base, run_dir / "adapter.safetensors"


@pytest.fixture(scope="module")
def base_and_adapter():
    return make_adapter()


@pytest.fixture(scope="module")
def small_cases():
    return random_cases([(64, 96), (68, 92)], [2, 1], seed=3)


# --------------------------------------------------------------------------- merge


def test_merge_structure_parameters_flops_and_parity(base_and_adapter, small_cases):
    base, adapter = base_and_adapter
    before = fingerprint(base)
    merged, report = merge_adapter(adapter, base, small_cases, wrap=ExportWrapper)
    assert fingerprint(base) == before  # the base is not modified
    base_state, merged_state = base.state_dict(), merged.state_dict()
    assert list(merged_state) == list(base_state)
    assert all(merged_state[k].shape == base_state[k].shape for k in base_state)
    assert lora.count_parameters(merged) == lora.count_parameters(base) == report.parameters_merged
    assert report.parameters_gated > report.parameters_base
    assert measure_cost(merged, (32, 48)) == measure_cost(base, (32, 48))  # same parameters and FLOPs
    assert report.parity.passed and report.parity.max_abs <= 1e-5
    # raw (unclamped) outputs too: merged == gated within 1e-5, and differ from the base
    gated = gated_copy(adapter, base)
    x = torch.from_numpy(small_cases[0].array)
    with torch.no_grad():
        assert (gated(x) - merged(x)).abs().max() <= 1e-5
        assert (merged(x) - base(x)).abs().max() > 1e-4
    changed = [k for k in base_state if not torch.equal(base_state[k], merged_state[k])]
    assert changed and all(k.rsplit(".", 2)[0] in adapter.sites for k in changed)
    assert report.as_dict()["layers"] == 6


def test_merge_refuses_other_base_weights(base_and_adapter):
    _, adapter = base_and_adapter
    other = backbones.create("dea-net-t")
    with pytest.raises(UserError, match="fingerprint"):
        merge_adapter(adapter, other)


def test_save_merged_loads_as_checkpoint(base_and_adapter, tmp_path):
    base, adapter = base_and_adapter
    merged, report = merge_adapter(adapter, base)
    path = save_merged(merged, tmp_path / "merged.safetensors", {"backbone": "dea-net-t"})
    reloaded = backbones.load("dea-net-t", weights=path)
    assert fingerprint(reloaded) == report.merged_fingerprint
    assert not list(tmp_path.glob(".*tmp*"))


# --------------------------------------------------------------------------- ONNX


def _dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_onnx_base_dynamic_parity_at_odd_sizes_and_batch2(tmp_path):
    torch.manual_seed(0)
    base = backbones.create("dea-net-t").eval()
    result = export_onnx(base, tmp_path / "model.onnx", opset=17, slim=False, metadata={"k": 1})
    proto = onnx.load(str(result.path))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["output"]
    assert _dims(proto.graph.input[0]) == ["N", 3, "H", "W"]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert result.opset == 17 and result.exporter == "torchscript" and result.precision == "fp32"
    # initializers are named by state-dict keys (refit mapping relies on it)
    assert set(base.state_dict()) <= set(initializer_names(proto))
    assert json.loads({p.key: p.value for p in proto.metadata_props}["bilalora"]) == {"k": 1}
    cases = random_cases([(68, 92), (100, 132)], [2, 1], seed=5)
    references = reference_outputs(ExportWrapper(base), cases)
    parity = onnx_parity(result.path, "fp32", cases, references).check()
    assert parity.max_abs <= 1e-4 and [c["shape"] for c in parity.cases] == [[2, 3, 68, 92], [1, 3, 100, 132]]
    # the graph clamps: outputs in [0, 1]
    assert all(0.0 <= r.min() and r.max() <= 1.0 for r in references)


def test_onnx_unmerged_keeps_lora_graph(base_and_adapter, tmp_path, small_cases):
    base, adapter = base_and_adapter
    gated = gated_copy(adapter, base)
    result = export_onnx(gated, tmp_path / "model.onnx", opset=17, fold_constants=False)
    assert result.slim.startswith("skipped")
    names = initializer_names(result.path)
    assert any(name.endswith(".lora_A") for name in names) and any(name.endswith(".lora_B") for name in names)
    assert result.parameters == lora.count_parameters(gated) > lora.count_parameters(base)
    references = reference_outputs(ExportWrapper(gated), small_cases)
    assert onnx_parity(result.path, "fp32", small_cases, references).check().max_abs <= 1e-4


def test_onnx_fp16_model_fp32_io_and_parity(tmp_path):
    torch.manual_seed(1)
    base = backbones.create("dea-net-t").eval()
    fp32 = export_onnx(base, tmp_path / "model.onnx", opset=17)
    fp16 = export_fp16(base, tmp_path / "model_fp16.onnx", opset=17)
    proto = onnx.load(str(fp16.path))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    conv_weights = [i for i in proto.graph.initializer if i.name.endswith(".weight")]
    assert conv_weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in conv_weights)
    assert not [n for n in fp32_initializers(fp16.path) if n.endswith((".weight", ".bias"))]
    assert fp16.path.stat().st_size < 0.6 * fp32.path.stat().st_size
    cases = random_cases([(64, 96), (132, 100)], [2, 1], seed=2)
    references = reference_outputs(ExportWrapper(base), cases)
    parity16 = onnx_parity(fp16.path, "fp16", cases, references).check()
    assert parity16.psnr_db >= 40.0 and parity16.gate == {"psnr_db": 40.0}
    # against a float64 reference: fp32 ONNX is near exact, fp16 within the gate
    model64 = ExportWrapper(_double_copy(base)).eval()
    with torch.no_grad():
        exact = [model64(torch.from_numpy(c.array).double()).numpy() for c in cases]
    parity32 = onnx_parity(fp32.path, "fp32", cases, exact)
    parity16_64 = onnx_parity(fp16.path, "fp16", cases, exact)
    assert parity32.max_abs <= 1e-5 and parity16_64.psnr_db >= 40.0


def _double_copy(model):
    import copy

    return copy.deepcopy(model).double()


def test_onnx_fixed_shape_is_static(tmp_path):
    torch.manual_seed(0)
    base = backbones.create("dea-net-t").eval()
    result = export_onnx(base, tmp_path / "fixed.onnx", opset=17, fixed=(1, 64, 96), slim=False)
    proto = onnx.load(str(result.path))
    assert _dims(proto.graph.input[0]) == [1, 3, 64, 96] and _dims(proto.graph.output[0]) == [1, 3, 64, 96]
    cases = random_cases([(64, 96)], [1])
    assert onnx_parity(result.path, "fp32", cases, reference_outputs(ExportWrapper(base), cases)).check().passed


def test_onnxslim_failure_only_warns(tmp_path, monkeypatch):
    fake = types.ModuleType("onnxslim")
    fake.__version__ = "9.9"

    def broken(model):
        raise RuntimeError("simulated slim crash\nsecond line")

    fake.slim = broken
    monkeypatch.setitem(sys.modules, "onnxslim", fake)
    notes = []
    torch.manual_seed(0)
    result = export_onnx(backbones.create("dea-net-t").eval(), tmp_path / "m.onnx", opset=17, log=notes.append)
    assert result.slim == "failed: simulated slim crash"
    assert notes and "onnxslim 9.9 failed" in notes[0] and "\n" not in notes[0]
    onnx.checker.check_model(onnx.load(str(result.path)))


def test_export_error_is_one_line(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eigvals(x[0, 0]).real[None, None].expand_as(x)

    with pytest.raises(UserError) as info:
        export_onnx(Broken(), tmp_path / "b.onnx", opset=17)
    assert "ONNX export of b.onnx failed" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "b.onnx").exists()


# --------------------------------------------------------------------------- parity helpers


def test_parity_gates_and_messages():
    cases = random_cases([(8, 12)], [1])
    reference = [cases[0].array.copy()]
    ok = evaluate("model.onnx", "fp32", cases, [reference[0] + 5e-5], reference, gate_for("onnx", "fp32"))
    assert ok.passed
    bad = evaluate("model.onnx", "fp32", cases, [reference[0] + 2e-4], reference, gate_for("onnx", "fp32"))
    with pytest.raises(ParityError, match=r"model\.onnx \(fp32\): max abs error 2\.000e-04 > 1e-04"):
        bad.check()
    noisy = reference[0] + np.float32(0.02)
    fp16 = evaluate("model_fp16.onnx", "fp16", cases, [noisy], reference, gate_for("onnx", "fp16"))
    assert math.isclose(fp16.psnr_db, psnr(noisy, reference[0]), rel_tol=1e-6) and fp16.psnr_db < 40
    with pytest.raises(ParityError, match=r"model_fp16\.onnx \(fp16\): PSNR 33\.98 dB < 40 dB"):
        fp16.check()
    assert gate_for("merge", "fp32") == {"max_abs": 1e-5} and gate_for("engine", "fp32") == {"psnr_db": 40.0}


def test_image_cases_pad_and_fixed(hazy_folder):
    cases = image_cases(hazy_folder, count=2)
    assert len(cases) == 2 and cases[0].label.endswith(".png")
    assert cases[0].shape == [1, 3, 72, 96]  # already multiples of 4
    odd = image_cases(hazy_folder, count=1, max_side=50)
    assert odd[0].shape[2] % 4 == 0 and odd[0].shape[3] % 4 == 0 and max(odd[0].shape[2:]) >= 50
    fixed = image_cases(hazy_folder, count=1, fixed=(2, 64, 64))
    assert fixed[0].shape == [2, 3, 64, 64] and fixed[0].array.dtype == np.float32


# --------------------------------------------------------------------------- pipeline (library)


def test_pipeline_parity_failure_stops_and_records(tmp_path, monkeypatch):
    from bilalora.export import parity
    from bilalora.export.pipeline import ExportOptions, run_export

    monkeypatch.setattr(parity, "FP32_MAX_ABS", 0.0)
    options = ExportOptions(base=True, backbone="dea-net-t", random_weights=True, out=tmp_path / "out",
                            parity_sizes=((64, 96),), slim=False)  # fmt: skip
    with pytest.raises(ParityError) as info:
        run_export(options)
    message = str(info.value)
    assert "parity gate failed for model.onnx" in message and "removed" in message and "\n" not in message
    assert not (tmp_path / "out" / "model.onnx").exists()
    record = sidecar.read_sidecar(tmp_path / "out")
    assert record["status"] == "failed" and record["error"] == message
    assert record["artefacts"]["model.onnx"]["parity"]["passed"] is False
    assert record["artefacts"]["model.onnx"]["removed"] is True


# --------------------------------------------------------------------------- sidecar


def test_sidecar_helpers(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"abc")
    entry = sidecar.file_entry(path, tmp_path, precision="fp32")
    assert entry == {
        "path": "a.bin",
        "bytes": 3,
        "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "precision": "fp32",
    }
    sidecar.write_sidecar(tmp_path, {"format_version": 1, "trt": None})
    assert sidecar.read_sidecar(tmp_path)["trt"] is None
    sidecar.write_sidecar(tmp_path, {"format_version": 99})
    with pytest.raises(ValueError, match="format 99"):
        sidecar.read_sidecar(tmp_path / "model.json")
    versions = sidecar.tool_versions("10.9.0.34")
    assert versions["tensorrt"] == "10.9.0.34" and versions["onnx"] == onnx.__version__


def test_sidecar_is_torch_free():
    result = run_without_torch("from bilalora.runtime.model_json import read_sidecar, engine_mismatch\nprint('ok')\n", 60)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_onnx_dynamo_exporter(tmp_path):
    pytest.importorskip("onnxscript")  # the torch.export-based exporter needs it (the [dev] extra)
    torch.manual_seed(0)
    base = backbones.create("dea-net-t").eval()
    result = export_onnx(base, tmp_path / "model.onnx", opset=18, dynamo=True)
    proto = onnx.load(str(result.path))
    assert result.exporter == "dynamo" and result.opset == 18
    assert _dims(proto.graph.input[0]) == ["N", 3, "H", "W"]
    assert set(base.state_dict()) <= set(initializer_names(proto))
    cases = random_cases([(68, 92)], [2])
    assert onnx_parity(result.path, "fp32", cases, reference_outputs(ExportWrapper(base), cases)).check().passed
