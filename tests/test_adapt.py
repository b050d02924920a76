"""Adaptation runs through the library: stages, records, resume after an interruption."""

from __future__ import annotations

import json

import pytest
import torch

from bilalora import backbones
from bilalora.adapt import AdaptConfig, adapt
from bilalora.adapter import Adapter
from bilalora.errors import UserError


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
    config = AdaptConfig(epochs=3, search_epochs=2, batch=2, crop=32, checkpoint_every=1, workers=0, top_k=2)
    config.optim.lr = 1e-3
    config.optim.gate_lr = 1e-2
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def _model():
    torch.manual_seed(0)
    return backbones.create("dea-net-t")


def test_bilevel_run_writes_records(tmp_path, hazy_folder):
    result = adapt(_model(), hazy_folder, ToyObjective(), _config(), tmp_path / "run")
    run = tmp_path / "run"
    for name in ("adapter.safetensors", "summary.json", "log.jsonl", "split.json", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["ranking"]) == 16 and len(summary["selected"]) == 2
    assert summary["selected"] == [name for name, _ in summary["ranking"][:2]]
    assert summary["stages"]["search"]["steps"] == 4 and summary["stages"]["finetune"]["steps"] == 2
    assert summary["trainable_parameters"]["finetune"] < summary["trainable_parameters"]["search"]
    assert summary["movement"]["mean_abs_output_change"] > 0
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and "gates" in lines[0] and "val_loss" in lines[0]
    adapter = Adapter.load(run / "adapter.safetensors")
    assert list(adapter.sites) == summary["selected"] and adapter.meta["method"] == "bilevel"
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) == 4 and len(split["val"]) == 4 and not set(split["train"]) & set(split["val"])
    merged = adapter.merge_into(_model())
    assert set(merged.state_dict()) == set(_model().state_dict())
    assert result.adapter is not None


@pytest.mark.parametrize("method", ["joint", "manual", "full"])
def test_baselines_run(tmp_path, hazy_folder, method):
    sites = ["level3_block1", "level3_block2"] if method == "manual" else None
    result = adapt(_model(), hazy_folder, ToyObjective(), _config(method=method, sites=sites, epochs=2,
                                                                    search_epochs=1), tmp_path / method)
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


def test_resume_reaches_the_same_adapter(tmp_path, hazy_folder):
    reference = adapt(_model(), hazy_folder, ToyObjective(), _config(), tmp_path / "straight").adapter

    class Interrupt(Exception):
        pass

    def stop_at_three(step, entry):
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        adapt(_model(), hazy_folder, ToyObjective(), _config(), tmp_path / "broken", on_step=stop_at_three)
    assert not (tmp_path / "broken" / "adapter.safetensors").exists()
    resumed = adapt(_model(), hazy_folder, ToyObjective(), _config(epochs=99), tmp_path / "broken", resume=True)
    assert resumed.summary["config"]["epochs"] == 3  # the checkpoint's settings win
    adapter = resumed.adapter
    assert list(adapter.sites) == list(reference.sites)
    for key, value in reference.tensors.items():
        assert torch.equal(adapter.tensors[key], value), key
    for name, gate in reference.sites.items():
        assert adapter.sites[name] == gate


def test_bad_settings(tmp_path, hazy_folder):
    with pytest.raises(UserError, match="--sites"):
        adapt(_model(), hazy_folder, ToyObjective(), _config(method="manual"), tmp_path / "r")
    with pytest.raises(UserError, match="--search-epochs"):
        adapt(_model(), hazy_folder, ToyObjective(), _config(search_epochs=5), tmp_path / "r")
    with pytest.raises(UserError, match="no checkpoint"):
        adapt(_model(), hazy_folder, ToyObjective(), _config(), tmp_path / "fresh", resume=True)
    with pytest.raises(UserError, match="no images"):
        adapt(_model(), tmp_path / "fresh", ToyObjective(), _config(), tmp_path / "r2")


def test_nan_loss_is_skipped_then_aborts(tmp_path, hazy_folder):
    class NanObjective(ToyObjective):
        def __call__(self, output, hazy):
            return output.mean() * float("nan")

    with pytest.raises(UserError, match="NaN"):
        adapt(_model(), hazy_folder, NanObjective(), _config(max_bad_steps=3), tmp_path / "nan")
