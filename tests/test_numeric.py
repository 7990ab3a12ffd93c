"""The numeric policy: float64 inside whatever the input dtype, equilibration (scaling a problem
scales its answer), and statuses set by verified residuals."""

from __future__ import annotations

import dataclasses

import cvxpy as cp
import numpy as np
import pytest
import torch

from diffopt import CvxpyLayer, QPLayer, SolverError, Status
from diffopt.cones import ConeDims
from diffopt.layers import _dense_pattern
from diffopt.solve import cone_solve, make_call
from diffopt.solvers import get_backend
from diffopt.solvers.base import Backend

SCALES = [1e-6, 1e-4, 1e-2, 1e2, 1e4, 1e6]
TOL_SCALED = 1e-7  # relative error of a rescaled problem's (rescaled) answer


def ill_scaled_qp():
    """``min ½(x₁² + 1e-4 x₂²) + cᵀx`` s.t. ``‖x‖ ≤ R`` (inactive at the data used): ``x = −P⁻¹c``,
    so ``d(Σx)/dc = (−1, −1e4)``; a pivot ratio of 1e-4, singular by float32's standard."""
    x, c, R = cp.Variable(2), cp.Parameter(2), cp.Parameter(nonneg=True)
    prob = cp.Problem(cp.Minimize(0.5 * cp.square(x[0]) + 0.5e-4 * cp.square(x[1]) + c @ x),
                      [cp.norm(x, 2) <= R])
    return prob, [c, R], [x]


@pytest.mark.filterwarnings("ignore::diffopt.DegenerateWarning")  # raised on main in float32
@pytest.mark.parametrize("solver", ["clarabel", "scs"])
def test_float32_gradients_match_float64(solver):
    layer = CvxpyLayer(*ill_scaled_qp(), solver=solver)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        c = torch.tensor([0.5, 1e-5], dtype=dtype, requires_grad=True)
        (x,) = layer(c, torch.tensor(1.0, dtype=dtype))
        x.sum().backward()
        assert x.dtype == c.grad.dtype == dtype
        grads[dtype] = c.grad.double()
    exact = torch.tensor([-1.0, -1e4], dtype=torch.float64)
    torch.testing.assert_close(grads[torch.float64], exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(grads[torch.float32], exact, rtol=1e-5, atol=0)


@pytest.mark.parametrize("solver", ["clarabel", "scs", "native"])
def test_float32_redundant_equality_row_stays_redundant(solver):
    """``Fx = g`` and ``(TF)x = Tg``: the second row is implied by the first. Mapped from
    float32 parameters in float32 it became a conflicting row (x 20-80 % off, status OPTIMAL)."""
    rng = np.random.default_rng(0)
    F, T = rng.standard_normal((2, 3)), rng.standard_normal((1, 2))
    g, z, x = cp.Parameter(2), cp.Parameter(3), cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - z)), [F @ x == g, (T @ F) @ x == T @ g])
    layer = CvxpyLayer(prob, [g, z], [x], solver=solver)
    gv = torch.tensor(rng.standard_normal((8, 2)), dtype=torch.float32)
    zv = torch.tensor(rng.standard_normal((8, 3)), dtype=torch.float32)
    (ref,) = layer(gv.double(), zv.double())
    (out,) = layer(gv, zv)
    assert out.dtype == torch.float32
    assert all(st is Status.OPTIMAL for st in layer.info.status)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("solver", ["clarabel", "native"])
def test_half_dtypes_forward_and_backward(dtype, solver):
    """Half-precision inputs are upcast, solved and differentiated in float64, and cast back
    (on main the Clarabel backward died in ``lu_cpu`` for Half)."""
    x, z = cp.Variable(3), cp.Parameter(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - z)), [x >= 0, cp.sum(x) <= 1])
    layer = CvxpyLayer(prob, [z], [x], solver=solver)
    z64 = torch.tensor([0.8, -0.3, 0.5], dtype=torch.float64, requires_grad=True)
    zh = z64.detach().to(dtype).requires_grad_()
    (ref,) = layer(z64)
    (out,) = layer(zh)
    w = torch.tensor([1.0, 2.0, -1.0])
    (ref * w.double()).sum().backward()
    (out * w.to(dtype)).sum().backward()
    assert out.dtype == zh.grad.dtype == dtype
    tol = 1e-2 if dtype is torch.float16 else 3e-2
    torch.testing.assert_close(out.double(), ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(zh.grad.double(), z64.grad, rtol=tol, atol=tol)


def soc_projection_layer(solver="clarabel"):
    x, t, z, s = cp.Variable(3), cp.Variable(), cp.Parameter(3), cp.Parameter()
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - z) + cp.square(t - s)), [cp.norm(x, 2) <= t])
    return CvxpyLayer(prob, [z, s], [x, t], solver=solver)


