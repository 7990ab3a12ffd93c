"""Log-log convex programs (``gp=True``): CVXPY's DGP -> DCP reduction, ``log`` in, ``exp`` out.

References independent of diffopt: closed-form optima differentiated by torch's autograd, CVXPY
solving the GP itself (``problem.solve(gp=True)``), and central differences of those solves.
The GPs here have exponential cones except the monomial one (an LP in log space); interior-point
solvers reach ~1e-10 there, so finite differences use steps matched to that accuracy.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

from diffopt import CvxpyLayer, InputError, ProblemError
from diffopt.solve import select_backend

#: (solver_args, gradcheck step, duals too) per backend: the step keeps FD noise (solution
#: error / step) below gradcheck's tolerances at the accuracy each reaches on exp cones.
#: Clarabel's duals there are ~1e-6 accurate at tol 1e-10 (ECOS's and SCS's ~1e-9), too coarse
#: for finite differences: its duals are compared with CVXPY's instead.
BACKENDS = {
    "auto": ({"tol": 1e-10}, 1e-4, False),  # Clarabel
    "ecos": ({"tol": 1e-12}, 1e-6, True),
    "scs": ({"tol": 1e-10, "max_iters": 100_000}, 1e-3, True),
}
#: Relative error of solutions/VJPs against closed forms, per backend at its BACKENDS settings.
#: Clarabel stops on a duality gap of ~1e-10, which leaves ~√gap in a strongly convex optimum.
CLOSED_FORM_TOL = {"auto": 5e-5, "ecos": 1e-8, "scs": 1e-5, "native": 1e-7}


def box():
    """Maximize the volume h·w·d of a box: wall area ≤ Aw, floor area ≤ Af, α ≤ h/w ≤ β."""
    h, w, d = (cp.Variable(pos=True) for _ in range(3))
    Aw, Af, al, be = (cp.Parameter(pos=True) for _ in range(4))
    cons = [2 * (h * w + h * d) <= Aw, w * d <= Af, al <= h / w, h / w <= be]
    prob = cp.Problem(cp.Maximize(h * w * d), cons)
    return prob, [Aw, Af, al, be], [h, w, d], cons


def box_values(rng, *batch):
    """Values where h/w ≤ β and w·d ≤ Af are active (Aw/(4Af) > β) and α ≤ h/w is not."""
    lo, hi = np.array([95.0, 9.5, 0.5, 1.5]), np.array([105.0, 10.5, 0.5, 1.9])
    v = rng.uniform(lo, hi, (*batch, 4))
    return [torch.tensor(v[..., k]) for k in range(4)]


def box_closed_form(Aw, Af, al, be):
    """With h = βw and d = Af/w, the wall constraint 2β(w² + Af) = Aw gives w."""
    del al
    w = torch.sqrt(Aw / (2 * be) - Af)
    return be * w, w, Af / w


def power():
    """Minimize x^e + e·a/x: the parameter e enters both as an exponent and through log e."""
    x = cp.Variable(pos=True)
    a, e = cp.Parameter(pos=True), cp.Parameter(pos=True)
    return cp.Problem(cp.Minimize(x**e + e * a / x)), [a, e], [x]


def power_closed_form(a, e):
    return (a ** (1 / (e + 1)),)  # e·x^(e−1) = e·a/x²


def monomial():
    """Minimize 1/(x·y) s.t. x ≤ a, y ≤ b·√x: an LP in log space (no exponential cone)."""
    x, y = cp.Variable(pos=True), cp.Variable(pos=True)
    a, b = cp.Parameter(pos=True), cp.Parameter(pos=True)
    return cp.Problem(cp.Minimize(1 / (x * y)), [x <= a, y <= b * x**0.5]), [a, b], [x, y]


def monomial_closed_form(a, b):
    return a, b * torch.sqrt(a)


def vector():
    """Minimize Σ cᵢ/xᵢ s.t. Π xᵢ ≤ 1, with a vector parameter c."""
    x, c = cp.Variable(3, pos=True), cp.Parameter(3, pos=True)
    return cp.Problem(cp.Minimize(cp.sum(cp.multiply(c, 1 / x))), [cp.prod(x) <= 1]), [c], [x]


def vector_closed_form(c):
    return (c / torch.exp(torch.log(c).mean(-1, keepdim=True)),)  # cᵢ/xᵢ equal, Π xᵢ = 1


def _solve_gp(prob, params, values, outputs):
    """CVXPY solving the GP itself (its own DGP path, ECOS to 1e-12): NumPy outputs."""
    for p, v in zip(params, values):
        p.value = float(v)
    prob.solve(gp=True, solver=cp.ECOS, abstol=1e-12, reltol=1e-12, feastol=1e-12)
    assert prob.status == cp.OPTIMAL
    return [np.asarray(o.value, dtype=float).copy() for o in outputs]


@pytest.mark.parametrize("batch", [(), (3,)], ids=["unbatched", "batched"])
def test_solution_and_duals_match_cvxpy_gp_solve(batch):
    prob, params, variables, cons = box()
    duals = [c.dual_variables[0] for c in cons]
    layer = CvxpyLayer(prob, params, variables + duals, gp=True)  # default solver
    values = box_values(np.random.default_rng(0), *batch)
    outs = layer(*values)
    assert all(o.shape == batch for o in outs)
    items = zip(*[v.reshape(-1) for v in values])
    got = torch.stack([o.reshape(-1) for o in outs], 1)
    for k, vals in enumerate(items):
        # duals are those of the log-space constraints, as CVXPY reports them
        ref = np.ravel(_solve_gp(prob, params, vals, variables + duals))
        np.testing.assert_allclose(got[k, :3].numpy(), ref[:3], rtol=1e-6)
        # Clarabel's default tol (1e-9) leaves ~1e-5 in the duals of exp-cone constraints
        np.testing.assert_allclose(got[k, 3:].numpy(), ref[3:], rtol=0, atol=2e-5)


@pytest.mark.parametrize("batch", [(), (2,)], ids=["unbatched", "batched"])
@pytest.mark.parametrize("solver", list(BACKENDS))
def test_gradcheck_variables_and_duals(solver, batch):
    prob, params, variables, cons = box()
    args, eps, duals = BACKENDS[solver]
    outputs = variables + ([cons[0].dual_variables[0], cons[3].dual_variables[0]] if duals else [])
    layer = CvxpyLayer(prob, params, outputs, gp=True, solver=solver, solver_args=args)
    values = box_values(np.random.default_rng(1), *batch)
    values[2] = values[2][0] if batch else values[2]  # one parameter shared by the batch
    values = tuple(v.requires_grad_() for v in values)
    assert torch.autograd.gradcheck(lambda *t: layer(*t), values, eps=eps, atol=1e-5, rtol=1e-4)


CASES = {"box": (box, box_closed_form), "power": (power, power_closed_form),
         "monomial": (monomial, monomial_closed_form), "vector": (vector, vector_closed_form)}


def _values(case, rng, batch):
    if case == "box":
        return box_values(rng, *batch)
    if case == "vector":
        return [torch.tensor(rng.uniform(0.5, 2.0, (*batch, 3)))]
    return [torch.tensor(rng.uniform(0.5, 2.0, batch)) for _ in range(2)]


@pytest.mark.parametrize("solver", ["auto", "ecos", "scs"])
@pytest.mark.parametrize("case", list(CASES))
def test_solution_and_vjp_match_closed_form(case, solver):
    build, closed_form = CASES[case]
    built = build()
    prob, params, variables = built[:3]
    args = BACKENDS[solver][0]
    layer = CvxpyLayer(prob, params, variables, gp=True, solver=solver, solver_args=args)
    rng = np.random.default_rng(2)
    values = [v.requires_grad_() for v in _values(case, rng, (4,))]
    outs = layer(*values)
    refs = closed_form(*values)
    weights = [torch.as_tensor(rng.standard_normal(o.shape)) for o in outs]
    tol = CLOSED_FORM_TOL["native" if case == "monomial" and solver == "auto" else solver]
    for o, r in zip(outs, refs):
        assert torch.allclose(o, r, rtol=tol, atol=0), (o, r)
    grads = torch.autograd.grad(outs, values, weights, allow_unused=True)
    ref_grads = torch.autograd.grad(refs, values, weights, allow_unused=True)
    for g, r in zip(grads, ref_grads):
        r = torch.zeros_like(g) if r is None else r
        assert (g - r).abs().max() <= tol * max(1.0, float(r.abs().max())), (g, r)


def test_monomial_gp_is_an_lp_and_runs_on_the_native_solver():
    prob, params, variables = monomial()
    layer = CvxpyLayer(prob, params, variables, gp=True)
    assert layer.template.dims.exp == 0
    assert select_backend("auto", layer.template.dims, False).name == "native"
    values = tuple(v.requires_grad_() for v in _values("monomial", np.random.default_rng(3), (2,)))
    assert torch.autograd.gradcheck(lambda *t: layer(*t), values, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_directional_derivative_vs_independent_cvxpy_gp_solves():
    """VJP·d against central differences of CVXPY's own GP solves (no diffopt in the reference)."""
    prob, params, variables, cons = box()
    layer = CvxpyLayer(prob, params, variables, gp=True, solver="ecos",
                       solver_args=BACKENDS["ecos"][0])
    rng = np.random.default_rng(4)
    values = [v.requires_grad_() for v in box_values(rng)]
    sol = torch.stack(layer(*values))
    g = rng.standard_normal(3)
    grads = torch.autograd.grad(sol, values, torch.as_tensor(g))
    v0 = np.array([float(v.detach()) for v in values])
    for _ in range(3):
        d = rng.standard_normal(4) * v0  # relative directions: the parameters differ in scale
        eps = 1e-5
        xp = np.ravel(_solve_gp(prob, params, v0 + eps * d, variables))
        xm = np.ravel(_solve_gp(prob, params, v0 - eps * d, variables))
        fd = g @ (xp - xm) / (2 * eps)
        ours = sum(float(gr) * dk for gr, dk in zip(grads, d))
        assert abs(ours - fd) <= 1e-6 * max(1.0, abs(fd)), (ours, fd)


