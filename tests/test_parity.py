"""Drop-in parity: cvxpylayers' solver_args and exceptions, qpth's empty constraint blocks."""

from __future__ import annotations

import subprocess
import sys

import cvxpy as cp
import numpy as np
import pytest
import torch

from diffopt import CvxpyLayer, DiffoptError, InputError, QPLayer, SolverError, Status
from diffopt.cones import ConeDims
from diffopt.solve import make_call
from diffopt.solvers.base import SparsePattern
from diffopt.solvers.options import translate
from problems import rel_err

diffcp = pytest.importorskip("diffcp")  # cvxpylayers' solver layer, a test dependency


def _pattern(rows: int, cols: int) -> SparsePattern:
    r, c = np.divmod(np.arange(rows * cols), cols)
    return SparsePattern(r, c, (rows, cols))


def _call(solver_args, solver="auto", dims=ConeDims(nonneg=2), quadratic=True, defaults=None):
    """make_call for a 2-variable program with ``dims`` (an LP or QP by default)."""
    return make_call(solver_args, solver, _pattern(2, 2) if quadratic else None,
                     _pattern(dims.size, 2), dims, defaults=defaults)


def least_squares(m=8, n=4, box=True):
    """min ‖Ax − b‖² + ‖x‖² (s.t. x ≥ −0.1): cvxpylayers' least-squares test problem."""
    A, b, x = cp.Parameter((m, n)), cp.Parameter(m), cp.Variable(n)
    cons = [x >= -0.1] if box else []
    prob = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b) + cp.sum_squares(x)), cons)
    rng = np.random.default_rng(0)
    vals = [torch.tensor(rng.standard_normal((m, n))), torch.tensor(rng.standard_normal(m))]
    return prob, [A, b], x, vals


# ---------------------------------------------------------------------------------------------
# cvxpylayers' solver_args
# ---------------------------------------------------------------------------------------------


def test_translate_renames_cvxpylayers_keys_and_keeps_the_rest():
    assert translate({"eps": 1e-8, "solve_method": "ECOS", "n_jobs_forward": 2,
                      "n_jobs_backward": 3, "acceleration_lookback": 0}) == {
        "tol": 1e-8, "solver": "ECOS", "n_jobs": 2, "acceleration_lookback": 0}


@pytest.mark.parametrize("solver", ["native", "clarabel", "scs", "ecos"])
def test_eps_is_tol_on_every_backend(solver):
    prob, params, x, vals = least_squares()
    if solver == "ecos":  # no quadratic objective: the same least squares as an SOCP
        A, b = params
        prob = cp.Problem(cp.Minimize(cp.norm(A @ x - b) + cp.norm(x)), prob.constraints)
    layer = CvxpyLayer(prob, params, [x], solver=solver)
    (x_eps,) = layer(*vals, solver_args={"eps": 1e-2})
    iters_eps = layer.info.iterations
    (x_tol,) = layer(*vals, solver_args={"tol": 1e-2})
    assert torch.equal(x_eps, x_tol) and layer.info.iterations == iters_eps
    layer(*vals, solver_args={"eps": 1e-11 if solver != "scs" else 1e-9})
    assert layer.info.iterations[0] > iters_eps[0]  # a tighter eps takes more iterations


@pytest.mark.parametrize("method, name", [("SCS", "scs"), ("ECOS", "ecos"),
                                          ("Clarabel", "clarabel"), ("CLARABEL", "clarabel")])
def test_solve_method_selects_the_backend(method, name):
    assert _call({"solve_method": method}, quadratic=False).backend.name == name
    assert _call({}, solver=method, quadratic=False).backend.name == name


@pytest.mark.parametrize("alias, name", [("DIFFCP", "native"), ("MOREAU", "native"),
                                         ("CUCLARABEL", "clarabel")])
def test_cvxpylayers_solver_names(alias, name):
    assert _call({}, solver=alias).backend.name == name  # "auto" picks native for a QP
    assert _call({}, solver=alias, dims=ConeDims(soc=[2])).backend.name == "clarabel"


