"""Tests of the native batched interior-point backend (diffopt.solvers.ipm)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffopt.cones import ConeDims
from diffopt.solvers.base import ConeProgram, SparsePattern, Status
from diffopt.solvers.ipm import _WEAK_REG, NativeIPM

# Tolerances, in one place; loosened per assertion where stated.
TOL_REF = 1e-6  # against Clarabel at tol 1e-10
TOL_FD = 1e-5  # derivatives against central differences of tight re-solves
TOL_SYSTEM = 1e-6  # the derivative solves the returned point's system
TOL_F32 = 2e-3  # float32 answers against float64 ones (relative)


# ---------------------------------------------------------------------------------------------
# Problem builders
# ---------------------------------------------------------------------------------------------


def program(P, c, A, b, p: int, l: int) -> ConeProgram:
    """A ConeProgram with dense patterns from batched dense tensors (P may be None)."""
    B, m, n = A.shape
    rows, cols = np.nonzero(np.ones((m, n)))
    if P is None:
        Pp, Pv = None, None
    else:
        pr, pc = np.nonzero(np.ones((n, n)))
        Pp, Pv = SparsePattern(pr, pc, (n, n)), P.reshape(B, -1)
    return ConeProgram(Pp, Pv, c, SparsePattern(rows, cols, (m, n)), A.reshape(B, -1), b,
                       ConeDims(zero=p, nonneg=l))


def random_problem(B, n, p, l, lp=False, seed=0, dtype=torch.float64):
    """Feasible, bounded QP/LP with a unique, strictly complementary solution.

    Built from a chosen primal-dual pair (x0, y0, s0); an LP gets exactly ``n − p`` active
    inequalities so that its solution is a nondegenerate vertex.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    m = p + l
    A = rnd(B, m, n)
    x0 = rnd(B, n)
    n_active = n - p if lp else l // 2
    active = torch.zeros(B, l, dtype=torch.bool)
    for i in range(B):
        active[i, torch.randperm(l, generator=g)[:n_active]] = True
    s0 = torch.zeros(B, m, dtype=torch.float64)
    s0[:, p:] = torch.where(active, 0.0, 0.5 + torch.rand(B, l, generator=g, dtype=torch.float64))
    y0 = torch.zeros(B, m, dtype=torch.float64)
    y0[:, :p] = rnd(B, p)
    y0[:, p:] = torch.where(active, 0.5 + torch.rand(B, l, generator=g, dtype=torch.float64), 0.0)
    b = torch.einsum("bmn,bn->bm", A, x0) + s0
    c = -torch.einsum("bmn,bm->bn", A, y0)
    P = None
    if not lp:
        M = rnd(B, n, n)
        P = M @ M.transpose(1, 2) / n + 0.1 * torch.eye(n, dtype=torch.float64)
        c = c - torch.einsum("bij,bj->bi", P, x0)
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(P), cast(c), cast(A), cast(b)


def clarabel_reference(P, c, A, b, p, l):
    """(x, y, s) per item from Clarabel through CVXPY at tolerance 1e-10."""
    cp = pytest.importorskip("cvxpy")
    out = []
    for i in range(A.shape[0]):
        x, s = cp.Variable(A.shape[2]), cp.Variable(A.shape[1])
        obj = c[i].numpy() @ x
        if P is not None:
            obj = obj + 0.5 * cp.quad_form(x, cp.psd_wrap(P[i].numpy()))
        eq = A[i].numpy() @ x + s == b[i].numpy()
        cons = [eq, s[:p] == 0, s[p:] >= 0]
        cp.Problem(cp.Minimize(obj), cons).solve(
            solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10
        )
        out.append((x.value, eq.dual_value, s.value))
    return [torch.tensor(np.stack(v)) for v in zip(*out)]


def rel_err(a, b):
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


# ---------------------------------------------------------------------------------------------
# Forward solves
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lp", [False, True], ids=["qp", "lp"])
def test_matches_clarabel(lp):
    n, p, l = (15, 3, 25) if lp else (20, 3, 25)
    data = random_problem(16, n, p, l, lp=lp, seed=1)
    sol = NativeIPM().solve(program(*data, p, l), {})
    assert all(st is Status.OPTIMAL for st in sol.status)
    x, y, s = clarabel_reference(*data, p, l)
    assert rel_err(sol.x, x) <= TOL_REF
    assert rel_err(sol.y, y) <= TOL_REF
    assert rel_err(sol.s, s) <= TOL_REF
    assert max(sol.primal_residual) <= 1e-7 and max(sol.dual_residual) <= 1e-7
    assert len(sol.iterations) == 16 and len(sol.gap) == 16


def test_equality_constrained_qp_closed_form():
    # min ½xᵀPx + cᵀx s.t. Ax = b: the KKT system [[P, Aᵀ], [A, 0]] [x; y] = [−c; b].
    P, c, A, b = random_problem(4, 8, 3, 0, seed=2)
    sol = NativeIPM().solve(program(P, c, A, b, 3, 0), {})
    K = torch.cat([torch.cat([P, A.transpose(1, 2)], 2), torch.cat([A, torch.zeros(4, 3, 3,
                  dtype=A.dtype)], 2)], 1)
    ref = torch.linalg.solve(K, torch.cat([-c, b], 1))
    assert rel_err(sol.x, ref[:, :8]) <= 1e-8
    assert rel_err(sol.y, ref[:, 8:]) <= 1e-8


def _lp2(c, A, b):
    """Batch of 2-variable LPs with 4 inequality rows, from Python lists."""
    t = (lambda v: torch.tensor(v, dtype=torch.float64))
    return program(None, t(c), t(A), t(b), 0, 4)


def test_infeasible_and_unbounded_in_a_mixed_batch():
    box = [[-1, 0], [0, -1], [1, 0], [0, 1]]  # 0 ≤ x ≤ 1
    prog = _lp2(
        c=[[1.0, -1.0], [1.0, 1.0], [-1.0, 0.0], [2.0, 1.0]],
        A=[box, [[-1, 0], [0, -1], [1, 0], [0, 1]], [[-1, 0], [0, -1], [0, 1], [0, 1]], box],
        b=[[0, 0, 1, 1], [-2, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]],  # item 1: x₁ ≥ 2, x₁ ≤ 1
    )
    sol = NativeIPM().solve(prog, {})
    assert sol.status == [Status.OPTIMAL, Status.INFEASIBLE, Status.UNBOUNDED, Status.OPTIMAL]
    assert torch.allclose(sol.x[0], torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-8)
    assert torch.allclose(sol.x[3], torch.tensor([0.0, 0.0], dtype=torch.float64), atol=1e-8)
    assert torch.isnan(sol.x[1]).all() and torch.isnan(sol.y[2]).all()


def test_infeasibility_takes_precedence_over_unboundedness():
    # An LP can be both primal and dual infeasible (contradictory rows, and a descent direction
    # in the rest): when both certificates hold, the primal one decides, as Clarabel does (the
    # unboundedness certificate proves only that the dual is infeasible). Rows of h as in _solve.
    from diffopt.solvers.ipm import _INFEASIBLE, _UNBOUNDED, _hsde_codes

    one, tiny = np.ones(2), np.full(2, 1e-12)
    cx, bz = np.array([-1.0, -1.0]), np.array([-1.0, 1.0])  # item 1: only unbounded
    h = np.stack([one, one, one, one, tiny, tiny, tiny, tiny, cx, bz, one, 0 * one, one, one,
                  0 * one])
    code, _ = _hsde_codes(h, np.float64(1.0), np.float64(1.0), 1e-9, 1e-8, 0.0, 2)
    assert code.tolist() == [_INFEASIBLE, _UNBOUNDED]


