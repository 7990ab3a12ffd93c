"""Tests for diffopt.cones: svec/smat, projections, projection Jacobians, ConeDims."""

from __future__ import annotations

import math

import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffopt.cones import (
    ConeDims,
    ProjJacobian,
    dproj_dual,
    proj_dual,
    proj_primal,
    smat,
    svec,
)

# Tolerances in one place; loosened per assertion only where said so.
TOL = {
    "exact": 1e-12,  # closed forms and identities in float64
    "solver": 1e-6,  # against a Clarabel solve at tight tolerance
    "fd": 1e-6,  # Jacobian vs central finite differences (relative to max(1, |D|))
    "float32": 1e-4,
}
FD_EPS = 1e-6
MIXED = ConeDims(zero=2, nonneg=3, soc=(1, 3, 4, 3), psd=(1, 2, 3), exp=4)
CLARABEL_OPTS = {"tol_gap_abs": 1e-11, "tol_gap_rel": 1e-11, "tol_feas": 1e-11}


def _rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=_rng(seed), dtype=torch.float64).to(dtype)


def _exp_points(region: str, count: int, seed: int) -> torch.Tensor:
    """``(count, 3)`` points of one region of the exponential-cone projection, away from kinks."""
    g = _rng(seed)
    u = torch.randn(count, 3, generator=g, dtype=torch.float64)
    lift = 0.1 + torch.rand(count, generator=g, dtype=torch.float64)
    if region == "cone":  # strictly inside K: y > 0, z > y exp(x/y)
        y = u[:, 1].abs() + 0.1
        return torch.stack([u[:, 0], y, y * torch.exp(u[:, 0] / y) * (1 + lift)], dim=1)
    if region == "polar":  # strictly inside K° = -K*: -(a, b, c) with a < 0, c > -a e^{b/a}/e
        a = -(u[:, 0].abs() + 0.1)
        c = (-a) * torch.exp(u[:, 1] / a - 1) * (1 + lift)
        return -torch.stack([a, u[:, 1], c], dim=1)
    if region == "corner":  # x < 0, y < 0
        return torch.stack([-(u[:, 0].abs() + 0.1), -(u[:, 1].abs() + 0.1), u[:, 2]], dim=1)
    # "hard": outside all three, found by rejection from a wider sample
    w = 2 * torch.randn(20 * count, 3, generator=g, dtype=torch.float64)
    x, y, z = w.unbind(1)
    in_k = (y > 0) & (y * torch.exp(x / y.clamp(min=1e-300)) <= z)
    in_polar = (x > 0) & (x * torch.exp(y / x.clamp(min=1e-300) - 1) <= -z)
    corner = (x <= 0) & (y <= 0)
    keep = w[~(in_k | in_polar | corner)]
    assert keep.shape[0] >= count
    return keep[:count]


def _exp_dist_k(p: torch.Tensor) -> torch.Tensor:
    """An upper bound on the distance of ``(..., 3)`` points to K_exp (0 inside)."""
    x, y, z = p.unbind(-1)
    ypos = y > 0
    ys = torch.where(ypos, y, 1.0)
    move_z = torch.where(ypos, (ys * torch.exp(x / ys) - z).clamp(min=0), torch.inf)
    ok = ypos & (z > 0)
    log_ratio = torch.log(torch.where(ok, z / ys, 1.0))
    move_x = torch.where(ok, (x - ys * log_ratio).clamp(min=0), torch.inf)
    to_face = torch.sqrt(x.clamp(min=0) ** 2 + y**2 + z.clamp(max=0) ** 2)
    return torch.minimum(torch.minimum(move_z, move_x), to_face)


def _exp_dist_kstar(d: torch.Tensor) -> torch.Tensor:
    """An upper bound on the distance of ``(..., 3)`` points to K*_exp (0 inside)."""
    u, v, w = d.unbind(-1)
    neg = u < 0
    us = torch.where(neg, u, -1.0)
    move_w = torch.where(neg, ((-us / math.e) * torch.exp(v / us) - w).clamp(min=0), torch.inf)
    to_face = torch.sqrt(u.clamp(min=0) ** 2 + v.clamp(max=0) ** 2 + w.clamp(max=0) ** 2)
    return torch.minimum(move_w, to_face)