def test_shared_parameter_gets_the_gradient_summed_over_the_batch():
    prob, params, variables = power()
    layer = CvxpyLayer(prob, params, variables, gp=True, solver_args={"tol": 1e-10})
    a = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    e = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    (x,) = layer(a, e)
    (g,) = torch.autograd.grad(x.sum(), e)
    e_ref = e.detach().clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(power_closed_form(a, e_ref)[0].sum(), e_ref)
    assert x.shape == (3,) and torch.allclose(g, g_ref, rtol=CLOSED_FORM_TOL["auto"])


# -- errors ---------------------------------------------------------------------------------------
def test_nonpositive_value_names_the_parameter():
    prob, params, variables, _ = box()
    layer = CvxpyLayer(prob, params, variables, gp=True)
    values = box_values(np.random.default_rng(5), 2)
    values[1] = values[1] * torch.tensor([1.0, -1.0], dtype=torch.float64)
    with pytest.raises(InputError, match=rf"parameter '{params[1].name()}' of the geometric "
                       r"program \(gp=True\) enters through its logarithm and must be positive"):
        layer(*values)
    values[1] = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(InputError, match="received values <= 0 \\(min 0\\)"):
        layer(*values)


def test_gp_true_on_a_dcp_problem_says_to_drop_it():
    x, a = cp.Variable(2), cp.Parameter(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - a)))
    with pytest.raises(ProblemError, match="gp=True expects a log-log convex.*it is DCP: drop "
                       "gp=True"):
        CvxpyLayer(prob, [a], [x], gp=True)


