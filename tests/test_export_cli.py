"""``bilalora export`` end to end in a temporary working directory: the argument-free chain after an
adapt run, an explicit unmerged adapter, the base, TensorRT absent, and one-line errors.

Adapters are made here (``lora.inject`` + random B + ``Adapter.from_model``), not by ``bilalora adapt``.
"""

from __future__ import annotations

import json
import os
import sys

import onnx
import pytest
from typer.testing import CliRunner

from bilalora import backbones
from bilalora.adapter import fingerprint
from bilalora.cli.app import app
from test_export import make_adapter_run  # tests/ is on sys.path under pytest

runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, ["export", *args], terminal_width=250)


def test_chain_export_merge_picks_newest_run(tmp_path, monkeypatch, hazy_folder):
    monkeypatch.chdir(tmp_path)
    make_adapter_run(tmp_path / "runs" / "adapt" / "exp", seed=5)
    base, _ = make_adapter_run(tmp_path / "runs" / "adapt" / "exp2", seed=0)
    old = tmp_path / "runs" / "adapt" / "exp" / "adapter.safetensors"
    os.utime(old, ns=(1_000_000_000, 1_000_000_000))  # exp2 is the newest run
    result = _invoke("--merge", "--fp16", "--images", str(hazy_folder))
    assert result.exit_code == 0, result.output
    out = tmp_path / "runs" / "adapt" / "exp2" / "export"
    text = result.output
    assert "adapter: runs/adapt/exp2/adapter.safetensors (newest run" in text
    assert "weights:" in text and "summary.json" in text
    assert ".partial" not in text  # lines name where the files end up, not the staging folder
    for line in ("PyTorch: export success", "ONNX: export success", "ONNX fp16: export success"):
        assert line in text
    assert "Merge: 3 site(s)" in text and "max |gated - merged|" in text
    registered = {info.name for info in app.registered_commands}
    record = json.loads((out / "model.json").read_text())
    assert any(command.startswith("bilalora bench --model") for command in record["next"])
    for command in record["next"]:  # suggested only where this installation has the command
        assert (command in text) == (command.split()[1] in registered), command
    assert sorted(p.name for p in out.iterdir()) == [
        "merged.safetensors",
        "model.json",
        "model.onnx",
        "model_fp16.onnx",
    ]

    record = json.loads((out / "model.json").read_text())
    assert record["format_version"] == 1 and record["status"] == "ok" and record["error"] is None
    assert record["source"] == {"mode": "adapter", "run": "runs/adapt/exp2"}
    assert record["backbone"] == "dea-net-t" and record["merged"] is True
    assert record["base_fingerprint"] == fingerprint(base)
    assert record["input"] == {
        "name": "input",
        "layout": "NCHW",
        "dtype": "float32",
        "range": [0.0, 1.0],
        "color": "RGB",
        "pad_multiple": 4,
        "pad_mode": "reflect",
        "pad_where": "bottom-right",
    }
    assert record["output"]["range"] == [0.0, 1.0] and record["output"]["clamped"] is True
    assert record["shapes"]["dynamic"] is True and record["shapes"]["multiple"] == 4
    assert record["opset"] == 17 and record["exporter"] == "torchscript"
    assert set(record["versions"]) >= {"python", "torch", "onnx", "onnxruntime", "tensorrt"}
    assert record["trt"] is None
    assert set(record["timings"]) >= {"load", "merge", "onnx", "fp16", "parity", "total"}

    adapter = record["adapter"]
    assert adapter["base_fingerprint"] == fingerprint(base) and adapter["rank"] == 4
    assert [site["name"] for site in adapter["sites"]] == ["level3_block2", "down_level1_block3", "level3_block7"]
    assert all(0 < site["gate"] < 1 for site in adapter["sites"])
    merge = adapter["merge"]
    assert merge["parameters_merged"] == merge["parameters_base"] < merge["parameters_gated"]
    assert merge["max_abs"] <= 1e-5

    arts = record["artefacts"]
    onnx32, onnx16 = arts["model.onnx"], arts["model_fp16.onnx"]
    assert onnx32["precision"] == "fp32" and onnx16["precision"] == "fp16"
    assert onnx32["bytes"] == (out / "model.onnx").stat().st_size and len(onnx32["sha256"]) == 64
    assert onnx32["parameters"] >= merge["parameters_base"]
    assert onnx32["parity"]["passed"] and onnx32["parity"]["max_abs"] <= 1e-4
    assert onnx16["parity"]["passed"] and onnx16["parity"]["psnr_db"] >= 40
    shapes = [case["shape"] for case in onnx32["parity"]["cases"]]
    assert [2, 3, 64, 96] in shapes and [1, 3, 260, 348] in shapes  # batch 2 and odd sizes
    labels = [case["input"] for case in onnx32["parity"]["cases"]]
    assert labels.count("random") == 2 and "hazy_00.png" in labels and "hazy_01.png" in labels
    assert arts["merged.safetensors"]["parity"]["max_abs"] <= 1e-5

    # merged.safetensors is a plain checkpoint with the base's keys; the ONNX carries its metadata
    merged = backbones.load("dea-net-t", weights=out / "merged.safetensors")
    assert list(merged.state_dict()) == list(base.state_dict())
    assert fingerprint(merged) == merge["merged_fingerprint"]
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(meta["bilalora"])["adapter_base_fingerprint"] == fingerprint(base)
    assert not list(out.glob(".*tmp*"))