def soc_projection(z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Closed form of the projection of ``(z, s)`` onto ``{‖x‖ ≤ t}``, as ``(B, 4)``."""
    nz = z.norm(dim=1, keepdim=True)
    a = ((nz + s[:, None]) / 2).clamp(min=0)
    inside = nz <= s[:, None]
    polar = nz <= -s[:, None]
    x = torch.where(inside, z, torch.where(polar, 0 * z, a * z / nz))
    t = torch.where(inside, s[:, None], torch.where(polar, 0 * a, a))
    return torch.cat([x, t], 1)


@pytest.mark.parametrize("scale", SCALES)
def test_soc_projection_scales_with_the_data(scale):
    """On main, ``1e-6·v`` came back OPTIMAL with ~60 % relative error."""
    layer = soc_projection_layer()
    rng = np.random.default_rng(0)
    z, s = torch.tensor(rng.standard_normal((6, 3))), torch.tensor(rng.standard_normal(6))
    x, t = layer(scale * z, scale * s)
    got = torch.cat([x, t[:, None]], 1) / scale
    want = soc_projection(z, s)
    assert (got - want).abs().max() <= TOL_SCALED * want.abs().max()


@pytest.mark.parametrize("scale", [1e-8, 1e-6, 1e-4])
def test_scs_lp_with_small_objective(scale):
    """An LP with costs of ``scale`` and right-hand sides of 1e3: on main SCS refused most
    (NUMERICAL_ERROR) at 1e-8 and some at 1e-6."""
    rng = np.random.default_rng(3)
    n, m = 5, 8
    x, c, G, h = cp.Variable(n), cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    layer = CvxpyLayer(cp.Problem(cp.Minimize(c @ x), [G @ x <= h]), [c, G, h], [x],
                       solver="scs")
    for _ in range(10):
        x0, Gv = rng.standard_normal(n), rng.standard_normal((m, n))
        hv = 1e3 * (Gv @ x0 + rng.uniform(0.1, 1, m))
        cv = -Gv.T @ rng.uniform(0, 1, m)  # a nonnegative combination of the rows: bounded
        data = [torch.tensor(v) for v in (cv, Gv, hv)]
        (ref,) = layer(*data, solver_args={"solver": "clarabel"})
        (out,) = layer(scale * data[0], *data[1:])
        assert (out - ref).abs().max() <= 1e-6 * ref.abs().max()


@pytest.mark.parametrize("scale", SCALES)
def test_native_qp_scales_with_the_data(scale):
    """``(P, q/t, G, h/t)`` has the answer ``x/t``; ``(αP, αq, G, h)`` the same ``x``."""
    rng = np.random.default_rng(1)
    B, n, m = 4, 5, 7
    L = torch.tensor(rng.standard_normal((B, n, n)))
    P = L @ L.mT + 0.1 * torch.eye(n, dtype=torch.float64)
    q, G = torch.tensor(rng.standard_normal((B, n))), torch.tensor(rng.standard_normal((B, m, n)))
    h = torch.tensor(rng.uniform(0.1, 1.0, (B, m)))
    layer = QPLayer()
    ref = layer(P, q, G, h)
    assert (layer(P, q * scale, G, h * scale) / scale - ref).abs().max() <= (
        TOL_SCALED * ref.abs().max())
    assert (layer(P * scale, q * scale, G, h) - ref).abs().max() <= TOL_SCALED * ref.abs().max()


@pytest.mark.filterwarnings("ignore::diffopt.DegenerateWarning")
def test_allow_inaccurate_keeps_and_marks_the_answer():
    """On main the INACCURATE items came back NaN and the backward failed inside
    ``torch.linalg.lstsq``."""
    layer = soc_projection_layer()
    rng = np.random.default_rng(0)
    z = torch.tensor(rng.standard_normal((6, 3)), requires_grad=True)
    s = torch.tensor(rng.standard_normal(6))
    # refine=False: refinement would finish every item of this SOC projection
    args = {"max_iters": 6, "allow_inaccurate": True, "on_failure": "nan", "refine": False}
    x, t = layer(z, s, solver_args=args)
    status = layer.info.status
    assert Status.INACCURATE in status
    marked = torch.tensor([st is Status.INACCURATE for st in status])
    assert torch.isfinite(x[marked]).all() and torch.isfinite(t[marked]).all()
    # the kept answers are near the projection: an interior point stopped early is off by about
    # the square root of its residuals (here up to ~2e-4)
    want = soc_projection(z.detach(), s)
    got = torch.cat([x, t[:, None]], 1).detach()
    assert (got[marked] - want[marked]).abs().max() < 5e-2
    assert Status.OPTIMAL in status  # backend-INACCURATE items with good residuals: accepted
    assert any(b is Status.INACCURATE and st is Status.OPTIMAL
               for b, st in zip(layer.info.backend_status, status))
    (x.nan_to_num().sum() + t.nan_to_num().sum()).backward()
    assert torch.isfinite(z.grad).all()


def test_nan_inputs_fail_their_items_only():
    layer = soc_projection_layer()
    rng = np.random.default_rng(2)
    z = torch.tensor(rng.standard_normal((4, 3)), requires_grad=True)
    s = torch.tensor(rng.standard_normal(4))
    zbad = z.detach().clone()
    zbad[1, 0] = float("nan")
    zbad[3, 2] = float("inf")
    zbad.requires_grad_()
    x, t = layer(zbad, s, solver_args={"on_failure": "nan"})
    status = layer.info.status
    assert [st is Status.NOT_FINITE for st in status] == [False, True, False, True]
    assert torch.isnan(x[[1, 3]]).all() and torch.isfinite(x[[0, 2]]).all()
    torch.testing.assert_close(torch.cat([x, t[:, None]], 1)[[0, 2]].detach(),
                               soc_projection(z.detach(), s)[[0, 2]], rtol=1e-7, atol=1e-8)
    x.nan_to_num().sum().backward()
    assert torch.isfinite(zbad.grad).all() and (zbad.grad[[1, 3]] == 0).all()
    with pytest.raises(SolverError, match=r"items \[1, 3\] NOT_FINITE: the item's data"):
        layer(zbad, s)


def test_nan_inputs_native_qp():
    P = torch.eye(2, dtype=torch.float64)
    q = torch.tensor([[-2.0, -3.0], [float("nan"), 0.0], [0.5, -0.5]], dtype=torch.float64)
    G, h = torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    layer = QPLayer(solver_args={"on_failure": "nan"})
    x = layer(P, q, G, h)
    assert [st.name for st in layer.info.status] == ["OPTIMAL", "NOT_FINITE", "OPTIMAL"]
    torch.testing.assert_close(x[[0, 2]], torch.tensor([[1.0, 1.0], [-0.5, 0.5]],
                                                       dtype=torch.float64))
    assert torch.isnan(x[1]).all()


class _Relabel(Backend):
    """Clarabel's answers, relabeled ``label`` and moved by ``shift`` (a fake backend)."""

    name = "relabel"
    cones = frozenset({"zero", "nonneg", "soc", "psd", "exp"})
    quadratic_objective = True

    def __init__(self, label: Status, shift: float = 0.0) -> None:
        self.label, self.shift = label, shift

    def solve(self, program, options):
        sol = get_backend("clarabel").solve(program, options)
        return dataclasses.replace(sol, x=sol.x + self.shift, status=[self.label] * len(sol.status))


def _qp_call(backend):
    """``min ½‖x‖² − zᵀx`` s.t. ``x ≤ 1`` in the standard form, with ``backend``."""
    z = torch.tensor([[0.3, 2.0], [-1.0, 0.5]], dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64).reshape(1, 4).expand(2, 4)
    call = make_call({}, "clarabel", _dense_pattern(2, 2), _dense_pattern(2, 2),
                     ConeDims(nonneg=2))
    call = dataclasses.replace(call, backend=backend)
    return call, (eye, -z, eye, torch.ones(2, 2, dtype=torch.float64))


def test_status_follows_residuals_not_labels():
    call, data = _qp_call(_Relabel(Status.INACCURATE))
    x, _, _ = cone_solve(*data, call)  # good answers labeled INACCURATE: accepted
    assert call.info.status == [Status.OPTIMAL] * 2
    assert call.info.backend_status == [Status.INACCURATE] * 2
    torch.testing.assert_close(x, torch.tensor([[0.3, 1.0], [-1.0, 0.5]], dtype=torch.float64))
    call, data = _qp_call(_Relabel(Status.OPTIMAL, shift=1e-5))
    with pytest.raises(SolverError, match="INACCURATE"):  # wrong answers labeled OPTIMAL
        cone_solve(*data, call)
    call, data = _qp_call(_Relabel(Status.OPTIMAL, shift=1.0))
    with pytest.raises(SolverError, match="NUMERICAL_ERROR: .*failed verification"):
        cone_solve(*data, call)


def test_unverified_infeasibility_certificate_is_not_trusted():
    call, data = _qp_call(_Relabel(Status.INFEASIBLE))  # a feasible problem: y is no certificate
    call = dataclasses.replace(call, on_failure="nan")
    x, _, _ = cone_solve(*data, call)
    assert call.info.status == [Status.NUMERICAL_ERROR] * 2 and torch.isnan(x).all()


@pytest.mark.parametrize("solver", ["native", "clarabel"])
def test_gradcheck_badly_scaled_qp(solver):
    """Exact gradients through the equilibrated solve (native: its own derivative, mapped back
    from the scaled program) on a QP whose data span 1e-3..1e3."""
    rng = np.random.default_rng(5)
    n, m = 3, 4
    L = torch.tensor(rng.standard_normal((n, n)))
    P = 1e3 * (L @ L.T + torch.eye(n, dtype=torch.float64))
    G = torch.tensor(rng.standard_normal((m, n))) * torch.tensor([1e-3, 1.0, 1e2, 1.0])[:, None]
    h = torch.tensor(rng.uniform(0.1, 1.0, m)) * torch.tensor([1e-3, 1.0, 1e2, 1.0])
    q = torch.tensor(rng.standard_normal(n), requires_grad=True) * 1e3
    layer = QPLayer(solver=solver, solver_args={"tol": 1e-12} if solver == "clarabel" else {})
    assert torch.autograd.gradcheck(lambda q: layer(P, q, G, h), (q.detach().requires_grad_(),),
                                    eps=1e-4, atol=1e-7, rtol=1e-4)


def test_an_item_is_scaled_by_its_own_data():
    """Each item's scaling depends on its data alone: an item solved in a batch with items of
    other scales gets the answer it gets alone, to rounding (Clarabel solves each item)."""
    layer = soc_projection_layer()
    rng = np.random.default_rng(4)
    z = torch.tensor(rng.standard_normal((3, 3))) * torch.tensor([[1e-5], [1.0], [1e4]])
    s = torch.tensor(rng.standard_normal(3))
    x, _ = layer(z, s)
    for i in range(3):
        xi, _ = layer(z[i:i + 1], s[i:i + 1])
        torch.testing.assert_close(xi[0], x[i], rtol=1e-13, atol=0)


def test_portfolio_items_the_backend_calls_inaccurate_are_verified_and_returned():
    """A 30-asset portfolio SOCP at B = 64: Clarabel labels 5 items AlmostSolved (INACCURATE),
    which made the call raise on main; their residuals meet the tolerance, and their answers
    match an independent tight CVXPY solve."""
    rng = np.random.default_rng(0)
    n = 30
    w, mu = cp.Variable(n), cp.Parameter(n)
    S = rng.standard_normal((n, n)) / np.sqrt(n)
    prob = cp.Problem(cp.Maximize(mu @ w - cp.norm(S @ w, 2)), [cp.sum(w) == 1, w >= 0])
    layer = CvxpyLayer(prob, [mu], [w])
    muv = torch.tensor(rng.standard_normal((64, n)) * 0.1)
    (sol,) = layer(muv)
    relabeled = [i for i, (b, st) in enumerate(zip(layer.info.backend_status, layer.info.status))
                 if b is Status.INACCURATE and st is Status.OPTIMAL]
    assert relabeled and all(st is Status.OPTIMAL for st in layer.info.status)
    for i in relabeled:
        mu.value = muv[i].numpy()
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)
        assert np.abs(sol[i].numpy() - w.value).max() < 1e-5