@pytest.mark.parametrize("solver", ["native", "clarabel", "scs", "ecos"])
def test_max_iters_is_each_backends_iteration_limit(solver):
    prob, params, x, vals = least_squares()
    if solver == "ecos":
        A, b = params
        prob = cp.Problem(cp.Minimize(cp.norm(A @ x - b) + cp.norm(x)), prob.constraints)
    layer = CvxpyLayer(prob, params, [x], solver=solver)
    # refine=False: Newton steps would finish this unconstrained QP from any iterate
    (sol,) = layer(*vals, solver_args={"max_iters": 2, "on_failure": "nan", "refine": False})
    # SCS labels its iterate at max_iters "solved (inaccurate)"; verified, it is MAX_ITERATIONS
    assert layer.info.status == [Status.MAX_ITERATIONS] and layer.info.iterations == [2]
    assert torch.isnan(sol).all()
    with pytest.raises(SolverError, match="raise max_iters|allow_inaccurate"):
        layer(*vals, solver_args={"max_iters": 2, "refine": False})


@pytest.mark.parametrize("solver", ["native", "clarabel", "scs", "ecos"])
def test_verbose_is_the_backends_verbosity(solver, capfd):
    prob, params, x, vals = least_squares()
    if solver == "ecos":
        A, b = params
        prob = cp.Problem(cp.Minimize(cp.norm(A @ x - b) + cp.norm(x)), prob.constraints)
    layer = CvxpyLayer(prob, params, [x], solver=solver)
    layer(*vals, solver_args={"verbose": False})
    assert capfd.readouterr().out == ""
    layer(*vals, solver_args={"verbose": True})
    assert len(capfd.readouterr().out.splitlines()) >= 3


def test_an_scs_setting_under_auto_selects_scs_and_reaches_it():
    call = _call({"eps": 1e-8, "max_iters": 10000, "acceleration_lookback": 0})
    assert call.backend.name == "scs"
    assert call.options == {"tol": 1e-8, "max_iters": 10000, "acceleration_lookback": 0}
    # reaches SCS: a setting SCS refuses comes back from SCS itself
    prob, params, x, vals = least_squares()
    layer = CvxpyLayer(prob, params, [x])
    with pytest.raises(ValueError, match="SCS rejected"):
        layer(*vals, solver_args={"acceleration_lookback": 0, "alpha": -1.0})


def test_backend_settings_under_auto_pick_the_backend_that_honours_them():
    assert _call({"feastol": 1e-9}, quadratic=False).backend.name == "ecos"
    assert _call({"tol_gap_abs": 1e-9}).backend.name == "clarabel"
    assert _call({"tol_gap_abs": 1e-9, "max_iter": 50}).options == {"tol_gap_abs": 1e-9,
                                                                    "max_iter": 50}
    # native's own options keep native; the common ones keep the default choice
    assert _call({"mu": 0.0, "kkt_refine": 2}).backend.name == "native"
    assert _call({"tol": 1e-6, "max_iters": 5, "verbose": False}).backend.name == "native"


def test_a_named_backend_that_cannot_honour_a_setting_names_the_one_that_can():
    with pytest.raises(InputError, match=r"'acceleration_lookback' is a setting of \['scs'\], "
                                         r"and solver 'native' cannot honour it"):
        _call({"acceleration_lookback": 0}, solver="native")
    with pytest.raises(InputError, match=r"'eps_abs' is a setting of \['scs'\], and solver "
                                         r"'clarabel' cannot honour it.*solve_method"):
        _call({"solve_method": "Clarabel", "eps_abs": 1e-6})
    with pytest.raises(InputError, match=r"'feastol' is a setting of \['ecos'\], and no solver "
                                         r"that can solve this problem honours all"):
        _call({"feastol": 1e-9})  # ECOS takes no quadratic objective


