"""Adaptation runs through the library: stages, records, held-out improvement, resume, refusals."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from bad_corpus import make_bad_corpus

from bilalora import backbones
from bilalora.adapt import MIN_SEARCH_STEPS, AdaptConfig, adapt, resolve_schedule, split_images
from bilalora.adapt.config import PRESETS, describe_preset, reconcile_resume, resolve_preset
from bilalora.adapt.report import gate_separation, movement
from bilalora.adapt.schedule import StepCrops, eval_batches
from bilalora.adapt.state import read_checkpoint
from bilalora.adapter import Adapter
from bilalora.errors import UserError
from bilalora.runs import read_split


class ToyObjective:
    """Pull the output toward a darker, contrast-stretched input (a stand-in no-reference loss)."""

    def __call__(self, output, hazy):
        target = ((hazy - 0.35) * 1.6).clamp(0, 1)
        return ((output - target) ** 2).mean()

    def to(self, device):
        return self

    def describe(self):
        return {"name": "toy"}


def _config(**changes):
    config = AdaptConfig(steps=6, search_steps=4, batch=2, crop=32, checkpoint_every=1, workers=0, top_k=2,
                         log_every=2)
    config.optim.lr = 1e-3
    config.optim.gate_lr = 1e-2
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return backbones.create("dea-net-t")


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _interrupt_at(step: int, *args, **kwargs) -> None:
    """Run ``adapt(*args, **kwargs)`` and stop it with an exception after global step ``step``."""

    class Interrupt(Exception):
        pass

    def stop(current, entry):
        if current == step:
            raise Interrupt

    with pytest.raises(Interrupt):
        adapt(*args, on_step=stop, **kwargs)


def test_bilevel_run_writes_records(tmp_path, hazy_folder):
    result = adapt(_model(), hazy_folder, ToyObjective(), _config(), tmp_path / "run")
    run = tmp_path / "run"
    for name in ("adapter.safetensors", "summary.json", "log.jsonl", "split.json", "checkpoints/last.pt",
                 "results.png"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["ranking"]) == 16 and len(summary["selected"]) == 2
    assert summary["selected"] == [name for name, _ in summary["ranking"][:2]]
    assert summary["schedule"] == {"search": 4, "finetune": 2}
    assert summary["stages"]["search"]["steps"] == 4 and summary["stages"]["finetune"]["steps"] == 2
    assert summary["trainable_parameters"]["finetune"] < summary["trainable_parameters"]["search"]
    assert summary["movement"]["split"] == "test" and summary["movement"]["mean_abs_output_change"] > 0
    # gates read at every log line (here every step: checkpoint_every=1 flushes the window)
    trajectory = summary["gates"]["trajectory"]
    assert trajectory["steps"] == [1, 2, 3, 4] and len(trajectory["values"]) == 16
    assert all(len(series) == 4 for series in trajectory["values"].values())
    final = {name: series[-1] for name, series in trajectory["values"].items()}
    assert sorted(final, key=lambda n: -final[n])[:2] == summary["selected"]
    separation = summary["gates"]["separation"]
    ordered = sorted(final.values(), reverse=True)
    assert separation["gap"] == pytest.approx(ordered[1] - ordered[2])
    lines = _log(run)
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]  # checkpoint_every=1 flushes every step
    assert "gates" in lines[1] and "val_loss" in lines[1] and "gates" not in lines[-1]
    adapter = Adapter.load(run / "adapter.safetensors")
    assert list(adapter.sites) == summary["selected"] and adapter.meta["method"] == "bilevel"
    split = json.loads((run / "split.json").read_text())
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (3, 3, 2)
    assert not (set(split["train"]) & set(split["val"])) and not (set(split["test"]) & set(split["train"] + split["val"]))
    assert all("/" not in name for name in split["train"])  # relative to images_root
    assert Path(split["images_root"]).is_absolute()
    merged = adapter.merge_into(_model())
    assert set(merged.state_dict()) == set(_model().state_dict())
    assert result.adapter is not None


def test_log_every_n_steps(tmp_path, hazy_folder):
    run = tmp_path / "run"
    adapt(_model(), hazy_folder, ToyObjective(), _config(steps=8, search_steps=5, log_every=3, checkpoint_every=0),
          run)
    lines = _log(run)
    assert [(line["step"], line["steps"]) for line in lines] == [(3, 3), (5, 2), (8, 3)]
    assert json.loads((run / "summary.json").read_text())["gates"]["trajectory"]["steps"] == [3, 5]


@pytest.mark.parametrize("method", ["joint", "manual", "full"])
def test_baselines_run(tmp_path, hazy_folder, method):
    sites = ["level3_block1", "level3_block2"] if method == "manual" else None
    result = adapt(_model(), hazy_folder, ToyObjective(), _config(method=method, sites=sites, steps=3,
                                                                    search_steps=2), tmp_path / method)
    summary = result.summary
    assert summary["method"] == method
    if method == "full":
        assert result.artefact.name == "finetuned.safetensors"
        assert summary["trainable_parameters"]["finetune"] == sum(p.numel() for p in _model().parameters())
    else:
        adapter = Adapter.load(result.artefact)
        expected = sites if method == "manual" else summary["selected"]
        assert list(adapter.sites) == expected
        if method == "manual":
            assert all(value == 1.0 for value in adapter.sites.values())


def test_objective_goes_down_on_held_out_crops(tmp_path, hazy_folder):
    """The adapted model scores better than the base on the test split's crops (never trained on)."""
    config = _config(method="manual", sites=["down_level1_block1", "down_level2_block1", "level3_block1", "level3_block4"],
                     steps=25, batch=4, checkpoint_every=0, log_every=5)
    config.optim.lr = 3e-3
    result = adapt(_model(), hazy_folder, ToyObjective(), config, tmp_path / "run")
    held_out = result.summary["movement"]
    assert held_out["split"] == "test" and held_out["images"] == 2
    assert held_out["objective_after"] < 0.9 * held_out["objective_before"], held_out
    # and directly: recompute on the held-out images with the saved adapter
    split = read_split(tmp_path / "run")
    from bilalora.data import ImageFolder

    folder = ImageFolder(hazy_folder)
    images = [folder[folder.paths.index(p)] for p in split["test"]]
    adapted = result.adapter.merge_into(_model())
    again = movement(_model(), adapted, ToyObjective(), eval_batches(images, 32, 4), "cpu")
    assert again["objective_after"] == pytest.approx(held_out["objective_after"], rel=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_movement_is_zero_for_an_unchanged_model(tmp_path, hazy_folder, precision):
    """lr 0: nothing moves; the report must say exactly 0 whatever the training precision and layout."""
    config = _config(method="manual", sites=["level3_block1", "down_level2_block1"], steps=2, precision=precision)
    config.optim.lr = 0.0
    result = adapt(_model(), hazy_folder, ToyObjective(), config, tmp_path / "run")
    assert result.summary["movement"]["mean_abs_output_change"] == 0.0
    assert result.summary["negligible_change"]
    base = _model()
    images = [torch.rand(3, 40, 40).permute(1, 2, 0).numpy() for _ in range(3)]
    copy = _model().to(memory_format=torch.channels_last)
    assert movement(base, copy, ToyObjective(), eval_batches(images, 32, 2), "cpu")["mean_abs_output_change"] == 0.0


def test_resume_reaches_the_same_adapter_without_repeating_log_lines(tmp_path, hazy_folder):
    reference = adapt(_model(), hazy_folder, ToyObjective(), _config(), tmp_path / "straight").adapter

    _interrupt_at(3, _model(), hazy_folder, ToyObjective(), _config(), tmp_path / "broken")
    assert not (tmp_path / "broken" / "adapter.safetensors").exists()
    messages = []
    resumed = adapt(_model(), hazy_folder, ToyObjective(), _config(rank=4), tmp_path / "broken", resume=True,
                    console=_Recorder(messages))
    assert resumed.summary["config"]["rank"] == 8  # the checkpoint's settings win ...
    assert any("--rank ignored" in m for m in messages)  # ... and the user is told
    adapter = resumed.adapter
    assert list(adapter.sites) == list(reference.sites)
    for key, value in reference.tensors.items():
        assert torch.equal(adapter.tensors[key], value), key
    for name, gate in reference.sites.items():
        assert adapter.sites[name] == gate
    assert [line["step"] for line in _log(tmp_path / "broken")] == [1, 2, 3, 4, 5, 6]


def test_resume_applies_a_longer_schedule(tmp_path, hazy_folder):
    run = tmp_path / "run"

    _interrupt_at(5, _model(), hazy_folder, ToyObjective(), _config(), run)
    messages = []
    result = adapt(_model(), hazy_folder, ToyObjective(), _config(steps=9), run, resume=True,
                   console=_Recorder(messages), given=["steps"])
    assert result.summary["schedule"] == {"search": 4, "finetune": 5}
    assert any("applying --steps" in m for m in messages) and not any("ignored" in m for m in messages)


def test_resume_with_other_weights_is_refused(tmp_path, hazy_folder):
    run = tmp_path / "run"
    adapt(_model(), hazy_folder, ToyObjective(), _config(), run)
    with pytest.raises(UserError, match="not the ones the interrupted run"):
        adapt(_model(seed=1), hazy_folder, ToyObjective(), None, run, resume=True)


def test_crafted_checkpoint_does_not_run_code(tmp_path, hazy_folder):
    run = tmp_path / "run"
    adapt(_model(), hazy_folder, ToyObjective(), _config(), run)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(run / "checkpoints" / "last.pt", "wb") as handle:
        pickle.dump({"config": Payload()}, handle)
    with pytest.raises(UserError) as caught:
        adapt(_model(), hazy_folder, ToyObjective(), None, run, resume=True)
    assert not marker.exists()
    assert "\n" not in caught.value.message and "cannot read checkpoint" in caught.value.message


def test_truncated_checkpoint_is_one_line(tmp_path, hazy_folder):
    run = tmp_path / "run"
    adapt(_model(), hazy_folder, ToyObjective(), _config(), run)
    path = run / "checkpoints" / "last.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="cannot read checkpoint") as caught:
        adapt(_model(), hazy_folder, ToyObjective(), None, run, resume=True)
    assert "\n" not in caught.value.message


def test_existing_run_is_refused_unless_exist_ok(tmp_path, hazy_folder):
    run = tmp_path / "run"
    adapt(_model(), hazy_folder, ToyObjective(), _config(), run)
    first = (run / "adapter.safetensors").read_bytes()
    with pytest.raises(UserError, match="already holds a run"):
        adapt(_model(), hazy_folder, ToyObjective(), _config(), run)
    assert (run / "adapter.safetensors").read_bytes() == first
    adapt(_model(), hazy_folder, ToyObjective(), _config(seed=3), run, exist_ok=True)
    assert json.loads((run / "summary.json").read_text())["config"]["seed"] == 3


def test_failed_run_leaves_no_folder(tmp_path, hazy_folder):
    class NanObjective(ToyObjective):
        def __call__(self, output, hazy):
            return output.mean() * float("nan")

    with pytest.raises(UserError, match="NaN"):
        adapt(_model(), hazy_folder, NanObjective(), _config(max_bad_steps=3, checkpoint_every=0, log_every=1),
              tmp_path / "nan")
    assert not (tmp_path / "nan").exists()
    with pytest.raises(UserError, match="no images"):
        adapt(_model(), tmp_path, ToyObjective(), _config(), tmp_path / "empty")
    assert not (tmp_path / "empty").exists()


def test_bad_settings(tmp_path, hazy_folder):
    cases = [
        ({"method": "manual"}, "--sites"),
        ({"search_steps": 9}, "longer than the whole run"),
        ({"seed": -1}, "--seed"),
        ({"top_k": 17}, "--top-k 17 is more than the 16"),
        ({"crop": 10}, "--crop"),
        ({"test_fraction": 1.0}, "--test-fraction"),
    ]
    for changes, expected in cases:
        with pytest.raises(UserError, match=expected):
            adapt(_model(), hazy_folder, ToyObjective(), _config(**changes), tmp_path / "r")
    for field in ("lr", "gate_lr"):
        config = _config()
        setattr(config.optim, field, -1.0)
        with pytest.raises(UserError, match="--" + field.replace("_", "-")):
            adapt(_model(), hazy_folder, ToyObjective(), config, tmp_path / "r")
    with pytest.raises(UserError, match="no checkpoint"):
        adapt(_model(), hazy_folder, ToyObjective(), _config(), tmp_path / "fresh", resume=True)
    assert not (tmp_path / "r").exists()


def test_tiny_crops_and_tiny_images(tmp_path):
    """--crop 8 is refused in one line (DEA-Net needs 16); images of 12 px or less are upsized to the crop."""
    import cv2
    import numpy as np

    folder = tmp_path / "tiny"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index, side in enumerate((1, 5, 8, 12, 12, 30)):
        cv2.imwrite(str(folder / f"t{index}.png"), rng.integers(0, 255, (side, side + index, 3), dtype=np.uint8))
    with pytest.raises(UserError, match="--crop 8 is too small for this backbone") as caught:
        adapt(_model(), folder, ToyObjective(), _config(crop=8, steps=2, search_steps=1), tmp_path / "run")
    assert "\n" not in caught.value.message and not (tmp_path / "run").exists()
    result = adapt(_model(), folder, ToyObjective(), _config(crop=16, steps=2, search_steps=1), tmp_path / "run")
    assert result.summary["data"]["n_images"] == 6


def test_bad_corpus_every_bad_file_named_every_good_file_used(tmp_path):
    corpus = make_bad_corpus(tmp_path / "mixed")
    messages = []
    result = adapt(_model(), corpus["folder"], ToyObjective(), _config(steps=2, search_steps=1), tmp_path / "run",
                   console=_Recorder(messages))
    text = " ".join(messages)
    for name in corpus["bad"]:
        assert name in text, name
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    used = sorted(split["train"] + split["val"] + split["test"])
    assert used == sorted(corpus["good"])
    data = result.summary["data"]
    assert sorted(data["skipped"] + list(data["not_files"])) == sorted(corpus["bad"])


def test_resume_from_another_directory(tmp_path, hazy_folder, monkeypatch):
    monkeypatch.chdir(hazy_folder.parent)
    run = tmp_path / "run"

    _interrupt_at(2, _model(), Path(hazy_folder.name), ToyObjective(), _config(), run)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = adapt(_model(), hazy_folder, ToyObjective(), None, run, resume=True)
    assert result.summary["stages"]["finetune"]["steps"] == 2
    assert all(p.is_file() for p in read_split(run)["test"])


def test_default_schedule_has_a_floor_in_steps():
    """Under the paper preset any folder of 8-100 images gets at least ~55 search steps at its batch of 24."""
    paper = AdaptConfig(schedule="paper")
    for n_images in (8, 20, 34, 68, 100):
        split = split_images([Path(f"{i:03d}.jpg") for i in range(n_images)], seed=0, test_fraction=0.2)
        schedule = resolve_schedule(paper, len(split.train))
        assert schedule.steps("search") >= 50 and schedule.steps("search") >= MIN_SEARCH_STEPS
        assert schedule.steps("finetune") >= 270
        assert "search 55 steps" in schedule.describe() and "batch 24" in schedule.describe()
        assert resolve_schedule(AdaptConfig(), len(split.train), "cuda").as_dict() == schedule.as_dict()  # auto
    big = resolve_schedule(paper, 480)  # 20 steps per epoch: the paper's 5 / 30 epochs win
    assert big.as_dict() == {"search": 100, "finetune": 500}
    assert resolve_schedule(AdaptConfig(schedule="paper", epochs=3, search_epochs=1), 8).as_dict() == {
        "search": 1, "finetune": 2}
    assert resolve_schedule(AdaptConfig(schedule="paper", method="manual"), 40).as_dict() == {"finetune": 330}


def test_presets_by_device():
    """auto: the cpu preset on the CPU, the paper's on any accelerator; named presets whatever the device."""
    for device in ("cpu", "CPU"):
        config = resolve_preset(AdaptConfig(), device)
        assert (config.preset, config.explicit) == ("cpu", [])
        assert (config.batch, config.crop, config.search_steps, config.steps, config.max_side) == (4, 96, 20, 80, 512)
    for device in ("cuda", "cuda:1", "mps", torch.device("cuda", 0)):
        config = resolve_preset(AdaptConfig(), device)
        assert (config.preset, config.explicit) == ("paper", [])
        assert (config.batch, config.crop, config.search_steps, config.steps, config.max_side) == (
            24, 224, None, None, None)
    assert resolve_preset(AdaptConfig(schedule="paper"), "cpu").batch == 24
    assert resolve_preset(AdaptConfig(schedule="cpu"), "cuda").batch == 4
    assert PRESETS["cpu"] == {"batch": 4, "crop": 96, "search_steps": 20, "steps": 80, "max_side": 512}
    # the stage lengths: 20 search steps of 80 on the CPU whatever the folder
    for n_train in (3, 27, 200):
        assert resolve_schedule(AdaptConfig(), n_train).as_dict() == {"search": 20, "finetune": 60}
        assert resolve_schedule(AdaptConfig(method="full"), n_train).as_dict() == {"finetune": 80}
    assert resolve_schedule(AdaptConfig(), 27, "cuda").as_dict() == {"search": 55, "finetune": 275}
    with pytest.raises(UserError, match="--schedule fast: use one of auto, paper, cpu"):
        AdaptConfig(schedule="fast").validate()
    with pytest.raises(UserError, match="--max-side must be >= 0"):
        AdaptConfig(max_side=-1).validate()


def test_explicit_settings_win_over_the_preset():
    config = AdaptConfig(batch=8, max_side=0)
    resolved = resolve_preset(config, "cpu")
    assert config.batch == 8 and config.crop is None and not config.resolved  # the caller's config is not changed
    assert (resolved.batch, resolved.crop, resolved.max_side, resolved.steps) == (8, 96, 0, 80)
    assert resolved.explicit == ["batch", "max_side"]
    # a stage given in epochs takes no steps from the preset; the other stage still does
    resolved = resolve_preset(AdaptConfig(epochs=10), "cpu")
    assert (resolved.steps, resolved.epochs, resolved.search_steps, resolved.explicit) == (None, 10, 20, ["epochs"])
    assert resolve_schedule(resolved, 27).as_dict() == {"search": 20, "finetune": 50}  # 10 epochs of 7 steps
    resolved = resolve_preset(AdaptConfig(crop=128, steps=100, search_epochs=2), "cuda")
    assert (resolved.crop, resolved.batch, resolved.steps, resolved.search_steps) == (128, 24, 100, None)
    assert resolved.explicit == ["crop", "steps", "search_epochs"]
    # resolving again (a resumed run on another device) changes nothing
    again = resolve_preset(resolve_preset(AdaptConfig(), "cpu"), "cuda")
    assert (again.preset, again.batch, again.crop, again.max_side) == ("cpu", 4, 96, 512)
    # a record of a run from before presets: its values as they were, called the paper's
    legacy = {k: v for k, v in resolve_preset(AdaptConfig(), "cuda").as_dict().items()
              if k not in ("schedule", "preset", "explicit")}
    old = AdaptConfig.from_dict(legacy)
    assert (old.preset, old.batch, old.crop, old.max_side) == ("paper", 24, 224, None)
    assert resolve_preset(old, "cpu").batch == 24


def test_preset_line():
    assert describe_preset(AdaptConfig(), "cpu") == (
        "schedule: cpu preset (device cpu; --schedule paper for the paper's: at least 55+275 steps at batch 24, "
        "crops of 224)")
    assert describe_preset(AdaptConfig(), "cuda:0").startswith("schedule: paper preset (device cuda:0; --schedule cpu")
    line = describe_preset(AdaptConfig(schedule="paper", batch=8, epochs=3), "cpu")
    assert line.startswith("schedule: paper preset (--schedule paper; --batch, --epochs given; --schedule cpu for")
    resumed = describe_preset(resolve_preset(AdaptConfig(), "cpu"), "cuda", resumed=True)
    assert resumed.startswith("schedule: cpu preset (the interrupted run's, kept on device cuda; a new run takes "
                              "--schedule paper")


def test_resume_keeps_the_preset():
    """The checkpoint's resolved schedule stays on resume; a differing --schedule or --batch is named as ignored."""
    saved = resolve_preset(AdaptConfig(), "cpu")
    config, applied, ignored = reconcile_resume(saved, AdaptConfig())  # the API's default request: nothing asked
    assert (applied, ignored) == ([], []) and config.as_dict() == saved.as_dict()
    config, applied, ignored = reconcile_resume(saved, AdaptConfig(schedule="paper", batch=8))
    assert ignored == ["--batch", "--schedule"] and (config.batch, config.preset, config.schedule) == (4, "cpu", "auto")
    config, applied, ignored = reconcile_resume(saved, AdaptConfig(schedule="paper", epochs=5),
                                                given=["schedule", "epochs"])
    assert applied == ["--epochs"] and ignored == ["--schedule"]
    assert (config.epochs, config.steps, config.search_steps) == (5, None, 20)  # --epochs replaces the preset's steps
    assert config.explicit == ["epochs"]


def test_split_holds_out_a_test_image():
    for n_images, expected_test in ((1, 0), (2, 0), (3, 1), (8, 2), (68, 14)):
        split = split_images([Path(f"{i}.jpg") for i in range(n_images)], seed=0, test_fraction=0.2)
        assert len(split.test) == expected_test
        assert len(split.train) >= 1 and len(split.val) >= 1
    assert split_images([Path("a.jpg"), Path("b.jpg")], 0, 0.2).warnings  # says no held-out image


def test_step_crops_are_deterministic_and_cover_small_folders():
    import numpy as np

    images = [np.full((20, 24, 3), i / 4, dtype=np.float32) for i in range(3)]
    crops = StepCrops(images, batch_size=7, crop=8, seed=5)
    first = crops.batch(4)
    assert first.shape == (7, 3, 8, 8) and first.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(first, StepCrops(images, 7, 8, 5).batch(4))
    assert not torch.equal(first, StepCrops(images, 7, 8, 6).batch(4))
    # 3 steps x 7 crops = 21 slots = 7 passes: every image drawn exactly 7 times
    seen = [crops.slot(j)[1] for j in range(21)]
    assert sorted(seen.count(i) for i in range(3)) == [7, 7, 7]


def test_gate_separation_within_noise():
    # steady drifts (how Adam moves gates that keep winning) are not noise, even when the gap is small
    steady = {"steps": [1, 2, 3, 4], "values": {"a": [0.50, 0.51, 0.52, 0.53], "b": [0.50, 0.505, 0.51, 0.515],
                                                "c": [0.5, 0.4, 0.3, 0.2]}}
    clear = gate_separation(steady, top_k=1)
    assert clear["gap"] == pytest.approx(0.015) and clear["spread"] == pytest.approx(0.0, abs=1e-12)
    assert not clear["within_noise"] and clear["stable_readings"] == 4
    # jitter larger than the gap
    noisy = {"steps": [1, 2, 3, 4], "values": {"a": [0.5, 0.52, 0.49, 0.502], "b": [0.5, 0.49, 0.52, 0.501],
                                               "c": [0.5, 0.51, 0.48, 0.499]}}
    result = gate_separation(noisy, top_k=1)
    assert result["within_noise"] and result["kth"] == "a" and result["next"] == "b"
    assert result["spread"] > result["gap"]
    # a top-k that changed at the last reading is not settled, whatever the jitter
    flipped = {"steps": [1, 2, 3, 4], "values": {"a": [0.50, 0.51, 0.52, 0.54], "b": [0.50, 0.515, 0.53, 0.535]}}
    late = gate_separation(flipped, top_k=1)
    assert late["kth"] == "a" and late["stable_readings"] == 1 and late["within_noise"]


class _Recorder:
    """A rich console writing into a buffer; ``lines`` (a list) receives the text when read."""

    def __new__(cls, lines):
        import io

        from rich.console import Console

        buffer = io.StringIO()
        console = Console(file=buffer, width=400, highlight=False, soft_wrap=True)
        original = console.print

        def record(*parts, **kwargs):
            original(*parts, **kwargs)
            lines[:] = buffer.getvalue().splitlines()

        console.print = record
        return console


def test_loop_reads_the_host_once_per_log_window(tmp_path, hazy_folder, monkeypatch):
    """Outside the step functions the loop reads device values only when it logs (every log_every steps)."""
    from bilalora.adapt import loop

    counts = {"reads": 0}
    inside_step = {"flag": False}
    for method in ("item", "tolist", "__bool__", "__float__", "cpu"):
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, **kwargs):
            if not inside_step["flag"]:
                counts["reads"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    for name in ("bilevel_step", "train_step"):
        step = getattr(loop, name)

        def wrapped(*args, _step=step, **kwargs):
            inside_step["flag"] = True
            try:
                return _step(*args, **kwargs)
            finally:
                inside_step["flag"] = False

        monkeypatch.setattr(loop, name, wrapped)
    state_reads = []
    original_run = loop.run_stages

    def run_and_count(*args, **kwargs):
        counts["reads"] = 0
        original_run(*args, **kwargs)
        state_reads.append(counts["reads"])

    monkeypatch.setattr("bilalora.adapt.pipeline.run_stages", run_and_count)
    reads = {}
    for log_every in (5, 1):
        config = _config(steps=10, search_steps=5, log_every=log_every, checkpoint_every=0, checkpoint_minutes=0,
                         crop=16)
        adapt(_model(), hazy_folder, ToyObjective(), config, tmp_path / f"run{log_every}")
        reads[log_every] = state_reads.pop()
    per_line = (reads[1] - reads[5]) / (10 - 2)  # 10 log lines against 2
    print(f"host reads outside the step functions in 10 steps: {reads[5]} (log_every 5), {reads[1]} (log_every 1); "
          f"{per_line:.1f} per log line")
    assert 0 < per_line <= 2  # one copy to the host (.cpu) and its conversion (.tolist) per log line, gates included
    assert reads[5] / 10 <= 3  # stage ends (ranking, checkpoint copies) included


def test_resume_names_an_image_gone_from_the_folder(tmp_path, hazy_folder):
    run = tmp_path / "run"

    _interrupt_at(2, _model(), hazy_folder, ToyObjective(), _config(), run)
    gone = read_split(run)["train"][0]
    gone.unlink()
    with pytest.raises(UserError, match=f"train image .*{gone.name}.* is gone"):
        adapt(_model(), hazy_folder, ToyObjective(), None, run, resume=True)


def test_no_test_split_scores_the_validation_half(tmp_path, hazy_folder):
    result = adapt(_model(), hazy_folder, ToyObjective(), _config(test_fraction=0.0), tmp_path / "run")
    assert result.summary["movement"]["split"] == "val" and result.summary["data"]["test"] == 0
    assert json.loads((tmp_path / "run" / "split.json").read_text())["test"] == []


def test_lora_start_depends_on_the_seed_only(tmp_path, hazy_folder):
    """LoRA factors start from --seed on the CPU generator, whatever the caller did with torch's global RNG."""
    config = _config(steps=1, search_steps=1)
    model = _model()
    torch.manual_seed(12345)
    first = adapt(model, hazy_folder, ToyObjective(), config, tmp_path / "a").adapter
    model = _model()
    torch.rand(1000)  # the global generator is elsewhere now
    second = adapt(model, hazy_folder, ToyObjective(), _config(steps=1, search_steps=1), tmp_path / "b").adapter
    assert all(torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)
    third = adapt(_model(), hazy_folder, ToyObjective(), _config(steps=1, search_steps=1, seed=1), tmp_path / "c")
    assert any(not torch.equal(first.tensors[k], third.adapter.tensors[k]) for k in first.tensors
               if k in third.adapter.tensors) or list(third.adapter.sites) != list(first.sites)


def test_resume_keeps_the_runs_input_normalisation(tmp_path, hazy_folder):
    from bilalora.backbones.normalize import CLIP_MEAN, CLIP_STD, fold_input_norm, same_input_norm

    clip = {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}

    def clip_model():
        model = fold_input_norm(_model(), CLIP_MEAN, CLIP_STD)
        model.bilalora_info["input_norm_source"] = "flag"
        return model

    run = tmp_path / "run"
    _interrupt_at(3, clip_model(), hazy_folder, ToyObjective(), _config(), run)
    plain = _model()  # resumed without --input-norm: the run's normalisation comes back
    result = adapt(plain, hazy_folder, ToyObjective(), None, run, resume=True)
    assert same_input_norm(result.summary["input_norm"], clip)
    reference = adapt(clip_model(), hazy_folder, ToyObjective(), _config(), tmp_path / "straight")
    for key, value in reference.adapter.tensors.items():
        assert torch.equal(result.adapter.tensors[key], value), key
    other = fold_input_norm(_model(), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    other.bilalora_info["input_norm_source"] = "flag"
    with pytest.raises(UserError, match="input normalisation"):
        adapt(other, hazy_folder, ToyObjective(), None, run, resume=True)


def test_run_records_and_prints_its_preset(tmp_path, hazy_folder):
    """A run on the CPU leaving batch and image size to the preset: cpu values, the line before the schedule."""
    messages = []
    config = _config(batch=None, max_side=None)
    result = adapt(_model(), hazy_folder, ToyObjective(), config, tmp_path / "run", console=_Recorder(messages))
    preset = result.summary["schedule_preset"]
    assert preset == {"requested": "auto", "preset": "cpu", "explicit": ["crop", "search_steps", "steps"],
                      "values": {"batch": 4, "crop": 32, "search_steps": 4, "steps": 6, "max_side": 512}}
    recorded = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert recorded["schedule_preset"] == preset and recorded["config"]["preset"] == "cpu"
    assert recorded["config"]["batch"] == 4 and recorded["data"]["max_side"] == 512
    line = next(i for i, m in enumerate(messages) if m.startswith("schedule: cpu preset"))
    assert messages[line] == ("schedule: cpu preset (device cpu; --crop, --search-steps, --steps given; --schedule "
                              "paper for the paper's: at least 55+275 steps at batch 24, crops of 224)")
    assert messages[line + 1].startswith("schedule: search 4 steps") and "batch 4 from 3" in messages[line + 1]
    assert config.batch is None  # the caller's config is left as it was


def test_resume_keeps_the_runs_preset(tmp_path, hazy_folder):
    run = tmp_path / "run"
    _interrupt_at(2, _model(), hazy_folder, ToyObjective(), _config(batch=None), run)
    assert read_checkpoint(run)["config"]["preset"] == "cpu"
    messages = []
    result = adapt(_model(), hazy_folder, ToyObjective(), AdaptConfig(schedule="paper", batch=8), run, resume=True,
                   console=_Recorder(messages), given=["batch", "schedule"])
    assert any("--batch, --schedule ignored" in m for m in messages)
    assert ("schedule: cpu preset (the interrupted run's; --crop, --search-steps, --steps given; a new run takes "
            "--schedule paper for the paper's") in "\n".join(messages)
    assert result.summary["schedule_preset"]["preset"] == "cpu" and result.summary["config"]["batch"] == 4
    assert result.summary["schedule"] == {"search": 4, "finetune": 2}


def test_prior_search_space_for_dea_net():
    """DEA-Net declares its level-1 encoder blocks as the prior's search space; other objectives keep the 16."""
    from bilalora import sites
    from bilalora.adapt.config import resolve_search_space

    model = _model()
    assert [s.name for s in sites.default_sites(model, "prior")] == [f"down_level1_block{i}" for i in range(1, 5)]
    assert len(sites.default_sites(model, "h2c")) == len(sites.default_sites(model)) == 16
    config = resolve_search_space(_config(), model, "prior")
    assert config.sites == ["down_level1_block[1-4]"] and config.search_space == "dea-net-t for the prior objective"
    for unchanged, name in ((_config(sites=["level3_*"]), "prior"), (_config(method="manual", sites=["level3_block1"]),
                            "prior"), (_config(), "h2c"), (_config(), None), (config, "prior")):  # fmt: skip
        assert resolve_search_space(unchanged, model, name) is unchanged
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3))  # a model without a registry entry
    assert resolve_search_space(_config(), plain, "prior").sites is None