def epigraph_socp():
    """``min cᵀx + ‖Gx − h‖`` s.t. ``‖x‖ ≤ R``, ``x₀ ≥ τ`` (fuzz family socp, seed 300): scaling
    ``c, G, h`` by ``s_c`` and ``h, R, τ`` by ``s_b`` gives the solution ``s_b x``."""
    x = cp.Variable(2)
    c, G, h = cp.Parameter(2), cp.Parameter((3, 2)), cp.Parameter(3)
    R, tau = cp.Parameter(), cp.Parameter()
    prob = cp.Problem(cp.Minimize(c @ x + cp.norm(G @ x - h, 2)),
                      [cp.norm(x, 2) <= R, x[0] >= tau])
    return prob, [c, G, h, R, tau], [x]


def _epigraph_values(item, s_b, s_c):
    """Items 2 and 1 of fuzz case socp seed 300 (unit scale), scaled, as float64 tensors."""
    data = {
        2: ([-4.400676708416257, -0.26770180109566266],
            [[-0.08881586889465867, -0.48889507293969287], [-0.38524693282155725,
             -1.3353956661740565], [1.0502780025306817, 1.7814498912348082]],
            [0.6120387346598327, -0.023191188833702532, 0.8665998022190657],
            1.7391575840063258, -3.4783151680126516),
        1: ([2.2317729026351723, 1.1461960858602747],
            [[1.6859852353751528, -0.3761303542319413], [-1.113648613220963,
             -0.5828925861209854], [1.533519003232743, 0.14080521718025815]],
            [-1.1385548708605824, 0.7357936288960184, -0.03065084345307681],
            0.5289380356873016, -1.0578760713746032),
    }[item]
    factors = (s_c, s_c, s_c * s_b, s_b, s_b)
    return [torch.tensor(v, dtype=torch.float64) * f for v, f in zip(data, factors)]