def test_conflicting_and_unsupported_cvxpylayers_keys():
    with pytest.raises(InputError, match=r"'eps'=0.001 and 'tol'=1e-06 set the same option "
                                         r"\(cvxpylayers' 'eps' is diffopt's 'tol'\)"):
        _call({"eps": 1e-3, "tol": 1e-6})
    with pytest.raises(InputError, match=r"'solve_method'='SCS' and 'solver'='ecos'"):
        _call({"solve_method": "SCS", "solver": "ecos"})
    assert _call({"eps": 1e-6, "tol": 1e-6}).options == {"tol": 1e-6}
    with pytest.raises(InputError, match=r"'mode' \(diffcp's\) has no counterpart.*kkt='dense'"):
        _call({"mode": "lsqr"})
    # a call's eps overrides the layer's tol (and the reverse): each dict is translated first
    assert _call({"eps": 1e-4}, defaults={"tol": 1e-9}).options == {"tol": 1e-4}
    assert _call({"tol": 1e-4}, defaults={"eps": 1e-9}).options == {"tol": 1e-4}
    assert _call({"n_jobs_forward": 2, "n_jobs_backward": 2}).options == {"n_jobs": 2}


def test_unknown_scs_setting_is_a_clear_error():
    prob, params, x, vals = least_squares()
    layer = CvxpyLayer(prob, params, [x], solver="scs")
    with pytest.raises(ValueError, match=r"unknown SCS option\(s\) \['no_such'\]"):
        layer(*vals, solver_args={"no_such": 1})


@pytest.mark.parametrize("batched", [False, True])
def test_cvxpylayers_recommended_scs_args_give_exact_gradients(batched):
    """README of cvxpylayers: ``{"eps": 1e-8, "max_iters": 10000, "acceleration_lookback": 0}``
    when SCS does not converge. They select SCS; gradcheck in float64 against the solution map."""
    prob, params, x, vals = least_squares(m=5, n=3)
    layer = CvxpyLayer(prob, params, [x])
    args = {"eps": 1e-11, "max_iters": 100000, "acceleration_lookback": 0}
    if batched:
        vals = [torch.stack([v, v + 0.1]) for v in vals]
    inputs = tuple(v.clone().requires_grad_() for v in vals)
    assert torch.autograd.gradcheck(lambda *t: layer(*t, solver_args=args)[0], inputs,
                                    eps=1e-5, atol=1e-5, rtol=1e-3)
    (ref,) = CvxpyLayer(prob, params, [x], solver="clarabel")(*vals, solver_args={"tol": 1e-12})
    assert rel_err(layer(*vals, solver_args=args)[0], ref) < 1e-7


# ---------------------------------------------------------------------------------------------
# Exceptions that code written for cvxpylayers catches
# ---------------------------------------------------------------------------------------------


def _infeasible_layer():
    x, p = cp.Variable(1), cp.Parameter(1)
    return CvxpyLayer(cp.Problem(cp.Minimize(p @ x), [x >= 1, x <= p]), [p], [x])


@pytest.mark.parametrize("catch", [diffcp.SolverError, cp.error.SolverError, SolverError,
                                   DiffoptError, RuntimeError],
                         ids=["diffcp", "cvxpy", "diffopt", "DiffoptError", "RuntimeError"])
def test_solver_error_is_caught_by_cvxpylayers_except_clauses(catch):
    layer = _infeasible_layer()
    with pytest.raises(catch) as err:
        layer(torch.tensor([[2.0], [0.0]], dtype=torch.float64))  # item 1: x >= 1, x <= 0
    assert isinstance(err.value, SolverError)
    assert err.value.failed == {1: Status.INFEASIBLE}
    assert layer.info.status == [Status.OPTIMAL, Status.INFEASIBLE]


