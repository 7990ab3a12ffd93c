"""Symmetric (PSD, NSD) parameters: the layer uses the symmetric part ½(S + Sᵀ) of the tensor.

Any square tensor is accepted for such a parameter; its antisymmetric part has no effect, so
the gradient is symmetric, and ``gradcheck``'s one-entry perturbations are differentiated right.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

from diffopt import CvxpyLayer

TIGHT = {"tol": 1e-12}


def _psd_projection(attr):
    """X = Π_PSD(S), the projection of a symmetric S onto the PSD cone (a nonlinear map)."""
    X = cp.Variable((3, 3), symmetric=True)
    S = cp.Parameter((3, 3), **{attr: True})
    prob = cp.Problem(cp.Minimize(cp.sum_squares(X - S)), [X >> 0])
    return CvxpyLayer(prob, [S], [X], solver_args=TIGHT)


def _psd_projection_closed_form(S):
    lam, Q = torch.linalg.eigh(0.5 * (S + S.transpose(-1, -2)))
    return Q @ torch.diag_embed(lam.clamp(min=0)) @ Q.transpose(-1, -2)


def _sym(rng, *shape):
    A = torch.as_tensor(rng.standard_normal(shape))
    return 0.5 * (A + A.transpose(-1, -2))


@pytest.mark.parametrize("batch", [(), (2,)], ids=["unbatched", "batched"])
def test_gradcheck_on_a_symmetric_parameter(batch):
    layer = _psd_projection("symmetric")
    S = _sym(np.random.default_rng(0), *batch, 3, 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: layer(s)[0], (S,), eps=1e-6, atol=1e-5,
                                    rtol=1e-4)


def test_asymmetric_value_means_its_symmetric_part_and_gradient_is_symmetric():
    rng = np.random.default_rng(1)
    layer = _psd_projection("symmetric")
    S = _sym(rng, 3, 3)
    K = torch.as_tensor(rng.standard_normal((3, 3)))
    K = K - K.T  # antisymmetric: no effect on the solution
    (X,) = layer(S + K)
    (X_sym,) = layer(S)
    assert torch.allclose(X, X_sym, atol=1e-9)
    assert torch.allclose(X, _psd_projection_closed_form(S), atol=1e-8)

    W = torch.as_tensor(rng.standard_normal((3, 3)))  # an upstream gradient, not symmetric
    Sa = (S + K).requires_grad_()
    (g,) = torch.autograd.grad((layer(Sa)[0] * W).sum(), Sa)
    Sr = (S + K).requires_grad_()
    (g_ref,) = torch.autograd.grad((_psd_projection_closed_form(Sr) * W).sum(), Sr)
    assert torch.allclose(g, g.T, atol=1e-12)
    assert torch.allclose(g, g_ref, atol=1e-7)


@pytest.mark.parametrize("attr", ["PSD", "NSD"])
def test_gradcheck_on_psd_and_nsd_parameters(attr):
    """Linear objective ⟨S, Y⟩ over the spectraplex with a soft penalty: Y depends smoothly on S."""
    Y = cp.Variable((2, 2), symmetric=True)
    S = cp.Parameter((2, 2), **{attr: True})
    sign = 1.0 if attr == "PSD" else -1.0
    prob = cp.Problem(cp.Minimize(sign * cp.trace(S @ Y) + cp.sum_squares(Y)),
                      [Y >> 0, cp.trace(Y) == 1])
    layer = CvxpyLayer(prob, [S], [Y], solver_args=TIGHT)
    St = sign * torch.tensor([[2.0, 0.3], [0.3, 1.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: layer(s)[0], (St.requires_grad_(),), eps=1e-6,
                                    atol=1e-5, rtol=1e-4)