@pytest.mark.parametrize("solver", ["ecos", "scs"])
def test_tiny_objective_with_an_epigraph_variable_is_solved(solver):
    """At ``s_c = 1e-8`` CVXPY's ``t ≥ ‖Gx − h‖`` enters the cone program as ``(t, 1e-8·Gx)``:
    left so, ECOS and SCS stopped with ``x`` 17-26 % off and every residual below 1e-9 (status
    OPTIMAL), ``x`` being undetermined below their absolute tolerances."""
    layer = CvxpyLayer(*epigraph_socp(), solver=solver)
    (ref,) = CvxpyLayer(*epigraph_socp(), solver="clarabel")(*_epigraph_values(2, 1.0, 1.0))
    (x,) = layer(*_epigraph_values(2, 1e-2, 1e-8))
    assert layer.info.status == [Status.OPTIMAL]
    torch.testing.assert_close(x / 1e-2, ref, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore::diffopt.DegenerateWarning")  # raised before the fix
@pytest.mark.parametrize("solver", ["ecos", "scs"])
def test_gradient_of_an_extremely_scaled_socp_is_the_unit_scale_one(solver):
    """At ``s_b = 1e-4``, ``s_c = 1e8`` the data span 1e12; the derivative taken on the original
    program (not the equilibrated one) came out 10 % off on SCS and ECOS, ``x`` right."""
    grads = {}
    for name, s_b, s_c in (("clarabel", 1.0, 1.0), (solver, 1e-4, 1e8)):
        values = [v.requires_grad_() for v in _epigraph_values(1, s_b, s_c)]
        layer = CvxpyLayer(*epigraph_socp(), solver=name)
        (x,) = layer(*values)
        assert layer.info.status == [Status.OPTIMAL]
        (x / s_b).sum().backward()
        # the derivative in the unit-scale data: each one is the given one times its factor
        grads[name] = torch.cat([(v.grad * f).flatten() for v, f in zip(
            values, (s_c, s_c, s_c * s_b, s_b, s_b))])
    torch.testing.assert_close(grads[solver], grads["clarabel"], rtol=1e-4, atol=1e-6)


def abs_epigraph_socp():
    """``min cᵀx + |gᵀx − h|`` s.t. ``‖x‖ ≤ R``, ``x₀ ≥ τ`` (fuzz family socp with ``k = 1``):
    CVXPY writes the norm of one row as ``t ≥ ±(gᵀx − h)``, two nonnegative rows."""
    x = cp.Variable(3)
    c, g, h = cp.Parameter(3), cp.Parameter((1, 3)), cp.Parameter(1)
    prob = cp.Problem(cp.Minimize(c @ x + cp.norm(g @ x - h, 2)),
                      [cp.norm(x, 2) <= 1.2, x[0] >= -2.4])
    return prob, [c, g, h], [x]


@pytest.mark.parametrize("solver", ["clarabel", "ecos", "scs"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tiny_objective_with_an_abs_epigraph_variable_is_solved(solver, dtype):
    """At ``s_c = 1e-8`` the column of ``t`` (cost 1, entries ±1 in two one-row blocks) dwarfed
    ``1e-8·(c, g, h)``: Clarabel, ECOS and SCS stopped with ``x`` 8-100 % off, status OPTIMAL
    (fuzz socp seed 10305, float32), until Ruiz started such a column at its rows' scale."""
    values = [torch.tensor([0.9, -1.7, 0.4], dtype=torch.float64),
              torch.tensor([[1.3, 0.2, -0.8]], dtype=torch.float64),
              torch.tensor([0.7], dtype=torch.float64)]
    (ref,) = CvxpyLayer(*abs_epigraph_socp(), solver="clarabel")(*values)
    layer = CvxpyLayer(*abs_epigraph_socp(), solver=solver)
    (x,) = layer(*(v.to(dtype) * 1e-8 for v in values))
    assert layer.info.status == [Status.OPTIMAL]
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(x.double(), ref, rtol=0, atol=tol)