def test_infeasible_lps_are_certified_not_numerical_errors():
    # Regression: 1ᵀx = 5 against three group caps summing to 3 (x ≥ 0). Near the certificate
    # every inequality row's s/z → 0, the δ = 1e-7 solves lost their accuracy before τ reached
    # the ~1e-8 the certificate test needs, and 4 of these 16 ended NUMERICAL_ERROR (see
    # _WEAK_REG).
    from diffopt import QPLayer

    g = torch.Generator().manual_seed(0)
    B, n = 16, 10
    G = torch.cat([-torch.eye(n, dtype=torch.float64).expand(B, n, n),
                   torch.zeros(B, 3, n, dtype=torch.float64)], 1)
    for k, cols in enumerate((slice(0, 3), slice(3, 6), slice(6, n))):
        G[:, n + k, cols] = 1.0
    h = torch.cat([torch.zeros(B, n), torch.ones(B, 3)], 1).double()
    A, b = torch.ones(B, 1, n, dtype=torch.float64), 5 * torch.ones(B, 1, dtype=torch.float64)
    q = torch.randn(B, n, generator=g, dtype=torch.float64)
    layer = QPLayer(solver_args={"on_failure": "nan"})
    layer(None, q, G, h, A, b)
    assert all(st is Status.INFEASIBLE for st in layer.info.status), layer.info.status
    assert max(layer.info.iterations) <= 15


def test_unbounded_qp_next_to_a_bounded_one():
    # min ½x₁² − x₂ s.t. x ≥ 0 (unbounded along x₂), and the same with x₂ ≤ 1 added.
    P = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]] * 2, dtype=torch.float64)
    c = torch.tensor([[0.0, -1.0]] * 2, dtype=torch.float64)
    A = torch.tensor([[[-1.0, 0], [0, -1], [0, 0]], [[-1.0, 0], [0, -1], [0, 1]]],
                     dtype=torch.float64)
    b = torch.tensor([[0.0, 0, 1], [0.0, 0, 1]], dtype=torch.float64)
    sol = NativeIPM().solve(program(P, c, A, b, 0, 3), {})
    assert sol.status == [Status.UNBOUNDED, Status.OPTIMAL]
    # x₁ ≥ 0 is weakly active (zero multiplier), so x₁ only converges like √μ.
    assert torch.allclose(sol.x[1], torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-4)


def test_infeasible_equalities_are_certified():
    # x₁ + x₂ = 1, x₁ + 2x₂ = −2 and x ≥ 0 (2 equality rows, 2 inequality rows).
    A = torch.tensor([[[1.0, 1.0], [1.0, 2.0], [-1.0, 0.0], [0.0, -1.0]]], dtype=torch.float64)
    b = torch.tensor([[1.0, -2.0, 0.0, 0.0]], dtype=torch.float64)
    sol = NativeIPM().solve(program(None, torch.ones(1, 2, dtype=torch.float64), A, b, 2, 2), {})
    assert sol.status == [Status.INFEASIBLE]


def test_step_length_is_zero_for_stopped_items_and_capped_at_one():
    from diffopt.solvers.ipm import _step_length

    inf = math.inf
    frac = torch.tensor([0.0, 0.0, 0.99, 0.99, 1 - 1e-6], dtype=torch.float64)
    ratio = torch.tensor([inf, 0.5, inf, 0.5, 1.0], dtype=torch.float64)
    expected = torch.tensor([0.0, 0.0, 1.0, 0.495, 1 - 1e-6], dtype=torch.float64)
    assert torch.equal(_step_length(frac, ratio), expected)


def test_iteration_limit():
    data = random_problem(4, 10, 2, 10, seed=3)
    sol = NativeIPM().solve(program(*data, 2, 10), {"max_iters": 2})
    assert sol.status == [Status.MAX_ITERATIONS] * 4
    assert sol.iterations == [2] * 4


def test_float32_data_solved_in_float64():
    data = random_problem(8, 12, 2, 16, seed=4)
    data32 = [t.float() for t in data]
    ref = NativeIPM().solve(program(*(t.double() for t in data32), 2, 16), {})
    sol = NativeIPM().solve(program(*data32, 2, 16), {})
    assert all(st is Status.OPTIMAL for st in sol.status)
    assert sol.x.dtype == torch.float64  # the layers cast it back to float32
    assert rel_err(sol.x, ref.x) <= 1e-12 and rel_err(sol.y, ref.y) <= 1e-12


@pytest.mark.parametrize("kkt_dtype", [None, torch.float32], ids=["kkt64", "kkt32"])
def test_float32_iterates(kkt_dtype):
    data = random_problem(8, 12, 2, 16, seed=4)
    ref = NativeIPM().solve(program(*data, 2, 16), {})
    data32 = [t.float() for t in data]
    sol = NativeIPM().solve(program(*data32, 2, 16),
                            {"dtype": torch.float32, "kkt_dtype": kkt_dtype})
    assert all(st is Status.OPTIMAL for st in sol.status)
    assert sol.x.dtype == torch.float32
    assert rel_err(sol.x.double(), ref.x) <= TOL_F32
    assert rel_err(sol.y.double(), ref.y) <= TOL_F32


def test_warm_start_reduces_iterations():
    P, c, A, b = random_problem(8, 20, 3, 25, seed=5)
    cold = NativeIPM().solve(program(P, c, A, b, 3, 25), {})
    b2 = b + 1e-3 * torch.randn(b.shape, generator=torch.Generator().manual_seed(0),
                                dtype=b.dtype)
    b2[:, :3] = b[:, :3]
    ref = NativeIPM().solve(program(P, c, A, b2, 3, 25), {})
    warm = NativeIPM().solve(program(P, c, A, b2, 3, 25), {"warm_start": cold})
    assert all(st is Status.OPTIMAL for st in warm.status)
    assert sum(warm.iterations) < sum(ref.iterations)
    assert rel_err(warm.x, ref.x) <= 1e-7
    triple = NativeIPM().solve(program(P, c, A, b2, 3, 25),
                               {"warm_start": (cold.x, cold.y, cold.s)})
    assert triple.iterations == warm.iterations


def _box_barrier(c: torch.Tensor, mu: float) -> torch.Tensor:
    """Minimizer of cᵀx − μΣ(log xᵢ + log(1 − xᵢ)): the root in (0, 1) of
    c·x(1 − x) = μ(1 − 2x), written as x = 2μ / (c + 2μ + √(c² + 4μ²))."""
    return 2 * mu / (c + 2 * mu + torch.sqrt(c * c + 4 * mu * mu))