def test_prior_run_searches_the_backbones_prior_space_and_resume_keeps_it(tmp_path, hazy_folder):
    from bilalora.objectives import Prior

    run = tmp_path / "run"
    _interrupt_at(5, _model(), hazy_folder, Prior(), _config(), run)
    saved = read_checkpoint(run)["config"]
    assert saved["sites"] == ["down_level1_block[1-4]"] and saved["search_space"] == "dea-net-t for the prior objective"
    result = adapt(_model(), hazy_folder, Prior(), None, run, resume=True, console=None)
    summary = result.summary
    assert sorted(name for name, _ in summary["ranking"]) == [f"down_level1_block{i}" for i in range(1, 5)]
    assert summary["config"]["search_space"] == "dea-net-t for the prior objective"
    # resume with a config that names no sites: the run's own space is not a changed flag
    config, applied, ignored = reconcile_resume(AdaptConfig.from_dict(saved), _config())
    assert config.sites == ["down_level1_block[1-4]"] and "--sites" not in ignored
    from rich.console import Console

    console = Console(record=True, width=300)  # a new run says where its search space came from
    adapt(_model(), hazy_folder, Prior(), _config(steps=2, search_steps=1), tmp_path / "new", console=console)
    text = console.export_text()
    assert "search space: down_level1_block[1-4] (dea-net-t for the prior objective; --sites " in text


def test_reference_objective_gets_the_unadapted_output_and_is_unbound_after(tmp_path, hazy_folder):
    """An objective that wants the base network's output (prior(detail=...)) gets exactly that, every step."""
    from bilalora.objectives import Prior

    class Recording(Prior):
        def __init__(self, **options):
            super().__init__(**options)
            self.seen = []

        def bind_reference(self, reference):
            if reference is None:
                super().bind_reference(None)
                return

            def checked(hazy):
                out = reference(hazy)
                self.seen.append((hazy.detach().clone(), out.detach().clone()))
                return out

            super().bind_reference(checked)

    objective = Recording(detail_weight=5.0)
    config = _config(method="manual", sites=["level3_block1", "down_level2_block1"], steps=3)
    config.optim.lr = 1e-2
    result = adapt(_model(), hazy_folder, objective, config, tmp_path / "run")
    assert len(objective.seen) >= 3 and objective._reference is None
    base = _model().eval()
    with torch.no_grad():
        for hazy, out in objective.seen:
            torch.testing.assert_close(out, base(hazy), rtol=1e-5, atol=1e-5)
    assert result.summary["objective"]["weights"]["detail"] == 5.0
