"""Export formats and the export folder's integrity, on the width-8 DEA-Net ("dea-net-t") and small images:

* OpenVINO IR and calibrated INT8 QDQ artefacts against PyTorch (run here for real on the CPU);
* the ONNX initializer swap (``--refit``): adapter B swapped into A's graph equals B's own export;
* the staged export: a crash or a SIGKILL mid-export leaves the earlier export whole and consistent;
* the degenerate-output gate: a bit-flipped adapter (a weight at 4.6e35) is refused;
* the table of formats drives the managed files and labels.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from bilalora import backbones
from bilalora.errors import UserError
from bilalora.export.formats import FORMATS, by_file, label_of, managed_files
from bilalora.export.onnx_export import ExportWrapper
from bilalora.export.options import ExportOptions
from bilalora.export.parity import (
    ParityError,
    degenerate,
    evaluate,
    gate_for,
    image_cases,
    ort_session,
    psnr,
    random_cases,
)
from bilalora.export.pipeline import run_export
from bilalora.runtime import model_json as sidecar
from test_export import make_adapter_run  # tests/ is on sys.path under pytest


def _weights_file(folder: Path, seed: int = 3) -> tuple[torch.nn.Module, Path]:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = backbones.create("dea-net-t").eval()
    path = folder / "w.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def _consistent(folder: Path) -> dict:
    """model.json of ``folder``, checked: every listed file exists with its recorded sha256, no hidden files."""
    record = sidecar.read_sidecar(folder)
    for name, entry in record["artefacts"].items():
        if entry.get("removed"):
            assert not (folder / name).exists()
            continue
        assert sidecar.sha256_of(folder / entry["path"]) == entry["sha256"], name
        if "bin" in entry:
            assert sidecar.sha256_of(folder / entry["bin"]["path"]) == entry["bin"]["sha256"]
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]
    return record


# --------------------------------------------------------------------------- table of formats


def test_the_table_drives_files_and_labels():
    assert [row.file for row in FORMATS] == [
        "merged.safetensors", "model.onnx", "model_fp16.onnx", "model_int8.onnx", "model.xml", "model.engine",
    ]  # fmt: skip
    assert "model.bin" in managed_files() and by_file("model.bin").key == "openvino"
    assert label_of("onnx", "int8") == "ONNX INT8" and label_of("tensorrt", "fp16") == "TensorRT fp16"
    assert label_of("openvino", "fp16") == "OpenVINO" and label_of("safetensors", "fp32") == "PyTorch"
    assert gate_for("onnx", "int8") == {"psnr_db": 35.0} and gate_for("openvino", "bf16") == {"psnr_db": 40.0}


# --------------------------------------------------------------------------- degenerate outputs


def test_saturated_or_constant_outputs_fail_every_gate():
    cases = random_cases([(8, 12)], [1])
    saturated = (np.random.default_rng(0).random((1, 3, 8, 12)) > 0.5).astype(np.float32)  # all 0 or 1
    for gate in (gate_for("onnx", "fp32"), gate_for("onnx", "fp16"), gate_for("merge", "fp32")):
        result = evaluate("model.onnx", "fp32", cases, [saturated], [saturated.copy()], gate)
        assert result.max_abs == 0.0 and not result.passed  # identical, and still a failure
        with pytest.raises(ParityError, match="degenerate output: reference saturated"):
            result.check()
    constant = np.full((1, 3, 8, 12), 0.5, dtype=np.float32)
    assert degenerate(constant) == "constant" and degenerate(constant * np.nan) == "not finite"
    assert degenerate(np.random.default_rng(1).random((1, 3, 8, 12))) is None
    ok = np.random.default_rng(1).random((1, 3, 8, 12)).astype(np.float32)
    assert evaluate("m", "fp32", cases, [ok], [ok.copy()], gate_for("onnx", "fp32")).passed


def test_bit_flipped_adapter_is_refused(tmp_path):
    """One exponent bit flipped in a LoRA factor (value 4.6e35): the export must refuse, not ship 0/255 pixels."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, adapter_path = make_adapter_run(tmp_path / "run")
    with safe_open(str(adapter_path), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata()
    key = next(k for k in tensors if k.endswith("lora_B"))
    flipped = tensors[key].clone()
    flipped.view(-1)[0] = 4.6e35
    tensors[key] = flipped
    save_file(tensors, str(adapter_path), metadata=metadata)
    with pytest.raises(UserError) as info:
        run_export(ExportOptions(adapter=adapter_path, out=tmp_path / "out", parity_sizes=((32, 32),), slim=False))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out" / "model.onnx").exists()


# --------------------------------------------------------------------------- staged export


def test_crash_mid_export_keeps_the_earlier_export(tmp_path, monkeypatch):
    _, weights = _weights_file(tmp_path)
    out = tmp_path / "export"
    options = ExportOptions(base=True, backbone="dea-net-t", weights=str(weights), out=out,
                            parity_sizes=((32, 32),), slim=False)  # fmt: skip
    run_export(options)
    before = _consistent(out)
    from bilalora.export import pipeline

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash after model.onnx")

    monkeypatch.setattr(pipeline, "_openvino_step", crash)
    with pytest.raises(RuntimeError):
        run_export(ExportOptions(**{**options.__dict__, "fp16": True, "openvino": True}))
    after = _consistent(out)
    assert after["artefacts"] == before["artefacts"] and not (out / "model_fp16.onnx").exists()
    assert not (tmp_path / "export.partial").exists()


_KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from bilalora.export import pipeline
from bilalora.export.options import ExportOptions
real = pipeline._onnx_step
def step(state, events, model, key, *args):
    real(state, events, model, key, *args)
    if key == "onnx-fp16":  # both ONNX files written in the staging folder: die without cleanup
        os.kill(os.getpid(), signal.SIGKILL)
pipeline._onnx_step = step
pipeline.run_export(ExportOptions(base=True, backbone="dea-net-t", weights=sys.argv[1], out=Path(sys.argv[2]),
                                  fp16=True, parity_sizes=((32, 32),), slim=False))
"""


def test_sigkill_mid_reexport_leaves_old_export_then_is_cleaned(tmp_path):
    _, weights = _weights_file(tmp_path, seed=3)
    out = tmp_path / "export"
    base = dict(base=True, backbone="dea-net-t", out=out, parity_sizes=((32, 32),), slim=False)
    run_export(ExportOptions(weights=str(weights), **base))
    before = _consistent(out)
    _, other = _weights_file(tmp_path / "other", seed=4)
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(other), str(out)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parent)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    staged = tmp_path / "export.partial"
    assert (staged / "model_fp16.onnx").is_file()  # the killed export's files are beside, not in, the folder
    assert _consistent(out)["artefacts"] == before["artefacts"]  # old files, old record: they agree
    assert not (out / "model_fp16.onnx").exists()
    result = run_export(ExportOptions(weights=str(other), **base))
    assert not staged.exists() and _consistent(out)["base_fingerprint"] == result.record["base_fingerprint"]
    assert result.record["base_fingerprint"] != before["base_fingerprint"]


def test_interrupted_commit_is_finished_by_the_next_export(tmp_path):
    """A kill between the file moves of the swap: the staged model.json finishes the commit next time."""
    from bilalora.export.staging import Staging

    out = tmp_path / "export"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"old onnx")
    (out / "model.engine").write_bytes(b"old engine")
    (out / "notes.txt").write_text("user file")
    staging = Staging(out)
    staging.dir.mkdir()
    (staging.dir / "model_fp16.onnx").write_bytes(b"new fp16")
    (out / "model.onnx").write_bytes(b"new onnx")  # already moved before the kill
    entries = {n: sidecar.file_entry(p, p.parent) for n, p in
               (("model.onnx", out / "model.onnx"), ("model_fp16.onnx", staging.dir / "model_fp16.onnx"))}  # fmt: skip
    sidecar.write_sidecar(staging.dir, {"format_version": sidecar.FORMAT_VERSION, "artefacts": entries})
    notes = Staging(out).open()
    assert notes and "finished" in notes[0]
    _consistent(out)
    assert not (out / "model.engine").exists() and (out / "notes.txt").read_text() == "user file"


# --------------------------------------------------------------------------- OpenVINO and INT8


@pytest.fixture(scope="module")
def formats_export(tmp_path_factory):
    """dea-net-t with known weights exported with --openvino and --int8 (calibration: made-up hazy frames)."""
    from conftest import write_hazy_images

    folder = tmp_path_factory.mktemp("formats")
    model, weights = _weights_file(folder)
    write_hazy_images(folder / "calib", count=6, size=(60, 84))
    options = ExportOptions(base=True, backbone="dea-net-t", weights=str(weights), out=folder / "export",
                            openvino=True, int8=True, calib=folder / "calib", calib_images=4,
                            parity_sizes=((64, 96),), slim=False)  # fmt: skip
    result = run_export(options)
    return model, result, folder


def test_openvino_ir_matches_pytorch(formats_export):
    import openvino as ov

    model, result, _ = formats_export
    out = result.out_dir
    record = _consistent(out)
    entry = record["artefacts"]["model.xml"]
    assert entry["format"] == "openvino" and entry["bin"]["path"] == "model.bin" and entry["parity"]["passed"]
    assert entry["parity"]["inference_precision"] in ("bf16", "f32") and entry["parity"]["psnr_db"] >= 40.0
    # independently of the gate: run the IR in OpenVINO (default CPU precision) against PyTorch fp32
    compiled = ov.Core().compile_model(str(out / "model.xml"), "CPU")
    x = random_cases([(68, 92)], [1], seed=11)[0].array
    with torch.no_grad():
        reference = ExportWrapper(model).eval()(torch.from_numpy(x)).numpy()
    assert psnr(np.asarray(compiled({"input": x})[compiled.output(0)]), reference) >= 40.0


def test_int8_qdq_matches_pytorch_on_held_out_images(formats_export):
    model, result, folder = formats_export
    record = _consistent(result.out_dir)
    entry = record["artefacts"]["model_int8.onnx"]
    assert entry["precision"] == "int8" and entry["parity"]["passed"] and entry["parity"]["gate"] == {"psnr_db": 35.0}
    assert entry["calibration"]["images"] == [f"hazy_0{i}.png" for i in range(4)]
    assert entry["calibration"]["held_out"] == ["hazy_04.png", "hazy_05.png"]
    assert isinstance(entry["kept_float"], list) and entry["float_nodes"] == entry["kept_float"]
    assert entry["int8_convs"] == entry["convs"] - len(entry["float_nodes"]) > entry["convs"] // 2
    kept = [a for a in entry["attempts"] if a["passed"] and a["kept_float"] == len(entry["float_nodes"])]
    assert kept and kept[-1]["stage"] in ("search", "ranges") and entry["parity"]["psnr_db"] >= 35.0
    assert entry["search"]["seconds"] > 0 and entry["activation_percentile"] in (99.99, 99.999, 99.9999, 100.0)
    graph = onnx.load(str(result.out_dir / "model_int8.onnx")).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    zero_points = [init for init in graph.initializer if init.name.endswith("_zero_point")]
    assert zero_points and all(not onnx.numpy_helper.to_array(z).any() for z in zero_points)  # symmetric
    # independently: the held-out frames through onnxruntime vs PyTorch fp32
    session = ort_session(result.out_dir / "model_int8.onnx", 1)
    for case in image_cases([folder / "calib" / "hazy_05.png"], count=1):
        with torch.no_grad():
            reference = ExportWrapper(model).eval()(torch.from_numpy(case.array)).numpy()
        assert psnr(session.run(["output"], {"input": case.array})[0], reference) >= 35.0


# --------------------------------------------------------------------------- refit: ONNX initializer swap


def _adapter_on(base: torch.nn.Module, seed: int):
    """Another adapter for the same base: other random LoRA factors and gates."""
    from bilalora import lora, sites
    from bilalora.adapter import Adapter

    model = backbones.create("dea-net-t").eval()
    model.load_state_dict(base.state_dict())
    lora.inject(model, sites.default_sites(model), rank=4, lora_alpha=8)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.05)
        for gate in lora.site_gates(model).values():
            gate.logit.copy_(torch.randn((), generator=generator))
    return Adapter.from_model(model, ["level3_block1", "down_level2_block2", "level3_block5"], method="bilevel")


def test_refit_swaps_adapter_b_into_a_graph_exactly(tmp_path):
    from bilalora.export.refit import refit_export

    base, path_a = make_adapter_run(tmp_path / "a", seed=0)
    _adapter_on(base, seed=9).save(tmp_path / "b.safetensors")
    common = dict(refit=True, parity_sizes=((64, 96),), slim=True)
    a = run_export(ExportOptions(adapter=path_a, out=tmp_path / "a-export", **common))
    mapping = a.record["refit"]["onnx_to_state_dict"]
    assert set(mapping) == set(base.state_dict()) & set(mapping) and all(k == v for k, v in mapping.items())
    names = {init.name for init in onnx.load(str(tmp_path / "a-export" / "model.onnx")).graph.initializer}
    weights = {k for k, v in base.state_dict().items() if v.is_floating_point() and k.endswith(("weight", "bias"))}
    assert weights <= names  # every weight reachable by name: nothing folded
    b_own = run_export(ExportOptions(adapter=tmp_path / "b.safetensors", out=tmp_path / "b-export",
                                     weights=str(tmp_path / "a" / "base.safetensors"), backbone="dea-net-t",
                                     **common))  # fmt: skip
    swapped = refit_export(tmp_path / "a-export", tmp_path / "b.safetensors", out=tmp_path / "b-swapped")
    assert swapped.swapped["model.onnx"] == len(mapping)
    record = _consistent(tmp_path / "b-swapped")
    assert record["adapter"]["sha256"] == sidecar.sha256_of(tmp_path / "b.safetensors")
    x = random_cases([(68, 92)], [2], seed=4)[0].array
    own = ort_session(b_own.out_dir / "model.onnx", 1).run(["output"], {"input": x})[0]
    via_swap = ort_session(tmp_path / "b-swapped" / "model.onnx", 1).run(["output"], {"input": x})[0]
    a_out = ort_session(a.out_dir / "model.onnx", 1).run(["output"], {"input": x})[0]
    assert np.abs(own - via_swap).max() <= 1e-6 and np.abs(own - a_out).max() > 1e-3


def test_refit_needs_a_refit_export(tmp_path):
    from bilalora.export.refit import refit_export

    _, path_a = make_adapter_run(tmp_path / "a", seed=0)
    run_export(ExportOptions(adapter=path_a, out=tmp_path / "plain", parity_sizes=((32, 32),), slim=False))
    with pytest.raises(UserError, match="not exported with --refit"):
        refit_export(tmp_path / "plain", path_a)


# --------------------------------------------------------------------------- input normalisation


def test_input_norm_is_folded_into_the_graph_and_recorded(tmp_path):
    """Weights expecting CLIP-normalised input: the graph takes [0, 1] and equals the network fed as the release feeds it."""
    from bilalora.backbones.normalize import CLIP_MEAN, CLIP_STD

    plain, weights = _weights_file(tmp_path)
    result = run_export(ExportOptions(base=True, backbone="dea-net-t", weights=str(weights), input_norm="clip",
                                      out=tmp_path / "export", parity_sizes=((64, 96),), slim=False))  # fmt: skip
    norm = result.record["input_norm"]
    assert norm["mean"] == pytest.approx(CLIP_MEAN) and norm["std"] == pytest.approx(CLIP_STD)
    assert json.loads(onnx.load(str(tmp_path / "export" / "model.onnx")).metadata_props[0].value)["input_norm"] == norm
    x = random_cases([(68, 92)], [1], seed=2)[0].array
    mean = np.asarray(CLIP_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(CLIP_STD, dtype=np.float32).reshape(1, 3, 1, 1)
    with torch.no_grad():
        release = ExportWrapper(plain).eval()(torch.from_numpy((x - mean) / std)).numpy()
    graph = ort_session(tmp_path / "export" / "model.onnx", 1).run(["output"], {"input": x})[0]
    assert np.abs(graph - release).max() <= 1e-4
    with torch.no_grad():  # and the fold matters: the network fed [0, 1] directly is far off
        assert np.abs(ExportWrapper(plain).eval()(torch.from_numpy(x)).numpy() - graph).max() > 1e-3


def test_bit_flipped_base_weight_fails_the_degenerate_gate(tmp_path):
    """Base weights are not an adapter (no checksum): the parity gate itself must catch the 0/1 outputs."""
    from safetensors.torch import save_file

    model, _ = _weights_file(tmp_path)
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    state["down1.0.weight"].view(-1)[0] = 4.6e35  # one flipped exponent bit in the first convolution
    save_file(state, str(tmp_path / "flipped.safetensors"))
    with pytest.raises(ParityError) as info:
        run_export(ExportOptions(base=True, backbone="dea-net-t", weights=str(tmp_path / "flipped.safetensors"),
                                 out=tmp_path / "out", parity_sizes=((32, 32),), slim=False))  # fmt: skip
    assert "degenerate output" in str(info.value) and "\n" not in str(info.value)
    record = sidecar.read_sidecar(tmp_path / "out")
    assert record["status"] == "failed" and record["artefacts"]["model.onnx"]["removed"] is True
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_openvino_bf16_failing_its_gate_is_gated_in_f32(tmp_path, monkeypatch):
    """bf16 under 40 dB on a case (measured on a real 720p frame of dea-net-s): the IR is kept, gated in f32."""
    from bilalora.export import openvino_export

    real = openvino_export.openvino_parity

    def bf16_fails(path, cases, references, precision=None, threads=0):
        result = real(path, cases, references, precision, threads)
        if precision is None:  # what the CPU would pick: pretend it was bf16 and lost accuracy on one case
            result.details["inference_precision"] = "bf16"
            result.cases[0].update(psnr_db=28.0, passed=False)
        return result

    monkeypatch.setattr(openvino_export, "openvino_parity", bf16_fails)
    _, weights = _weights_file(tmp_path)
    result = run_export(ExportOptions(base=True, backbone="dea-net-t", weights=str(weights), out=tmp_path / "out",
                                      openvino=True, parity_sizes=((32, 32),), slim=False))  # fmt: skip
    parity = result.record["artefacts"]["model.xml"]["parity"]
    assert parity["inference_precision"] == "f32" and parity["passed"]
    assert parity["bf16"] == {"passed": False, "psnr_db": 28.0, "worst_input": "random"}
    assert any("OpenVINO bf16 failed its gate (28.0 dB" in w for w in result.warnings)
    assert not any("gated on random inputs only" in w for w in result.warnings)  # gated in f32, not bf16


def test_int8_gate_refusal_and_explicit_lower_gate(tmp_path, monkeypatch):
    """No quantisation passing the gate: one line with every attempt's PSNR and no file; --int8-min-psnr is recorded."""
    from conftest import write_hazy_images

    from bilalora.export import parity

    _, weights = _weights_file(tmp_path)
    write_hazy_images(tmp_path / "calib", count=4, size=(40, 52))
    common = dict(base=True, backbone="dea-net-t", weights=str(weights), int8=True, calib=tmp_path / "calib",
                  calib_images=3, parity_sizes=((32, 32),), slim=False)  # fmt: skip
    monkeypatch.setattr(parity, "INT8_MIN_PSNR", 200.0)  # unreachable: every keep-float set within the cap fails
    with pytest.raises(ParityError) as info:
        run_export(ExportOptions(out=tmp_path / "refused", **common))
    message = str(info.value)
    assert "no quantisation reached PSNR 200 dB" in message and "every conv int8" in message and "\n" not in message
    assert "at most" in message and "may stay float" in message
    assert not (tmp_path / "refused" / "model_int8.onnx").exists()
    result = run_export(ExportOptions(out=tmp_path / "lowered", int8_min_psnr=20.0, **common))
    entry = result.record["artefacts"]["model_int8.onnx"]
    assert entry["parity"]["gate"] == {"psnr_db": 20.0} and result.record["options"]["int8_min_psnr"] == 20.0


def test_refit_name_check_refuses_folded_weights(tmp_path):
    """A weight that is not a named initializer (folded into a constant) makes --refit refuse in one line."""
    from bilalora.export.onnx_export import export_onnx
    from bilalora.export.refit import check_refit_names

    model, _ = _weights_file(tmp_path)
    export_onnx(model, tmp_path / "m.onnx", opset=17, fold_constants=False, slim=False)
    state = dict(model.state_dict())
    assert check_refit_names(tmp_path / "m.onnx", state)  # every weight named
    state["extra.conv.weight"] = torch.zeros(3, 3, 1, 1)
    with pytest.raises(UserError, match="cannot be refitted"):
        check_refit_names(tmp_path / "m.onnx", state)


def test_cli_export_does_not_import_the_app():
    """cli/export.py and cli/app.py no longer import each other (the app wires commands; commands stand alone)."""
    code = "import sys, bilalora.cli.export; print('bilalora.cli.app' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr
