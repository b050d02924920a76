"""Adapter files: round trip, apply/merge parity, refusal on other base weights, atomic write."""

from __future__ import annotations

import json

import pytest
import torch

from bilalora import lora, sites
from bilalora.adapter import Adapter, fingerprint
from bilalora.backbones import create
from bilalora.errors import UserError


def _trained_adapter(model, names=("level3_block2", "down_level1_block3", "level3_block7")):
    lora.inject(model, sites.default_sites(model), rank=4, lora_alpha=8)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.05)
        for gate in lora.site_gates(model).values():
            gate.logit.copy_(torch.randn((), generator=generator))
    return Adapter.from_model(model, list(names), method="bilevel", objective={"name": "prior"}, seed=7)


def test_round_trip_and_merge_parity(tmp_path, tiny_dea):
    base = create("dea-net-t")
    base.load_state_dict(tiny_dea.state_dict())
    base_print = fingerprint(base)
    adapter = _trained_adapter(tiny_dea)
    assert adapter.base_fingerprint == base_print  # fingerprint is taken through the wrappers
    path = adapter.save(tmp_path / "day.safetensors")
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left
    loaded = Adapter.load(path)
    assert list(loaded.sites) == ["level3_block2", "down_level1_block3", "level3_block7"]
    assert loaded.rank == 4 and loaded.lora_alpha == 8.0 and loaded.meta["method"] == "bilevel"
    assert loaded.meta["seed"] == 7 and loaded.layers_of("level3_block2") == [
        "level3_block2.conv1",
        "level3_block2.conv2",
    ]
    for key, value in adapter.tensors.items():
        assert torch.equal(loaded.tensors[key], value)

    # reference: the gated model restricted to the adapter's sites
    reference = create("dea-net-t")
    reference.load_state_dict(base.state_dict())
    loaded.apply(reference)
    x = torch.rand(1, 3, 48, 64)
    with torch.no_grad():
        gated = reference(x)
        merged_model = create("dea-net-t")
        merged_model.load_state_dict(base.state_dict())
        loaded.merge_into(merged_model)
        merged = merged_model(x)
        plain = base(x)
    assert (gated - merged).abs().max() <= 1e-5
    assert (merged - plain).abs().max() > 1e-4
    assert list(merged_model.state_dict()) == list(base.state_dict())


def test_refuses_other_base_weights(tmp_path, tiny_dea):
    path = _trained_adapter(tiny_dea).save(tmp_path / "a.safetensors")
    torch.manual_seed(99)
    other = create("dea-net-t")
    with pytest.raises(UserError) as err:
        Adapter.load(path).apply(other)
    assert "fingerprint" in str(err.value) and Adapter.load(path).base_fingerprint in str(err.value)


def test_metadata_is_json(tmp_path, tiny_dea):
    from safetensors import safe_open

    path = _trained_adapter(tiny_dea).save(tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as handle:
        meta = json.loads(handle.metadata()["bilalora"])
    assert meta["format_version"] == 1 and meta["backbone"] == "dea-net-t"
    assert [s["name"] for s in meta["sites"]][0] == "level3_block2"
    assert 0 < meta["sites"][0]["gate"] < 1


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Adapter.load(tmp_path / "none.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match="not a readable"):
        Adapter.load(junk)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(UserError, match="no bilalora metadata"):
        Adapter.load(plain)
