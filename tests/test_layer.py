"""CvxpyLayer behaviour: gradients (gradcheck, finite differences), batching, dtypes, failures."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffopt import CvxpyLayer, DegenerateWarning, SolverError, Status
from problems import psd_case, rel_err, soc_case, sparsemax_case

TIGHT = {"tol": 1e-12}


def random_qp(rng, n=6, m=5, p=2):
    """A QP with parametric q, G, h, A, b and a known strictly feasible point."""
    x = cp.Variable(n)
    q, G, h = cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    A, b = cp.Parameter((p, n)), cp.Parameter(p)
    L = rng.standard_normal((n, n))
    Q = L @ L.T + np.eye(n)
    prob = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, Q) + q @ x), [G @ x <= h, A @ x == b])
    x0 = rng.standard_normal(n)
    Gv = rng.standard_normal((m, n))
    Av = rng.standard_normal((p, n))
    vals = [rng.standard_normal(n), Gv, Gv @ x0 + rng.uniform(0.1, 1.0, m), Av, Av @ x0]
    return prob, [q, G, h, A, b], x, vals


def test_gradcheck_qp_all_parameters():
    rng = np.random.default_rng(0)
    prob, params, x, vals = random_qp(rng, n=4, m=3, p=1)
    layer = CvxpyLayer(prob, params, [x], solver_args=TIGHT)
    tensors = tuple(torch.tensor(v, requires_grad=True) for v in vals)
    assert torch.autograd.gradcheck(lambda *t: layer(*t)[0], tensors, eps=1e-6, atol=1e-5,
                                    rtol=1e-4)


# The exponential cone (softmax) is left out: interior-point solvers reach only ~1e-8 accuracy
# there, too coarse for finite differences; its VJP/JVP are checked against the closed-form
# softmax Jacobian in test_conformance.py instead.
@pytest.mark.parametrize("case", [sparsemax_case(3), soc_case(3), psd_case(2)],
                         ids=lambda c: c.name)
def test_gradcheck_cones(case):
    prob, params, variables = case.build()
    layer = CvxpyLayer(prob, params, variables, solver_args=TIGHT)
    values = tuple(v.requires_grad_() for v in case.sample(np.random.default_rng(2), 2))
    if case.name == "psd_projection":  # symmetric input: check along symmetric directions
        fn = lambda Z: layer((Z + Z.transpose(1, 2)) / 2)[0]  # noqa: E731
    else:
        fn = lambda *v: layer(*v)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, values, eps=1e-6, atol=1e-5, rtol=1e-4)


def _cvxpy_solve(prob, params, x, vals, tol=1e-12):
    for p, v in zip(params, vals):
        p.value = v
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=tol, tol_gap_rel=tol, tol_feas=tol)
    assert prob.status == cp.OPTIMAL
    return x.value.copy()


def test_directional_derivative_vs_independent_cvxpy_solves():
    """VJP·d against central differences of CVXPY's own solves (no diffopt in the reference)."""
    rng = np.random.default_rng(3)
    prob, params, x, vals = random_qp(rng)
    layer = CvxpyLayer(prob, params, [x], solver_args=TIGHT)
    tensors = [torch.tensor(v, requires_grad=True) for v in vals]
    (sol,) = layer(*tensors)
    g = rng.standard_normal(sol.shape)
    grads = torch.autograd.grad(sol, tensors, torch.as_tensor(g))
    for _ in range(2):
        d = [rng.standard_normal(np.shape(v)) for v in vals]
        eps = 1e-5
        xp = _cvxpy_solve(prob, params, x, [v + eps * dv for v, dv in zip(vals, d)])
        xm = _cvxpy_solve(prob, params, x, [v - eps * dv for v, dv in zip(vals, d)])
        fd = g @ (xp - xm) / (2 * eps)
        ad = sum(float((gr * torch.as_tensor(dv)).sum()) for gr, dv in zip(grads, d))
        assert abs(fd - ad) <= 1e-5 * max(1.0, abs(fd))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 6), m=st.integers(1, 6),
       p=st.integers(0, 2))
