"""`bilalora adapt` through the CLI: tiny CLIP via the real loading path, prior objective,
baselines, the default runs/ folder, and the chain into `bilalora export --merge`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bilalora import backbones
from bilalora.adapter import Adapter
from bilalora.cli.app import app

ASSETS = Path(__file__).parent / "assets"
FAST = ["--steps", "4", "--search-steps", "2", "--batch", "4", "--crop", "32", "--workers", "0",
        "--lr", "1e-3", "--gate-lr", "1e-2", "--device", "cpu"]
runner = CliRunner()


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory) -> Path:
    """A width-8 DEA-Net's random weights saved as the user's pretrained checkpoint."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "dea-net-t.pth"
    torch.save(backbones.create("dea-net-t").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A randomly initialised tiny open_clip checkpoint matching tests/assets/tiny_clip.json."""
    from bilalora.objectives.clip_loader import save_random_checkpoint

    path = tmp_path_factory.mktemp("clip") / "tiny_clip.safetensors"
    save_random_checkpoint(path, clip=None, clip_config=ASSETS / "tiny_clip.json")
    return path


def _invoke(args):
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_adapt_h2c_with_tiny_clip(tmp_path, hazy_folder, base_weights, tiny_clip):
    out = tmp_path / "run"
    result = _invoke(["adapt", "--images", str(hazy_folder), "--out", str(out), "--backbone", "dea-net-t",
                      "--weights", str(base_weights), "--clip-config", str(ASSETS / "tiny_clip.json"),
                      "--clip-pretrained", str(tiny_clip), "--top-k", "3", *FAST])
    assert "selected sites" in result.output
    adapter = Adapter.load(out / "adapter.safetensors")
    assert len(adapter.sites) == 3
    assert adapter.meta["objective"]["name"] == "h2c"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["selected"] == list(adapter.sites)
    assert summary["weights"] == str(base_weights) and summary["backbone"] == "dea-net-t"
    model = backbones.load("dea-net-t", weights=base_weights)
    adapter.merge_into(model)  # fingerprint of the user's weights matches


def test_adapt_prior_default_runs_folder_then_export(tmp_path, hazy_folder, base_weights, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _invoke(["adapt", "--images", str(hazy_folder), "--objective", "prior", "--backbone", "dea-net-t",
             "--weights", str(base_weights), *FAST])
    _invoke(["adapt", "--images", str(hazy_folder), "--objective", "prior", "--backbone", "dea-net-t",
             "--weights", str(base_weights), *FAST])
    assert (tmp_path / "runs/adapt/exp/adapter.safetensors").is_file()
    assert (tmp_path / "runs/adapt/exp2/adapter.safetensors").is_file()
    result = _invoke(["export", "--merge"])
    assert "exp2" in result.output
    assert (tmp_path / "runs/adapt/exp2/export/model.onnx").is_file()
    assert (tmp_path / "runs/adapt/exp2/export/merged.safetensors").is_file()
    record = json.loads((tmp_path / "runs/adapt/exp2/export/model.json").read_text())
    assert record["adapter"]["base_fingerprint"] == record["base_fingerprint"]
    assert record["adapter"]["merge"]["max_abs"] <= 1e-5


@pytest.mark.parametrize("method", ["joint", "manual", "full"])
def test_adapt_baselines_cli(tmp_path, hazy_folder, base_weights, method):
    extra = ["--sites", "level3_block1,level3_block2"] if method == "manual" else []
    out = tmp_path / method
    _invoke(["adapt", "--images", str(hazy_folder), "--out", str(out), "--objective", "prior", "--method", method,
             "--backbone", "dea-net-t", "--weights", str(base_weights), *extra, *FAST])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method
    assert Path(summary["artefact"]).is_file()


def test_adapt_user_errors_are_one_line(tmp_path, hazy_folder, base_weights):
    cases = [
        (["--images", str(tmp_path / "none")], "does not exist"),
        (["--images", str(hazy_folder), "--method", "manual"], "--sites"),
        (["--images", str(hazy_folder), "--objective", "fog"], "--objective"),
        (["--images", str(hazy_folder), "--clip-pretrained", str(tmp_path / "missing.pt")], "--objective prior"),
        (["--images", str(hazy_folder), "--sites", "nope*"], "match no site"),
        (["--images", str(hazy_folder), "--device", "tpu"], "--device"),
    ]
    for args, expected in cases:
        result = runner.invoke(app, ["adapt", *args, "--backbone", "dea-net-t", "--weights", str(base_weights),
                                     "--out", str(tmp_path / "r"), *FAST[:-2]], terminal_width=300)
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.output, (args, result.output)
        assert "Traceback" not in result.output
    result = runner.invoke(app, ["adapt", "--images", str(hazy_folder), "--backbone", "dea-net-t"],
                           terminal_width=300)
    assert result.exit_code == 2 and "--weights" in result.output


def _fails_in_one_line(args, expected):
    result = runner.invoke(app, ["adapt", *args], terminal_width=300)
    assert result.exit_code == 2, result.output
    assert expected in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.output and len(errors) == 1 and expected in errors[0], result.output
    assert result.output.rstrip().endswith(errors[0].rstrip()), result.output  # the error is the last, whole line
    return result


def test_adapt_refusals_are_one_line(tmp_path, hazy_folder, base_weights, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--images", str(hazy_folder), "--objective", "prior", "--backbone", "dea-net-t",
              "--weights", str(base_weights), *FAST]
    for flag, value, expected in (("--lr", "-1", "--lr must be"), ("--gate-lr", "-1", "--gate-lr must be"),
                                  ("--seed", "-1", "--seed must be"), ("--top-k", "99", "--top-k 99 is more than"),
                                  ("--test-fraction", "1", "--test-fraction"),
                                  ("--hypergradient", "magic", "--hypergradient magic"),
                                  ("--gate-optimizer", "magic", "--gate-optimizer magic")):
        _fails_in_one_line([*common, flag, value], expected)
    _fails_in_one_line([*common, "--crop", "8"], "--crop 8 is too small")
    assert not (tmp_path / "runs/adapt/exp").exists()  # a failed adapt leaves no run folder behind


def test_adapt_out_existing_run(tmp_path, hazy_folder, base_weights):
    out = tmp_path / "run"
    common = ["--images", str(hazy_folder), "--objective", "prior", "--backbone", "dea-net-t",
              "--weights", str(base_weights), "--out", str(out), *FAST]
    _invoke(["adapt", *common])
    first = (out / "adapter.safetensors").read_bytes()
    _fails_in_one_line(common, "already holds a run")
    assert (out / "adapter.safetensors").read_bytes() == first
    result = _invoke(["adapt", *common, "--exist-ok", "--seed", "4", "--hypergradient", "direct",
                      "--gate-optimizer", "sgd"])
    assert "replacing the earlier run" in result.output
    config = json.loads((out / "summary.json").read_text())["config"]
    assert config["seed"] == 4
    assert (config["optim"]["hypergradient"], config["optim"]["gate_optimizer"]) == ("direct", "sgd")


def test_adapt_resume_cli(tmp_path, hazy_folder, base_weights):
    """Resume: flags that differ are applied (--steps) or named as ignored; other weights are refused."""
    out = tmp_path / "run"
    common = ["--images", str(hazy_folder), "--objective", "prior", "--backbone", "dea-net-t", "--out", str(out)]
    _invoke(["adapt", *common, "--weights", str(base_weights), *FAST, "--checkpoint-every", "1"])
    (out / "adapter.safetensors").unlink()
    torch.manual_seed(1)
    other = tmp_path / "other.pth"
    torch.save(backbones.create("dea-net-t").state_dict(), other)
    _fails_in_one_line([*common, "--weights", str(other), "--resume"], "not the ones the interrupted run")
    result = _invoke(["adapt", *common, "--weights", str(base_weights), "--resume", "--steps", "6", "--rank", "4",
                      "--device", "cpu", "--schedule", "paper"])
    assert "applying --steps" in result.output and "--rank, --schedule ignored" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["schedule"] == {"search": 2, "finetune": 4} and summary["config"]["rank"] == 8
    assert summary["schedule_preset"]["preset"] == "cpu" and summary["config"]["max_side"] == 512  # the run's preset
    assert "schedule: cpu preset (the interrupted run's;" in result.output


def test_adapt_resume_refuses_a_crafted_checkpoint(tmp_path, hazy_folder, base_weights):
    import os
    import pickle

    out = tmp_path / "run"
    common = ["--images", str(hazy_folder), "--objective", "prior", "--backbone", "dea-net-t", "--out", str(out),
              "--weights", str(base_weights)]
    _invoke(["adapt", *common, *FAST])
    marker = tmp_path / "created-by-pickle"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (out / "checkpoints" / "last.pt").write_bytes(pickle.dumps({"config": Payload()}))
    _fails_in_one_line([*common, "--resume"], "cannot read checkpoint")
    assert not marker.exists()


def test_adapt_schedule_presets_cli(tmp_path, hazy_folder, base_weights):
    """--schedule: the cpu preset on the CPU by default (explicit flags win), the paper's on request."""
    common = ["--images", str(hazy_folder), "--objective", "prior", "--backbone", "dea-net-t",
              "--weights", str(base_weights), "--steps", "3", "--search-steps", "2", "--crop", "32", "--workers", "0",
              "--device", "cpu"]
    result = _invoke(["adapt", *common, "--out", str(tmp_path / "auto")])
    flat = " ".join(result.output.split())  # the console wraps long lines
    assert ("schedule: cpu preset (device cpu; --crop, --search-steps, --steps given; --schedule paper for the "
            "paper's: at least 55+275 steps at batch 24, crops of 224) schedule: search 2 steps") in flat
    assert "batch 4 from" in flat and "batch 4, crop 32" in flat  # the banner shows the values the run uses
    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
    assert summary["schedule_preset"] == {"requested": "auto", "preset": "cpu",
                                          "explicit": ["crop", "search_steps", "steps"],
                                          "values": {"batch": 4, "crop": 32, "search_steps": 2, "steps": 3,
                                                     "max_side": 512}}
    result = _invoke(["adapt", *common, "--schedule", "paper", "--batch", "2", "--out", str(tmp_path / "paper")])
    assert "schedule: paper preset (--schedule paper; --batch, --crop, --search-steps, --steps given" in " ".join(
        result.output.split())
    summary = json.loads((tmp_path / "paper" / "summary.json").read_text())
    assert summary["schedule_preset"]["preset"] == "paper" and summary["config"]["batch"] == 2
    assert summary["config"]["max_side"] is None and summary["data"]["max_side"] is None
    _fails_in_one_line([*common, "--schedule", "fast", "--out", str(tmp_path / "bad")], "--schedule fast")
    _fails_in_one_line([*common, "--max-side", "-1", "--out", str(tmp_path / "bad")], "--max-side must be >= 0")


def test_adapt_prints_the_schedule_and_names_bad_files(tmp_path, base_weights):
    from bad_corpus import make_bad_corpus

    corpus = make_bad_corpus(tmp_path / "mixed")
    result = _invoke(["adapt", "--images", str(corpus["folder"]), "--objective", "prior", "--backbone", "dea-net-t",
                      "--weights", str(base_weights), "--out", str(tmp_path / "run"), *FAST])
    assert "schedule: search 2 steps" in result.output and "finetune 2 steps" in result.output
    flat = " ".join(result.output.split())
    for name in corpus["bad"]:
        assert name in flat, name
    assert "held out from both levels" in result.output


def test_adapt_takes_the_backbones_objective_options(tmp_path, hazy_folder):
    """dea-net-s-synthetic's registry entry sets the prior's options; --objective options win."""
    out = tmp_path / "run"
    result = _invoke(["adapt", "--images", str(hazy_folder), "--objective", "prior", "--backbone",
                      "dea-net-s-synthetic", "--out", str(out), "--method", "manual", "--sites", "down_level1_block1",
                      *FAST])
    printed = "".join(result.output.split())  # the console wraps long lines
    assert "objectiveoptionsofdea-net-s-synthetic:prior(bright=0,range_gain=0,range=2,exposure_relative=0.9)" in printed
    objective = json.loads((out / "summary.json").read_text())["objective"]
    assert objective["weights"]["bright"] == 0.0 and objective["range_gain"] == 0.0
    out2 = tmp_path / "run2"
    _invoke(["adapt", "--images", str(hazy_folder), "--objective", "prior(bright=0.5)", "--backbone",
             "dea-net-s-synthetic", "--out", str(out2), "--method", "manual", "--sites", "down_level1_block1", *FAST])
    objective = json.loads((out2 / "summary.json").read_text())["objective"]
    assert objective["weights"]["bright"] == 0.5 and objective["range_gain"] == 0.0
    assert backbones.create("dea-net-t").bilalora_info["objective_options"] == {}
    assert backbones.create("dea-net-s").bilalora_info["objective_options"]["prior"]["detail_weight"] > 0
