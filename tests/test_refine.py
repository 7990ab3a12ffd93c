"""Solution refinement (diffopt.diff.refine) and the scale-invariant decisions of the derivative."""

from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import diffopt.diff.refine as refine_module
from diffopt import CvxpyLayer, InputError, QPLayer, Status
from problems import _proj_soc, soc_case

F64 = torch.float64


def _soc_projection_batch():
    """Projections of 16 points (s, z) onto {‖x‖ ≤ t}: 4 deep in the polar cone (projection at the
    apex), 4 on its boundary, 2 on the cone. At the default tolerance Clarabel ended 4 of them
    INACCURATE, and the others up to 2e-5 from the closed form."""
    n = 5
    x, t = cp.Variable(n), cp.Variable()
    z, s0 = cp.Parameter(n), cp.Parameter()
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - z) + cp.square(t - s0)), [cp.norm(x) <= t])
    layer = CvxpyLayer(prob, parameters=[z, s0], variables=[x, t])
    rng = np.random.default_rng(0)
    Z = rng.standard_normal((16, n))
    norms = np.linalg.norm(Z, axis=1)
    S = 2 * rng.standard_normal(16)
    S[:4], S[4:8], S[8:10] = -2 * norms[:4], -norms[4:8], norms[8:10]
    return layer, torch.tensor(Z), torch.tensor(S)