def test_barrier_parameter_gives_central_path_point():
    # min cᵀx over the box 0 ≤ x ≤ 1: rows −x + s = 0 and x + s = 1.
    n, mu = 5, 0.05
    c = torch.tensor([[-2.0, -0.3, 0.0, 0.1, 1.5], [1.0, 2.0, -1.0, 0.5, 0.0]],
                     dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    A = torch.cat([-eye, eye]).expand(2, -1, -1)
    b = torch.cat([torch.zeros(n), torch.ones(n)]).to(torch.float64).expand(2, -1)
    sol = NativeIPM().solve(program(None, c, A, b, 0, 2 * n), {"mu": mu})
    assert all(st is Status.OPTIMAL for st in sol.status)
    assert rel_err(sol.x, _box_barrier(c, mu)) <= 1e-8
    assert rel_err(sol.s * sol.y, torch.full_like(sol.s, mu)) <= 1e-8
    # Its derivative in c: dx/dc from the closed form, through the tangent map (dR₁ = dc).
    dc = torch.randn(2, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dx, _, _ = sol.differentiator.tangent(dc, torch.zeros(2, 2 * n, dtype=torch.float64))
    h = 1e-6
    fd = (_box_barrier(c + h * dc, mu) - _box_barrier(c - h * dc, mu)) / (2 * h)
    assert rel_err(dx, fd) <= 1e-7


# ---------------------------------------------------------------------------------------------
# The differentiator
# ---------------------------------------------------------------------------------------------


def _perturbation(P, c, A, b, seed):
    g = torch.Generator().manual_seed(seed)
    dP = torch.randn(P.shape, generator=g, dtype=P.dtype)
    dP = dP + dP.transpose(1, 2)
    return (dP, torch.randn(c.shape, generator=g, dtype=c.dtype),
            torch.randn(A.shape, generator=g, dtype=A.dtype),
            torch.randn(b.shape, generator=g, dtype=b.dtype))


TIGHT = {"tol": 1e-12}


@pytest.fixture(scope="module")
def qp_solution():
    p, l = 2, 14
    data = random_problem(6, 10, p, l, seed=7)
    return data, NativeIPM().solve(program(*data, p, l), TIGHT), (p, l)


def test_adjoint_matches_finite_differences(qp_solution):
    (P, c, A, b), sol, (p, l) = qp_solution
    g = torch.Generator().manual_seed(3)
    gx, gy, gs = (torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (sol.x, sol.y, sol.s))
    l1, l2 = sol.differentiator.adjoint(gx, gy, gs)
    x, y = sol.x, sol.y
    grad_c, grad_b = l1, -l2
    grad_A = y.unsqueeze(2) * l1.unsqueeze(1) + l2.unsqueeze(2) * x.unsqueeze(1)
    grad_P = 0.5 * (l1.unsqueeze(2) * x.unsqueeze(1) + x.unsqueeze(2) * l1.unsqueeze(1))
    dP, dc, dA, db = _perturbation(P, c, A, b, seed=4)
    predicted = ((grad_P * dP).sum((1, 2)) + (grad_c * dc).sum(1) + (grad_A * dA).sum((1, 2))
                 + (grad_b * db).sum(1))
    h = 1e-6

    def loss(t):
        s = NativeIPM().solve(program(P + t * dP, c + t * dc, A + t * dA, b + t * db, p, l),
                              TIGHT)
        return (gx * s.x).sum(1) + (gy * s.y).sum(1) + (gs * s.s).sum(1)

    fd = (loss(h) - loss(-h)) / (2 * h)
    assert rel_err(predicted, fd) <= TOL_FD


def test_tangent_matches_finite_differences(qp_solution):
    (P, c, A, b), sol, (p, l) = qp_solution
    dP, dc, dA, db = _perturbation(P, c, A, b, seed=5)
    x, y = sol.x, sol.y
    dr1 = torch.einsum("bij,bj->bi", dP, x) + torch.einsum("bmn,bm->bn", dA, y) + dc
    dr2 = torch.einsum("bmn,bn->bm", dA, x) - db
    dx, dy, ds = sol.differentiator.tangent(dr1, dr2)
    h = 1e-6
    plus = NativeIPM().solve(program(P + h * dP, c + h * dc, A + h * dA, b + h * db, p, l), TIGHT)
    minus = NativeIPM().solve(program(P - h * dP, c - h * dc, A - h * dA, b - h * db, p, l),
                              TIGHT)
    for got, hi, lo in ((dx, plus.x, minus.x), (dy, plus.y, minus.y), (ds, plus.s, minus.s)):
        assert rel_err(got, (hi - lo) / (2 * h)) <= TOL_FD


def test_adjoint_and_tangent_are_dual(qp_solution):
    # ⟨g, tangent(dR)⟩ = ⟨adjoint(g), dR⟩ for the triple (x, y, s).
    (_, _, _, _), sol, _ = qp_solution
    g = torch.Generator().manual_seed(6)
    gx, gy, gs = (torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (sol.x, sol.y, sol.s))
    dr1, dr2 = torch.randn(sol.x.shape, generator=g, dtype=sol.x.dtype), torch.randn(
        sol.y.shape, generator=g, dtype=sol.y.dtype)
    dx, dy, ds = sol.differentiator.tangent(dr1, dr2)
    l1, l2 = sol.differentiator.adjoint(gx, gy, gs)
    lhs = (gx * dx).sum(1) + (gy * dy).sum(1) + (gs * ds).sum(1)
    rhs = (l1 * dr1).sum(1) + (l2 * dr2).sum(1)
    assert rel_err(lhs, rhs) <= 1e-10


@pytest.mark.parametrize("mu", [0.0, 1e-2])
def test_derivative_solves_the_returned_points_system(mu):
    # mu > 0: J = [[P, Aᵀ], [A, −diag(s/y)]] (zero on equality rows) at the returned (x, y, s);
    # mu = 0: the same with the active set snapped (D = 0 where y > s, dy = 0 where s > y).
    p, l = 3, 20
    P, c, A, b = random_problem(8, 15, p, l, seed=8)
    sol = NativeIPM().solve(program(P, c, A, b, p, l), {"mu": mu})
    D = torch.cat([torch.zeros(8, p, dtype=A.dtype), sol.s[:, p:] / sol.y[:, p:]], 1)
    J = torch.cat([torch.cat([P, A.transpose(1, 2)], 2),
                   torch.cat([A, torch.diag_embed(-D)], 2)], 1)
    if mu == 0:
        J, keep = _snapped_matrix(P, A, sol.y, sol.s, p)
        assert bool((keep[:, p:].sum(1) == l // 2).all())  # random_problem's active set
    g = torch.Generator().manual_seed(9)
    gx, gy = torch.randn(8, 15, generator=g, dtype=A.dtype), torch.randn(8, p + l, generator=g,
                                                                          dtype=A.dtype)
    l1, l2 = sol.differentiator.adjoint(gx, gy, torch.zeros_like(gy))
    if mu == 0:  # dy = 0 on the inactive rows: g_y there does not enter, and λ is 0 there
        ref = torch.linalg.solve(J, -torch.cat([gx, gy * keep], 1))
        ref[:, 15:] *= keep
    else:
        ref = torch.linalg.solve(J, -torch.cat([gx, gy], 1))
    assert rel_err(torch.cat([l1, l2], 1), ref) <= TOL_SYSTEM


# ---------------------------------------------------------------------------------------------
# Errors and devices
# ---------------------------------------------------------------------------------------------


def test_unknown_option_is_refused():
    data = random_problem(1, 3, 0, 4, seed=0)
    with pytest.raises(ValueError, match="unknown option"):
        NativeIPM().solve(program(*data, 0, 4), {"tolerance": 1e-3})
    with pytest.raises(ValueError, match="'mu'"):
        NativeIPM().solve(program(*data, 0, 4), {"mu": -1.0})
    with pytest.raises(ValueError, match="warm_start"):
        NativeIPM().solve(program(*data, 0, 4), {"warm_start": 3})
    with pytest.raises(ValueError, match="kkt_dtype"):
        NativeIPM().solve(program(*data, 0, 4), {"kkt_dtype": torch.int64})
    with pytest.raises(ValueError, match="option 'dtype' must be torch.float32 or torch.float64"):
        NativeIPM().solve(program(*data, 0, 4), {"dtype": "float32"})


def test_unsupported_cone_is_refused():
    P, c, A, b = random_problem(1, 3, 0, 4, seed=0)
    prog = program(P, c, A, b, 0, 4)
    prog.dims = ConeDims(zero=0, nonneg=1, soc=(3,))
    with pytest.raises(ValueError, match="does not support the cone"):
        NativeIPM().solve(prog, {})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    data = random_problem(16, 20, 3, 25, seed=10)
    cpu = NativeIPM().solve(program(*data, 3, 25), {})
    gpu = NativeIPM().solve(program(*[t.cuda() for t in data], 3, 25), {})
    assert gpu.x.is_cuda and gpu.status == cpu.status
    assert rel_err(gpu.x.cpu(), cpu.x) <= 1e-8
    l1, _ = gpu.differentiator.adjoint(gpu.x, gpu.y, gpu.s)
    assert l1.is_cuda and math.isfinite(float(l1.abs().max()))


# ---------------------------------------------------------------------------------------------
# Options shared with the conic backends
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_chunks_match_the_whole_batch(n_jobs):
    # Chunks of 3, 2, 3 items (balanced), solved in turn or by two threads: the same solutions,
    # iterations and derivatives as one batch, item by item.
    P, c, A, b = random_problem(8, 6, 1, 8, seed=11)
    P = P[:1].expand_as(P)  # a shared P stays shared in every chunk
    prog = program(P, c, A, b, 1, 8)
    ref = NativeIPM().solve(prog, {})
    sol = NativeIPM().solve(prog, {"chunk_size": 3, "n_jobs": n_jobs})
    assert [p.degenerate.shape[0] for p in sol.differentiator.parts] == [3, 2, 3]
    assert rel_err(sol.x, ref.x) <= 1e-12 and rel_err(sol.y, ref.y) <= 1e-12
    assert sol.iterations == ref.iterations and sol.status == ref.status
    g = torch.Generator().manual_seed(3)
    gx, gy, gs = (torch.randn(8, k, generator=g, dtype=torch.float64) for k in (6, 9, 9))
    for a, r in zip(sol.differentiator.adjoint(gx, gy, gs), ref.differentiator.adjoint(gx, gy, gs)):
        assert rel_err(a, r) <= 1e-10
    stack = torch.randn(8, 6, 2, generator=g, dtype=torch.float64), torch.randn(
        8, 9, 2, generator=g, dtype=torch.float64)
    for a, r in zip(sol.differentiator.tangent(*stack), ref.differentiator.tangent(*stack)):
        assert a.shape == r.shape and rel_err(a, r) <= 1e-10
    assert sol.differentiator.degenerate.shape == (8,)


def test_default_chunks_are_cache_sized_and_one_per_thread():
    from diffopt.solvers.ipm import _chunk_bounds, _per_item_entries

    def bounds(prog, chunk_size, n_jobs):
        return _chunk_bounds(prog.batch_size, _per_item_entries(prog), chunk_size, n_jobs)

    # 100 variables, 100 per-item inequality rows: 8·(100² + 100·100) bytes per item, so 19
    # items fit 3 MiB; chunks are balanced, of at most max(32, 19) items.
    P, c, A, b = random_problem(100, 100, 0, 100, seed=14)
    prog = program(P[:1].expand_as(P), c, A, b, 0, 100)
    assert bounds(prog, None, 1) == [0, 25, 50, 75, 100]
    # With shared matrices only the factor counts: 8·20² bytes per item, one chunk.
    P, c, A, b = random_problem(100, 20, 0, 20, seed=15)
    shared = program(P[:1].expand_as(P), c, A[:1].expand_as(A), b, 0, 20)
    assert bounds(shared, None, 1) == [0, 100]
    # One chunk per thread when threads are asked for, down to 8 items.
    assert bounds(shared, None, 4) == [0, 25, 50, 75, 100]
    assert bounds(program(*random_problem(12, 4, 0, 4, seed=16), 0, 4), None, 4) == [
        0, 6, 12]
    assert bounds(prog, 40, 1) == [0, 33, 67, 100]


def test_large_chunks_run_on_torchs_threads_by_default(monkeypatch):
    # Several default chunks of >= 10k per-item entries: min(torch's threads, cores, chunks)
    # threads, each with one intra-op thread; the same answers as one thread. A small problem,
    # or one with a single default chunk, stays on one.
    import diffopt.solvers.ipm as ipm

    calls = []
    real = ipm.parallel_map

    def spy(fn, count, n_jobs):
        calls.append((count, n_jobs, torch.get_num_threads()))
        return real(fn, count, n_jobs)

    monkeypatch.setattr(ipm, "parallel_map", spy)
    P, c, A, b = random_problem(64, 100, 0, 100, seed=14)
    prog = program(P, c, A, b, 0, 100)  # 8·(3·100²) bytes per item: chunks of 32
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sol = NativeIPM().solve(prog, {})
        expected = min(2, ipm._available_cores())
        assert calls == ([(2, 2, 1)] if expected == 2 else [])
        assert torch.get_num_threads() == 2
        ref = NativeIPM().solve(prog, {"n_jobs": 1})
        assert rel_err(sol.x, ref.x) <= 1e-12 and sol.iterations == ref.iterations
        calls.clear()
        NativeIPM().solve(program(*random_problem(64, 10, 0, 10, seed=3), 0, 10), {})
        NativeIPM().solve(program(P[:32], c[:32], A[:32], b[:32], 0, 100), {})
        assert calls == []
    finally:
        torch.set_num_threads(before)


def test_small_solves_run_on_one_thread_and_restore_the_setting(monkeypatch):
    # The factorizations (forward) and triangular solves (both passes) see one thread.
    seen = []

    def spy(real):
        def call(*args, **kwargs):
            seen.append(torch.get_num_threads())
            return real(*args, **kwargs)
        return call

    data = random_problem(4, 6, 1, 8, seed=17)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for name in ("cholesky_ex", "solve_triangular"):
            monkeypatch.setattr(torch.linalg, name, spy(getattr(torch.linalg, name)))
        sol = NativeIPM().solve(program(*data, 1, 8), {})
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
        seen.clear()
        sol.differentiator.adjoint(*(torch.ones_like(t) for t in (sol.x, sol.y, sol.s)))
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_chunks_take_their_rows_of_a_warm_start():
    data = random_problem(6, 6, 1, 8, seed=12)
    prog = program(*data, 1, 8)
    first = NativeIPM().solve(prog, {})
    warm = NativeIPM().solve(prog, {"warm_start": first, "chunk_size": 2})
    whole = NativeIPM().solve(prog, {"warm_start": first})
    assert warm.iterations == whole.iterations
    assert rel_err(warm.x, whole.x) <= 1e-12


@pytest.mark.parametrize("key, value", [("n_jobs", 0), ("chunk_size", 0), ("n_jobs", 1.5)])
def test_bad_chunk_options_are_refused(key, value):
    data = random_problem(2, 4, 0, 4, seed=13)
    with pytest.raises(ValueError, match=key):
        NativeIPM().solve(program(*data, 0, 4), {key: value})


@pytest.mark.parametrize("mu", [0.0, 1e-2])
def test_verbose_prints_one_line_per_iteration(mu, capsys):
    data = random_problem(3, 6, 1, 8, seed=11)
    NativeIPM().solve(program(*data, 1, 8), {"mu": mu})
    assert capsys.readouterr().out == ""
    sol = NativeIPM().solve(program(*data, 1, 8), {"mu": mu, "verbose": True})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("NativeIPM: 3 problem(s), n=6")
    rows = [ln.split() for ln in lines[1:]]
    assert all(r[2::2] == ["pres", "dres", "gap", "mu", "running"] for r in rows)
    # One line per iteration of the slowest item, plus the line that finds it converged
    # (per phase when centering).
    assert len(rows) >= max(sol.iterations) + 1
    assert int(rows[0][-1]) == 3 and rows[-1][-1] == "0"
    assert float(rows[-1][3]) <= 1e-9 and float(rows[-1][5]) <= 1e-9


# ---------------------------------------------------------------------------------------------
# The bounds form: diagonal P, one nonzero per inequality row (Schur complement on A_E)
# ---------------------------------------------------------------------------------------------


def bounds_problem(B, n, p, shared, lp=False, seed=0):
    """min ½ xᵀdiag(d)x + cᵀx s.t. Ex = f, lo ≤ x ≤ hi written as rows −a x ≤ −a lo, a x ≤ a hi.

    ``shared``: E and the bound rows are the same for every item (only c, f, d vary); otherwise
    every item scales its bound rows by its own positive factors ``a``.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    E = rnd(1 if shared else B, p, n).expand(B, p, n)
    x0 = torch.rand(B, n, generator=g, dtype=torch.float64)  # strictly inside [0, 1]
    f = torch.einsum("bpn,bn->bp", E, x0)
    a = (0.5 + torch.rand(1 if shared else B, 2 * n, generator=g, dtype=torch.float64)).expand(
        B, 2 * n)
    eye = torch.eye(n, dtype=torch.float64)
    G = torch.cat([-eye, eye]).expand(B, 2 * n, n) * a.unsqueeze(-1)
    h = torch.cat([torch.zeros(B, n, dtype=torch.float64), a[:, n:]], 1)
    A, b = torch.cat([E, G], 1), torch.cat([f, h], 1)
    c = rnd(B, n)
    P = None if lp else torch.diag_embed(0.1 + torch.rand(B, n, generator=g, dtype=torch.float64))
    return P, c, A, b


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "batched"])
@pytest.mark.parametrize("lp", [False, True], ids=["qp", "lp"])
def test_bounds_form_matches_clarabel(shared, lp):
    n, p = 12, 4
    data = bounds_problem(6, n, p, shared, lp=lp, seed=12)
    sol = NativeIPM().solve(program(*data, p, 2 * n), {})
    kkt = sol.differentiator._kkt
    # A positive diagonal P or bounds on every variable: δ = 1e-9 without refinement.
    assert kkt.bounds and kkt.unrefined and kkt.reg == 1e-9
    assert all(st is Status.OPTIMAL for st in sol.status)
    x, y, s = clarabel_reference(*data, p, 2 * n)
    assert rel_err(sol.x, x) <= TOL_REF
    assert rel_err(sol.s, s) <= TOL_REF
    if not lp:  # LP duals need not be unique
        assert rel_err(sol.y, y) <= TOL_REF


def test_bounds_form_keeps_refinement_for_a_variable_without_bounds():
    # min c0 x0 + c1 x1 + c2 x2  s.t.  x0 − x1 = 0.5, x1 ≥ 0, 0 ≤ x2 ≤ 1 (x0 free: G_00 = δ).
    # With c0 + c1 > 0 the optimum is x = (0.5, 0, 0 or 1 by the sign of c2).
    c = torch.tensor([[1.0, 0.5, 2.0], [-0.5, 1.0, -1.0]], dtype=torch.float64)
    A = torch.tensor([[1.0, -1.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [0.0, 0.0, 1.0]],
                     dtype=torch.float64).expand(2, 4, 3)
    b = torch.tensor([0.5, 0.0, 0.0, 1.0], dtype=torch.float64).expand(2, 4)
    sol = NativeIPM().solve(program(None, c, A, b, 1, 3), {})
    kkt = sol.differentiator._kkt
    assert kkt.bounds and not kkt.unrefined and kkt.reg == _WEAK_REG  # smaller than the 1e-7
    assert all(st is Status.OPTIMAL for st in sol.status)
    expected = torch.tensor([[0.5, 0.0, 0.0], [0.5, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(sol.x, expected, rtol=0, atol=1e-8)


def test_unboundedness_along_free_variables_is_certified():
    # Regression: x free on half its coordinates, 1ᵀx = 1, integer costs (mostly unbounded).
    # In the bounds form the free variables have G_jj = δ, and with δ = 1e-7 the certificate's
    # ratio stalled at 1.3e-8 > tol_infeas: NUMERICAL_ERROR after up to 89 iterations.
    n, B = 12, 128
    g = torch.Generator().manual_seed(0)
    c = torch.randint(-1, 2, (B, n), generator=g).double()
    A = torch.cat([torch.ones(1, n), -torch.eye(n)[: n // 2]]).double().expand(B, -1, -1)
    b = torch.cat([torch.ones(1), torch.zeros(n // 2)]).double().expand(B, -1)
    sol = NativeIPM().solve(program(None, c, A, b, 1, n // 2), {})
    # Unbounded iff the free costs differ, or some bounded cost is below their common value.
    free_descent = (c[:, n // 2:] != c[:, n // 2:].amin(1, keepdim=True)).any(1) | (
        c[:, : n // 2].amin(1) < c[:, n // 2:].amin(1))
    assert sol.differentiator._kkt.bounds
    assert all(st is (Status.UNBOUNDED if d else Status.OPTIMAL)
               for st, d in zip(sol.status, free_descent.tolist())), sol.status
    assert max(sol.iterations) <= 10


@pytest.mark.parametrize("mu", [0.0, 1e-2])
def test_bounds_form_derivative_solves_the_returned_points_system(mu):
    n, p = 10, 3
    P, c, A, b = bounds_problem(5, n, p, shared=False, seed=13)
    sol = NativeIPM().solve(program(P, c, A, b, p, 2 * n), {"mu": mu})
    assert sol.differentiator._kkt.bounds
    m = p + 2 * n
    D = torch.cat([torch.zeros(5, p, dtype=A.dtype), sol.s[:, p:] / sol.y[:, p:]], 1)
    J = torch.cat([torch.cat([P, A.transpose(1, 2)], 2),
                   torch.cat([A, torch.diag_embed(-D)], 2)], 1)
    g = torch.Generator().manual_seed(14)
    gx, gy = (torch.randn(5, k, generator=g, dtype=A.dtype) for k in (n, m))
    l1, l2 = sol.differentiator.adjoint(gx, gy, torch.zeros_like(gy))
    ref = torch.linalg.solve(J, -torch.cat([gx, gy], 1))
    assert rel_err(torch.cat([l1, l2], 1), ref) <= TOL_SYSTEM


# ---------------------------------------------------------------------------------------------
# The dual form: positive definite P, Schur complement A(P + δI)⁻¹Aᵀ + D formed once
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["dual", "general", "bounds"])
def test_factorizations_of_a_solve_share_one_storage(form, monkeypatch):
    # Without autograd recording, each iteration's factor is written into the previous one's
    # storage (and the dual form's S into one buffer); the returned factor is the last one.
    # Recorded iterations (solve_unrolled) get fresh tensors: autograd cannot go through out=.
    factors = []

    def spy(real):
        def call(H, *args, **kwargs):
            L, info = real(H, *args, **kwargs)
            factors.append((L, H.data_ptr()))
            return L, info
        return call

    monkeypatch.setattr(torch.linalg, "cholesky_ex", spy(torch.linalg.cholesky_ex))
    B, n, p, l = 4, 6, 1, 8
    P, c, A, b = random_problem(B, n, p, l, lp=form == "general", seed=23)
    if form == "general":  # an LP: no positive definite P, no bound rows
        prog = program(None, c, A, b, p, l)
    elif form == "bounds":  # diagonal P, x >= -1 on every variable
        eye = torch.eye(n, dtype=torch.float64).expand(B, n, n)
        prog = program(eye.clone(), c, torch.cat((A[:, :p], -eye), 1),
                       torch.cat((b[:, :p], torch.ones(B, n, dtype=torch.float64)), 1), p, n)
    else:
        prog = program(P, c, A, b, p, l)
    sol = NativeIPM().solve(prog, {})
    kkt = sol.differentiator._kkt
    assert (kkt.dual, kkt.bounds) == (form == "dual", form == "bounds")
    assert all(st is Status.OPTIMAL for st in sol.status)
    in_loop = [L for L, _ in factors if L.dim() == 3 and L.shape[0] == B][-5:]
    assert len(in_loop) == 5 and len({L.data_ptr() for L in in_loop}) == 1
    assert kkt.L.data_ptr() == in_loop[-1].data_ptr()
    if form == "dual":
        assert len({ptr for L, ptr in factors[-5:]}) == 1  # S: one buffer
    factors.clear()
    prog_grad = ConeProgram(prog.P_pattern, prog.P_values, prog.c.clone().requires_grad_(),
                            prog.A_pattern, prog.A_values, prog.b, prog.dims)
    out = NativeIPM().solve_unrolled(prog_grad, {})
    assert len({L.data_ptr() for L, _ in factors}) == len(factors) > 5
    torch.autograd.grad(out.x.sum(), prog_grad.c)


@pytest.mark.parametrize("share", ["none", "P", "A", "both"])
def test_dual_form_matches_clarabel(share):
    B, n, p, l = 5, 12, 2, 16
    P, c, A, b = random_problem(B, n, p, l, seed=21)
    if share in ("A", "both"):  # the first item's feasible set for all; P is positive definite
        A, b = A[:1].expand_as(A), b[:1].expand_as(b)
    if share in ("P", "both"):
        P = P[:1].expand_as(P)
    sol = NativeIPM().solve(program(P, c, A, b, p, l), {})
    kkt = sol.differentiator._kkt
    assert kkt.dual and kkt.Pinv.shared == (share in ("P", "both"))
    assert (kkt.G is None) == (share == "P")
    assert all(st is Status.OPTIMAL for st in sol.status)
    x, y, s = clarabel_reference(P, c, A, b, p, l)
    assert rel_err(sol.x, x) <= TOL_REF
    assert rel_err(sol.y, y) <= TOL_REF
    assert rel_err(sol.s, s) <= TOL_REF


def test_dual_form_with_dependent_equality_rows():
    # The dual form's δ is tiny (1e-12): S = A(P + δI)⁻¹Aᵀ + D + δI is singular but for δ on
    # duplicated equality rows. Solutions and the derivative in x must not notice.
    P, c, A, b = random_problem(8, 12, 3, 16, seed=5)
    dup = program(P, c, torch.cat([A[:, :3], A[:, :3], A[:, 3:]], 1),
                  torch.cat([b[:, :3], b[:, :3], b[:, 3:]], 1), 6, 16)
    sol, ref = NativeIPM().solve(dup, {}), NativeIPM().solve(program(P, c, A, b, 3, 16), {})
    assert sol.differentiator._kkt.dual and all(st is Status.OPTIMAL for st in sol.status)
    assert rel_err(sol.x, ref.x) <= 1e-10
    gx = torch.randn(8, 12, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    l1, _ = sol.differentiator.adjoint(gx, torch.zeros(8, 22, dtype=torch.float64),
                                       torch.zeros(8, 22, dtype=torch.float64))
    r1, _ = ref.differentiator.adjoint(gx, torch.zeros(8, 19, dtype=torch.float64),
                                       torch.zeros(8, 19, dtype=torch.float64))
    assert rel_err(l1, r1) <= 1e-8


def test_zero_P_keeps_the_general_form():
    # Regression: P = 0 (an LP given with a quadratic term) passed the dual form's conditioning
    # test as P + δI = δI, and S = AAᵀ/δ + D failed most degenerate LPs (NUMERICAL_ERROR on 11
    # of these 16: integer costs with ties, x ≥ 0, four 0/1 rows, 1ᵀx = 2).
    from diffopt import QPLayer

    g = torch.Generator().manual_seed(0)
    B, n = 16, 12
    eye = torch.eye(n, dtype=torch.float64).expand(B, n, n)
    G = torch.cat([-eye, torch.randint(0, 2, (B, 4, n), generator=g).double()], 1)
    h = torch.cat([torch.zeros(B, n), 3 * torch.ones(B, 4)], 1).double()
    q = -torch.randint(0, 2, (B, n), generator=g).double()
    A, b = torch.ones(B, 1, n, dtype=torch.float64), 2 * torch.ones(B, 1, dtype=torch.float64)
    layer = QPLayer(solver_args={"on_failure": "nan"})
    x = layer(torch.zeros(B, n, n, dtype=torch.float64), q, G, h, A, b)
    assert all(st is Status.OPTIMAL for st in layer.info.status)
    assert max(layer.info.iterations) <= 8
    ref = QPLayer(solver="clarabel")(None, q, G, h, A, b)
    assert float(((q * x).sum(1) - (q * ref).sum(1)).abs().max()) <= 1e-7
    sol = NativeIPM().solve(program(torch.zeros(2, n, n, dtype=torch.float64), q[:2],
                                    torch.cat([A, G], 1)[:2], torch.cat([b, h], 1)[:2], 1, n + 4),
                            {})
    assert not sol.differentiator._kkt.dual


def test_ill_conditioned_P_keeps_the_general_form():
    # λ_min(P)/λ_max(P) ~ 1e-9: (P + δI)⁻¹ would amplify round-off in the dual form's S.
    P, c, A, b = random_problem(4, 10, 2, 16, seed=22)
    scale = torch.ones(10, dtype=P.dtype)
    scale[0] = 1e-4
    P = P * scale[:, None] * scale[None, :]
    sol = NativeIPM().solve(program(P, c, A, b, 2, 16), {})
    kkt = sol.differentiator._kkt
    assert not kkt.dual and not kkt.bounds
    x, y, s = clarabel_reference(P, c, A, b, 2, 16)
    assert rel_err(sol.x, x) <= TOL_REF
    assert rel_err(sol.y, y) <= TOL_REF
    assert rel_err(sol.s, s) <= TOL_REF


def grid_path_layer(solver: str = "auto", all_rows: bool = False):
    """CvxpyLayer of the 5x5 shortest-path LP in the cost (flow conservation, 0 ≤ x ≤ 1), or
    with ``all_rows`` every node's conservation row (one of them dependent) and x ≥ 0 only."""
    cp = pytest.importorskip("cvxpy")
    from diffopt import CvxpyLayer

    k = 5
    arcs = []
    for i in range(k):  # PyEPO's order: a row's east arcs, then the south arcs leaving it
        arcs += [(i * k + j, i * k + j + 1) for j in range(k - 1)]
        arcs += [(i * k + j, i * k + j + k) for j in range(k) if i < k - 1]
    inc = np.zeros((k * k, len(arcs)))
    for e, (u, v) in enumerate(arcs):
        inc[u, e], inc[v, e] = 1.0, -1.0
    supply = np.zeros(k * k)
    supply[0], supply[-1] = 1.0, -1.0
    x, cost = cp.Variable(len(arcs)), cp.Parameter(len(arcs))
    cons = ([inc @ x == supply, x >= 0] if all_rows
            else [inc[:-1] @ x == supply[:-1], x >= 0, x <= 1])
    problem = cp.Problem(cp.Minimize(cost @ x), cons)
    return CvxpyLayer(problem, parameters=[cost], variables=[x], solver=solver)


@pytest.mark.parametrize("tol", [None, 1e-12])
@pytest.mark.parametrize("smoothing", [1.0, None], ids=["qptl", "lp"])
def test_bounds_form_converges_on_paths(tol, smoothing):
    # Regression: QuadraticSmoothing(1) of the 5x5 shortest-path LP (min cᵀx + ½‖x‖², flow
    # conservation, 0 ≤ x ≤ 1) with costs like a model's predictions in training. With δ = 1e-12
    # in the bounds form this batch took 93 iterations (others in training > 100); the form's
    # δ = 1e-9 keeps it at the usual count. At tol = 1e-12 the unrefined δ = 1e-9 stalled too
    # (7 QPTL items of this batch); there the solver takes δ = 1e-7 with refinement. The LP
    # itself (every arc bounded) gets the same treatment.
    from diffopt import QuadraticSmoothing

    layer = grid_path_layer()
    g = torch.Generator().manual_seed(5)
    c = 0.8 * torch.randn(64, 40, generator=g, dtype=torch.float64)
    gradient = None if smoothing is None else QuadraticSmoothing(smoothing)
    layer(c, gradient=gradient, solver_args={"tol": tol, "on_failure": "nan"})
    assert all(st is Status.OPTIMAL for st in layer.info.status)
    assert max(layer.info.iterations) <= 25


@pytest.mark.parametrize("kind", ["integer", "near-tie", "integer-all-rows"])
def test_bounds_form_solves_degenerate_paths(kind):
    # Regression: with costs that tie, the optimal face has arcs strictly between their bounds,
    # the bounds form's G_jj fall to ~δ and the unrefined iterations stalled (integer costs in
    # {0, 1, 2}: 11 of these 128 items at max_iters; costs 1 + 1e-7·N(0, 1): 2, and with
    # δ = 1e-7 and refinement from δ alone 18 NUMERICAL_ERROR and 2 at max_iters).
    # Weak factorizations are refined against the exact K (see _WEAK_PIVOT). With every
    # conservation row (one dependent) and x ≥ 0 only, refinement stopped at 1e-13 instead of
    # _WEAK_TOL left 2 of these 128 NUMERICAL_ERROR / MAX_ITERATIONS.
    all_rows = kind == "integer-all-rows"
    layer = grid_path_layer(all_rows=all_rows)
    g = torch.Generator().manual_seed(0 if all_rows else 7)
    if kind.startswith("integer"):
        c = torch.randint(0, 3, (128, 40), generator=g).double()
    else:
        c = 1.0 + 1e-7 * torch.randn(128, 40, generator=g, dtype=torch.float64)
    options = [{}, {"reg": 1e-7}] if kind == "near-tie" else [{}]
    for opts in options:
        (x,) = layer(c, solver_args={**opts, "on_failure": "nan"})
        assert all(st is Status.OPTIMAL for st in layer.info.status), opts
        assert max(layer.info.iterations) <= 12, opts
    (ref,) = grid_path_layer(solver="clarabel", all_rows=all_rows)(
        c, solver_args={"tol_gap_rel": 1e-12})
    obj, obj_ref = (c * x).sum(1), (c * ref).sum(1)
    assert float((obj - obj_ref).abs().max()) <= 1e-8 * float(obj_ref.abs().max())


# ---------------------------------------------------------------------------------------------
# Loose boxes: every constraint inactive at the optimum (regression: the iterations stalled)
# ---------------------------------------------------------------------------------------------

# The reported QP: bounds on x₁ and x₃ plus one dense row, all inactive at the solution; the
# old start (margin 1 next to slacks of order 100) cycled without reducing μ (MAX_ITERATIONS).
_LOOSE_P = (1.0, 1.0, 1.5, 1.5)
_LOOSE_Q = (-1.53911868265637275, -1.20090957925857800, -0.68974264452752199,
            0.36787500594989275)
_LOOSE_G = ((-1.0, 0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0), (0.0, 0.0, -1.0, 0.0),
            (0.0, 0.0, 1.0, 0.0), (-0.99532051, -0.09662854, 0.99532051, 0.09662854))
_LOOSE_H = (128.20868570648409, 19.791314293515889, 94.755928318874354, 49.244071681125632,
            17.600632106263763)
_LOOSE_X = (1.5391, 1.2009, 0.4598, -0.2453)  # Clarabel's solution (rounded)


@pytest.mark.parametrize("factor", [1.0, 0.5, 2.0, 0.1])
def test_loose_box_qp_matches_clarabel(factor):
    from diffopt import QPLayer

    P = torch.diag(torch.tensor(_LOOSE_P, dtype=torch.float64))
    q = torch.tensor(_LOOSE_Q, dtype=torch.float64)
    G = torch.tensor(_LOOSE_G, dtype=torch.float64)
    h = factor * torch.tensor(_LOOSE_H, dtype=torch.float64)
    layer = QPLayer()
    x = layer(P, q, G, h)
    assert layer.info.status == [Status.OPTIMAL]
    assert torch.allclose(x, torch.tensor(_LOOSE_X, dtype=torch.float64), atol=1e-4)
    xr, _, _ = clarabel_reference(P[None], q[None], G[None], h[None], 0, 5)
    assert rel_err(x[None], xr) <= TOL_REF
    # Every constraint is inactive: x* is the unconstrained minimizer −P⁻¹q.
    assert rel_err(x, -q / P.diagonal()) <= 1e-8


def loose_box_qp(B, p, dense, seed):
    """Diagonal-P QPs whose bound rows (on x₁, x₃, …) and ``dense`` general rows are all
    inactive at the known solution ``xs`` (slacks 3 to 200), with ``p`` equality rows through
    ``xs``; returns ``(P, c, A, b, xs)``."""
    g = torch.Generator().manual_seed(seed)
    n = 4

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def unif(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)

    P = torch.diag_embed(unif(0.8, 2.0, B, n))
    xs = rnd(B, n)
    cols = torch.arange(0, n, 2)
    k = cols.numel()
    Ab = torch.zeros(B, 2 * k, n, dtype=torch.float64)
    Ab[:, 0::2, :][:, torch.arange(k), cols] = -1.0
    Ab[:, 1::2, :][:, torch.arange(k), cols] = 1.0
    Ad = rnd(B, dense, n)
    Ad = Ad / Ad.norm(dim=2, keepdim=True)
    A = torch.cat((rnd(B, p, n), Ab, Ad), 1)
    b = torch.einsum("bmn,bn->bm", A, xs)
    b[:, p:] += 10 ** unif(0.5, 2.3, B, 2 * k + dense)
    c = -torch.einsum("bij,bj->bi", P, xs)
    return P, c, A, b, xs


@pytest.mark.parametrize("p, dense", [(0, 0), (0, 2), (1, 1), (1, 2), (2, 2)])
def test_loose_box_family_is_solved(p, dense):
    # Seed 0 made the old iterations stall on 7 of these 320 items; (0, 0) is the bounds form
    # with no equality row at all.
    P, c, A, b, xs = loose_box_qp(64, p, dense, seed=0)
    l = A.shape[1] - p
    sol = NativeIPM().solve(program(P, c, A, b, p, l), {})
    assert sol.differentiator._kkt.bounds == (dense == 0)
    assert all(st is Status.OPTIMAL for st in sol.status)
    assert rel_err(sol.x, xs) <= TOL_REF
    assert float(sol.y.abs().max()) <= 1e-8
    if (p, dense) == (1, 2):
        x, _, _ = clarabel_reference(P, c, A, b, p, l)
        assert rel_err(sol.x, x) <= TOL_REF


# ---------------------------------------------------------------------------------------------
# The exact derivative at mu = 0: the KKT system with the active set snapped
# ---------------------------------------------------------------------------------------------


def natural_qp(B, n, p, l, seed):
    """Random dense QPs ``min ½xᵀPx + cᵀx, Ex = Ex₀, Gx ≤ Gx₀ + U(0, 1)`` with random ``c``:
    multipliers of all sizes, some small (where the barrier derivative is least accurate)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x0 = rnd(B, n)
    A = rnd(B, p + l, n)
    b = torch.einsum("bmn,bn->bm", A, x0)
    b[:, p:] += torch.rand(B, l, generator=g, dtype=torch.float64)
    M = rnd(B, n, n)
    P = M @ M.mT / n + 0.1 * torch.eye(n, dtype=torch.float64)
    return P, rnd(B, n), A, b


def _vjp(P, c, A, b, p, l, solver, args, weights):
    """Gradient of ``Σ wₓ·x + w_y·y + w_s·s`` w.r.t. (P, c, A, b) through ``cone_solve``."""
    from diffopt.solve import cone_solve, make_call

    B, m, n = A.shape
    rows, cols = np.nonzero(np.ones((m, n)))
    pr, pc = np.nonzero(np.ones((n, n)))
    call = make_call(dict(args, on_failure="nan"), solver, SparsePattern(pr, pc, (n, n)),
                     SparsePattern(rows, cols, (m, n)), ConeDims(zero=p, nonneg=l))
    leaves = [t.reshape(B, -1).clone().requires_grad_() for t in (P, c, A, b)]
    out = cone_solve(*leaves, call)
    sum((o * w).sum() for o, w in zip(out, weights)).backward()
    return torch.cat([t.grad for t in leaves], 1), call


def test_exact_vjp_matches_clarabel_reference():
    # At the default tol (1e-9) the barrier derivative is off by 4e-5 on these items (this
    # one: 8e-8); Clarabel fails on two of them at tol 1e-12, which are left out.
    B, n, p, l = 16, 20, 3, 16
    P, c, A, b = natural_qp(B, n, p, l, seed=28)
    g = torch.Generator().manual_seed(22)
    w = [torch.randn(B, k, generator=g, dtype=torch.float64) for k in (n, p + l, p + l)]
    tight = {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12}
    ref, _ = _vjp(P, c, A, b, p, l, "clarabel", tight, w)
    got, call = _vjp(P, c, A, b, p, l, "native", {}, w)
    assert call._diff.exact
    ok = torch.isfinite(ref).all(1) & (ref.norm(dim=1) > 0)  # Clarabel failures: zero rows
    assert int(ok.sum()) >= B - 2
    err = (got[ok] - ref[ok]).norm(dim=1) / ref[ok].norm(dim=1)
    assert float(err.max()) <= 1e-6


def _snapped_matrix(P, A, y, s, p):
    keep = torch.ones_like(y)
    keep[:, p:] = (y[:, p:] > s[:, p:]).to(y.dtype)
    top = torch.cat((P, A.mT * keep.unsqueeze(1)), 2)
    return torch.cat((top, torch.cat((A * keep.unsqueeze(2), torch.diag_embed(keep - 1)), 2)),
                     1), keep


def test_exact_derivative_solves_the_snapped_system():
    B, n, p, l = 6, 12, 2, 14
    P, c, A, b = natural_qp(B, n, p, l, seed=23)
    sol = NativeIPM().solve(program(P, c, A, b, p, l), {})
    K, keep = _snapped_matrix(P, A, sol.y, sol.s, p)
    g = torch.Generator().manual_seed(24)
    gx, gy, gs = (torch.randn(B, k, generator=g, dtype=A.dtype) for k in (n, p + l, p + l))
    l1, l2 = sol.differentiator.adjoint(gx, gy, gs)
    # λ = −K̃⁻¹(gx − A_Iᵀ gs_I, gy_R) and λ_I = −gs_I.
    gsI = gs * (1 - keep)
    rhs = torch.cat((gx - torch.einsum("bmn,bm->bn", A, gsI), gy * keep), 1)
    ref = -torch.linalg.solve(K, rhs)
    ref[:, n:] = ref[:, n:] * keep - gsI
    assert rel_err(torch.cat([l1, l2], 1), ref) <= 1e-10
    # Tangent and adjoint are transposes of each other, ds included.
    dr1, dr2 = torch.randn(B, n, generator=g, dtype=A.dtype), torch.randn(B, p + l, generator=g,
                                                                            dtype=A.dtype)
    dx, dy, ds = sol.differentiator.tangent(dr1, dr2)
    lhs = (gx * dx).sum(1) + (gy * dy).sum(1) + (gs * ds).sum(1)
    assert torch.allclose(lhs, (l1 * dr1).sum(1) + (l2 * dr2).sum(1), rtol=1e-9, atol=1e-10)
    assert (dy[:, p:] * (1 - keep[:, p:])).abs().max() == 0  # inactive rows: dy = 0
    assert (ds * keep).abs().max() == 0  # active and equality rows: ds = 0


@pytest.mark.parametrize("chunk_size", [None, 2], ids=["one-batch", "chunks"])
def test_exact_derivative_of_degenerate_items_is_finite(chunk_size):
    # Item 0: a duplicated active row (dependent active constraints, singular snapped system);
    # item 1: a weakly active constraint (y = s = 0); item 2: a regular one. In chunks, the
    # flags set by the chunks' solves are those of the batch.
    n = 3
    P = torch.eye(n, dtype=torch.float64).expand(3, n, n)
    G = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64).expand(3, 3, n)
    c = torch.tensor([[-2.0, 0, 0], [-2.0, 0, 0], [-2.0, -3.0, 0]], dtype=torch.float64)
    h = torch.tensor([[1.0, 1.0, 5.0], [1.0, 3.0, 0.0], [1.0, 3.0, 2.0]], dtype=torch.float64)
    sol = NativeIPM().solve(program(P, c, G, h, 0, 3),
                            {} if chunk_size is None else {"chunk_size": chunk_size})
    assert all(st is Status.OPTIMAL for st in sol.status)
    g = torch.Generator().manual_seed(25)
    gx, gy, gs = (torch.randn(3, k, generator=g, dtype=torch.float64) for k in (n, 3, 3))
    l1, l2 = sol.differentiator.adjoint(gx, gy, gs)
    assert torch.isfinite(l1).all() and torch.isfinite(l2).all()
    dx, dy, ds = sol.differentiator.tangent(gx, gy)
    assert all(torch.isfinite(t).all() for t in (dx, dy, ds))
    assert bool(sol.differentiator.degenerate[0]) and not bool(sol.differentiator.degenerate[2])