def test_qplayer_solver_error_is_a_diffcp_solver_error():
    P, q = torch.eye(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    G = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    with pytest.raises(diffcp.SolverError, match="INFEASIBLE"):
        QPLayer()(P, q, G, torch.tensor([-1.0, 0.0], dtype=torch.float64))


def test_solver_error_without_diffcp_is_still_a_cvxpy_solver_error():
    code = ("import sys; sys.modules['diffcp'] = None\n"  # diffcp cannot be imported
            "import cvxpy, diffopt\n"
            "err = diffopt.SolverError('m', {0: diffopt.Status.INFEASIBLE})\n"
            "assert isinstance(err, cvxpy.error.SolverError) and isinstance(err, RuntimeError)\n"
            "assert err.failed == {0: diffopt.Status.INFEASIBLE}\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ---------------------------------------------------------------------------------------------
# qpth's conventions in QPLayer
# ---------------------------------------------------------------------------------------------


def _qp(rng, B=3, n=4, m=3, p=1):
    L = rng.standard_normal((n, n))
    P = torch.as_tensor(L @ L.T + np.eye(n))
    q = torch.as_tensor(rng.standard_normal((B, n)))
    G = torch.as_tensor(rng.standard_normal((m, n)))
    x0 = rng.standard_normal(n)
    h = torch.as_tensor(G.numpy() @ x0 + rng.uniform(0.1, 1, m))
    A = torch.as_tensor(rng.standard_normal((p, n)))
    return P, q, G, h, A, torch.as_tensor(A.numpy() @ x0)


EMPTIES = {
    "torch.Tensor()": lambda n, B: (torch.Tensor(), torch.Tensor()),
    "(0, n)": lambda n, B: (torch.zeros(0, n), torch.zeros(0)),
    "(B, 0, n)": lambda n, B: (torch.zeros(B, 0, n), torch.zeros(B, 0)),
}


@pytest.mark.parametrize("solver", ["native", "clarabel"])
@pytest.mark.parametrize("block", ["eq", "ineq"])
@pytest.mark.parametrize("form", list(EMPTIES))
def test_empty_constraint_block_is_like_none(form, block, solver):
    P, q, G, h, A, b = _qp(np.random.default_rng(0))
    empty = EMPTIES[form](4, q.shape[0])
    none_args = (G, h, None, None) if block == "eq" else (None, None, A, b)
    empty_args = (G, h, *empty) if block == "eq" else (*empty, A, b)
    layer = QPLayer(solver=solver, duals=True)
    q1 = q.clone().requires_grad_()
    x1, nu1, lam1 = layer(P, q1, *none_args)
    q2 = q.clone().requires_grad_()
    x2, nu2, lam2 = layer(P, q2, *empty_args)
    assert torch.equal(x1, x2) and torch.equal(nu1, nu2) and torch.equal(lam1, lam2)
    x1.sum().backward()
    x2.sum().backward()
    assert torch.equal(q1.grad, q2.grad)


def test_empty_blocks_gradcheck_unbatched_and_batched():
    P, q, G, h, A, b = _qp(np.random.default_rng(1), B=2)
    e = torch.Tensor()
    layer = QPLayer(solver_args={"tol": 1e-12})
    for qq in (q[0], q):  # unbatched and batched
        args = tuple(t.clone().requires_grad_() for t in (P, qq, G, h))
        assert torch.autograd.gradcheck(lambda *t: layer(*t, e, e), args, eps=1e-6,
                                        atol=1e-5, rtol=1e-4)


def test_batched_empty_block_sets_the_batch_size_and_qpth_style_calls_work():
    P, q, G, h, A, b = _qp(np.random.default_rng(2))
    assert QPLayer()(P, q[0], G, h, torch.zeros(5, 0, 4), torch.zeros(5, 0)).shape == (5, 4)
    # qpth's own test calls: p of shape (1, n), A = b = torch.DoubleTensor() with neq = 0
    e = torch.DoubleTensor()
    assert QPLayer()(P, q[:1], G, h, e, e).shape == (1, 4)
    with pytest.raises(InputError, match=r"Inconsistent batch sizes \[3, 5\]"):
        QPLayer()(P, q, G, h, torch.zeros(5, 0, 4), torch.zeros(5, 0))


def test_malformed_empty_blocks_are_clear_errors():
    P, q, G, h, A, b = _qp(np.random.default_rng(3))
    with pytest.raises(InputError, match=r"G: an empty tensor stands for no constraint rows, "
                                         r"of shape \(0,\), \(0, 4\) or \(batch, \*\(0, 4\)\); "
                                         r"received \(0, 5\)"):
        QPLayer()(P, q, torch.zeros(0, 5), torch.zeros(0))
    with pytest.raises(InputError, match="G and h go together.*an empty tensor counts as neither"):
        QPLayer()(P, q, torch.Tensor(), h)
    with pytest.raises(InputError, match=r"G: expected shape \(rows, n\) or \(batch, rows, n\), "
                                         r"received \(4,\)"):
        QPLayer()(P, q, torch.ones(4, dtype=torch.float64), h)