def test_gp_true_on_a_non_dgp_problem_names_the_culprit():
    x = cp.Variable(pos=True)
    a = cp.Parameter()  # not pos=True: not log-log affine
    prob = cp.Problem(cp.Minimize(x + 1 / x), [x >= a])
    with pytest.raises(ProblemError, match=r"`param\d+` breaks the DGP rules.*pos=True"):
        CvxpyLayer(prob, [a], [x], gp=True)


def test_dgp_problem_without_gp_true_says_to_pass_it():
    prob, params, variables, _ = box()
    with pytest.raises(ProblemError, match="not DCP.*log-log convex \\(DGP\\): pass gp=True"):
        CvxpyLayer(prob, params, variables)


def test_parameter_and_variable_lists_are_checked_as_for_dcp_problems():
    prob, params, variables, _ = box()
    with pytest.raises(ProblemError, match=rf"missing \['{params[3].name()}'\]"):
        CvxpyLayer(prob, params[:3], variables, gp=True)
    with pytest.raises(ProblemError, match="neither a variable of the problem"):
        CvxpyLayer(prob, params, [cp.Variable(pos=True)], gp=True)
    layer = CvxpyLayer(prob, params, variables, gp=True)
    with pytest.raises(InputError, match="expected 4 tensors"):
        layer(*box_values(np.random.default_rng(6))[:3])


def test_symmetric_parameter_is_symmetrized_in_log_space():
    """A symmetric S enters as log S, whose symmetric part is used: √(S_ij·S_ji) off the diagonal."""
    x = cp.Variable(2, pos=True)
    S = cp.Parameter((2, 2), pos=True, symmetric=True)
    prob = cp.Problem(cp.Minimize(cp.sum(S @ x) + cp.sum(1 / x)))
    layer = CvxpyLayer(prob, [S], [x], gp=True, solver="ecos", solver_args=BACKENDS["ecos"][0])
    St = torch.tensor([[1.0, 0.8], [0.2, 2.0]], dtype=torch.float64, requires_grad=True)

    def closed_form(S):  # x_j = (Σ_i S_ij)^(-1/2), S symmetrized geometrically
        return (torch.sqrt(S * S.T)).sum(0) ** -0.5

    (x_t,) = layer(St)
    assert torch.allclose(x_t, closed_form(St), rtol=1e-9)
    (g,) = torch.autograd.grad(x_t.sum(), St)
    (g_ref,) = torch.autograd.grad(closed_form(St).sum(), St)
    assert torch.allclose(g, g_ref, rtol=1e-7)
    assert torch.autograd.gradcheck(lambda s: layer(s)[0], (St,), eps=1e-6, atol=1e-5, rtol=1e-4)