def _fd_jacobian(f, v: torch.Tensor) -> torch.Tensor:
    """``(B, m, m)`` central finite-difference Jacobian of a row-wise map ``(B, m) -> (B, m)``."""
    cols = [
        (f(v + FD_EPS * e) - f(v - FD_EPS * e)) / (2 * FD_EPS)
        for e in torch.eye(v.shape[1], dtype=v.dtype)
    ]
    return torch.stack(cols, dim=-1)


# --------------------------------------------------------------------------------------------
# svec / smat
# --------------------------------------------------------------------------------------------


def test_svec_order_by_hand() -> None:
    X = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 5.0], [3.0, 5.0, 6.0]], dtype=torch.float64)
    r2 = math.sqrt(2.0)
    # (0,0), (1,0), (2,0), (1,1), (2,1), (2,2)
    expected = torch.tensor([1.0, 2 * r2, 3 * r2, 4.0, 5 * r2, 6.0], dtype=torch.float64)
    torch.testing.assert_close(svec(X), expected, rtol=0, atol=TOL["exact"])
    torch.testing.assert_close(smat(expected, 3), X, rtol=0, atol=TOL["exact"])


@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_svec_roundtrip_and_inner_product(k: int, seed: int) -> None:
    A, B = _randn(2, 4, k, k, seed=seed).unbind(0)
    X, Y = A + A.mT, B + B.mT
    torch.testing.assert_close(smat(svec(X), k), X, rtol=0, atol=TOL["exact"])
    lhs = (svec(X) * svec(Y)).sum(-1)
    rhs = torch.einsum("bij,bji->b", X, Y)
    torch.testing.assert_close(lhs, rhs, rtol=TOL["exact"], atol=TOL["exact"])


def test_svec_smat_shape_errors() -> None:
    with pytest.raises(ValueError, match="square matrices"):
        svec(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="k \\(k \\+ 1\\) / 2 = 6 for k = 3"):
        smat(torch.zeros(5), 3)


# --------------------------------------------------------------------------------------------
# Projections: closed forms
# --------------------------------------------------------------------------------------------


def test_zero_and_nonneg_closed_form() -> None:
    dims = ConeDims(zero=2, nonneg=3)
    v = _randn(20, 5, seed=1)
    expected_primal = torch.cat([torch.zeros(20, 2, dtype=v.dtype), v[:, 2:].clamp(min=0)], 1)
    expected_dual = torch.cat([v[:, :2], v[:, 2:].clamp(min=0)], 1)
    torch.testing.assert_close(proj_primal(v, dims), expected_primal, rtol=0, atol=0)
    torch.testing.assert_close(proj_dual(v, dims), expected_dual, rtol=0, atol=0)