def test_random_feasible_qps_match_cvxpy_and_jvp_is_adjoint_of_vjp(seed, n, m, p):
    rng = np.random.default_rng(seed)
    p = min(p, n - 1)
    prob, params, x, vals = random_qp(rng, n, m, max(p, 1))
    layer = CvxpyLayer(prob, params, [x], solver_args={"tol": 1e-10})
    tensors = [torch.tensor(v) for v in vals]
    (sol,) = layer(*tensors)
    ref = _cvxpy_solve(prob, params, x, vals, tol=1e-10)
    assert np.allclose(sol.numpy(), ref, atol=1e-6 * max(1, np.abs(ref).max()))
    # ⟨g, J d⟩ = ⟨Jᵀ g, d⟩: forward and reverse mode are consistent
    d = [torch.as_tensor(rng.standard_normal(v.shape)) for v in vals]
    g = torch.as_tensor(rng.standard_normal(sol.shape))
    _, (jd,) = torch.func.jvp(lambda *t: layer(*t), tuple(tensors), tuple(d))
    req = [t.clone().requires_grad_() for t in tensors]
    vjp = torch.autograd.grad(layer(*req)[0], req, g)
    lhs = float(g @ jd)
    rhs = sum(float((a * b).sum()) for a, b in zip(vjp, d))
    assert abs(lhs - rhs) <= 1e-7 * max(1.0, abs(lhs))


# cvxpylayers 1.2 passes copy=False to np.array on scipy objects (numpy 2 deprecation).
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_matches_cvxpylayers_where_its_gradient_is_accurate():
    import cvxpylayers.torch as cvxpylayers
    case = sparsemax_case(4)
    prob, params, variables = case.build()
    ours = CvxpyLayer(prob, params, variables)
    theirs = cvxpylayers.CvxpyLayer(prob, parameters=params, variables=variables)
    z = case.sample(np.random.default_rng(4), 3)[0].requires_grad_()
    (a,) = ours(z)
    # cvxpylayers' default SCS tolerance leaves ~1e-4 errors (even small negative entries
    # here); tighten it so the comparison is about the gradients, not SCS's stopping rule.
    (b,) = theirs(z, solver_args={"eps_abs": 1e-10, "eps_rel": 1e-10, "max_iters": 100000})
    assert rel_err(a.detach(), b.detach()) < 1e-6
    w = torch.arange(4.0, dtype=torch.float64)
    ga, = torch.autograd.grad((a * w).sum(), z)
    gb, = torch.autograd.grad((b * w).sum(), z)
    assert rel_err(ga, gb) < 1e-5


def test_shared_parameter_gradient_is_sum_over_batch():
    rng = np.random.default_rng(5)
    prob, params, x, vals = random_qp(rng)
    layer = CvxpyLayer(prob, params, [x])
    q = torch.tensor(np.stack([vals[0], -vals[0], 0.5 * vals[0]]), requires_grad=True)
    shared = [torch.tensor(v, requires_grad=True) for v in vals[1:]]
    (sol,) = layer(q, *shared)
    assert sol.shape == (3, len(vals[0]))
    sol.sum().backward()
    total = [torch.zeros_like(s) for s in shared]
    for i in range(3):
        item = [torch.tensor(v, requires_grad=True) for v in vals[1:]]
        (si,) = layer(q[i].detach(), *item)
        si.sum().backward()
        for t, it in zip(total, item):
            t += it.grad
    for s, t in zip(shared, total):
        assert torch.allclose(s.grad, t, atol=1e-7)


