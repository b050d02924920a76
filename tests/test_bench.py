"""``bilalora bench``: subjects from the newest run, latency rows per backend, quality tables, bench.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bilalora.bench.latency import time_callable
from bilalora.bench.quality import load_images, torch_dehazer
from bilalora.cli.app import app
from bilalora.metrics import fade
from conftest import write_hazy_images
from test_export import make_adapter_run  # tests/ is on sys.path under pytest

runner = CliRunner()
FAST = ["--size", "32x32", "--runs", "2", "--warmup", "0", "--threads", "1"]


def _invoke(*args: str):
    return runner.invoke(app, ["bench", *args], terminal_width=200)


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    """runs/adapt/exp with an adapter, split.json over 4 made-up hazy images, and its merged export."""
    from bilalora.export.pipeline import ExportOptions, run_export

    root = tmp_path_factory.mktemp("bench")
    run = root / "runs" / "adapt" / "exp"
    make_adapter_run(run)
    paths = write_hazy_images(root / "hazy", count=4, size=(40, 52))
    (run / "split.json").write_text(json.dumps({"seed": 0, "train": [], "val": [str(p) for p in paths]}))
    run_export(ExportOptions(adapter=run / "adapter.safetensors", out=run / "export", fp16=True,
                             parity_sizes=((32, 32),), slim=False))  # fmt: skip
    return root


@pytest.fixture
def workdir(exported_run, tmp_path, monkeypatch):
    target = tmp_path / "work"
    shutil.copytree(exported_run, target)
    monkeypatch.chdir(target)
    return target


def test_bench_chains_from_the_newest_run(workdir):
    result = _invoke(*FAST, "--dcp", "--iqa", "piqe", "--sheet", "2")
    assert result.exit_code == 0, result.output
    assert "newest run" in result.output and "same parameters and FLOPs as the base" in result.output
    record = json.loads((workdir / "runs/adapt/exp/bench/bench.json").read_text())
    assert [s["name"] for s in record["subjects"]] == ["base", "adapted"]
    assert record["cost"]["base"]["parameters"] == record["cost"]["adapted"]["parameters"]
    assert record["cost"]["base"]["gflops"] == record["cost"]["adapted"]["gflops"] > 0

    rows = {(r["subject"], r["backend"]): r for r in record["latency"]["rows"]}
    assert rows[("base", "torch")]["status"] == "OK" and rows[("base", "torch")]["ms"]["runs"] == 2
    assert rows[("adapted", "onnx")]["status"] == "OK" and rows[("adapted", "onnx-fp16")]["status"] == "OK"
    assert rows[("adapted", "onnx-fp16")]["megabytes"] < rows[("adapted", "onnx")]["megabytes"]
    assert "bilalora export --base" in rows[("base", "onnx")]["status"]
    assert rows[("adapted", "tensorrt")]["status"].startswith("skipped")
    assert rows[("adapted", "onnx")]["ms"]["fps"] == pytest.approx(1000 / rows[("adapted", "onnx")]["ms"]["p50"])

    quality = record["quality"]
    assert quality["metrics"]["piqe"] == "lower" and quality["metrics"]["fade"] == "lower"
    assert set(quality["mean"]) == {"input", "base", "adapted", "dcp"}
    assert len(quality["per_image"]) == 4 and record["images"]["count"] == 4
    # the wins are the per-image comparisons
    per_image = quality["per_image"].values()
    expected = np.mean([row["adapted"]["fade"] < row["base"]["fade"] for row in per_image])
    assert quality["wins_vs_base"]["adapted"]["fade"] == pytest.approx(expected)
    assert (workdir / "runs/adapt/exp/bench/sheet.jpg").is_file()


def test_quality_scores_are_those_of_the_networks_outputs(workdir):
    import torch

    from bilalora import backbones
    from bilalora.adapter import Adapter

    result = _invoke(*FAST, "--metrics", "fade", "--sheet", "0", "--backends", "torch", "--report", "out")
    assert result.exit_code == 0, result.output
    record = json.loads((workdir / "out" / "bench.json").read_text())
    base = backbones.load("dea-net-t", weights=workdir / "runs/adapt/exp/base.safetensors")
    merged = Adapter.load(workdir / "runs/adapt/exp/adapter.safetensors").merge_into(base)
    torch.set_num_threads(1)
    split = json.loads((workdir / "runs/adapt/exp/split.json").read_text())
    images, _ = load_images([Path(p) for p in split["val"]], 1024)
    name, image = images[0]
    expected = fade(torch_dehazer(merged, "cpu")(image))
    assert record["quality"]["per_image"][name]["adapted"]["fade"] == pytest.approx(expected, rel=1e-6)
    assert [r["backend"] for r in record["latency"]["rows"]] == ["torch", "torch"]


def test_a_stale_export_is_not_timed(workdir):
    from bilalora.adapter import Adapter

    path = workdir / "runs/adapt/exp/adapter.safetensors"
    changed = Adapter.load(path)
    for key in changed.tensors:
        changed.tensors[key] = changed.tensors[key] * 2
    changed.save(path)  # same base, new factors: the export no longer holds this adapter
    result = _invoke(*FAST, "--metrics", "", "--backends", "torch,onnx")
    assert result.exit_code == 0, result.output
    assert "does not hold adapter.safetensors" in result.output
    record = json.loads((workdir / "runs/adapt/exp/bench/bench.json").read_text())
    rows = {(r["subject"], r["backend"]): r for r in record["latency"]["rows"]}
    assert rows[("adapted", "onnx")]["status"].startswith("skipped: no export")
    assert record["quality"] is None


def test_bench_an_export_folder_as_it_is(workdir):
    result = _invoke(*FAST, "--model", "runs/adapt/exp/export", "--backends", "torch,onnx", "--sheet", "0",
                     "--images", str(workdir / "hazy"), "--metrics", "entropy", "--report", "m")  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((workdir / "m" / "bench.json").read_text())
    assert [s["role"] for s in record["subjects"]] == ["export"]
    assert record["subjects"][0]["weights"].endswith("merged.safetensors")
    assert all(r["status"] == "OK" for r in record["latency"]["rows"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backends", "tflite"], "--backends tflite"),
        (["--size", "30x30"], "--size 30x30"),
        (["--size", "big"], "--size big"),
        (["--metrics", "sharpness"], "--metrics sharpness"),
        (["--iqa", "nosuchmetric"], "pyiqa has no such metric"),
        (["--images", "nowhere"], "--images nowhere"),
    ],
)
def test_bench_user_errors_are_one_line(workdir, args, message):
    result = _invoke(*FAST, "--backends", "torch", *args) if args[0] != "--backends" else _invoke(*FAST, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_bench_without_a_run_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _invoke(*FAST)
    assert result.exit_code == 2 and "bilalora adapt --images" in result.output


def test_time_callable_counts_and_syncs():
    calls, syncs = [], []
    timing = time_callable(lambda: calls.append(1), warmup=2, runs=5, sync=lambda: syncs.append(1))
    assert len(calls) == 7 and len(syncs) == 6 and timing.runs == 5
    assert 0 <= timing.min <= timing.p50 <= timing.p90