# CVXPY's form of ‖x‖ ≤ t has an auxiliary t' with ‖x‖ ≤ t' ≤ t, not unique where the cone
# constraint is inactive (points inside the cone): J is singular there, on main too.
@pytest.mark.filterwarnings("ignore::diffopt.DegenerateWarning")
def test_soc_projections_at_the_apex_are_solved_and_exact():
    layer, Z, S = _soc_projection_batch()
    Z.requires_grad_(), S.requires_grad_()
    x, t = layer(Z, S)
    assert layer.info.status == [Status.OPTIMAL] * 16
    assert all(k >= 1 for k in layer.info.refine_steps)
    want = _proj_soc(torch.cat([S[:, None], Z], 1))
    got = torch.cat([t[:, None], x], 1)
    assert float((got - want).detach().abs().max()) <= 1e-12
    assert float(got[:4].detach().abs().max()) <= 1e-12  # the apex
    # Gradients against autograd through the closed form (unrefined, 139 of 512 random SOC
    # projections had a VJP more than 1e-6 off, the worst by 1.0).
    g = torch.randn(got.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    # Items 4-9 sit on the polar cone's or the cone's boundary, where the projection has a kink.
    gS, gZ = torch.autograd.grad(got, (S, Z), g)
    rS, rZ = torch.autograd.grad(want, (S, Z), g)
    smooth = torch.tensor([i not in range(4, 10) for i in range(16)])
    assert torch.allclose(gS[smooth], rS[smooth], rtol=0, atol=1e-9)
    assert torch.allclose(gZ[smooth], rZ[smooth], rtol=0, atol=1e-9)


@pytest.mark.filterwarnings("ignore::diffopt.DegenerateWarning")  # points inside the cone, above
def test_random_soc_projection_gradients_match_the_closed_form():
    # Unrefined, 139 of 512 such items (8 batches) had a VJP more than 1e-6 off the closed form's.
    case = soc_case(5)
    prob, params, variables = case.build()
    layer = CvxpyLayer(prob, params, variables, solver="clarabel")
    (z,) = case.sample(np.random.default_rng(0), 64)
    z.requires_grad_()
    g = torch.randn(64, 5, dtype=F64, generator=torch.Generator().manual_seed(2))
    (got,) = torch.autograd.grad(layer(z)[0], z, g)
    (want,) = torch.autograd.grad(case.reference(z)[0], z, g)
    assert float((got - want).abs().max()) <= 1e-9


def test_portfolio_socp_batch_has_no_false_failures():
    # max μᵀw − ‖Sw‖₂ over the simplex, a 5-factor risk model: Clarabel ended 1 of these 64
    # items INACCURATE (so the call raised); Clarabel at tol=1e-8 solves them all.
    rng = np.random.default_rng(0)
    m = 30
    S = 0.1 * rng.standard_normal((5, m))
    w, mu = cp.Variable(m), cp.Parameter(m)
    prob = cp.Problem(cp.Maximize(mu @ w - cp.norm(S @ w, 2)), [cp.sum(w) == 1, w >= 0])
    layer = CvxpyLayer(prob, parameters=[mu], variables=[w])
    mus = rng.standard_normal((64, m))
    (got,) = layer(torch.tensor(mus))
    assert layer.info.status == [Status.OPTIMAL] * 64
    ref = []
    for v in mus[:16]:
        mu.value = v
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
        ref.append(w.value)
    assert np.abs(got[:16].numpy() - np.array(ref)).max() <= 1e-6


def _logistic_regression_layer():
    """ℓ₂-regularized logistic regression (exponential cones), as in cvxpylayers' tests."""
    rng = np.random.default_rng(0)
    N, n = 5, 2
    X = rng.standard_normal((N, n))
    Y = np.round(1 / (1 + np.exp(-(X @ rng.standard_normal((n, 1)) + 0.5 * rng.standard_normal(
        (N, 1))))))
    a, Xp, lam = cp.Variable((n, 1)), cp.Parameter((N, n)), cp.Parameter(nonneg=True)
    log_lik = cp.sum(cp.multiply(Y, Xp @ a) - cp.log_sum_exp(
        cp.hstack([np.zeros((N, 1)), Xp @ a]).T, axis=0, keepdims=True).T) / N
    prob = cp.Problem(cp.Minimize(-log_lik + lam * cp.sum_squares(a)))
    return CvxpyLayer(prob, parameters=[Xp, lam], variables=[a]), X


def test_exponential_cone_gradcheck_logistic_regression():
    # Unrefined, Clarabel's answer was ~6e-7 off, and finite differences with eps=1e-6 saw that
    # noise: gradcheck failed at the default settings.
    layer, X = _logistic_regression_layer()
    Xt = torch.tensor(X, requires_grad=True)
    lam = torch.tensor(0.1, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda X, lam: layer(X, lam)[0], (Xt, lam), eps=1e-6,
                                    atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("refine", [True, False])
def test_derivative_of_a_row_scaled_constraint_is_exact(refine):
    # x ≤ 1 written as 1e-4·x ≤ 1e-4, inactive at z₀ = 0.999: the active set read on y − s
    # (y ~ 1e-6 from the interior point, s = 1e-7) made dx₀/dz₀ 0 instead of 1.
    for alpha in (1.0, 1e-4):
        z = torch.tensor([0.999, 2.0], dtype=F64, requires_grad=True)
        P, G = torch.eye(2, dtype=F64), alpha * torch.eye(2, dtype=F64)
        x = QPLayer(solver="clarabel")(P, -z, G, alpha * torch.ones(2, dtype=F64),
                                       solver_args={"refine": refine})
        (g,) = torch.autograd.grad(x[0], z)
        assert torch.allclose(g, torch.tensor([1.0, 0.0], dtype=F64), rtol=0, atol=1e-9), alpha


@pytest.mark.parametrize("scale", [1.0, 5e4, 1e8])
def test_badly_scaled_nonsingular_kkt_gives_the_exact_gradient_without_warning(scale):
    # P = scale·I next to unit constraint rows: the smallest pivot of J over the largest fell below
    # the singularity threshold at 5e4; the least-squares fallback then returned ±1e-5 where the
    # exact gradient is 0 (with a DegenerateWarning).
    P = scale * torch.eye(2, dtype=F64)
    q = torch.tensor([-2.0 * scale, 0.5 * scale], dtype=F64, requires_grad=True)
    h = torch.ones(2, dtype=F64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = QPLayer(solver="clarabel")(P, q, torch.eye(2, dtype=F64), h)
        gq, gh = torch.autograd.grad(x.sum(), (q, h))
    # x₀ = h₀ (active), x₁ = −q₁/scale (inactive)
    assert torch.allclose(gq, torch.tensor([0.0, -1 / scale], dtype=F64), rtol=1e-9,
                          atol=1e-12 / scale)
    assert torch.allclose(gh, torch.tensor([1.0, 0.0], dtype=F64), rtol=0, atol=1e-12)


# -- refinement itself ----------------------------------------------------------------------------
def _families():
    """One small batched problem per cone kind: (name, layer, parameter tensors)."""
    rng = np.random.default_rng(1)
    x = cp.Variable(4)
    q = cp.Parameter(4)
    lp = CvxpyLayer(cp.Problem(cp.Minimize(q @ x), [x >= -1, x <= 1, cp.sum(x) == 0.5]), [q],
                    [x], solver="clarabel")
    Q = rng.standard_normal((4, 4))
    qp = CvxpyLayer(cp.Problem(cp.Minimize(cp.sum_squares(Q @ x) + q @ x), [x >= 0]), [q], [x],
                    solver="clarabel")
    soc = CvxpyLayer(cp.Problem(cp.Minimize(q @ x), [cp.norm(x[1:]) <= x[0], x[0] <= 2]),
                     [q], [x])
    X, C = cp.Variable((3, 3), symmetric=True), cp.Parameter((3, 3), symmetric=True)
    psd = CvxpyLayer(cp.Problem(cp.Minimize(cp.sum_squares(X - C)), [X >> 0, cp.trace(X) == 1]),
                     [C], [X])
    ent = CvxpyLayer(cp.Problem(cp.Maximize(q @ x + cp.sum(cp.entr(x))), [cp.sum(x) == 1]),
                     [q], [x])
    qs = torch.tensor(rng.standard_normal((6, 4)))
    qs_soc = qs.clone()
    qs_soc[:, 0] = qs[:, 1:].norm(dim=1) + 0.5  # bounded below: the cone constraint is active
    M = torch.tensor(rng.standard_normal((6, 3, 3)))
    return [("lp", lp, (qs,)), ("qp", qp, (qs,)), ("soc", soc, (qs_soc,)),
            ("psd", psd, (M + M.mT,)), ("exp", ent, (qs,))]


@pytest.mark.parametrize("family", range(5), ids=["lp", "qp", "soc", "psd", "exp"])
def test_refinement_lowers_residuals_and_never_makes_an_item_worse(family, monkeypatch):
    name, layer, params = _families()[family]
    seen = []
    inner = refine_module.refine

    def spy(program, x, y, s, candidates, *args, **kwargs):
        # Half of the items start from a damaged answer, where a Newton step may not help.
        x = x.clone()
        x[::2] += 1e-2 * torch.randn(x[::2].shape, dtype=x.dtype,
                                     generator=torch.Generator().manual_seed(0))
        out = inner(program, x, y, s, candidates, *args, **kwargs)
        seen.append((x, y, s, candidates, out))
        return out

    monkeypatch.setattr(refine_module, "refine", spy)
    layer(*params, solver_args={"refine": True, "on_failure": "nan"})
    ((x, y, s, cand, out),) = seen
    assert bool(cand.all())
    assert bool((out.after <= out.before).all())
    kept = out.steps > 0
    assert bool((out.after[kept] < out.before[kept]).all())
    for got, given in ((out.x, x), (out.y, y), (out.s, s)):  # no step kept: the input, as is
        assert torch.equal(got[~kept], given[~kept])
    undamaged = torch.arange(x.shape[0]) % 2 == 1
    assert bool((out.after[undamaged] <= 1e-12).all()), (name, out.before, out.after)
    assert bool((out.after[undamaged] < out.before[undamaged]).all()), name


def test_auto_refines_conic_items_and_only_inaccurate_lp_qp_items():
    (_, lp, p_lp), _, (_, soc, p_soc) = _families()[:3]
    lp(*p_lp)
    assert lp.info.refine_steps == [0] * 6  # all OPTIMAL: left alone
    soc(*p_soc)
    assert all(k >= 1 for k in soc.info.refine_steps)
    soc(*p_soc, solver_args={"refine": False})
    assert soc.info.refine_steps == []
    lp(*p_lp, solver_args={"refine": True})
    assert all(k >= 1 for k in lp.info.refine_steps)


def test_native_solver_is_not_refined():
    x = QPLayer()(torch.eye(2, dtype=F64), torch.ones(3, 2, dtype=F64))
    assert x.shape == (3, 2)
    layer = QPLayer()
    layer(torch.eye(2, dtype=F64), torch.ones(3, 2, dtype=F64), solver_args={"refine": True})
    assert layer.info.refine_steps == []


def test_refine_option_is_validated():
    with pytest.raises(InputError, match=r"refine must be True, False or 'auto', received 'yes'"):
        QPLayer(solver="clarabel")(torch.eye(2, dtype=F64), torch.ones(2, dtype=F64),
                                   solver_args={"refine": "yes"})


def test_float32_inputs_are_refined_in_float64():
    # Refined in float32, no step helped: 2 of these 16 items stayed INACCURATE.
    layer, Z, S = _soc_projection_batch()
    x, t = layer(Z.float(), S.float())
    assert x.dtype == torch.float32 and layer.info.status == [Status.OPTIMAL] * 16
    got = torch.cat([t[:, None], x], 1).double()
    want = _proj_soc(torch.cat([S[:, None], Z], 1).float().double())
    # 1e-5: rounded to float32, item 8 lies on the cone's boundary (t = ‖z‖), a point that is
    # not strictly complementary, where Newton steps do not converge quadratically (gap 3e-10)
    assert float((got - want).abs().max()) <= 1e-5
    # ‖x‖ ≤ R active: d Σx / dR = Σ z/‖z‖ (was -2.8e-15 through Clarabel in float32)
    xv, z, R = cp.Variable(3), cp.Parameter(3), cp.Parameter(nonneg=True)
    proj = CvxpyLayer(cp.Problem(cp.Minimize(cp.sum_squares(xv - z)), [cp.norm(xv) <= R]),
                      [z, R], [xv], solver="clarabel")
    zt = torch.tensor([1.0, 2.0, 3.0])
    Rt = torch.tensor(1.0, requires_grad=True)
    (g,) = torch.autograd.grad(proj(zt, Rt)[0].sum(), Rt)
    assert g.dtype == torch.float32
    assert abs(float(g) - float((zt / zt.norm()).sum())) <= 1e-6
