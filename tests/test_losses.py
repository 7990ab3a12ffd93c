"""Decision-focused losses: values, gradients and the regret metric against brute force."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

from diffopt import CvxpyLayer, InputError
from diffopt.bilevel import normalized_regret, perturbed_fenchel_young, regret, spo_plus


def argmin_vertex(c):
    """Exact oracle over the simplex: the cheapest vertex."""
    return torch.nn.functional.one_hot(c.argmin(1), c.shape[1]).to(c)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    c = torch.as_tensor(rng.uniform(0, 1, (6, 4)))
    c_hat = torch.as_tensor(rng.uniform(0, 1, (6, 4))).requires_grad_()
    x = argmin_vertex(c)
    return c, c_hat, x, (c * x).sum(1)


def test_spo_plus_value_and_subgradient(data):
    c, c_hat, x, z = data
    loss = spo_plus(c_hat, c, x, z, argmin_vertex, reduction="none")
    x_t = argmin_vertex(2 * c_hat.detach() - c)
    expected = ((c - 2 * c_hat.detach()) * x_t).sum(1) + 2 * (c_hat.detach() * x).sum(1) - z
    assert torch.allclose(loss.detach(), expected)
    assert (loss.detach() >= regret(c_hat, c, z, argmin_vertex) - 1e-12).all()  # upper bound
    loss.sum().backward()
    assert torch.allclose(c_hat.grad, 2 * (x - x_t))


def test_spo_plus_with_a_layer_oracle_matches_exact_oracle(data):
    c, c_hat, x, z = data
    xv, cv = cp.Variable(4), cp.Parameter(4)
    layer = CvxpyLayer(cp.Problem(cp.Minimize(cv @ xv), [cp.sum(xv) == 1, xv >= 0]), [cv], [xv])
    a = spo_plus(c_hat, c, x, z, layer)
    b = spo_plus(c_hat, c, x, z, argmin_vertex)
    assert torch.allclose(a, b, atol=1e-7)


def test_perturbed_fenchel_young_gradient_and_seed(data):
    c, c_hat, x, z = data
    loss = perturbed_fenchel_young(c_hat, x, argmin_vertex, sigma=0.5, samples=8, seed=1)
    loss.backward()
    g1 = c_hat.grad.clone()
    c_hat.grad = None
    perturbed_fenchel_young(c_hat, x, argmin_vertex, sigma=0.5, samples=8, seed=1).backward()
    assert torch.equal(g1, c_hat.grad)
    # gradient = (x_true − mean perturbed solution)/B: rows sum to zero on the simplex
    assert torch.allclose(g1.sum(1), torch.zeros(6, dtype=g1.dtype), atol=1e-12)
    assert float(loss.detach()) >= 0


def test_perturbed_fenchel_young_unseeded_follows_manual_seed(data):
    """seed=None: fresh draws each call, reproducible under torch.manual_seed, and the global
    generator is advanced, never reseeded (later draws of the caller stay reproducible)."""
    _, c_hat, x, _ = data

    def run():
        torch.manual_seed(5)
        a = perturbed_fenchel_young(c_hat, x, argmin_vertex, sigma=0.5, samples=8)
        b = perturbed_fenchel_young(c_hat, x, argmin_vertex, sigma=0.5, samples=8)
        return a, b, torch.rand(3)

    a1, b1, r1 = run()
    a2, b2, r2 = run()
    assert torch.equal(a1, a2) and torch.equal(b1, b2) and torch.equal(r1, r2)
    assert not torch.equal(a1, b1)


def test_regret_and_normalized_regret(data):
    c, c_hat, x, z = data
    r = regret(c_hat, c, z, argmin_vertex)
    brute = c.gather(1, c_hat.detach().argmin(1, keepdim=True)).squeeze(1) - c.min(1).values
    assert torch.allclose(r, brute)
    assert torch.allclose(normalized_regret(c_hat, c, z, argmin_vertex), brute.sum() / z.abs().sum())
    assert float(regret(c, c, z, argmin_vertex).abs().max()) == 0.0


def test_loss_input_errors(data):
    c, c_hat, x, z = data
    with pytest.raises(InputError, match=r"expected batch size 6"):
        spo_plus(c_hat, c[:3], x, z, argmin_vertex)
    with pytest.raises(InputError, match="reduction must be"):
        spo_plus(c_hat, c, x, z, argmin_vertex, reduction="avg")
    with pytest.raises(InputError, match="oracle must map costs"):
        regret(c_hat, c, z, lambda cost: cost[:, :2])