def test_constant_problem_data_is_shared_and_outside_autograd(monkeypatch):
    # Only c is a parameter: P, A and b are computed once, reach the solver as one row expanded
    # over the batch and carry no graph; answers and gradients are those of the same problem
    # with A and b as parameters.
    from diffopt.solvers.ipm import NativeIPM

    rng = np.random.default_rng(11)
    n, p = 6, 2
    Av = rng.standard_normal((p, n))
    bv = Av @ rng.uniform(0.5, 1.0, n)
    x, c = cp.Variable(n), cp.Parameter(n)
    A, b = cp.Parameter((p, n)), cp.Parameter(p)
    objective = cp.Minimize(c @ x + 0.5 * cp.sum_squares(x))
    fixed = CvxpyLayer(cp.Problem(objective, [Av @ x == bv, x >= 0]), [c], [x])
    free = CvxpyLayer(cp.Problem(objective, [A @ x == b, x >= 0]), [c, A, b], [x])
    assert fixed._kind == {"c": "gather", "b": "const", "A": "const", "P": "const"}
    seen = []
    real = NativeIPM.solve
    monkeypatch.setattr(NativeIPM, "solve", lambda self, prog, opts: (
        seen.append(prog), real(self, prog, opts))[1])
    cs = torch.tensor(rng.standard_normal((5, n)), requires_grad=True)
    (sol,) = fixed(cs)
    prog = seen[-1]
    for values in (prog.P_values, prog.A_values):  # b is scaled per item (diffopt.scaling)
        assert values.stride(0) == 0 and values.grad_fn is None
    assert prog.b.grad_fn is None
    w = torch.tensor(rng.standard_normal((5, n)))
    (g,) = torch.autograd.grad((sol * w).sum(), cs)
    c2 = cs.detach().clone().requires_grad_()
    (sol2,) = free(c2, torch.tensor(Av), torch.tensor(bv))
    (g2,) = torch.autograd.grad((sol2 * w).sum(), c2)
    assert torch.allclose(sol, sol2, atol=1e-8) and torch.allclose(g, g2, atol=1e-7)
    assert "A_const" in fixed.state_dict() and "A_const" not in free.state_dict()


def test_float32_in_float32_out_and_unbatched_shapes():
    case = sparsemax_case(4)
    prob, params, variables = case.build()
    layer = CvxpyLayer(prob, params, variables)
    z = torch.tensor([0.3, -0.1, 0.8, 0.2], dtype=torch.float32, requires_grad=True)
    (sol,) = layer(z)
    assert sol.dtype == torch.float32 and sol.shape == (4,)
    sol[0].backward()
    assert z.grad.dtype == torch.float32
    ref = case.reference(z.detach().double()[None])[0][0]
    assert torch.allclose(sol.detach().double(), ref, atol=1e-6)


def test_duals_match_cvxpy():
    x = cp.Variable(3)
    z = cp.Parameter(3)
    cons = [cp.sum(x) == 1, x >= 0.1]
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - z)), cons)
    layer = CvxpyLayer(prob, [z], [x, cons[0].dual_variables[0], cons[1].dual_variables[0]])
    zv = np.array([0.9, 0.4, -0.5])
    xs, nu, lam = layer(torch.tensor(zv))
    z.value = zv
    prob.solve(solver=cp.CLARABEL)
    assert np.allclose(nu.numpy(), cons[0].dual_value, atol=1e-6)
    assert np.allclose(lam.numpy(), cons[1].dual_value, atol=1e-6)
    assert lam.shape == (3,) and nu.shape == ()


def test_psd_variable_and_dual_of_psd_constraint():
    X = cp.Variable((2, 2), symmetric=True)
    C = cp.Parameter((2, 2), symmetric=True)
    cons = [X >> 0, cp.trace(X) == 1]
    prob = cp.Problem(cp.Minimize(cp.trace(C @ X)), cons)
    layer = CvxpyLayer(prob, [C], [X, cons[0].dual_variables[0]])
    Cv = np.array([[2.0, 0.5], [0.5, 1.0]])
    Xs, Zd = layer(torch.tensor(Cv))
    # min tr(CX) over the spectraplex: the eigenvector of the smallest eigenvalue
    lam, Q = np.linalg.eigh(Cv)
    assert np.allclose(Xs.numpy(), np.outer(Q[:, 0], Q[:, 0]), atol=1e-6)
    C.value = Cv
    prob.solve(solver=cp.CLARABEL)
    assert np.allclose(Zd.numpy(), cons[0].dual_value, atol=1e-6)