def test_explicit_adapter_no_merge(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, adapter_path = make_adapter_run(tmp_path / "elsewhere", weights_in_summary=False)
    out = tmp_path / "unmerged"
    result = _invoke(
        "--adapter",
        str(adapter_path),
        "--no-merge",
        "--weights",
        str(adapter_path.parent / "base.safetensors"),
        "--out",
        str(out),
        "--shape",
        "64x96",
        "--batch",
        "2",
    )
    assert result.exit_code == 0, result.output
    assert "Unmerged: gated LoRA graph" in result.output and "--merge removes that" in result.output
    assert not (out / "merged.safetensors").exists()
    record = json.loads((out / "model.json").read_text())
    assert record["merged"] is False and record["shapes"]["fixed"] == [2, 3, 64, 96]
    merge = record["adapter"]["merge"]
    assert merge["merged"] is False and 0 < merge["lora_overhead"] < 0.1
    assert record["artefacts"]["model.onnx"]["parameters"] == merge["parameters_gated"]
    assert record["artefacts"]["model.onnx"]["parity"]["cases"][0]["shape"] == [2, 3, 64, 96]
    names = [init.name for init in onnx.load(str(out / "model.onnx")).graph.initializer]
    assert any(name.endswith(".lora_B") for name in names)


def test_no_adapter_run_and_no_base_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _invoke("--merge", "--trt")
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 2  # the header and one error line
    assert "nothing to export" in lines[-1] and "bilalora adapt --images DIR" in lines[-1] and "--base" in lines[-1]
    assert "Traceback" not in result.output


def test_tensorrt_absent_writes_onnx_then_fails(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    result = _invoke("--base", "--backbone", "dea-net-t", "--random-weights", "--trt", "--shape", "64x96")
    assert result.exit_code != 0
    out = tmp_path / "runs" / "export" / "dea-net-t-base"
    assert "ONNX: export success" in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1 and "pip install 'bilalora[trt]'" in errors[0] and str(out.relative_to(tmp_path)) in errors[0]
    )
    assert (out / "model.onnx").is_file() and not (out / "model.engine").exists()
    record = json.loads((out / "model.json").read_text())
    assert record["status"] == "partial" and "bilalora[trt]" in record["error"]
    assert record["adapter"] is None and record["source"]["mode"] == "base"
    assert record["artefacts"]["model.onnx"]["parity"]["passed"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--base", "--shape", "250x250"], "--shape 250x250: height and width must be multiples of 4"),
        (["--base", "--max", "1000x1001"], "--max 1000x1001: height and width must be multiples of 4"),
        (["--base", "--backbone", "dea-net-t"], "backbone dea-net-t has no weights here"),
        (["--base", "--backbone", "dea-net-t", "--random-weights", "--int8"], "--int8 needs calibration images"),
        (["--base", "--adapter", "x.safetensors"], "--adapter and --base exclude each other"),
        (["--adapter", "missing.safetensors"], "adapter file not found: missing.safetensors (--adapter)"),
        (
            ["--base", "--backbone", "dea-net-t", "--images", "no-such-folder"],
            "image folder no-such-folder does not exist",
        ),
    ],
)
def test_bad_flags_are_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = _invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_wrong_base_weights_is_one_line(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    make_adapter_run(tmp_path / "runs" / "adapt" / "exp")
    other = backbones.create("dea-net-t")
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "other.safetensors"))
    result = _invoke("--weights", "other.safetensors")
    assert result.exit_code == 2
    assert "fingerprint" in result.output and "--weights" in result.output
    assert not (tmp_path / "runs" / "adapt" / "exp" / "export" / "model.onnx").exists()


def test_refit_onnx_swaps_another_adapter_in(tmp_path, monkeypatch):
    """export --refit, then --refit-onnx DIR --adapter B: one line per swapped file, a consistent new folder."""
    from bilalora.runtime import model_json as sidecar
    from test_export_formats import _adapter_on

    monkeypatch.chdir(tmp_path)
    base, adapter_a = make_adapter_run(tmp_path / "runs" / "adapt" / "exp")
    _adapter_on(base, seed=9).save(tmp_path / "b.safetensors")
    first = _invoke("--adapter", str(adapter_a), "--refit", "--out", "a")
    assert first.exit_code == 0, first.output
    assert "ONNX initializers carry state-dict names" in first.output
    result = _invoke("--refit-onnx", "a", "--adapter", "b.safetensors", "--out", "b")
    assert result.exit_code == 0, result.output
    assert "model.onnx: " in result.output and "weights swapped in OK" in result.output
    record = sidecar.load_record(tmp_path / "b", required=True)
    for name in record["artefacts"]:
        sidecar.resolve_artefact(tmp_path / "b", record, name)  # confined and sha256-verified
    assert record["adapter"]["sha256"] == sidecar.sha256_of(tmp_path / "b.safetensors")
    missing = _invoke("--refit-onnx", "a")
    assert missing.exit_code == 2 and "need --adapter FILE" in missing.output and "Traceback" not in missing.output
    plain = _invoke("--refit-engine", "a/model.engine", "--adapter", "b.safetensors")
    assert plain.exit_code == 2 and "no such engine file" in plain.output
