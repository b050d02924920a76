"""The search: hypergradient estimators against closed forms, steps that lower the objective,
device-side skipping of non-finite steps, the gate optimisers, and steps without host syncs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bilalora import hypergradient as hg
from bilalora import lora, sites
from bilalora.search import (
    NormalizedGradient,
    OptimConfig,
    StepResult,
    bilevel_step,
    hypergradient,
    joint_step,
    make_gate_optimizer,
    make_lora_optimizer,
    rank_sites,
    train_step,
)


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


class _Two(nn.Module):
    """Two sites that both reach the output, with different leverage."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 3, 1))
        self.b = nn.Sequential(nn.Conv2d(3, 3, 1))

    def forward(self, x):
        return self.a(x) + 0.3 * self.b(x)


def _target_objective(output, hazy):
    target = hazy.flip(1) * 0.8  # a colour permutation: needs a change of the useful conv
    return ((output - target) ** 2).mean()


def _gated_toy(cls=_Toy, seed=0, randomise=True):
    torch.manual_seed(seed)
    model = cls()
    lora.inject(model, sites.discover(model), rank=2, lora_alpha=4)
    lora.freeze_base(model)
    if randomise:
        with torch.no_grad():
            for layer in lora.lora_layers(model).values():
                layer.lora_B.normal_(0, 0.1)
            for gate in lora.site_gates(model).values():
                gate.logit.normal_()
    return model


# ---------------------------------------------------------------- the estimators

@pytest.mark.parametrize("variant", ["ift", "release", "direct"])
def test_hypergradient_variants_match_their_formulas(variant):
    model = _gated_toy(_Two)
    train, val = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    eta = 0.01
    hyper, g, lower, upper = hypergradient(model, _target_objective, train, val, eta, variant=variant)

    gates = lora.gate_parameters(model)
    weights = lora.lora_parameters(model)
    big_f = _target_objective(model(val), val)
    d_f_da = torch.autograd.grad(big_f, gates, retain_graph=True)
    v = torch.autograd.grad(big_f, weights)
    small_f = _target_objective(model(train), train)
    g_direct = torch.autograd.grad(small_f, weights, retain_graph=True)
    df_da = torch.autograd.grad(small_f, gates)
    c = sum((a.double() * b.double()).sum() for a, b in zip(v, g_direct)) / (
        sum((b.double() ** 2).sum() for b in g_direct) + 1e-8)
    c = float(c)
    assert abs(c) > 1e-3  # the implicit term is not trivially zero on this problem
    factor = {"ift": -c, "release": eta * c, "direct": 0.0}[variant]
    for got, a, b in zip(hyper, d_f_da, df_da):
        assert torch.allclose(got, a + factor * b, atol=1e-7, rtol=1e-5)
    for got, want in zip(g, g_direct):
        assert torch.allclose(got, want, atol=1e-7)
    assert abs(float(lower) - float(small_f)) < 1e-6 and abs(float(upper) - float(big_f)) < 1e-6
    if variant != "direct":  # the implicit term changes the gradient
        assert not all(torch.allclose(x, y) for x, y in zip(hyper, d_f_da))


def _quadratic_problem(seed=0, n=5, m=3):
    """f(w, a) = 1/2 w^T P w - w^T (Q a + r);  F(w, a) = 1/2 |w - t|^2 + s . a  (float64).

    w*(a) = P^{-1} (Q a + r), so dF/da = s + Q^T P^{-1} (w* - t) in closed form.
    """
    gen = torch.Generator().manual_seed(seed)
    m_ = torch.randn(n, n, generator=gen, dtype=torch.float64)
    P = m_ @ m_.T + n * torch.eye(n, dtype=torch.float64)
    Q = torch.randn(n, m, generator=gen, dtype=torch.float64)
    r = torch.randn(n, generator=gen, dtype=torch.float64)
    t = torch.randn(n, generator=gen, dtype=torch.float64)
    s = torch.randn(m, generator=gen, dtype=torch.float64)
    a = torch.randn(m, generator=gen, dtype=torch.float64).requires_grad_()
    w_star = torch.linalg.solve(P, Q @ a.detach() + r)
    w = w_star.clone().requires_grad_()

    def lower():
        return 0.5 * w @ P @ w - w @ (Q @ a + r)

    def upper():
        return 0.5 * ((w - t) ** 2).sum() + s @ a

    closed = s + Q.T @ torch.linalg.solve(P, w_star - t)
    return w, a, lower, upper, closed


