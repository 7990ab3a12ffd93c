"""Tests for diffopt.diff.kkt: the structural entries of J and the dense/sparse factorizations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffopt.cones import ConeDims, dproj_dual, proj_dual
from diffopt.diff.kkt import KKTDifferentiator, kkt_entries
from diffopt.solvers.base import ConeProgram, SparsePattern

# Two SOCs of one size (stacked in one group) and one of another, a PSD cone, two exp cones.
DIMS = ConeDims(zero=3, nonneg=4, soc=(3, 3, 4), psd=(3,), exp=2)
N_X = 32  # more variables than rows: J is nonsingular for generic data


def _pattern(mask: np.ndarray) -> SparsePattern:
    rows, cols = np.nonzero(mask)
    return SparsePattern(rows, cols, mask.shape)


def _program(B: int, seed: int = 0, density: float = 0.2, aux: bool = False):
    """A random batched program and a point (x, y, s) with y = Π(v), s = y − v.

    With ``aux``, the last three variables are auxiliaries as CVXPY makes them (say t = Fx − g
    for sum_squares with a sparse F): each has one nonzero in A, in zero-cone row 0, 1, 2, whose
    other nonzeros are two other variables, and P touches two of them on the diagonal only (the
    third appears in no quadratic term).
    """
    rng = np.random.default_rng(seed)
    m = DIMS.size
    a_mask = rng.random((m, N_X)) < density
    last = np.arange(N_X - 3, N_X)
    a_mask[np.arange(m), np.arange(m) % (N_X - 3 if aux else N_X)] = True  # rows all touched
    p_mask = np.eye(N_X, dtype=bool)
    p_mask[0, 1] = p_mask[1, 0] = True
    if aux:
        a_mask[:, last] = False
        a_mask[:3] = False
        a_mask[[0, 1, 2], last] = a_mask[[0, 1, 2], [0, 1, 2]] = a_mask[[0, 1, 2], [5, 6, 7]] = True
        p_mask[N_X - 1, N_X - 1] = False
    pa, pp = _pattern(a_mask), _pattern(p_mask)
    P = np.zeros((B, N_X, N_X))
    P[:, pp.rows, pp.cols] = rng.uniform(0.5, 1.5, (B, pp.nnz))
    P = P + P.transpose(0, 2, 1)
    f64 = torch.float64
    program = ConeProgram(
        pp, torch.tensor(P[:, pp.rows, pp.cols], dtype=f64),
        torch.tensor(rng.standard_normal((B, N_X)), dtype=f64),
        pa, torch.tensor(rng.standard_normal((B, pa.nnz)), dtype=f64),
        torch.tensor(rng.standard_normal((B, m)), dtype=f64), DIMS,
    )
    v = torch.tensor(rng.standard_normal((B, m)), dtype=f64)
    y = proj_dual(v, DIMS)
    x = torch.tensor(rng.standard_normal((B, N_X)), dtype=f64)
    return program, x, y, y - v


def _J(program: ConeProgram, y, s) -> torch.Tensor:
    """J = [[P, AᵀD], [A, D − I]] straight from the definition."""
    P, A = program.dense_P(), program.dense_A()
    D = dproj_dual(y - s, program.dims).dense()
    eye = torch.eye(program.m, dtype=A.dtype)
    return torch.cat([torch.cat([P, A.mT @ D], 2), torch.cat([A, D - eye], 2)], 1)


def test_entries_match_the_definition_of_J():
    program, _, y, s = _program(B=3)
    rows, cols, vals = kkt_entries(program, dproj_dual(y - s, DIMS))
    N = program.n + program.m
    assert np.unique(rows * N + cols).size == rows.size  # no duplicates
    J = torch.zeros(3, N, N, dtype=torch.float64)
    J[:, rows, cols] = vals
    assert torch.allclose(J, _J(program, y, s), rtol=0, atol=1e-13)


@pytest.mark.parametrize("failed", [(), (0,), (0, 2)], ids=["all-ok", "first-failed", "two-failed"])
def test_sparse_and_dense_solves_match_direct_solves(failed):
    # The sparse path factors the first usable item with COLAMD and reuses its column order
    # for the others: every item, whichever, must solve its own system.
    B = 5
    program, x, y, s = _program(B, seed=1)
    ok = torch.ones(B, dtype=torch.bool)
    ok[list(failed)] = False
    J = _J(program, y, s)
    D = dproj_dual(y - s, DIMS).dense()
    n, m = program.n, program.m
    rng = np.random.default_rng(2)
    gx, gy, gs, r1 = (torch.tensor(rng.standard_normal((B, k)), dtype=torch.float64)
                      for k in (n, m, m, n))
    r2 = gy
    for t in (gx, gy, gs, r1):  # the caller zeroes the rows of failed items
        t[~ok] = 0
    gv = (D @ (gy + gs).unsqueeze(-1)).squeeze(-1) - gs
    lam = torch.linalg.solve(J.mT, -torch.cat([gx, gv], 1))
    dz = torch.linalg.solve(J, -torch.cat([r1, r2], 1))
    dv = dz[:, n:]
    dy = (D @ dv.unsqueeze(-1)).squeeze(-1)
    want = {"adjoint": (lam[:, :n], lam[:, n:]), "tangent": (dz[:, :n], dy, dy - dv)}
    for method in ("dense", "sparse"):
        kkt = KKTDifferentiator(program, x, y, s, ok, method)
        assert kkt.method == method
        assert not kkt.degenerate.any()
        got = {"adjoint": kkt.adjoint(gx, gy, gs), "tangent": kkt.tangent(r1, r2)}
        for kind, outs in got.items():
            for a, b in zip(outs, want[kind]):
                assert torch.allclose(a[ok], b[ok], rtol=0, atol=1e-10 * b.abs().max()), kind
                assert not a[~ok].any(), kind


def test_auto_picks_sparse_for_a_large_mostly_zero_system():
    # 200 equality rows on 200 variables, one nonzero each: J is mostly zero.
    B, n = 2, 200
    dims = ConeDims(zero=n)
    idx = np.arange(n)
    pa = SparsePattern(idx, idx, (n, n))
    f64 = torch.float64
    program = ConeProgram(None, None, torch.zeros(B, n, dtype=f64), pa,
                          torch.full((B, n), 2.0, dtype=f64), torch.ones(B, n, dtype=f64), dims)
    x, y = torch.full((B, n), 0.5, dtype=f64), torch.zeros(B, n, dtype=f64)
    kkt = KKTDifferentiator(program, x, y, torch.zeros_like(y), torch.ones(B, dtype=torch.bool))
    assert kkt.method == "sparse"
    # min 0 s.t. 2x = 1: dx = db / 2 for a change db of b (dR₂ = −db)
    dx, _, _ = kkt.tangent(torch.zeros(B, n, dtype=f64), -torch.ones(B, n, dtype=f64))
    assert torch.allclose(dx, torch.full((B, n), 0.5, dtype=f64))


@pytest.mark.parametrize("method", ["dense", "sparse"])
@pytest.mark.parametrize("case", ["all-ok", "one-failed", "a-zero"])
def test_eliminating_auxiliary_variables_keeps_the_solutions(method, case):
    B = 4
    program, x, y, s = _program(B, seed=3, aux=True)
    ok = torch.ones(B, dtype=torch.bool)
    if case == "one-failed":
        ok[1] = False
    if case == "a-zero":  # item 2's coefficient of the first auxiliary is 0: not eliminated
        pa = program.A_pattern
        program.A_values[2, np.flatnonzero((pa.rows == 0) & (pa.cols == N_X - 3))] = 0.0
    n, m = program.n, program.m
    J = _J(program, y, s)
    D = dproj_dual(y - s, DIMS).dense()
    rng = np.random.default_rng(4)
    gx, gy, gs, r1, r2 = (torch.tensor(rng.standard_normal((B, k)), dtype=torch.float64)
                          for k in (n, m, m, n, m))
    for t in (gx, gy, gs, r1, r2):
        t[~ok] = 0
    gv = (D @ (gy + gs).unsqueeze(-1)).squeeze(-1) - gs
    lam = torch.linalg.solve(J.mT, -torch.cat([gx, gv], 1))
    dz = torch.linalg.solve(J, -torch.cat([r1, r2], 1))
    dy = (D @ dz[:, n:].unsqueeze(-1)).squeeze(-1)
    kkt = KKTDifferentiator(program, x, y, s, ok, method)
    assert kkt.elim is not None and kkt.N == n + m - 2 * (2 if case == "a-zero" else 3)
    got = (*kkt.adjoint(gx, gy, gs), *kkt.tangent(r1, r2))
    want = (lam[:, :n], lam[:, n:], dz[:, :n], dy, dy - dz[:, n:])
    for a, b in zip(got, want):
        assert torch.allclose(a[ok], b[ok], rtol=0, atol=1e-10 * b.abs().max())
        assert not a[~ok].any()


def test_structure_kept_with_the_pattern_follows_the_values():
    # One pattern, three calls: the layout is built once; the elimination plan changes when a
    # coefficient becomes zero (that pair is kept) and changes back; every solve stays exact.
    B = 3
    program, x, y, s = _program(B, seed=5, aux=True)
    pa, n, m = program.A_pattern, program.n, program.m
    first = np.flatnonzero((pa.rows == 0) & (pa.cols == N_X - 3))
    ok = torch.ones(B, dtype=torch.bool)
    rng = np.random.default_rng(6)
    sizes = []
    for zero in (False, True, False):
        A_values = program.A_values.clone()
        if zero:
            A_values[1, first] = 0.0
        prog = ConeProgram(program.P_pattern, program.P_values, program.c, pa, A_values,
                           program.b, DIMS)
        J = _J(prog, y, s)
        r = torch.tensor(rng.standard_normal((B, n + m)), dtype=torch.float64)
        kkt = KKTDifferentiator(prog, x, y, s, ok, "dense")
        dz = torch.linalg.solve(J, -r)
        dx, dy, _ = kkt.tangent(r[:, :n], r[:, n:])
        D = dproj_dual(y - s, DIMS).dense()
        assert torch.allclose(dx, dz[:, :n], rtol=0, atol=1e-10 * dz.abs().max())
        assert torch.allclose(dy, (D @ dz[:, n:].unsqueeze(-1)).squeeze(-1), rtol=0,
                              atol=1e-10 * dz.abs().max())
        sizes.append(kkt.N)
    assert sizes == [n + m - 6, n + m - 4, n + m - 6]
    assert len(pa._memo) == 1  # one layout for the three calls


@pytest.fixture
def differentiators(monkeypatch) -> list:
    """The KKTDifferentiators the layers build during the test, in order (refinement, which
    builds its own, is off in the layers that use this)."""
    made = []
    init = KKTDifferentiator.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(KKTDifferentiator, "__init__", spy)
    return made


def test_psd_projection_layer_eliminates_and_matches_finite_differences(differentiators):
    # CVXPY writes ‖X − V‖² with t = X − V: those auxiliaries are eliminated from J.
    cp = pytest.importorskip("cvxpy")
    from diffopt import CvxpyLayer

    k = 3
    X, V = cp.Variable((k, k), symmetric=True), cp.Parameter((k, k), symmetric=True)
    layer = CvxpyLayer(cp.Problem(cp.Minimize(cp.sum_squares(X - V)), [X >> 0]), [V], [X],
                       solver="clarabel", solver_args={"tol": 1e-11, "refine": False})
    rng = np.random.default_rng(5)
    M = rng.standard_normal((k, k))
    v0 = torch.tensor(M + M.T, dtype=torch.float64, requires_grad=True)
    (out,) = layer(v0)
    G = torch.tensor(rng.standard_normal((k, k)), dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * G).sum(), v0)
    H = torch.tensor(rng.standard_normal((k, k)), dtype=torch.float64)
    H = H + H.T
    eps = 1e-5
    with torch.no_grad():
        fd = ((layer(v0 + eps * H)[0] - layer(v0 - eps * H)[0]) * G).sum() / (2 * eps)
    assert [d.elim is not None for d in differentiators] == [True]
    assert abs(float((grad * H).sum()) - float(fd)) <= 1e-6 * max(1.0, abs(float(fd)))


def test_auxiliaries_of_dense_rows_are_kept(differentiators):
    # sum_squares(Fx − g) with 5 columns: eliminating t = Fx − g would add the dense normal
    # equations (25 entries per row for 13 removed), so J keeps them.
    cp = pytest.importorskip("cvxpy")
    from diffopt import CvxpyLayer

    F = np.random.default_rng(6).standard_normal((8, 5))
    x, g = cp.Variable(5), cp.Parameter(8)
    layer = CvxpyLayer(cp.Problem(cp.Minimize(cp.sum_squares(F @ x - g)), [x >= 0]), [g], [x],
                       solver="clarabel", solver_args={"refine": False})
    g0 = torch.ones(8, dtype=torch.float64, requires_grad=True)
    layer(g0)[0].sum().backward()
    assert [(d.elim, d.N - d.n - d.m) for d in differentiators] == [(None, 0)]


def test_dense_solves_of_large_systems_are_exact_on_two_threads():
    # torch 2.13's batched CPU LU returned zero pivots on two threads from order ~150 on (then
    # lu_solve raised, or hung): the factorization runs on one thread (solves on any number).
    B, n, m = 32, 150, 60
    dims = ConeDims(nonneg=m)
    rng = np.random.default_rng(4)
    pa = _pattern(np.ones((m, n), dtype=bool))
    pp = _pattern(np.eye(n, dtype=bool))
    f64 = torch.float64
    program = ConeProgram(pp, torch.ones(B, n, dtype=f64), torch.zeros(B, n, dtype=f64), pa,
                          torch.tensor(rng.standard_normal((B, pa.nnz)), dtype=f64),
                          torch.zeros(B, m, dtype=f64), dims)
    v = torch.tensor(rng.standard_normal((B, m)), dtype=f64)
    y = proj_dual(v, dims)
    x = torch.zeros(B, n, dtype=f64)
    ok = torch.ones(B, dtype=torch.bool)
    gx, gy, gs = (torch.tensor(rng.standard_normal((B, k)), dtype=f64) for k in (n, m, m))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = KKTDifferentiator(program, x, y, y - v, ok, "dense").adjoint(gx, gy, gs)
        torch.set_num_threads(2)
        kkt = KKTDifferentiator(program, x, y, y - v, ok, "dense")
        assert int(kkt.piv.min()) >= 1 and torch.get_num_threads() == 2
        for a, b in zip(kkt.adjoint(gx, gy, gs), want):
            assert torch.allclose(a, b, rtol=0, atol=1e-10 * b.abs().max())
    finally:
        torch.set_num_threads(before)
