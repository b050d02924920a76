"""Gated LoRA: factorisation, gates, merge parity, strip, sites."""

from __future__ import annotations

import contextlib
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


# ---------------------------------------------------------------- merge / unmerge (PEFT's layer model)

def test_merge_and_unmerge_are_inverses_and_keep_the_output(tiny_dea):
    base_state = {k: v.clone() for k, v in tiny_dea.state_dict().items()}
    lora.inject(tiny_dea, sites.default_sites(tiny_dea), rank=4, lora_alpha=8)
    _randomise(tiny_dea, seed=2)
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        gated = tiny_dea(x)
        lora.merge_adapter(tiny_dea)
        assert all(layer.merged for layer in lora.lora_layers(tiny_dea).values())
        merged = tiny_dea(x)
        merged_state = {k: v.clone() for k, v in lora.base_state_dict(tiny_dea).items()}
        lora.merge_adapter(tiny_dea)  # merging twice is a no-op
        assert all(torch.equal(v, merged_state[k]) for k, v in lora.base_state_dict(tiny_dea).items())
        lora.unmerge_adapter(tiny_dea)
        assert not any(layer.merged for layer in lora.lora_layers(tiny_dea).values())
        unmerged = tiny_dea(x)
    assert (merged - gated).abs().max() <= 1e-5
    assert torch.equal(unmerged, gated) or (unmerged - gated).abs().max() <= 1e-6
    changed = 0
    for key, value in lora.base_state_dict(tiny_dea).items():
        # back to the base weights to float32 rounding of (W + d) - d
        assert torch.allclose(value, base_state[key], rtol=0, atol=4 * torch.finfo(torch.float32).eps
                              * max(1.0, float(base_state[key].abs().max()))), key
        changed += not torch.equal(merged_state[key], base_state[key])
    assert changed >= 32  # the merge really wrote every LoRA'd weight


def test_safe_merge_refuses_non_finite_weights_and_leaves_the_model_unchanged(tiny_dea):
    lora.inject(tiny_dea, sites.default_sites(tiny_dea), rank=2, lora_alpha=4)
    _randomise(tiny_dea)
    layers = list(lora.lora_layers(tiny_dea).values())
    with torch.no_grad():
        layers[5].lora_B[0, 0] = float("nan")
    before = {k: v.clone() for k, v in lora.base_state_dict(tiny_dea).items()}
    with pytest.raises(UserError, match="NaN/inf"):
        lora.merge_adapter(tiny_dea)
    assert not any(layer.merged for layer in layers)  # the layers merged before the bad one were unmerged
    after = lora.base_state_dict(tiny_dea)
    for key in before:
        assert torch.allclose(after[key], before[key], atol=1e-6, equal_nan=True), key
    with pytest.raises(UserError, match="NaN/inf"):
        lora.merge(tiny_dea)
    assert len(lora.lora_layers(tiny_dea)) == len(layers)  # merge() did not strip either
    layers[5].merge(safe_merge=False)  # the unsafe path writes whatever it gets
    assert layers[5].merged and not bool(torch.isfinite(layers[5].base.weight).all())


def test_adapters_swap_in_a_live_model():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))
    lora.inject(net, sites.discover(net), rank=2, lora_alpha=2)
    x = torch.rand(2, 3, 12, 12)
    adapters = []
    for seed in (1, 2):
        _randomise(net, seed)
        adapters.append(({k: v.clone() for k, v in lora.lora_state_dict(net).items()},
                         {k: float(v) for k, v in lora.gate_values(net).items()}, net(x).detach()))
    for state, gates, expected in adapters + adapters[:1]:
        lora.unmerge_adapter(net)
        lora.load_lora_state_dict(net, state)
        lora.set_gate_values(net, gates)
        lora.merge_adapter(net)
        assert torch.allclose(net(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match="merged"):
        lora.load_lora_state_dict(net, adapters[0][0])


def test_disabling_lora_gives_the_base_output():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))
    reference = copy.deepcopy(net)
    lora.inject(net, sites.discover(net), rank=2, lora_alpha=2)
    _randomise(net)
    x = torch.rand(1, 3, 9, 9)
    adapted = net(x).detach()
    lora.merge_adapter(net)
    lora.set_enabled(net, False)  # unmerges first
    assert torch.allclose(net(x), reference(x), atol=1e-6)
    lora.set_enabled(net, True, sites=["2"])
    only_last = net(x).detach()
    assert not torch.allclose(only_last, reference(x)) and not torch.allclose(only_last, adapted)
    lora.set_enabled(net, True)
    assert torch.allclose(net(x), adapted, atol=1e-6)