def test_exact_ift_equals_the_closed_form_on_a_quadratic_bilevel_problem():
    for seed in range(3):
        w, a, lower, upper, closed = _quadratic_problem(seed)
        (got,) = hg.exact_ift(lower, upper, [w], [a])
        assert torch.allclose(got, closed, atol=1e-6, rtol=0), (got, closed)
        # and the direct gradient alone is wrong here: the implicit term matters
        (direct,) = torch.autograd.grad(upper(), [a])
        assert (direct - closed).abs().max() > 1e-2


def test_rank_one_estimator_equals_its_formula_by_hand():
    w, a, lower, upper, closed = _quadratic_problem(1)
    # at w* the lower gradient vanishes; evaluate the estimator a little away from it
    with torch.no_grad():
        w.add_(0.1)
    (v, direct) = torch.autograd.grad(upper(), [w, a])
    g, df_da = torch.autograd.grad(lower(), [w, a])
    by_hand = direct - (float(v @ g) / (float(g @ g) + 1e-8)) * df_da
    got = hg.estimate("ift", direct, df_da, [v], [g], eps=1e-8)
    assert torch.allclose(got, by_hand, atol=1e-12, rtol=0)
    released = hg.estimate("release", direct, df_da, [v], [g], eta=0.3, eps=1e-8)
    assert torch.allclose(released, direct + 0.3 * (float(v @ g) / (float(g @ g) + 1e-8)) * df_da, atol=1e-12)
    assert torch.equal(hg.estimate("direct", direct, df_da, [v], [g]), direct)
    # with a rank-one lower Hessian, H = g g^T holds exactly: the rank-one estimator IS the exact IFT
    u = torch.randn(4, dtype=torch.float64)
    a2 = torch.randn(2, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(4, dtype=torch.float64, requires_grad=True)
    lower2 = lambda: 0.5 * (u @ w2 - 1.0 - a2.sum()) ** 2
    upper2 = lambda: ((w2 - 1.0) ** 2).sum() + (a2 ** 2).sum()
    (v2, d2) = torch.autograd.grad(upper2(), [w2, a2])
    g2, dfa2 = torch.autograd.grad(lower2(), [w2, a2])
    estimate = hg.estimate("ift", d2, dfa2, [v2], [g2], eps=0.0)
    # exact: H = u u^T (rank one; pseudo-inverse), mixed d2f/(da dw) = -1 u^T for each gate
    exact = d2 - (-torch.ones(2, dtype=torch.float64)) * float(u @ v2) / float(u @ u)
    assert torch.allclose(estimate, exact, atol=1e-10)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="hypergradient"):
        OptimConfig(hypergradient="exact")
    with pytest.raises(ValueError, match="gate optimizer"):
        OptimConfig(gate_optimizer="lion")


# ---------------------------------------------------------------- steps that do their job

@pytest.mark.parametrize("variant", ["ift", "release", "direct"])
def test_bilevel_search_lowers_the_objective_and_moves_only_the_useful_gate(variant):
    model = _gated_toy(randomise=False)
    config = OptimConfig(lr=1e-2, gate_lr=5e-2, hypergradient=variant)
    lora_opt = make_lora_optimizer(lora.lora_parameters(model), config)
    gate_opt = make_gate_optimizer(lora.gate_parameters(model), config)
    generator = torch.Generator().manual_seed(3)
    held_out = torch.rand(8, 3, 8, 8, generator=generator)
    with torch.no_grad():
        before = float(_target_objective(model(held_out), held_out))
    for step in range(40):
        train, val = torch.rand(4, 3, 8, 8, generator=generator), torch.rand(4, 3, 8, 8, generator=generator)
        result = bilevel_step(model, _target_objective, train, val, lora_opt, gate_opt, config)
        assert not bool(result.skipped)
    with torch.no_grad():
        after = float(_target_objective(model(held_out), held_out))
    assert after < 0.8 * before
    gates = dict(rank_sites(model))
    # the idle sites never reach the output: zero hypergradient, so their gates never move
    assert all(gates[name] == 0.5 for name in ("idle1", "idle2", "idle3"))
    assert abs(gates["useful"] - 0.5) > 0.005
    if variant != "ift":
        assert gates["useful"] > 0.55  # dF/da alone (or nearly): opening the useful gate lowers F
    # (ift: with train and validation halves from one distribution v ~ g, so the implicit term
    # cancels most of dF/da and the useful gate's direction is decided by the batches)


