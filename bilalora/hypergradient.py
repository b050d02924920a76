"""Hypergradients of the site gates: the estimators and the exact implicit-function reference.

The bilevel problem of layer positioning (gate logits ``a``, LoRA factors ``w``):

    min_a  F(w*(a), a)            F: the objective on the validation half
    s.t.   w*(a) = argmin_w f(w, a)   f: the objective on the train half

**Implicit function theorem.** At the lower optimum ``grad_w f(w*(a), a) = 0`` for
every ``a``; differentiating this identity in ``a`` gives
``H dw*/da + d2f/(dw da) = 0`` with ``H = d2f/dw2``, hence
``dw*/da = -H^{-1} d2f/(dw da)`` and the total derivative

    dF/da = dF/da|_w - d2f/(da dw) H^{-1} v,        v = dF/dw,  g = df/dw.       (1)

:func:`exact_ift` evaluates (1) with Hessian-vector products and conjugate
gradients (for tests and small problems; it needs second derivatives).

**The paper's rank-one estimator** (``ift``). Approximate the Hessian of f in
the joint variable (w, a) by the outer product of its gradient (the empirical
Fisher / Gauss-Newton approximation of a loss by its own gradient):

    d2f/dw2 ~ g g^T,        d2f/(da dw) ~ (df/da) g^T.

``g g^T`` is singular; its pseudo-inverse is ``g g^T / |g|^4``, so
``H^+ v = g <g, v> / |g|^4`` and

    d2f/(da dw) H^+ v ~ (df/da) g^T g <g, v> / |g|^4 = (<g, v> / |g|^2) df/da.

Substituting in (1), with ``eps`` guarding |g| = 0:

    dF/da ~ dF/da|_w - (<v, g> / (|g|^2 + eps)) * df/da.                         (2)

No learning rate appears. The approximation keeps only the component of v
along g: when the validation gradient is aligned with the train gradient
(c = <v,g>/|g|^2 > 0, the two halves agree), the gates are pushed against
df/da, i.e. credit for what the lower level will do anyway is removed. With
both halves drawn from one distribution, v and g are equal in expectation
(c ~ 1) and so are dF/da|_w and df/da: (2) then cancels most of the direct
term, and the gates move on the difference between the halves' gradients
(tests/test_search.py shows it on a toy problem).

**The release's estimator** (``release``, BiLaLoRA_Train.py): the implicit
term multiplied by the LoRA learning rate ``eta`` and added with a plus sign,

    dF/da ~ dF/da|_w + eta * (<v, g> / (|g|^2 + eps)) * df/da,                   (3)

which is (2) with the implicit term scaled by ``-eta`` (at eta = 1e-3 it is
about a thousandth of (2)'s term). **Direct** (``direct``): ``dF/da|_w`` only
(the first-order DARTS approximation, w treated as independent of a).

All estimators here are pure functions of gradient lists and run on the
device without host synchronisation (the dot products are one fused reduction).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["VARIANTS", "estimate", "exact_ift", "implicit_coefficient"]

#: Hypergradient estimators: the paper's rank-one IFT, the release's, and the direct gradient.
VARIANTS = ("ift", "release", "direct")


def implicit_coefficient(v: Sequence[torch.Tensor], g: Sequence[torch.Tensor], eps: float = 1e-8) -> torch.Tensor:
    """c = <v, g> / (|g|^2 + eps): the rank-one IFT coefficient (float64 0-d tensor)."""
    a = torch.cat([t.reshape(-1) for t in v]).double()
    b = torch.cat([t.reshape(-1) for t in g]).double()
    return torch.dot(a, b) / (torch.dot(b, b) + eps)


def estimate(
    variant: str,
    direct: torch.Tensor,
    df_da: torch.Tensor,
    v: Sequence[torch.Tensor],
    g: Sequence[torch.Tensor],
    eta: float = 0.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    """The gate hypergradient of ``variant`` (see the module docstring).

    Args:
        variant: ``ift`` (2), ``release`` (3) or ``direct``.
        direct: dF/da|_w, (S,) for S gates.
        df_da: df/da, (S,).
        v, g: dF/dw and df/dw, lists of tensors shaped like the LoRA factors.
        eta: the LoRA learning rate (``release`` only).
        eps: the guard of |g|^2.

    Returns:
        (S,) tensor, dtype of ``direct``.
    """
    if variant == "direct":
        return direct
    if variant not in VARIANTS:
        raise ValueError(f"hypergradient {variant!r}: use one of {', '.join(VARIANTS)}")
    c = implicit_coefficient(v, g, eps).to(direct.dtype)
    if variant == "ift":
        return direct - c * df_da
    return direct + (eta * c) * df_da


def exact_ift(
    lower: Callable[[], torch.Tensor],
    upper: Callable[[], torch.Tensor],
    weights: Sequence[torch.Tensor],
    gates: Sequence[torch.Tensor],
    iterations: int = 100,
    tol: float = 1e-12,
) -> list[torch.Tensor]:
    """Equation (1) with the exact Hessian: dF/da|_w - d2f/(da dw) H^{-1} dF/dw.

    ``H^{-1} v`` is solved by conjugate gradients with Hessian-vector products of
    f (H must be positive definite at ``weights``, i.e. at a lower-level optimum of
    a convex-enough f). Meant for tests and small problems: every CG iteration is a
    double backward pass.

    Args:
        lower, upper: closures returning f and F (0-d) at the current parameters.
        weights: the lower-level variables w (requires_grad).
        gates: the upper-level variables a (requires_grad).

    Returns:
        The hypergradient per gate tensor, shaped like ``gates``.
    """
    weights, gates = list(weights), list(gates)
    big_f = upper()
    grads = torch.autograd.grad(big_f, weights + gates, allow_unused=True)
    v = [_zeros_if_none(x, p) for x, p in zip(grads[: len(weights)], weights)]
    direct = [_zeros_if_none(x, p) for x, p in zip(grads[len(weights):], gates)]
    small_f = lower()
    g = torch.autograd.grad(small_f, weights, create_graph=True)

    def hvp(vector: list[torch.Tensor]) -> list[torch.Tensor]:
        out = torch.autograd.grad(g, weights, grad_outputs=vector, retain_graph=True, allow_unused=True)
        return [_zeros_if_none(x, p) for x, p in zip(out, weights)]

    # conjugate gradients for H u = v
    u = [torch.zeros_like(x) for x in v]
    r = [x.clone() for x in v]
    p = [x.clone() for x in r]
    rr = sum((x * x).sum() for x in r)
    for _ in range(iterations):
        if float(rr) <= tol:
            break
        hp = hvp(p)
        alpha = rr / sum((a * b).sum() for a, b in zip(p, hp))
        u = [a + alpha * b for a, b in zip(u, p)]
        r = [a - alpha * b for a, b in zip(r, hp)]
        rr_new = sum((x * x).sum() for x in r)
        p = [a + (rr_new / rr) * b for a, b in zip(r, p)]
        rr = rr_new
    # mixed term: d/da <df/dw, u> with u held fixed
    inner = sum((a * b.detach()).sum() for a, b in zip(g, u))
    mixed = torch.autograd.grad(inner, gates, allow_unused=True)
    mixed = [_zeros_if_none(x, q) for x, q in zip(mixed, gates)]
    return [d - m for d, m in zip(direct, mixed)]


def _zeros_if_none(grad, param: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(param) if grad is None else grad