def test_double_backward_matches_closed_form():
    """Sparsemax: ``x = z − τ`` on the support S, so ``∂x/∂z = I − 11ᵀ/|S|`` there and the
    Hessian of ``Σx²`` is ``2 JᵀJ`` (more in tests/test_higher_order.py)."""
    case = sparsemax_case(3)
    prob, params, variables = case.build()
    layer = CvxpyLayer(prob, params, variables, solver_args=TIGHT)
    z = torch.tensor([0.2, 0.5, 0.1], dtype=torch.float64, requires_grad=True)
    (sol,) = layer(z)
    (g,) = torch.autograd.grad((sol**2).sum(), z, create_graph=True)
    H = torch.stack([torch.autograd.grad(g[k], z, retain_graph=True)[0] for k in range(3)])
    on = (sol.detach() > 0).to(z.dtype)
    J = torch.diag(on) - torch.outer(on, on) / on.sum()
    assert torch.allclose(H, 2 * J.T @ J, atol=1e-8)


def test_sparse_kkt_path_matches_dense():
    rng = np.random.default_rng(6)
    prob, params, x, vals = random_qp(rng, n=8, m=6, p=2)
    layer = CvxpyLayer(prob, params, [x], solver_args=TIGHT)
    grads = {}
    for method in ("dense", "sparse"):
        tensors = [torch.tensor(v, requires_grad=True) for v in vals]
        (sol,) = layer(*tensors, solver_args={"kkt": method})
        grads[method] = torch.autograd.grad(sol @ torch.arange(8.0, dtype=sol.dtype), tensors)
        _, (jd,) = torch.func.jvp(lambda *t: layer(*t, solver_args={"kkt": method}),
                                  tuple(t.detach() for t in tensors),
                                  tuple(torch.ones_like(t) for t in tensors))
        grads[method + "_jvp"] = (jd,)
    for a, b in zip(grads["dense"] + grads["dense_jvp"], grads["sparse"] + grads["sparse_jvp"]):
        assert torch.allclose(a, b, atol=1e-8)


def _duplicate_constraint_layer(solver):
    # Two identical constraints x <= 1: the KKT matrix is singular at any solution with x = 1.
    x = cp.Variable(1)
    z = cp.Parameter(1)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - z)), [x <= 1, 2 * x <= 2])
    return CvxpyLayer(prob, [z], [x], solver=solver)


def test_degenerate_item_gets_least_squares_gradient_and_flag():
    layer = _duplicate_constraint_layer("clarabel")
    zt = torch.tensor([[3.0], [0.0]], dtype=torch.float64, requires_grad=True)
    (sol,) = layer(zt)
    with pytest.warns(DegenerateWarning, match=r"item\(s\) \[0\]"):
        sol.sum().backward()
    assert layer.info.degenerate == [True, False]
    assert torch.isfinite(zt.grad).all()
    assert torch.allclose(zt.grad, torch.tensor([[0.0], [1.0]], dtype=torch.float64), atol=1e-6)


def test_degenerate_item_native_solver_is_finite_and_correct():
    # The native solver differentiates its barrier system, which stays nonsingular.
    layer = _duplicate_constraint_layer("native")
    zt = torch.tensor([[3.0], [0.0]], dtype=torch.float64, requires_grad=True)
    (sol,) = layer(zt)
    sol.sum().backward()
    assert torch.allclose(zt.grad, torch.tensor([[0.0], [1.0]], dtype=torch.float64), atol=1e-6)