def test_joint_and_train_steps_lower_the_objective():
    model = _gated_toy(randomise=False)
    config = OptimConfig(lr=1e-2, gate_lr=5e-2)
    lora_opt = make_lora_optimizer(lora.lora_parameters(model), config)
    gate_opt = make_gate_optimizer(lora.gate_parameters(model), config)
    generator = torch.Generator().manual_seed(4)
    held_out = torch.rand(8, 3, 8, 8, generator=generator)
    before = float(_target_objective(model(held_out), held_out))
    for _ in range(20):
        joint_step(model, _target_objective, torch.rand(4, 3, 8, 8, generator=generator), lora_opt, gate_opt, config)
    middle = float(_target_objective(model(held_out), held_out))
    lora.keep_sites(model, ["useful"])
    optimizer = make_lora_optimizer(lora.lora_parameters(model), config)
    for _ in range(20):
        train_step(model, _target_objective, torch.rand(4, 3, 8, 8, generator=generator), optimizer, config)
    after = float(_target_objective(model(held_out), held_out))
    assert middle < 0.8 * before and after < 0.8 * middle


def test_three_pass_step_takes_the_lora_step_at_the_updated_gates():
    """passes=3: the LoRA gradient is recomputed after the gate step (plain SGD to read the step exactly)."""
    results = {}
    for passes in (2, 3):
        model = _gated_toy(_Two, seed=1)
        config = OptimConfig(gate_lr=0.5, clip_norm=0.0)
        lora_opt = torch.optim.SGD(lora.lora_parameters(model), lr=1.0)
        gate_opt = make_gate_optimizer(lora.gate_parameters(model), config)
        train, val = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
        reference = copy.deepcopy(model)
        bilevel_step(model, _target_objective, train, val, lora_opt, gate_opt, config, passes=passes)
        # replay by hand: gates as the step left them, weights as before the step
        with torch.no_grad():
            for (_, gate), (_, new) in zip(lora.site_gates(reference).items(), lora.site_gates(model).items()):
                gate.logit.copy_(new.logit)
        at_new_gates = torch.autograd.grad(_target_objective(reference(train), train), lora.lora_parameters(reference))
        step = [new.detach() - old.detach() for new, old in zip(lora.lora_parameters(model),
                                                                 lora.lora_parameters(reference))]
        results[passes] = max(float((s + g).abs().max()) for s, g in zip(step, at_new_gates))
    assert results[3] < 1e-6  # the LoRA step is -grad at the updated gates
    assert results[2] > 1e-5  # the 2-pass step reuses the gradient from before the gate step


def test_a_non_finite_step_is_skipped_on_the_device():
    model = _gated_toy()
    config = OptimConfig(lr=1e-2, gate_lr=5e-2)
    lora_opt = make_lora_optimizer(lora.lora_parameters(model), config)
    gate_opt = make_gate_optimizer(lora.gate_parameters(model), config)
    train, val = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    bilevel_step(model, _target_objective, train, val, lora_opt, gate_opt, config)  # some optimiser state
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora_state = copy.deepcopy(lora_opt.state_dict())

    def nan_objective(output, hazy):
        return _target_objective(output, hazy) * float("nan")

    for step in (lambda: bilevel_step(model, nan_objective, train, val, lora_opt, gate_opt, config),
                 lambda: joint_step(model, nan_objective, train, lora_opt, gate_opt, config),
                 lambda: train_step(model, nan_objective, train, lora_opt, config)):
        result = step()
        assert isinstance(result.skipped, torch.Tensor) and bool(result.skipped)
        assert result.as_dict()["skipped"] is True
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key
        after_state = lora_opt.state_dict()["state"]
        for index, entry in lora_state["state"].items():
            for name, tensor in entry.items():
                assert torch.equal(after_state[index][name], tensor), name
    result = bilevel_step(model, _target_objective, train, val, lora_opt, gate_opt, config)
    assert not bool(result.skipped)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_step_result_as_dict_reads_everything():
    result = StepResult(torch.tensor(0.5), torch.tensor(0.25), torch.tensor(2.0), torch.tensor(False),
                        torch.tensor([0.5, 0.75]))
    assert result.as_dict() == {"train_loss": 0.5, "val_loss": 0.25, "grad_norm": 2.0, "skipped": False,
                                "gates": [0.5, 0.75]}
    assert StepResult(torch.tensor(1.0)).as_dict() == {"train_loss": 1.0, "skipped": False}


