"""Gradient modes for LPs: descent where the exact gradient vanishes, consistency as smoothing -> 0."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

from diffopt import LPGD, CvxpyLayer, InputError, LogBarrier, Perturbed, QuadraticSmoothing
from problems import rel_err

SURROGATES = [QuadraticSmoothing(2.0), LogBarrier(0.1), Perturbed(1.0, 64, seed=0), LPGD(2.0)]


def simplex_lp(n=3):
    x = cp.Variable(n)
    c = cp.Parameter(n)
    prob = cp.Problem(cp.Minimize(c @ x), [cp.sum(x) == 1, x >= 0])
    return CvxpyLayer(prob, [c], [x])


def linear_cost_sparsemax(n=5):
    """x*(z) = sparsemax(z), with z entering only the linear cost (what LPGD/perturbation use)."""
    x = cp.Variable(n)
    z = cp.Parameter(n)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x) - z @ x), [cp.sum(x) == 1, x >= 0])
    return CvxpyLayer(prob, [z], [x])


def test_exact_lp_gradient_is_zero():
    layer = simplex_lp()
    c = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    (x,) = layer(c)
    ((x - torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)) ** 2).sum().backward()
    assert torch.allclose(c.grad, torch.zeros(3, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("mode", SURROGATES, ids=lambda m: type(m).__name__)
def test_surrogate_gives_descent_direction_on_lp(mode):
    """Gradient steps on c with the surrogate move the exact LP solution to the target vertex."""
    layer = simplex_lp()
    target = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    c = torch.tensor([0.0, 0.3, 0.6], dtype=torch.float64, requires_grad=True)
    start = ((layer(c.detach())[0] - target) ** 2).sum()
    opt = torch.optim.SGD([c], lr=0.5)
    for step in range(30):
        (x,) = layer(c, gradient=mode)
        loss = ((x - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert c.grad.abs().max() > 1e-3  # informative, unlike the exact gradient
        opt.step()
    end = ((layer(c.detach())[0] - target) ** 2).sum()
    assert start > 1.9 and end < 1e-6


def _vjp(layer, z, g, mode):
    z = z.clone().requires_grad_()
    (x,) = layer(z, gradient=mode)
    return torch.autograd.grad(x, z, g)[0]


@pytest.mark.parametrize(
    "family",
    [
        lambda t: QuadraticSmoothing(t),
        lambda t: LogBarrier(t),
        lambda t: LPGD(t, central=True),
    ],
    ids=["QuadraticSmoothing", "LogBarrier", "LPGD"],
)
def test_surrogate_converges_to_exact_derivative(family):
    """On a QP whose derivative exists (sparsemax), smoothing -> 0 recovers the exact VJP."""
    layer = linear_cost_sparsemax(5)
    rng = np.random.default_rng(0)
    z = torch.as_tensor(rng.standard_normal((4, 5)))
    g = torch.as_tensor(rng.standard_normal((4, 5)))
    exact = _vjp(layer, z, g, "exact")
    errs = [rel_err(_vjp(layer, z, g, family(t)), exact) for t in (1e-1, 1e-3, 1e-5, 1e-7)]
    assert errs[-1] < 1e-3
    assert errs[-1] < errs[0]


def test_perturbed_converges_to_exact_derivative_as_sigma_shrinks():
    layer = linear_cost_sparsemax(4)
    rng = np.random.default_rng(1)
    z = torch.as_tensor(rng.standard_normal((2, 4)))
    g = torch.as_tensor(rng.standard_normal((2, 4)))
    exact = _vjp(layer, z, g, "exact")
    err = rel_err(_vjp(layer, z, g, Perturbed(1e-3, 4000, seed=0)), exact)
    assert err < 0.1  # Monte-Carlo error ~ 1/sqrt(samples)


def test_perturbed_is_reproducible_under_a_seed():
    layer = simplex_lp()
    c = torch.tensor([[0.0, 0.2, 0.1]], dtype=torch.float64)
    g = torch.tensor([[1.0, -1.0, 0.5]], dtype=torch.float64)
    a = _vjp(layer, c, g, Perturbed(0.5, 16, seed=3))
    b = _vjp(layer, c, g, Perturbed(0.5, 16, seed=3))
    d = _vjp(layer, c, g, Perturbed(0.5, 16, seed=4))
    assert torch.equal(a, b) and not torch.equal(a, d)
    xa = layer(c, gradient=Perturbed(0.5, 16, seed=3))[0]
    xb = layer(c, gradient=Perturbed(0.5, 16, seed=3))[0]
    assert torch.equal(xa, xb)
    assert torch.allclose(xa.sum(), torch.tensor(1.0, dtype=torch.float64))  # mean of vertices
    # Unseeded: fresh perturbations, reproducible under torch.manual_seed, which they advance
    # but never reseed (the caller's later draws stay reproducible).
    def unseeded():
        torch.manual_seed(5)
        first, second = (layer(c, gradient=Perturbed(0.5, 16))[0] for _ in range(2))
        return first, second, torch.rand(3)

    u1, v1, r1 = unseeded()
    u2, v2, r2 = unseeded()
    assert torch.equal(u1, u2) and torch.equal(v1, v2) and torch.equal(r1, r2)
    assert not torch.equal(u1, v1)


def test_logbarrier_rejects_conic_problems_and_bad_parameters():
    x = cp.Variable(3)
    c = cp.Parameter(3)
    layer = CvxpyLayer(cp.Problem(cp.Minimize(c @ x), [cp.norm(x) <= 1]), [c], [x])
    with pytest.raises(Exception, match="LogBarrier needs the native LP/QP solver"):
        layer(torch.ones(3, dtype=torch.float64), gradient=LogBarrier(0.1))
    with pytest.raises(InputError, match="mu must be > 0"):
        LogBarrier(0.0)
    with pytest.raises(InputError, match="gamma must be > 0"):
        QuadraticSmoothing(-1.0)
    with pytest.raises(InputError, match="samples must be an int >= 1"):
        Perturbed(1.0, 0)
    with pytest.raises(InputError, match="tau must be > 0"):
        LPGD(0.0)
    with pytest.raises(InputError, match="gradient must be a diffopt.diff GradientMode"):
        simplex_lp()(torch.ones(3, dtype=torch.float64), gradient="smooth")


@pytest.mark.parametrize("mode", [Perturbed(0.5, 8, seed=0), LPGD(1.0)], ids=["perturbed", "lpgd"])
def test_estimators_refuse_torch_func_clearly(mode):
    layer = simplex_lp()
    c = torch.tensor([0.0, 0.2, 0.1], dtype=torch.float64)
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        with pytest.raises(InputError, match="cannot run under torch.func transforms"):
            transform(lambda v: layer(v, gradient=mode)[0])(c)
    # plain autograd still works
    v = c.clone().requires_grad_()
    layer(v, gradient=mode)[0].sum().backward()
    assert v.grad is not None