def test_soc_closed_form_regions() -> None:
    dims = ConeDims(soc=(3,))
    v = torch.tensor(
        [[2.0, 1.0, 1.0], [-2.0, 1.0, 1.0], [0.0, 3.0, 4.0], [1.0, 0.0, 0.0]], dtype=torch.float64
    )
    expected = torch.tensor(
        [[2.0, 1.0, 1.0], [0.0, 0.0, 0.0], [2.5, 1.5, 2.0], [1.0, 0.0, 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(proj_primal(v, dims), expected, rtol=0, atol=TOL["exact"])
    one_dim = ConeDims(soc=(1, 1))
    w = torch.tensor([[-1.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(proj_dual(w, one_dim), torch.tensor([[0.0, 2.0]], dtype=w.dtype))


def test_psd_closed_form() -> None:
    k = 4
    Q, _ = torch.linalg.qr(_randn(k, k, seed=2))
    lam = torch.tensor([-2.0, -0.5, 1.0, 3.0], dtype=torch.float64)
    V = Q @ torch.diag(lam) @ Q.T
    expected = svec(Q @ torch.diag(lam.clamp(min=0)) @ Q.T)
    dims = ConeDims(psd=(k,))
    out = proj_primal(svec(V)[None], dims)[0]
    torch.testing.assert_close(out, expected, rtol=0, atol=TOL["exact"])


@pytest.mark.parametrize("region", ["cone", "polar", "corner"])
def test_exp_closed_form_regions(region: str) -> None:
    v = _exp_points(region, 20, seed=3)
    expected = {
        "cone": v,
        "polar": torch.zeros_like(v),
        "corner": torch.stack([v[:, 0], torch.zeros_like(v[:, 1]), v[:, 2].clamp(min=0)], 1),
    }[region]
    dims = ConeDims(exp=20)
    out = proj_primal(v.reshape(1, -1), dims).reshape(-1, 3)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Projections against CVXPY (Clarabel at tight tolerance)
# --------------------------------------------------------------------------------------------


def _cvxpy_projection(v: np.ndarray, constraints_of) -> np.ndarray:
    p = cp.Variable(v.shape)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(p - v)), constraints_of(p))
    prob.solve(solver=cp.CLARABEL, **CLARABEL_OPTS)
    assert prob.status == cp.OPTIMAL, prob.status
    return p.value


def test_soc_against_cvxpy() -> None:
    v = _randn(20, 4, seed=4)
    ref = _cvxpy_projection(v.numpy(), lambda p: [cp.SOC(p[:, 0], p[:, 1:], axis=1)])
    out = proj_primal(v.reshape(1, -1), ConeDims(soc=(4,) * 20)).reshape(20, 4)
    np.testing.assert_allclose(out.numpy(), ref, atol=TOL["solver"])


def test_psd_against_cvxpy() -> None:
    k, count = 3, 6
    A = _randn(count, k, k, seed=5)
    V = (A + A.mT).numpy()
    P = [cp.Variable((k, k), symmetric=True) for _ in range(count)]
    prob = cp.Problem(
        cp.Minimize(sum(cp.sum_squares(Pi - Vi) for Pi, Vi in zip(P, V))), [Pi >> 0 for Pi in P]
    )
    prob.solve(solver=cp.CLARABEL, **CLARABEL_OPTS)
    ref = np.stack([Pi.value for Pi in P])
    flat = svec(torch.from_numpy(V)).reshape(1, -1)
    out = smat(proj_primal(flat, ConeDims(psd=(k,) * count)).reshape(count, -1), k)
    np.testing.assert_allclose(out.numpy(), ref, atol=TOL["solver"])


@pytest.mark.parametrize("region", ["cone", "polar", "corner", "hard"])
def test_exp_against_cvxpy(region: str) -> None:
    v = _exp_points(region, 20, seed=6)
    ref = _cvxpy_projection(v.numpy(), lambda p: [cp.ExpCone(p[:, 0], p[:, 1], p[:, 2])])
    out = proj_primal(v.reshape(1, -1), ConeDims(exp=20)).reshape(20, 3)
    np.testing.assert_allclose(out.numpy(), ref, atol=TOL["solver"])
    # The dual cone through CVXPY's primal one: (u, v, w) ∈ K* iff (-v, -u, e w) ∈ K.
    dual_ref = _cvxpy_projection(
        v.numpy(), lambda p: [cp.ExpCone(-p[:, 1], -p[:, 0], math.e * p[:, 2])]
    )
    dual = proj_dual(v.reshape(1, -1), ConeDims(exp=20)).reshape(20, 3)
    np.testing.assert_allclose(dual.numpy(), dual_ref, atol=TOL["solver"])


# --------------------------------------------------------------------------------------------
# Moreau decomposition, membership and orthogonality
# --------------------------------------------------------------------------------------------


def test_moreau_decomposition_mixed() -> None:
    v = _randn(20, MIXED.size, seed=7)
    p = proj_primal(v, MIXED)
    d = proj_dual(-v, MIXED)  # Π_{K°}(v) = -Π_{K*}(-v)
    torch.testing.assert_close(p - d, v, rtol=0, atol=TOL["exact"])
    assert (p * d).sum(1).abs().max() <= TOL["exact"]
    # idempotence: projections of projections are fixed points
    torch.testing.assert_close(proj_primal(p, MIXED), p, rtol=0, atol=TOL["exact"])
    torch.testing.assert_close(proj_dual(d, MIXED), d, rtol=0, atol=TOL["exact"])


def test_exp_projection_wide_dynamic_range() -> None:
    # Friberg's stress grid: every sign and magnitudes from e^-20 to e^20 in each coordinate.
    mags = [math.exp(k) for k in range(-20, 21, 4)]
    grid = torch.tensor([-m for m in mags] + [0.0] + mags, dtype=torch.float64)
    v = torch.cartesian_prod(grid, grid, grid)
    p = proj_primal(v.reshape(1, -1), ConeDims(exp=v.shape[0])).reshape(-1, 3)
    d = p - v  # = Π_{K*}(-v)
    scale = torch.linalg.vector_norm(v, dim=1).clamp(min=1)
    assert torch.isfinite(p).all()
    assert (_exp_dist_k(p) / scale).max() <= 1e-11
    assert (_exp_dist_kstar(d) / scale).max() <= 1e-11
    assert ((p * d).sum(1).abs() / scale**2).max() <= 1e-13


def test_exp_projection_extreme_magnitudes() -> None:
    # Entries near the overflow and underflow limits: finite output, exact Moreau identity.
    big, tiny = 1e300, 1e-300
    v = torch.tensor(
        [[big, -big, 1.0], [-1e-3, 1e-7, -big], [-big, tiny, -1e-17], [tiny, tiny, -tiny],
         [1.0, big, -big], [-big, big, big]],
        dtype=torch.float64,
    )
    p = proj_primal(v.reshape(1, -1), ConeDims(exp=v.shape[0])).reshape(-1, 3)
    assert torch.isfinite(p).all()
    p, v = p / v.abs().amax(1, keepdim=True), v / v.abs().amax(1, keepdim=True)
    assert (_exp_dist_k(p) <= 1e-12).all()
    assert ((p * (p - v)).sum(1).abs() <= 1e-12).all()


def test_exp_projection_against_high_precision() -> None:
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 50
    v = _exp_points("hard", 10, seed=14)
    p = proj_primal(v.reshape(1, -1), ConeDims(exp=10)).reshape(-1, 3)
    for vi, pi in zip(v.tolist(), p.tolist()):
        # Independent reference: Newton on h(ρ) in 50 digits, started at our root.
        x0, y0, z0 = map(mp.mpf, vi)
        h = lambda r: ((r - 1) * x0 + y0) * mp.exp(r) - (x0 - r * y0) * mp.exp(-r) - (
            r * r - r + 1
        ) * z0  # noqa: E731
        rho = mp.findroot(h, mp.mpf(pi[0]) / mp.mpf(pi[1]))
        s = ((rho - 1) * x0 + y0) / (rho * rho - rho + 1)
        ref = [float(s * rho), float(s), float(s * mp.exp(rho))]
        np.testing.assert_allclose(pi, ref, rtol=0, atol=1e-14 * max(1.0, max(map(abs, vi))))


def test_exp_dual_membership_and_moreau() -> None:
    v = torch.cat([_exp_points(r, 10, seed=8) for r in ("cone", "polar", "corner", "hard")])
    dims = ConeDims(exp=v.shape[0])
    y = proj_dual(v.reshape(1, -1), dims).reshape(-1, 3)
    assert _exp_dist_kstar(y).max() <= TOL["exact"]
    # Π_{K*}(v) - v = Π_K(-v) must lie in K and be orthogonal to Π_{K*}(v).
    assert _exp_dist_k(y - v).max() <= TOL["exact"]
    assert (y * (y - v)).sum(1).abs().max() <= TOL["exact"]


# --------------------------------------------------------------------------------------------
# Jacobians
# --------------------------------------------------------------------------------------------


def _check_jacobian(v: torch.Tensor, dims: ConeDims) -> None:
    jac = dproj_dual(v, dims)
    D = jac.dense()
    fd = _fd_jacobian(lambda w: proj_dual(w, dims), v)
    err = (D - fd).abs().amax(dim=(1, 2)) / D.abs().amax(dim=(1, 2)).clamp(min=1)
    assert err.max() <= TOL["fd"], err.max()
    torch.testing.assert_close(D, D.mT, rtol=0, atol=TOL["exact"])
    eig = torch.linalg.eigvalsh(D)
    assert eig.min() >= -TOL["exact"] and eig.max() <= 1 + TOL["exact"]
    u = _randn(*v.shape, seed=99)
    dense_u = (D @ u[..., None]).squeeze(-1)
    torch.testing.assert_close(jac.matvec(u), dense_u, rtol=0, atol=TOL["exact"])


def test_jacobian_mixed_cones() -> None:
    _check_jacobian(_randn(20, MIXED.size, seed=9), MIXED)


@pytest.mark.parametrize("region", ["cone", "polar", "corner", "hard"])
def test_jacobian_exp_regions(region: str) -> None:
    # proj_dual at v evaluates Π_K at -v, so -points of each region probe each branch.
    v = -_exp_points(region, 20, seed=10).reshape(4, 15)
    _check_jacobian(v, ConeDims(exp=5))


def test_jacobian_soc_regions_and_psd_ties() -> None:
    soc = torch.tensor([[2.0, 1.0, 1.0, -2.0, 1.0, 1.0, 0.5, 3.0, -4.0]], dtype=torch.float64)
    _check_jacobian(soc, ConeDims(soc=(3, 3, 3)))
    # Repeated positive and repeated negative eigenvalues: Γ is 1 / 0 on those pairs.
    Q, _ = torch.linalg.qr(_randn(4, 4, seed=11))
    V = Q @ torch.diag(torch.tensor([-1.0, -1.0, 2.0, 2.0], dtype=torch.float64)) @ Q.T
    _check_jacobian(svec(V)[None], ConeDims(psd=(4,)))


def test_jacobian_diag_values_and_blocks() -> None:
    dims = ConeDims(zero=1, nonneg=2, soc=(3,), exp=1)
    v = torch.tensor([[-3.0, -1.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    jac = dproj_dual(v, dims)
    torch.testing.assert_close(jac.diag, torch.tensor([[1.0, 0.0, 1.0]], dtype=v.dtype))
    assert [off for off, _ in jac.blocks] == [3, 6]
    assert [b.shape for _, b in jac.blocks] == [(1, 3, 3), (1, 3, 3)]
    torch.testing.assert_close(jac.blocks[0][1][0], torch.eye(3, dtype=v.dtype))
    # Built from the public fields only, the Jacobian acts the same.
    rebuilt = ProjJacobian(diag=jac.diag, blocks=jac.blocks, size=jac.size)
    torch.testing.assert_close(rebuilt.dense(), jac.dense(), rtol=0, atol=0)
    u = _randn(1, dims.size, seed=12)
    torch.testing.assert_close(rebuilt.matvec(u), jac.matvec(u), rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected shape"):
        jac.matvec(u[:, :3])


# --------------------------------------------------------------------------------------------
# dtype, shapes
# --------------------------------------------------------------------------------------------


def test_float32_follows_input() -> None:
    v64 = _randn(20, MIXED.size, seed=13)
    v32 = v64.float()
    for f in (proj_primal, proj_dual):
        out = f(v32, MIXED)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), f(v64, MIXED), rtol=0, atol=TOL["float32"])
    jac = dproj_dual(v32, MIXED)
    assert jac.diag.dtype == torch.float32 and jac.dense().dtype == torch.float32
    assert all(b.dtype == torch.float32 for _, b in jac.blocks)
    assert svec(torch.eye(3)).dtype == torch.float32


def test_batch_shape_errors() -> None:
    m = MIXED.size
    with pytest.raises(ValueError, match=f"expected a \\(B, m\\) tensor with m = dims.size = {m}"):
        proj_primal(torch.zeros(m), MIXED)
    with pytest.raises(ValueError, match=f"m = dims.size = {m}, received shape \\(2, {m - 1}\\)"):
        dproj_dual(torch.zeros(2, m - 1), MIXED)
    with pytest.raises(ValueError, match="floating-point"):
        proj_dual(torch.zeros(2, m, dtype=torch.long), MIXED)
    with pytest.raises(ValueError, match="expected dims to be a ConeDims"):
        proj_dual(torch.zeros(2, m), (2, 3))


# --------------------------------------------------------------------------------------------
# ConeDims
# --------------------------------------------------------------------------------------------


def test_cone_dims_size_and_kinds() -> None:
    assert MIXED.size == 2 + 3 + 11 + (1 + 3 + 6) + 12
    assert MIXED.kinds() == frozenset({"zero", "nonneg", "soc", "psd", "exp"})
    assert ConeDims(nonneg=2, soc=[3]).kinds() == frozenset({"nonneg", "soc"})
    assert ConeDims(soc=[3, 2]).soc == (3, 2)  # lists are normalized to (hashable) tuples
    assert ConeDims().size == 0 and ConeDims().kinds() == frozenset()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"zero": -1}, "ConeDims.zero: expected an integer >= 0, received -1"),
        ({"nonneg": 2.5}, "ConeDims.nonneg: expected an integer, received 2.5"),
        ({"exp": True}, "ConeDims.exp: expected an integer"),
        ({"soc": (3, 0)}, "ConeDims.soc\\[1\\]: expected an integer >= 1, received 0"),
        ({"psd": (0,)}, "ConeDims.psd\\[0\\]: expected an integer >= 1"),
        ({"soc": 3}, "ConeDims.soc: expected a sequence of cone sizes"),
        ({"pow": 0.5}, "ConeDims.pow: expected a sequence of exponents"),
        ({"pow": (0.5, 1.0)}, "ConeDims.pow\\[1\\]: expected an exponent α strictly between 0"),
        ({"pow": (float("nan"),)}, "ConeDims.pow\\[0\\]: expected an exponent"),
        ({"pow": ("0.5",)}, "ConeDims.pow\\[0\\]: expected an exponent"),
    ],
)
def test_cone_dims_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConeDims(**kwargs)


def test_cone_dims_from_cvxpy() -> None:
    x = cp.Variable(3)
    X = cp.Variable((3, 3), symmetric=True)
    prob = cp.Problem(
        cp.Minimize(cp.sum(x) + cp.trace(X)),
        [
            x[0] + x[1] == 1,
            x >= -1,
            cp.norm(x[:2]) <= x[2],
            X >> 0,
            cp.exp(x[0]) <= x[1] + X[0, 0],
        ],
    )
    raw = prob.get_problem_data(cp.SCS)[0]["dims"]
    dims = ConeDims.from_cvxpy(raw)
    assert dims == ConeDims(
        zero=raw.zero, nonneg=raw.nonneg, soc=tuple(raw.soc), psd=tuple(raw.psd), exp=raw.exp
    )
    assert dims.zero == 1 and dims.soc == (3,) and dims.psd == (3,) and dims.exp == 1
    assert dims.size == prob.get_problem_data(cp.SCS)[0]["A"].shape[0]


def test_cone_dims_from_cvxpy_power_cones() -> None:
    x = cp.Variable(3)
    prob = cp.Problem(
        cp.Minimize(cp.sum(x)),
        [cp.PowCone3D(x[0], x[1], x[2], 0.3), x <= 1, cp.PowCone3D(x[1], x[0], x[2], 0.6)],
    )
    data = prob.get_problem_data(cp.SCS)[0]
    dims = ConeDims.from_cvxpy(data["dims"])
    assert dims == ConeDims(nonneg=3, pow=(0.3, 0.6)) and dims.size == data["A"].shape[0]
    # CVXPY keeps n-dimensional power cones for Clarabel; diffopt canonicalizes for SCS.
    nd = cp.Problem(cp.Maximize(cp.geo_mean(x, approx=False)), [x <= 1])
    with pytest.raises(ValueError, match="n-dimensional power cones are not supported"):
        ConeDims.from_cvxpy(nd.get_problem_data(cp.CLARABEL)[0]["dims"])
