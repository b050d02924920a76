"""The hypergradient against a direct autograd evaluation, and site ranking on a toy problem."""

from __future__ import annotations

import torch
from torch import nn

from bilalora import lora, sites
from bilalora.search import OptimConfig, bilevel_step, hypergradient, make_gate_optimizer, make_lora_optimizer, rank_sites


class _Toy(nn.Module):
    """Four parallel 1x1-conv sites; only ``useful`` reaches the output."""

    def __init__(self):
        super().__init__()
        self.useful = nn.Sequential(nn.Conv2d(3, 3, 1))
        self.idle1 = nn.Sequential(nn.Conv2d(3, 3, 1))
        self.idle2 = nn.Sequential(nn.Conv2d(3, 3, 1))
        self.idle3 = nn.Sequential(nn.Conv2d(3, 3, 1))
        with torch.no_grad():
            for block in (self.useful, self.idle1, self.idle2, self.idle3):
                block[0].weight.copy_(torch.eye(3).view(3, 3, 1, 1))
                block[0].bias.zero_()

    def forward(self, x):
        # the idle sites are computed but contribute nothing to the output
        idle = self.idle1(x) + self.idle2(x) + self.idle3(x)
        return self.useful(x) + 0.0 * idle


def _target_objective(output, hazy):
    target = hazy.flip(1) * 0.8  # a colour permutation: needs a change of the useful conv
    return ((output - target) ** 2).mean()


def test_hypergradient_matches_direct_formula():
    torch.manual_seed(0)
    model = _Toy()
    lora.inject(model, sites.discover(model), rank=2, lora_alpha=4)
    lora.freeze_base(model)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.normal_(0, 0.1)
        for gate in lora.site_gates(model).values():
            gate.logit.normal_()
    train, val = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    eta = 0.01
    hyper, g, lower, upper = hypergradient(model, _target_objective, train, val, eta)

    gates = lora.gate_parameters(model)
    weights = lora.lora_parameters(model)
    big_f = _target_objective(model(val), val)
    d_f_da = torch.autograd.grad(big_f, gates, retain_graph=True)
    v = torch.autograd.grad(big_f, weights, allow_unused=True)
    small_f = _target_objective(model(train), train)
    g_direct = torch.autograd.grad(small_f, weights, retain_graph=True)
    df_da = torch.autograd.grad(small_f, gates)
    v = [torch.zeros_like(w) if x is None else x for x, w in zip(v, weights)]
    dot = sum((a * b).sum() for a, b in zip(v, g_direct))
    norm = sum((b * b).sum() for b in g_direct)
    expected = [a - eta * dot / (norm + 1e-8) * b for a, b in zip(d_f_da, df_da)]
    for got, want in zip(hyper, expected):
        assert torch.allclose(got, want, atol=1e-6)
    for got, want in zip(g, g_direct):
        assert torch.allclose(got, want, atol=1e-6)
    assert abs(float(lower) - float(small_f)) < 1e-6 and abs(float(upper) - float(big_f)) < 1e-6


def test_bilevel_ranks_the_only_useful_site_first():
    torch.manual_seed(0)
    model = _Toy()
    lora.inject(model, sites.discover(model), rank=2, lora_alpha=4)
    lora.freeze_base(model)
    config = OptimConfig(lr=1e-2, gate_lr=5e-2)
    lora_opt = make_lora_optimizer(lora.lora_parameters(model), config)
    gate_opt = make_gate_optimizer(lora.gate_parameters(model), config)
    for step in range(40):
        train, val = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
        result = bilevel_step(model, _target_objective, train, val, lora_opt, gate_opt, config)
        assert not result.skipped
    ranking = rank_sites(model)
    assert ranking[0][0] == "useful"
    assert ranking[0][1] > 0.55
    assert all(abs(value - 0.5) < 0.05 for name, value in ranking[1:])


def test_three_pass_variant_runs_and_differs():
    torch.manual_seed(0)
    losses = {}
    for passes in (2, 3):
        torch.manual_seed(0)
        model = _Toy()
        lora.inject(model, sites.discover(model), rank=2, lora_alpha=4)
        lora.freeze_base(model)
        config = OptimConfig(lr=1e-2, gate_lr=5e-2)
        lora_opt = make_lora_optimizer(lora.lora_parameters(model), config)
        gate_opt = make_gate_optimizer(lora.gate_parameters(model), config)
        generator = torch.Generator().manual_seed(1)
        for _ in range(5):
            train = torch.rand(4, 3, 8, 8, generator=generator)
            val = torch.rand(4, 3, 8, 8, generator=generator)
            bilevel_step(model, _target_objective, train, val, lora_opt, gate_opt, config, passes=passes)
        losses[passes] = float(_target_objective(model(train), train))
    assert losses[2] != losses[3]