# -- failures ----------------------------------------------------------------------------------
def _feasibility_layer():
    x = cp.Variable(2)
    lo = cp.Parameter(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x)), [x >= lo, cp.sum(x) <= 1])
    return CvxpyLayer(prob, [lo], [x])


def test_infeasible_item_raises_naming_it():
    layer = _feasibility_layer()
    lo = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.2, 0.1]], dtype=torch.float64)
    with pytest.raises(SolverError, match=r"items \[1\] INFEASIBLE") as err:
        layer(lo)
    assert err.value.failed == {1: Status.INFEASIBLE}
    assert layer.info.status[1] is Status.INFEASIBLE and layer.info.status[0] is Status.OPTIMAL


def test_infeasible_item_nan_policy_keeps_others_and_zero_gradient():
    layer = _feasibility_layer()
    lo = torch.tensor([[0.3, 0.2], [1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    (sol,) = layer(lo, solver_args={"on_failure": "nan"})
    assert torch.isnan(sol[1]).all() and torch.allclose(sol[0], lo[0].detach(), atol=1e-7)
    sol[0].sum().backward()
    assert torch.allclose(lo.grad[0], torch.ones(2, dtype=torch.float64), atol=1e-6)
    assert (lo.grad[1] == 0).all()


def test_inaccurate_solution_is_not_returned_as_solution():
    case = sparsemax_case(4)
    prob, params, variables = case.build()
    layer = CvxpyLayer(prob, params, variables, solver="scs")
    z = case.sample(np.random.default_rng(7), 2)[0]
    with pytest.raises(SolverError, match="INACCURATE|MAX_ITERATIONS|NUMERICAL"):
        layer(z, solver_args={"max_iters": 3, "tol": 1e-12})


@pytest.mark.filterwarnings("ignore::diffopt.DegenerateWarning")  # expected for clarabel
@pytest.mark.parametrize("solver", ["clarabel", "native"])
def test_degenerate_path_qp_gradient_matches_finite_differences(solver):
    """Grid shortest path + 0.1‖x‖²: more active constraints than variables (LICQ fails), so the
    conic KKT matrix is singular; the least-squares gradient must still be the true derivative."""
    k = 3
    arcs = [(i * k + j, i * k + j + 1) for i in range(k) for j in range(k - 1)]
    arcs += [(i * k + j, (i + 1) * k + j) for i in range(k - 1) for j in range(k)]
    inc = np.zeros((k * k, len(arcs)))
    for e, (u, v) in enumerate(arcs):
        inc[u, e], inc[v, e] = 1.0, -1.0
    sup = np.zeros(k * k)
    sup[0], sup[-1] = 1.0, -1.0
    x, c = cp.Variable(len(arcs)), cp.Parameter(len(arcs))
    prob = cp.Problem(cp.Minimize(c @ x + 0.1 * cp.sum_squares(x)),
                      [inc[:-1] @ x == sup[:-1], x >= 0, x <= 1])
    layer = CvxpyLayer(prob, [c], [x], solver=solver, solver_args={"tol": 1e-10})
    rng = np.random.default_rng(8)
    cv = rng.uniform(0.5, 1.5, len(arcs))
    ct = torch.tensor(cv, requires_grad=True)
    (sol,) = layer(ct)
    g = rng.standard_normal(len(arcs))
    (grad,) = torch.autograd.grad(sol, ct, torch.as_tensor(g))
    for _ in range(2):
        d = rng.standard_normal(len(arcs))
        xp = _cvxpy_solve(prob, [c], x, [cv + 1e-5 * d])
        xm = _cvxpy_solve(prob, [c], x, [cv - 1e-5 * d])
        fd = g @ (xp - xm) / 2e-5
        assert abs(fd - float(grad @ torch.as_tensor(d))) <= 1e-5 * max(1.0, abs(fd))