def test_keep_sites_toggles_state_in_place(tiny_dea):
    base_state = {k: v.clone() for k, v in tiny_dea.state_dict().items()}
    lora.inject(tiny_dea, sites.default_sites(tiny_dea), rank=2, lora_alpha=4)
    _randomise(tiny_dea, seed=3)
    kept = ["level3_block2", "down_level1_block1"]
    layers_before = lora.lora_layers(tiny_dea)
    gates_before = {k: v.logit.detach().clone() for k, v in lora.site_gates(tiny_dea).items()}
    lora.keep_sites(tiny_dea, kept)
    layers = lora.lora_layers(tiny_dea)
    assert set(lora.site_gates(tiny_dea)) == set(kept)
    assert set(layers) == {f"{name}.conv{i}" for name in kept for i in (1, 2)}
    for path, layer in layers.items():
        assert layer is layers_before[path]  # the same modules and parameter objects
    for name, gate in lora.site_gates(tiny_dea).items():
        assert torch.equal(gate.logit.detach(), gates_before[name]) and not gate.logit.requires_grad
    trainable = {n for n, p in tiny_dea.named_parameters() if p.requires_grad}
    assert trainable == {f"{path}.{f}" for path in layers for f in ("lora_A", "lora_B")}
    state = lora.base_state_dict(tiny_dea)
    assert all(torch.equal(state[k], base_state[k]) for k in base_state)  # removed sites are back to base
    with pytest.raises(KeyError, match="no LoRA site"):
        lora.keep_sites(tiny_dea, ["level3_block7"])


def test_lora_a_is_drawn_on_the_cpu_from_the_seed():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    draws = []
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(7)
        holder = nn.Sequential(copy.deepcopy(conv).to(dtype))
        lora.inject(holder, sites.discover(holder), rank=2, lora_alpha=4)
        draws.append(holder[0].lora_A.detach().double())
    # the same numbers whatever the weight's dtype (and so device): drawn in float32 on the CPU first
    assert torch.equal(draws[0], draws[1])
    torch.manual_seed(7)
    bound = 1.0 / (4 * 3) ** 0.5
    expected = torch.empty(2 * 3, 4 * 3).uniform_(-bound, bound)
    assert torch.equal(draws[0].float(), expected)
    generator = torch.Generator().manual_seed(7)
    holder = nn.Sequential(copy.deepcopy(conv))
    lora.inject(holder, sites.discover(holder), rank=2, lora_alpha=4, generator=generator)
    assert torch.equal(holder[0].lora_A.detach(), expected)


# ---------------------------------------------------------------- precision under bf16 autocast

def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_a_small_delta_survives_bf16_autocast_in_the_forward_pass():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3, padding=1)
    holder = nn.Sequential(conv)
    lora.inject(holder, sites.discover(holder), rank=4, lora_alpha=8)
    layer = holder[0]
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_B.mul_(1e-3 * conv.weight.norm() / layer.get_delta_weight().norm())  # |delta| = 1e-3 |W|
    x = torch.rand(2, 32, 24, 24).bfloat16()  # what a previous bf16 layer would hand over
    with torch.no_grad():
        expected = conv._conv_forward(x.float(), layer.get_delta_weight(), None)
        with _bf16():
            with_delta = holder(x).float()
            saved = layer.lora_B.clone()
            layer.lora_B.zero_()
            without = holder(x).float()
            layer.lora_B.copy_(saved)
            # the naive way: the delta added to W and the sum rounded to bf16 by the conv
            naive = (conv._conv_forward(x, layer.effective_weight(), conv.bias).float()
                     - conv._conv_forward(x, conv.weight, conv.bias).float())
    realised = with_delta - without
    survival = 1 - float((realised - expected).norm() / expected.norm())
    assert survival >= 0.9
    naive_survival = 1 - float((naive - expected).norm() / expected.norm())
    assert naive_survival < 0.5  # what the branch avoids (the test would pass trivially otherwise)


def test_prior_gradient_under_bf16_autocast_matches_fp32(tiny_dea):
    from bilalora.objectives import build_objective
    from bilalora.search import _loss

    torch.manual_seed(0)
    lora.inject(tiny_dea, sites.default_sites(tiny_dea), rank=4, lora_alpha=8)
    lora.freeze_base(tiny_dea)
    _randomise(tiny_dea, seed=1)
    objective = build_objective("prior")
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(2, 3, 1, 1, generator=generator) * 0.5 + 0.3
    x = (base + 0.15 * torch.rand(2, 3, 48, 48, generator=generator)).clamp(0, 1)
    params = lora.lora_parameters(tiny_dea) + lora.gate_parameters(tiny_dea)
    grads = {}
    for name, autocast in (("fp32", contextlib.nullcontext), ("bf16", _bf16)):
        loss = _loss(tiny_dea, objective, x, autocast)
        assert loss.dtype == torch.float32
        grads[name] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    cosine = float(torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], dim=0))
    assert cosine >= 0.99
