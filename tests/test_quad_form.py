"""Parametric quadratic forms: ``cp.quad_form(x, Q)`` with a PSD (or NSD) parameter ``Q``.

``Q``'s values become the parametric ``P`` of the cone program; the references are CVXPY
solving each item with ``Q`` as a constant (no parameter, no diffopt), central differences of
those solves, and closed forms (the unconstrained QP, the trust-region subproblem).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cvxpy as cp
import numpy as np
import pytest
import torch
from scipy.optimize import brentq

from diffopt import CvxpyLayer, InputError, ProblemError
from problems import rel_err

N_VAR = 3
#: Tolerances, in one place: relative errors of solutions and gradients against CVXPY solves
#: at 1e-11 (SCS: first-order, as accurate as its stopping rule).
SOL_TOL = {"auto": 1e-6, "native": 1e-6, "clarabel": 1e-6, "scs": 1e-4}
SOLVER_ARGS = {"auto": {}, "native": {}, "clarabel": {"tol": 1e-12},
               "scs": {"tol": 1e-10, "max_iters": 100000}}
GRAD_TOL = 1e-5
#: CVXPY's Clarabel for the references.
REFERENCE_TOL = {"tol_gap_abs": 1e-11, "tol_gap_rel": 1e-11, "tol_feas": 1e-11}


def _psd(rng, k=N_VAR):
    L = rng.standard_normal((k, k))
    return L @ L.T + 0.5 * np.eye(k)


#: how to declare and sample each named datum: PSD / NSD matrices and a vector.
MATRICES = "PQN"
DECLARE = {
    "P": lambda: cp.Parameter((N_VAR, N_VAR), PSD=True),
    "Q": lambda: cp.Parameter((N_VAR, N_VAR), PSD=True),
    "N": lambda: cp.Parameter((N_VAR, N_VAR), NSD=True),
    "q": lambda: cp.Parameter(N_VAR),
}
SAMPLE = {
    "P": _psd,
    "Q": _psd,
    "N": lambda rng: -_psd(rng),
    "q": lambda rng: 2 * rng.standard_normal(N_VAR),
}


@dataclass
class QFCase:
    """A problem written once for parameters and for constants: ``make(x, data)`` gets a dict
    from the names in ``names`` to cvxpy Parameters or to numpy arrays."""

    name: str
    names: tuple[str, ...]
    make: Callable

    def build(self):
        x = cp.Variable(N_VAR)
        params = {k: DECLARE[k]() for k in self.names}
        return self.make(x, params), [params[k] for k in self.names], x

    def sample(self, rng, B: int | None):
        """float64 values per name; with a batch size ``B``, each with a leading batch dim."""
        draw = (lambda k: SAMPLE[k](rng)) if B is None else (
            lambda k: np.stack([SAMPLE[k](rng) for _ in range(B)]))
        return [draw(k) for k in self.names]

    def reference(self, values):
        """x* of one item by CVXPY, with the data as constants."""
        x = cp.Variable(N_VAR)
        prob = self.make(x, dict(zip(self.names, values)))
        prob.solve(solver=cp.CLARABEL, **REFERENCE_TOL)
        assert prob.status == cp.OPTIMAL
        return x.value.copy()


def _box(x):
    return [x >= -1, x <= 1]


CASES = [
    QFCase("psd_box", ("Q", "q"),
           lambda x, d: cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, d["Q"]) + d["q"] @ x),
                                   _box(x))),
    QFCase("nsd_maximize", ("N", "q"),
           lambda x, d: cp.Problem(cp.Maximize(0.5 * cp.quad_form(x, d["N"]) + d["q"] @ x),
                                   _box(x))),
    QFCase("sum_P_plus_Q", ("P", "Q", "q"),
           lambda x, d: cp.Problem(cp.Minimize(cp.quad_form(x, d["P"] + d["Q"]) + d["q"] @ x),
                                   [cp.sum(x) == 1, x >= -1])),
    QFCase("negated_nsd", ("N", "q"),
           lambda x, d: cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, -d["N"]) + d["q"] @ x),
                                   _box(x))),
    QFCase("several_forms", ("P", "Q", "q"),
           lambda x, d: cp.Problem(
               cp.Minimize(0.5 * cp.quad_form(x, d["P"]) + 2 * cp.quad_form(x - 1, d["Q"])
                           + cp.sum_squares(x) + d["q"] @ x),
               [x[0] + 2 * x[1] == 0.5, x <= 1])),
]


@pytest.mark.parametrize("solver", ["auto", "native", "clarabel", "scs"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_cvxpy_batched_and_unbatched(case, solver):
    prob, params, x = case.build()
    layer = CvxpyLayer(prob, params, [x], solver=solver, solver_args=SOLVER_ARGS[solver])
    rng = np.random.default_rng(17)
    values = case.sample(rng, None)
    (sol,) = layer(*map(torch.tensor, values))
    assert sol.shape == (N_VAR,)
    assert rel_err(sol, torch.tensor(case.reference(values))) < SOL_TOL[solver]
    # a batch of 3, and the same batch with the vector q shared by every item
    batch = case.sample(rng, 3)
    shared = [v[0] if name == "q" else v for name, v in zip(case.names, batch)]
    for vals in (batch, shared):
        (sol,) = layer(*map(torch.tensor, vals))
        assert sol.shape == (3, N_VAR)
        for i in range(3):
            item = [v[i] if np.ndim(v) == (3 if k in MATRICES else 2) else v
                    for k, v in zip(case.names, vals)]
            assert rel_err(sol[i], torch.tensor(case.reference(item))) < SOL_TOL[solver]


def _symmetrized(case, layer):
    """The layer as a function of raw tensors whose matrices are symmetrized first, so that
    gradcheck's one-entry perturbations stay within the PSD parameters' symmetric matrices."""
    def fn(*tensors):
        args = [0.5 * (t + t.mT) if k in MATRICES else t for k, t in zip(case.names, tensors)]
        return layer(*args)[0]
    return fn


@pytest.mark.parametrize("solver", ["auto", "clarabel"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("B", [None, 2], ids=["unbatched", "batched"])
def test_gradcheck_all_parameters(case, solver, B):
    prob, params, x = case.build()
    layer = CvxpyLayer(prob, params, [x], solver=solver, solver_args=SOLVER_ARGS[solver])
    values = case.sample(np.random.default_rng(3), B)
    tensors = tuple(torch.tensor(v, requires_grad=True) for v in values)
    assert torch.autograd.gradcheck(_symmetrized(case, layer), tensors, eps=1e-6, atol=1e-5,
                                    rtol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_vjp_vs_central_differences_of_cvxpy_solves(case):
    """VJP·d against central differences of independent CVXPY solves (data as constants), along
    symmetric directions for the matrices."""
    prob, params, x = case.build()
    layer = CvxpyLayer(prob, params, [x])
    rng = np.random.default_rng(5)
    values = case.sample(rng, None)
    tensors = [torch.tensor(v, requires_grad=True) for v in values]
    (sol,) = layer(*tensors)
    g = rng.standard_normal(N_VAR)
    grads = torch.autograd.grad(sol, tensors, torch.tensor(g))
    for k, gr in zip(case.names, grads):
        if k in MATRICES:  # the symmetric part is used: the gradient is symmetric
            assert torch.allclose(gr, gr.T, atol=1e-12)
    d = [rng.standard_normal(np.shape(v)) for v in values]
    d = [0.5 * (v + v.T) if k in MATRICES else v for k, v in zip(case.names, d)]
    eps = 1e-5
    xp = case.reference([v + eps * dv for v, dv in zip(values, d)])
    xm = case.reference([v - eps * dv for v, dv in zip(values, d)])
    fd = g @ (xp - xm) / (2 * eps)
    ad = sum(float((gr * torch.tensor(dv)).sum()) for gr, dv in zip(grads, d))
    assert abs(ad - fd) < GRAD_TOL * max(1.0, abs(fd))


@pytest.mark.parametrize("solver", ["native", "clarabel", "scs"])
def test_unconstrained_closed_form(solver):
    """min ½xᵀQx + qᵀx: x* = −Q⁻¹q, and its gradient w.r.t. (Q, q) by autograd through
    torch.linalg.solve on the symmetric part of Q."""
    Q, q, x = cp.Parameter((4, 4), PSD=True), cp.Parameter(4), cp.Variable(4)
    prob = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, Q) + q @ x))
    layer = CvxpyLayer(prob, [Q, q], [x], solver=solver, solver_args=SOLVER_ARGS[solver])
    rng = np.random.default_rng(11)
    Qv = torch.tensor(np.stack([_psd(rng, 4) for _ in range(3)]), requires_grad=True)
    qv = torch.tensor(rng.standard_normal((3, 4)), requires_grad=True)
    g = torch.tensor(rng.standard_normal((3, 4)))
    (sol,) = layer(Qv, qv)
    ref = torch.linalg.solve(0.5 * (Qv + Qv.mT), -qv.unsqueeze(-1)).squeeze(-1)
    tol = SOL_TOL[solver]
    assert rel_err(sol.detach(), ref.detach()) < tol
    got = torch.autograd.grad(sol, (Qv, qv), g)
    want = torch.autograd.grad(ref, (Qv, qv), g)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 10 * tol


def test_jacrev_and_jacfwd_closed_form():
    """Reverse and forward mode (the JVP's dP·x term) in Q against the interior solution's
    Jacobian ∂x/∂Q_jk = −sym(Q⁻¹e_j x_k)."""
    Q, q, x = cp.Parameter((2, 2), PSD=True), cp.Parameter(2), cp.Variable(2)
    prob = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, Q) + q @ x), [x >= -1, x <= 1])
    layer = CvxpyLayer(prob, [Q, q], [x])
    Qv = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    qv = torch.tensor([1.0, -0.5], dtype=torch.float64)
    Qi = torch.linalg.inv(Qv)
    xs = -Qi @ qv
    ref = torch.stack([-0.5 * (torch.outer(Qi[i], xs) + torch.outer(xs, Qi[i])) for i in range(2)])
    for jac in (torch.func.jacrev, torch.func.jacfwd):
        J = jac(lambda Qt: layer(Qt, qv)[0])(Qv)
        assert torch.allclose(J, ref, atol=1e-8)


def _trust_region(Q, q, r):
    """argmin ½xᵀQx + qᵀx s.t. ‖x‖ ≤ r for Q ≻ 0 when the ball constraint is active, in closed
    form: x = −(Q + μI)⁻¹q with μ > 0 the root of ‖x(μ)‖ = r (the secular equation)."""
    lam, V = np.linalg.eigh(Q)
    qv = V.T @ q
    gap = lambda mu: np.linalg.norm(qv / (lam + mu)) - r  # noqa: E731
    assert gap(0.0) > 0, "the unconstrained minimizer lies inside the ball"
    return -V @ (qv / (lam + brentq(gap, 0.0, np.abs(qv).sum() / r)))


@pytest.mark.parametrize("solver", ["auto", "clarabel", "scs"])
def test_second_order_cone_constraint_closed_form(solver):
    """A parametric quadratic objective over a ball (an SOC): solution and VJP against the
    closed form and its central differences."""
    Q, q, x = cp.Parameter((3, 3), PSD=True), cp.Parameter(3), cp.Variable(3)
    prob = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, Q) + q @ x), [cp.norm(x, 2) <= 0.8])
    # Clarabel reaches about 1e-9 on this SOC (at 1e-12 it reports "inaccurate"): its default
    args = {"scs": SOLVER_ARGS["scs"]}.get(solver, {})
    layer = CvxpyLayer(prob, [Q, q], [x], solver=solver, solver_args=args)
    rng = np.random.default_rng(8)
    Qv = np.stack([_psd(rng) for _ in range(3)])
    # The ball's constraint is active: inside it, CVXPY's epigraph variable t ∈ [‖x‖, r] of
    # the norm would not be unique (a degenerate KKT system).
    qv = 3 * rng.standard_normal((3, 3))
    Qt, qt = torch.tensor(Qv, requires_grad=True), torch.tensor(qv, requires_grad=True)
    (sol,) = layer(Qt, qt)
    ref = np.stack([_trust_region(a, b, 0.8) for a, b in zip(Qv, qv)])
    assert rel_err(sol.detach(), torch.tensor(ref)) < 1e-5
    g = rng.standard_normal((3, 3))
    gQ, gq = torch.autograd.grad(sol, (Qt, qt), torch.tensor(g))
    dQ = rng.standard_normal((3, 3, 3))
    dQ, dq, eps = dQ + dQ.transpose(0, 2, 1), rng.standard_normal((3, 3)), 1e-6
    for i in range(3):
        xp = _trust_region(Qv[i] + eps * dQ[i], qv[i] + eps * dq[i], 0.8)
        xm = _trust_region(Qv[i] - eps * dQ[i], qv[i] - eps * dq[i], 0.8)
        fd = g[i] @ (xp - xm) / (2 * eps)
        ad = float((gQ[i] * torch.tensor(dQ[i])).sum() + gq[i] @ torch.tensor(dq[i]))
        assert abs(ad - fd) < 1e-4 * max(1.0, abs(fd))


def test_constraint_duals_match_cvxpy():
    case = CASES[0]
    x = cp.Variable(N_VAR)
    Q, q = DECLARE["Q"](), DECLARE["q"]()
    lower, upper = x >= -1, x <= 1
    prob = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, Q) + q @ x), [lower, upper])
    layer = CvxpyLayer(prob, [Q, q], [x, lower.dual_variables[0], upper.dual_variables[0]])
    values = case.sample(np.random.default_rng(2), None)
    out = layer(*map(torch.tensor, values))
    Q.value, q.value = values
    prob.solve(solver=cp.CLARABEL, **REFERENCE_TOL)
    for got, want in zip(out, (x.value, lower.dual_value, upper.dual_value)):
        assert torch.allclose(got, torch.tensor(want), atol=1e-6)


# -- errors -----------------------------------------------------------------------------------
def _psd_layer():
    Q, q, x = cp.Parameter((2, 2), PSD=True), cp.Parameter(2), cp.Variable(2)
    prob = cp.Problem(cp.Minimize(cp.quad_form(x, Q) + q @ x), [x >= -1])
    return CvxpyLayer(prob, [Q, q], [x]), Q


def test_non_psd_value_is_refused():
    layer, Q = _psd_layer()
    with pytest.raises(InputError, match=rf"parameter '{Q.name()}' is declared PSD but received "
                                         r"a matrix with eigenvalue -1 < 0 \(of its symmetric "
                                         r"part\)"):
        layer(torch.tensor([[1.0, 0.0], [0.0, -1.0]]), torch.ones(2))
    bad = torch.stack([torch.eye(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]]), torch.eye(2)])
    with pytest.raises(InputError, match=r"eigenvalue -1 < 0 \(of its symmetric part\) "
                                         r"\(items \[1\]\)"):
        layer(bad.double(), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("factor,accepted", [(0.9, True), (1.1, False)])
def test_psd_tolerance_is_relative_roundoff(factor, accepted):
    """The rule: λ_min(S) ≥ −√eps·‖S‖_F, on the symmetric part S (‖S‖_F = 1 here)."""
    layer, _ = _psd_layer()
    lam = -factor * torch.finfo(torch.float64).eps ** 0.5
    Qv = torch.tensor([[1.0, 0.0], [0.0, lam]], dtype=torch.float64)
    q = torch.tensor([0.0, 1.0], dtype=torch.float64)
    if accepted:
        (sol,) = layer(Qv, q)
        assert torch.allclose(sol, torch.tensor([0.0, -1.0], dtype=torch.float64), atol=1e-6)
    else:
        with pytest.raises(InputError, match=r"eigenvalue -1.6\de-08 < 0"):
            layer(Qv, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_singular_psd_values_are_accepted(dtype):
    """A rank-one L Lᵀ has roundoff eigenvalues of either sign."""
    layer, _ = _psd_layer()
    scale = torch.linspace(1, 3, 8, dtype=dtype)[:, None, None]
    L = torch.tensor([[0.3], [1.7]], dtype=dtype) * scale
    (sol,) = layer(L @ L.mT, torch.tensor([1.0, -1.0], dtype=dtype))
    assert sol.shape == (8, 2) and layer.info.ok == [True] * 8


def test_non_nsd_value_is_refused():
    N, q, x = cp.Parameter((2, 2), NSD=True), cp.Parameter(2), cp.Variable(2)
    prob = cp.Problem(cp.Maximize(cp.quad_form(x, N) + q @ x), [x <= 1])
    layer = CvxpyLayer(prob, [N, q], [x])
    with pytest.raises(InputError, match=r"declared NSD but received a matrix with eigenvalue "
                                         r"1 > 0 \(of its symmetric part\).*-\(L @ L.mT\)"):
        layer(torch.eye(2), torch.ones(2))


def test_parametric_quad_form_in_constraint_is_refused():
    P, x = cp.Parameter((2, 2), PSD=True), cp.Variable(2)
    prob = cp.Problem(cp.Minimize(cp.sum(x)), [cp.quad_form(x, P) <= 1])
    with pytest.raises(ProblemError, match=r"contains quad_form\(x, Q\) with a parameter Q: a "
                                           r"parametric Q is only supported in the objective.*"
                                           r"cp.sum_squares\(L @ x\)"):
        CvxpyLayer(prob, [P], [x])


def test_constraint_check_holds_inside_a_quad_form_dpp_scope():
    """Built inside CVXPY's quad-form scope (as some cvxpylayers code does), a constraint's
    parametric quad form is still refused, and an objective's still accepted."""
    from cvxpy.utilities.scopes import quad_form_dpp_scope

    P, q, x = cp.Parameter((2, 2), PSD=True), cp.Parameter(2), cp.Variable(2)
    with quad_form_dpp_scope():
        with pytest.raises(ProblemError, match="only supported in the objective"):
            CvxpyLayer(cp.Problem(cp.Minimize(q @ x), [cp.quad_form(x, P) <= 1]), [P, q], [x])
        layer = CvxpyLayer(cp.Problem(cp.Minimize(cp.quad_form(x, P) + q @ x)), [P, q], [x])
    (sol,) = layer(2 * torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(sol, torch.full((2,), -0.25, dtype=torch.float64), atol=1e-8)


def test_parametric_quad_form_under_nonaffine_atom_is_refused():
    """CVXPY would canonicalize it with Q's current value as a constant (silently wrong)."""
    P, q, x = cp.Parameter((2, 2), PSD=True), cp.Parameter(2), cp.Variable(2)
    prob = cp.Problem(cp.Minimize(cp.maximum(cp.quad_form(x, P), 1) + q @ x), [x >= -1])
    with pytest.raises(ProblemError, match=r"sits under a non-affine atom of the objective.*"
                                           r"cp.sum_squares\(L @ x\)"):
        CvxpyLayer(prob, [P, q], [x])


def test_symmetric_only_parameter_is_refused():
    S, x = cp.Parameter((2, 2), symmetric=True), cp.Variable(2)
    prob = cp.Problem(cp.Minimize(cp.quad_form(x, S)), [x >= -1])
    with pytest.raises(ProblemError, match=r"convex only for a Q declared positive "
                                           r"semidefinite \(cp.Parameter\(..., PSD=True\)"):
        CvxpyLayer(prob, [S], [x])


@pytest.mark.parametrize("which", ["product", "param_in_x"])
def test_non_dpp_quad_forms_are_refused(which):
    P, p, x = cp.Parameter((2, 2), PSD=True), cp.Parameter(2), cp.Variable(2)
    if which == "product":
        obj, params, culprit = cp.quad_form(x, P @ P, assume_PSD=True), [P], "param.* @ param"
    else:
        obj, params, culprit = cp.quad_form(x + p, P), [p, P], "QuadForm"
    prob = cp.Problem(cp.Minimize(obj), [cp.sum(x) == 1])
    with pytest.raises(ProblemError, match=rf"not DPP: `{culprit}"):
        CvxpyLayer(prob, params, [x])
