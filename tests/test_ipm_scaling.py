"""The native solver at large and small objective scales (diffopt.solvers.ipm).

Objectives far from unit scale are solved scaled by a power of two and mapped back; these
problems used to end NUMERICAL_ERROR, MAX_ITERATIONS or a false UNBOUNDED certificate at
iteration 0. References: closed forms, and Clarabel at tol 1e-10 (its answers are scale-free).
"""

from __future__ import annotations

import pytest
import torch

from diffopt import QPLayer
from diffopt.cones import ConeDims
from diffopt.solvers.base import ConeProgram, SparsePattern
from diffopt.solvers.ipm import _objective_scale

TOL = 1e-7  # relative, against closed forms and Clarabel
F64 = torch.float64


def _box():
    G = torch.cat([torch.eye(2, dtype=F64), -torch.eye(2, dtype=F64)])
    return G, torch.tensor([1.0, 0.5, 1.0, 0.5], dtype=F64)


def _rel(a, b):
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


@pytest.mark.parametrize("scale", [1e5, 1e7, 1e8, 1e-6])
def test_box_qp_at_objective_scale(scale):
    """A 2-variable box QP whose objective is multiplied by ``scale``: the unit-scale solution,
    duals multiplied by ``scale``, and the closed-form Jacobian ``∂x_F/∂q_F = −P_FF⁻¹`` on the
    free coordinates F (zero on those at a bound)."""
    gen = torch.Generator().manual_seed(4)
    R = torch.randn(4, 2, 2, generator=gen, dtype=F64)
    P = R @ R.transpose(1, 2) + 0.1 * torch.eye(2, dtype=F64)
    q = 2.0 * torch.randn(4, 2, generator=gen, dtype=F64)
    G, h = _box()
    x_ref, _, lam_ref = QPLayer(solver="clarabel", duals=True, solver_args={"tol": 1e-10})(
        P, q, G, h)
    qs = (scale * q).requires_grad_()
    layer = QPLayer(duals=True)
    x, _, lam = layer(scale * P, qs, G, h)
    assert [st.name for st in layer.info.status] == ["OPTIMAL"] * 4
    assert _rel(x.detach(), x_ref) < TOL
    assert _rel(lam.detach(), scale * lam_ref) < 1e-6
    w = torch.tensor([1.0, -2.0], dtype=F64)
    (g,) = torch.autograd.grad((x * w).sum(), qs)
    _, dx = torch.func.jvp(lambda t: QPLayer()(scale * P, t, G, h), (qs.detach(),),
                           (w.expand(4, 2),))
    for i in range(4):
        free = (x_ref[i] - h[:2]).abs().gt(1e-6) & (x_ref[i] + h[2:]).abs().gt(1e-6)
        J = torch.zeros(2, 2, dtype=F64)
        F = free.nonzero().flatten()
        J[F[:, None], F] = -torch.linalg.inv(scale * P[i][F[:, None], F])
        assert _rel(g[i], J.T @ w) < 1e-6
        assert _rel(dx[i], J @ w) < 1e-6


@pytest.mark.parametrize("scale", [1e5, 1e8])
def test_one_variable_qp_with_one_equality(scale):
    """``min scale·(p/2 x² + q x)  s.t.  a x = b``: ``x = b/a``, multiplier ``−scale(p x + q)/a``."""
    p, q, a, b = 0.7, -1.3, 2.0, 3.0
    layer = QPLayer(duals=True)
    x, nu, _ = layer(torch.tensor([[scale * p]], dtype=F64), torch.tensor([scale * q], dtype=F64),
                     None, None, torch.tensor([[a]], dtype=F64), torch.tensor([b], dtype=F64))
    assert layer.info.status[0].name == "OPTIMAL"
    assert abs(float(x) - b / a) < TOL * b / a
    nu_ref = -scale * (p * b / a + q) / a
    assert abs(float(nu) - nu_ref) < TOL * abs(nu_ref)


@pytest.mark.parametrize("scale", [1e6, 1e8, 1e10])
def test_box_lp_with_huge_costs(scale):
    """``min cᵀx, −1 ≤ x ≤ 1`` with costs of order 1e8: ``x = −sign(c)``, not UNBOUNDED."""
    c = scale * torch.tensor([[0.3, -1.2, 0.7], [-2.0, 0.5, 1.1]], dtype=F64)
    G = torch.cat([torch.eye(3, dtype=F64), -torch.eye(3, dtype=F64)])
    layer = QPLayer()
    x = layer(None, c, G, torch.ones(6, dtype=F64))
    assert [st.name for st in layer.info.status] == ["OPTIMAL"] * 2
    assert torch.allclose(x, -torch.sign(c), atol=1e-8)


def test_unit_scale_is_left_alone():
    """Objectives within 2^±6 of 1 are solved as given (no scaling, so no change)."""
    pat = SparsePattern(torch.arange(2).numpy(), torch.arange(2).numpy(), (2, 2))
    c = torch.tensor([[0.02, 40.0], [1.0, -3.0]], dtype=F64)
    prog = ConeProgram(None, None, c, pat, torch.ones(2, 2, dtype=F64),
                       torch.ones(2, 2, dtype=F64), ConeDims(nonneg=2))
    assert _objective_scale(prog) is None
    big = ConeProgram(None, None, c * torch.tensor([[1.0], [1e6]], dtype=F64), pat,
                      torch.ones(2, 2, dtype=F64), torch.ones(2, 2, dtype=F64), ConeDims(nonneg=2))
    sigma = _objective_scale(big)
    assert sigma[0] == 1.0 and sigma[1] == 2.0 ** -22  # powers of two: exact scaling