# ---------------------------------------------------------------- gate optimisers

def test_normalized_gradient_keeps_relative_sizes_and_moves_by_lr():
    params = [nn.Parameter(torch.zeros(())) for _ in range(4)]
    optimizer = NormalizedGradient(params, lr=0.1)
    grads = [1.0, 10.0, -2.0, 0.0]
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g)
    optimizer.step()
    moved = torch.stack([p.detach() for p in params])
    assert torch.allclose(moved.pow(2).mean().sqrt(), torch.tensor(0.1), atol=1e-6)  # RMS step = lr
    assert torch.allclose(moved, -0.1 * torch.tensor(grads) / torch.tensor(grads).pow(2).mean().sqrt(), atol=1e-6)
    optimizer.found_inf = torch.tensor(1.0)
    params[1].grad = torch.tensor(float("nan"))
    optimizer.step()
    assert torch.equal(torch.stack([p.detach() for p in params]), moved)  # skipped, NaN gradient and all


@pytest.mark.parametrize("name", ["adam", "sgd", "normalized"])
def test_gate_optimizers_are_built_from_the_config(name):
    params = [nn.Parameter(torch.zeros(())) for _ in range(3)]
    optimizer = make_gate_optimizer(params, OptimConfig(gate_optimizer=name, gate_lr=0.01))
    assert optimizer.param_groups[0]["lr"] == 0.01
    for p, g in zip(params, (1.0, 4.0, -1.0)):
        p.grad = torch.tensor(g)
    optimizer.step()
    moved = [float(p) for p in params]
    assert moved[0] < 0 < moved[2]
    if name == "adam":  # Adam moves each by about lr whatever the gradient's size: the point
        assert moved[1] == pytest.approx(moved[0], rel=1e-3)
    else:
        assert moved[1] == pytest.approx(4 * moved[0], rel=1e-4)


# ---------------------------------------------------------------- host syncs

def test_a_search_step_does_not_read_values_back(monkeypatch):
    model = _gated_toy()
    config = OptimConfig(lr=1e-2, gate_lr=5e-2)
    lora_opt = make_lora_optimizer(lora.lora_parameters(model), config)
    gate_opt = make_gate_optimizer(lora.gate_parameters(model), config)
    train, val = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    calls = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for step in (lambda: bilevel_step(model, _target_objective, train, val, lora_opt, gate_opt, config),
                 lambda: bilevel_step(model, _target_objective, train, val, lora_opt, gate_opt, config, passes=3),
                 lambda: joint_step(model, _target_objective, train, lora_opt, gate_opt, config)):
        step()
    assert calls == []


def test_deconv_indexes_with_a_device_buffer_and_keeps_its_kernel():
    from bilalora.backbones.deconv import _ANGULAR_SHIFT, DEConv

    torch.manual_seed(0)
    layer = DEConv(4)
    assert "conv1_4.shift_index" not in layer.state_dict()  # not a weight: state-dict keys unchanged
    assert layer.conv1_4.shift_index.tolist() == _ANGULAR_SHIFT
    flat = layer.conv1_4.conv.weight.flatten(2)
    expected = (flat - flat[:, :, _ANGULAR_SHIFT]).view_as(layer.conv1_4.conv.weight)
    assert torch.equal(layer.conv1_4.merged_weight()[0], expected)
    layer.double()
    assert layer.conv1_4.shift_index.dtype == torch.long  # moved with the module, never cast
    x = torch.rand(1, 4, 8, 8, dtype=torch.float64)
    weight, bias = layer.merged_weight()
    assert torch.allclose(layer(x), torch.nn.functional.conv2d(x, weight, bias, padding=1))
