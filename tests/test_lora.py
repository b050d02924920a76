"""Gated LoRA: factorisation, gates, merge parity, strip, sites."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bilalora import lora, sites
from bilalora.errors import UserError


def _randomise(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for layer in lora.lora_layers(model).values():
        with torch.no_grad():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator) * 0.05)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.05)
    for gate in lora.site_gates(model).values():
        with torch.no_grad():
            gate.logit.copy_(torch.randn((), generator=generator))


def test_default_sites_are_the_release_16(tiny_dea):
    names = [site.name for site in sites.default_sites(tiny_dea)]
    expected = [f"down_level1_block{i}" for i in range(1, 5)]
    expected += [f"down_level2_block{i}" for i in range(1, 5)]
    expected += [f"level3_block{i}" for i in range(1, 9)]
    assert names == expected
    assert all(site.convs == (f"{site.name}.conv1", f"{site.name}.conv2") for site in sites.default_sites(tiny_dea))


def test_lora_parameter_count_matches_paper():
    from bilalora import backbones

    model = backbones.create("dea-net")
    by_name = {site.name: site for site in sites.default_sites(model)}
    # three level-3 sites at rank 8: 3.653 M -> 3.764 M parameters as in the paper
    top3 = sum(by_name[f"level3_block{i}"].lora_params(8) for i in (1, 2, 3))
    assert top3 == 110_592
    sites_list = [by_name[f"level3_block{i}"] for i in (1, 2, 3)]
    lora.inject(model, sites_list, rank=8, lora_alpha=16)
    lora.freeze_base(model)
    assert lora.count_parameters(model, trainable_only=True) == 110_592 + 3  # + one gate per site


def test_all_sites_and_select(tiny_dea):
    every = sites.discover(tiny_dea)
    names = [site.name for site in every]
    assert "fe_level_2" in names and "mix1" in names and "level3_block1.pa" in names and "up3" in names
    chosen = sites.select(every, include=["level3_block*"], exclude=["*.sa", "*.ca.ca", "*.pa"])
    assert [s.name for s in chosen] == [f"level3_block{i}" for i in range(1, 9)]
    with pytest.raises(UserError, match="match no site"):
        sites.select(every, include=["nope*"])


def test_factorisation_shapes_and_init():
    conv = nn.Conv2d(6, 4, 3, padding=1)
    site = sites.Site("x", ("conv",), (tuple(conv.weight.shape),), (1,))
    holder = nn.Module()
    holder.conv = conv
    lora.inject(holder, [sites.Site("conv", ("conv",), site.shapes, site.groups)], rank=2, lora_alpha=4)
    layer = holder.conv
    assert layer.lora_A.shape == (2 * 3, 6 * 3) and layer.lora_B.shape == (4 * 3, 2 * 3)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert layer.scale == 2.0
    x = torch.rand(1, 6, 8, 8)
    assert torch.equal(layer(x), conv(x))  # B = 0: no change at start


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect"),
        nn.Conv2d(4, 8, 5, dilation=2, padding=4, groups=2, padding_mode="circular"),
        nn.Conv2d(8, 8, 7, padding=3, groups=8, padding_mode="replicate", bias=False),
        nn.Conv2d(4, 6, (3, 5), padding=(1, 2)),
        nn.Conv2d(4, 6, 1),
    ],
)
def test_delta_is_added_to_the_weight_for_any_conv(conv):
    holder = nn.Sequential(conv)
    reference = copy.deepcopy(conv)
    lora.inject(holder, sites.discover(holder), rank=3, lora_alpha=6)
    _randomise(holder)
    layer = holder[0]
    gate = lora.site_gates(holder)["0"].value()
    expected_weight = reference.weight + gate * 2.0 * (layer.lora_B @ layer.lora_A).view(reference.weight.shape)
    x = torch.rand(2, 4 if conv.in_channels == 4 else 8, 17, 19)
    expected = reference._conv_forward(x, expected_weight, reference.bias)
    assert torch.allclose(holder(x), expected, atol=1e-6)
    out_before = holder(x).detach()
    lora.merge(holder)
    assert isinstance(holder[0], nn.Conv2d)
    assert torch.allclose(holder(x), out_before, atol=1e-5)


def test_linear_lora_merge():
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    lora.inject(net, sites.discover(net), rank=2, lora_alpha=2)
    _randomise(net)
    assert net[0].lora_A.shape == (2, 5) and net[0].lora_B.shape == (7, 2)
    x = torch.rand(4, 5)
    before = net(x).detach()
    lora.merge(net)
    assert torch.allclose(net(x), before, atol=1e-6)
    assert set(net.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_merge_parity_on_every_dea_net_site(tiny_dea):
    base_state = {k: v.clone() for k, v in tiny_dea.state_dict().items()}
    every = sites.discover(tiny_dea)
    lora.inject(tiny_dea, every, rank=4, lora_alpha=8)
    _randomise(tiny_dea, seed=5)
    assert len(lora.site_gates(tiny_dea)) == len(every)
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        gated = tiny_dea(x)
        lora.merge(tiny_dea)
        merged = tiny_dea(x)
    assert (gated - merged).abs().max() <= 1e-5
    state = tiny_dea.state_dict()
    assert list(state) == list(base_state)
    assert all(state[k].shape == base_state[k].shape for k in state)
    # the deltas really changed the output
    assert any(not torch.equal(state[k], base_state[k]) for k in state)


def test_gate_is_shared_and_scales_the_delta(tiny_dea):
    chosen = sites.select(sites.default_sites(tiny_dea), include=["level3_block1"])
    gates = lora.inject(tiny_dea, chosen, rank=2, lora_alpha=4)
    gate = gates["level3_block1"]
    assert tiny_dea.level3_block1.conv1.gate is gate and tiny_dea.level3_block1.conv2.gate is gate
    assert float(gate.value().detach()) == pytest.approx(0.5)
    names = [n for n, _ in tiny_dea.named_parameters() if "lora_gate" in n]
    assert names == ["level3_block1.lora_gate"]
    lora.set_gate_values(tiny_dea, {"level3_block1": 1.0})
    assert not gate.gated and float(gate.value()) == 1.0
    lora.set_gate_values(tiny_dea, {"level3_block1": 0.25})
    assert float(gate.value()) == pytest.approx(0.25, abs=1e-6)


def test_freeze_and_strip(tiny_dea):
    base_state = {k: v.clone() for k, v in tiny_dea.state_dict().items()}
    lora.inject(tiny_dea, sites.default_sites(tiny_dea), rank=8, lora_alpha=16)
    lora.freeze_base(tiny_dea)
    trainable = {n for n, p in tiny_dea.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B", "lora_gate")) for n in trainable)
    assert len(lora.gate_parameters(tiny_dea)) == 16
    assert set(lora.base_state_dict(tiny_dea)) == set(base_state)
    _randomise(tiny_dea)
    lora.strip(tiny_dea)
    assert all(torch.equal(v, base_state[k]) for k, v in tiny_dea.state_dict().items())
    assert not lora.lora_layers(tiny_dea) and not lora.site_gates(tiny_dea)
