"""``bilalora bench``: subjects from the newest run, held-out images, latency rows per format, quality tables
with classical rows, bench.json, the metrics figure; bad input named, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bilalora.bench.latency import time_callable
from bilalora.baselines.stretch import stretch_channels, stretch_global
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
    write_hazy_images(root / "hazy", count=8, size=(40, 52))
    _write_split(root)
    # every format bench times on a CPU: ONNX fp32/fp16, INT8 QDQ (2 calibration images), OpenVINO IR
    run_export(ExportOptions(adapter=run / "adapter.safetensors", out=run / "export", fp16=True, int8=True,
                             calib=root / "hazy", calib_images=2, openvino=True, parity_sizes=((32, 32),),
                             slim=False))  # fmt: skip
    return root


def _write_split(root: Path) -> None:
    """split.json as adapt writes it: names relative to an absolute images_root; 4 train, 2 val, 2 test."""
    names = sorted(p.name for p in (root / "hazy").iterdir())
    split = {"seed": 0, "images_root": str(root / "hazy"), "train": names[:4], "val": names[4:6], "test": names[6:]}
    (root / "runs" / "adapt" / "exp" / "split.json").write_text(json.dumps(split))


@pytest.fixture
def workdir(exported_run, tmp_path, monkeypatch):
    target = tmp_path / "work"
    shutil.copytree(exported_run, target)
    _write_split(target)  # the copy's own images
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
    for backend in ("onnx-int8", "openvino", "openvino-int8"):  # through the runtime's backends
        assert rows[("adapted", backend)]["status"] == "OK" and rows[("adapted", backend)]["ms"]["runs"] == 2, backend
    assert "OpenVINO" in rows[("adapted", "openvino")]["device"]
    assert rows[("adapted", "onnx-int8")]["file"].endswith("model_int8.onnx")
    assert rows[("adapted", "openvino-int8")]["file"].endswith("model_int8.onnx")
    assert rows[("adapted", "onnx")]["ms"]["fps"] == pytest.approx(1000 / rows[("adapted", "onnx")]["ms"]["p50"])

    quality = record["quality"]
    assert quality["metrics"]["piqe"] == "lower" and quality["metrics"]["fade"] == "lower"
    assert set(quality["mean"]) == {"input", "base", "adapted", "dcp", "base+stretch", "base+stretch-global"}
    # the default images are the run's held-out test split, and the record says the run never trained on them
    images = record["images"]
    assert images["split"] == "test" and images["count"] == 2 and images["seen_by_run"] == {"test": 2}
    assert sorted(i["name"] for i in images["scored"]) == ["hazy_06.png", "hazy_07.png"]
    assert all(i["seen_by_run"] == "test" for i in images["scored"])
    assert len(quality["per_image"]) == 2
    # the wins are the per-image comparisons, against the base and against the base+stretch row
    per_image = quality["per_image"].values()
    expected = np.mean([row["adapted"]["fade"] < row["base"]["fade"] for row in per_image])
    assert quality["wins_vs_base"]["adapted"]["fade"] == pytest.approx(expected)
    expected = np.mean([row["adapted"]["fade"] < row["base+stretch"]["fade"] for row in per_image])
    assert quality["wins_vs_base+stretch"]["adapted"]["fade"] == pytest.approx(expected)
    assert "better than base+stretch" in result.output
    assert (workdir / "runs/adapt/exp/bench/sheet.jpg").is_file()
    figure = workdir / "runs/adapt/exp/bench/metrics.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and record["figure"] == str(figure.relative_to(workdir))


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
    images, _ = load_images([workdir / "hazy" / name for name in split["test"]], 1024)
    name, image = images[0]
    expected = fade(torch_dehazer(merged, "cpu")(image))
    assert record["quality"]["per_image"][name]["adapted"]["fade"] == pytest.approx(expected, rel=1e-6)
    # the stretch rows are the base's output, stretched
    base = backbones.load("dea-net-t", weights=workdir / "runs/adapt/exp/base.safetensors")  # merge_into changed it
    base_out = torch_dehazer(base, "cpu")(image)
    assert record["quality"]["per_image"][name]["base+stretch"]["fade"] == pytest.approx(
        fade(stretch_channels(base_out)), rel=1e-6)
    assert record["quality"]["per_image"][name]["base+stretch-global"]["fade"] == pytest.approx(
        fade(stretch_global(base_out)), rel=1e-6)
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


# --------------------------------------------------------------------------- which images


def test_an_old_run_without_a_test_split_falls_back_to_validation_with_a_note(workdir):
    split = workdir / "runs/adapt/exp/split.json"
    old = [str(workdir / "hazy" / f"hazy_0{i}.png") for i in range(6)]
    split.write_text(json.dumps({"seed": 0, "train": old[:3], "val": old[3:]}))  # paths as typed, no test
    result = _invoke(*FAST, "--backends", "torch", "--metrics", "entropy", "--sheet", "0", "--no-stretch")
    assert result.exit_code == 0, result.output
    assert "has no test split" in result.output
    record = json.loads((workdir / "runs/adapt/exp/bench/bench.json").read_text())
    assert record["images"]["split"] == "val" and record["images"]["seen_by_run"] == {"val": 3}
    assert "base+stretch" not in record["quality"]["mean"]


def test_images_folder_says_which_images_the_run_saw(workdir):
    result = _invoke(*FAST, "--backends", "none", "--metrics", "entropy", "--sheet", "0", "--images", "hazy",
                     "--report", "r")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "latency" not in result.output
    assert "6 of 8 images were used by" in result.output and "not held out" in result.output
    record = json.loads((workdir / "r" / "bench.json").read_text())
    assert record["latency"]["rows"] == [] and record["images"]["split"] == "folder"
    assert record["images"]["seen_by_run"] == {"train": 4, "val": 2, "test": 2}
    seen = {i["name"]: i["seen_by_run"] for i in record["images"]["scored"]}
    assert seen["hazy_00.png"] == "train" and seen["hazy_05.png"] == "val" and seen["hazy_07.png"] == "test"


def test_unseen_folder_is_marked_unseen(workdir):
    write_hazy_images(workdir / "other", count=2, size=(36, 44), seed=5)
    result = _invoke(*FAST, "--backends", "torch", "--metrics", "entropy", "--sheet", "0", "--images", "other",
                     "--report", "r")  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((workdir / "r" / "bench.json").read_text())
    assert record["images"]["seen_by_run"] == {"unseen": 2} and "not held out" not in result.output


def test_images_are_checked_before_the_latency_pass(workdir, monkeypatch):
    import bilalora.bench.pipeline as pipeline

    timed = []
    monkeypatch.setattr(pipeline, "time_backend", lambda *a, **k: timed.append(a) or pytest.fail("timed"))
    result = _invoke(*FAST, "--images", "nowhere")
    assert result.exit_code == 2 and "--images nowhere" in result.output and timed == []
    (workdir / "runs/adapt/exp/split.json").write_text(json.dumps({"images_root": str(workdir / "gone"),
                                                                    "train": [], "test": ["a.png"]}))  # fmt: skip
    result = _invoke(*FAST)
    assert result.exit_code == 2 and "none of its test images exist" in result.output and timed == []
    (workdir / "runs/adapt/exp/split.json").write_text("{not json")
    result = _invoke(*FAST)
    assert result.exit_code == 2 and "not readable as JSON" in result.output and timed == []


def test_tiny_images_are_edge_padded_and_scored(workdir):
    import cv2

    folder = workdir / "tiny"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for height, width in ((1, 1), (8, 8), (12, 30), (5, 17)):
        image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"t{height}x{width}.png"), image)
    result = _invoke(*FAST, "--backends", "torch", "--metrics", "fade,entropy", "--images", "tiny", "--sheet", "4",
                     "--report", "r")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    record = json.loads((workdir / "r" / "bench.json").read_text())
    assert record["images"]["count"] == 4 and record["images"]["skipped"] == []
    per_image = record["quality"]["per_image"]
    assert per_image["t1x1.png"]["adapted"]["fade"] is None  # undefined on one pixel: left out, not NaN
    defined = [row["adapted"]["fade"] for row in per_image.values() if row["adapted"]["fade"] is not None]
    assert per_image["t12x30.png"]["adapted"]["fade"] is not None and len(defined) < 4
    assert record["quality"]["count"]["adapted"] == {"fade": len(defined), "entropy": 4}
    assert record["quality"]["mean"]["adapted"]["fade"] == pytest.approx(np.mean(defined))


def test_torch_dehazer_keeps_the_size_of_tiny_frames():
    from bilalora import backbones

    model = backbones.load("dea-net-t", weights="random")
    run = torch_dehazer(model, "cpu")
    for shape in ((1, 1, 3), (3, 13, 3), (16, 16, 3), (17, 22, 3)):
        out = run(np.full(shape, 128, np.uint8))
        assert out.shape == shape and out.dtype == np.uint8


def test_bad_corpus_every_bad_file_named_every_good_file_scored(workdir):
    from bad_corpus import make_bad_corpus

    corpus = make_bad_corpus(workdir / "mixed")
    result = _invoke(*FAST, "--backends", "torch", "--metrics", "entropy,brightness", "--images", "mixed",
                     "--sheet", "0", "--no-stretch", "--report", "r")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    record = json.loads((workdir / "r" / "bench.json").read_text())
    skipped = {s["name"]: s["reason"] for s in record["images"]["skipped"]}
    assert sorted(skipped) == corpus["bad"]
    assert all(reason for reason in skipped.values())
    assert sorted(i["name"] for i in record["images"]["scored"]) == corpus["good"]
    assert set(record["quality"]["per_image"]) == set(corpus["good"])
    for name in corpus["bad"]:
        assert f"skipped {name}" in " ".join(result.output.split())


# --------------------------------------------------------------------------- exports that must not be timed


def _export_record(workdir: Path) -> tuple[Path, dict]:
    path = workdir / "runs/adapt/exp/export/model.json"
    return path, json.loads(path.read_text())


def test_a_malformed_model_json_is_named_not_swallowed(workdir):
    path, record = _export_record(workdir)
    record["input"]["pad_multiple"] = "four"
    path.write_text(json.dumps(record))
    result = _invoke(*FAST, "--metrics", "", "--backends", "torch,onnx")
    assert result.exit_code == 0, result.output
    assert "not timed" in result.output and "pad_multiple" in result.output
    result = _invoke(*FAST, "--model", "runs/adapt/exp/export", "--metrics", "", "--backends", "onnx")
    assert result.exit_code == 2 and "pad_multiple" in result.output and "Traceback" not in result.output


def test_a_swapped_artefact_is_not_timed(workdir):
    export = workdir / "runs/adapt/exp/export"
    (export / "model.onnx").write_bytes((export / "model_fp16.onnx").read_bytes())
    result = _invoke(*FAST, "--metrics", "", "--backends", "onnx,onnx-fp16", "--no-base")
    assert result.exit_code == 0, result.output
    record = json.loads((workdir / "runs/adapt/exp/bench/bench.json").read_text())
    rows = {r["backend"]: r for r in record["latency"]["rows"]}
    assert rows["onnx"]["status"].startswith("failed") and "sha256" in rows["onnx"]["status"]
    assert rows["onnx"]["ms"] is None and rows["onnx-fp16"]["status"] == "OK"


def test_an_artefact_that_failed_its_gate_is_not_timed(workdir):
    path, record = _export_record(workdir)
    record["artefacts"]["model_fp16.onnx"]["parity"]["passed"] = False
    record["artefacts"]["model_fp16.onnx"]["parity"]["psnr_db"] = 21.5
    record["artefacts"]["model.xml"]["removed"] = True  # how export records a file its gate removed
    del record["artefacts"]["model_int8.onnx"]  # never exported
    path.write_text(json.dumps(record))
    formats = "onnx,onnx-fp16,onnx-int8,openvino,openvino-int8"
    result = _invoke(*FAST, "--metrics", "", "--backends", formats, "--no-base")
    assert result.exit_code == 0, result.output
    rows = {r["backend"]: r for r in json.loads((workdir / "runs/adapt/exp/bench/bench.json").read_text())
            ["latency"]["rows"]}  # fmt: skip
    assert rows["onnx"]["status"] == "OK"
    assert rows["onnx-fp16"]["status"] == ("skipped: model_fp16.onnx failed its parity gate at export (21.5 dB); "
                                           "not shipped")
    assert rows["openvino"]["status"].startswith("skipped: model.xml failed its parity gate")
    assert "bilalora export --int8" in rows["onnx-int8"]["status"]
    assert "bilalora export --int8" in rows["openvino-int8"]["status"]
    assert all(rows[b]["ms"] is None for b in ("onnx-fp16", "onnx-int8", "openvino", "openvino-int8"))


def test_without_a_run_the_named_base_is_benchmarked_alone(tmp_path, monkeypatch):
    write_hazy_images(tmp_path / "hazy", count=2, size=(36, 44))
    monkeypatch.chdir(tmp_path)
    result = _invoke(*FAST, "--backbone", "dea-net-t", "--weights", "random", "--images", "hazy", "--sheet", "0",
                     "--metrics", "entropy", "--backends", "torch,torch-fp16,onnx")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "benchmarking the base dea-net-t alone" in result.output
    record = json.loads(next((tmp_path / "runs" / "bench").glob("*/bench.json")).read_text())
    assert [s["name"] for s in record["subjects"]] == ["base"]
    rows = {r["backend"]: r["status"] for r in record["latency"]["rows"]}
    assert rows["torch"] == "OK"
    assert rows["torch-fp16"] == "skipped: fp16 PyTorch is timed on CUDA only (use --device cuda)"
    assert set(record["quality"]["mean"]) == {"input", "base", "base+stretch", "base+stretch-global"}


def test_adapt_eval_targets_follow_the_method_issue():
    import importlib.util

    spec = importlib.util.spec_from_file_location("adapt_eval", Path(__file__).parents[1] / "benchmarks/adapt_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    quality = {
        "mean": {"base": {"fade": 1.0, "entropy": 7.0, "piqe": 20.0},
                 "adapted": {"fade": 0.75, "entropy": 7.0, "piqe": 20.3},
                 "base+stretch": {"fade": 0.8, "entropy": 7.1, "piqe": 20.0}},
        "wins_vs_base": {"adapted": {"fade": 0.85}},
    }  # fmt: skip
    checks = module.targets(quality, "dea-net-s")
    assert checks["fade_vs_base"]["value"] == pytest.approx(-0.25) and checks["fade_vs_base"]["met"]
    assert checks["fade_below_base+stretch"]["met"] and checks["fade_wins_vs_base"]["met"]
    entropy = checks["entropy_vs_base+stretch"]
    assert entropy["value"] == pytest.approx(0.1 / 7.1) and entropy["met"]
    assert checks["piqe_vs_base+stretch"]["value"] == pytest.approx(0.015) and checks["piqe_vs_base+stretch"]["met"]
    # the paper-setting base must lower FADE by 30 %: 25 % is not enough
    assert not module.targets(quality, "dea-net-s-synthetic")["fade_vs_base"]["met"]
    quality["mean"]["adapted"]["piqe"] = 21.0  # 5 % worse than base+stretch
    assert not module.targets(quality, "dea-net-s")["piqe_vs_base+stretch"]["met"]
