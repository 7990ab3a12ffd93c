"""The 3D power cone end to end: projections, their Jacobian, backends and layers.

K_α = {(x, y, z): x^α y^(1-α) >= |z|, x, y >= 0} and its dual
K_α* = {(u, v, w): (u/α)^α (v/(1-α))^(1-α) >= |w|, u, v >= 0}.
"""

from __future__ import annotations

import math

import cvxpy as cp
import numpy as np
import pytest
import torch

from diffopt import CvxpyLayer, ProblemError
from diffopt.cones import ConeDims, dproj_dual, proj_dual, proj_primal
from diffopt.solvers import get_backend
from test_cones import TOL, _check_jacobian, _cvxpy_projection

#: Layer tolerances per backend, relative to the solution's scale. An interior point's iterate
#: is ~sqrt(gap) from the optimum along a curved cone's boundary: Clarabel at tol 1e-10 (it stops
#: "almost solved" below that on some power-cone items) is ~1e-6 accurate. SCS converges
#: linearly to 1e-10 and better, which gradcheck's finite differences need.
LAYER_TOL = {"clarabel": 1e-5, "scs": 1e-5}
LAYER_ARGS = {"clarabel": {"tol": 1e-10}, "scs": {"tol": 1e-12, "max_iters": 500_000}}


def _alphas(count: int, seed: int) -> torch.Tensor:
    """Exponents spread over (0.1, 0.9), a quarter of them exactly ½ (as x² and geo_mean use)."""
    g = torch.Generator().manual_seed(seed)
    a = 0.1 + 0.8 * torch.rand(count, generator=g, dtype=torch.float64)
    a[::4] = 0.5
    return a


def _geo(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return x.clamp(min=0) ** a * y.clamp(min=0) ** (1 - a)


def _pow_points(region: str, alpha: torch.Tensor, seed: int) -> torch.Tensor:
    """``(count, 3)`` points of one region of the projection onto K_α, away from its kinks."""
    count = alpha.shape[0]
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(count, 3, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(count, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    x, y = 0.2 + 2 * u[:, 0], 0.2 + 2 * u[:, 1]
    shrink = 0.1 + 0.8 * u[:, 2]
    if region == "cone":  # strictly inside K
        return torch.stack([x, y, sign * shrink * _geo(x, y, alpha)], dim=1)
    if region == "polar":  # strictly inside K° = -K*
        w = shrink * _geo(x / alpha, y / (1 - alpha), alpha)
        return -torch.stack([x, y, sign * w], dim=1)
    if region == "plane":  # z = 0 with x y < 0: neither in K nor in K°
        return torch.stack([sign * x, -sign * y, torch.zeros_like(x)], dim=1)
    # "hard": outside all three, by rejection from a wider sample
    w = 2 * torch.randn(30 * count, 3, generator=g, dtype=torch.float64)
    a = alpha.repeat(30)
    x, y, z = w.unbind(1)
    in_k = (x >= 0) & (y >= 0) & (_geo(x, y, a) >= z.abs())
    in_polar = (x <= 0) & (y <= 0) & (_geo(-x / a, -y / (1 - a), a) >= z.abs())
    keep = ~(in_k | in_polar)
    # Candidate i has exponent alpha[i % count]: take slot j's first accepted candidate.
    out = torch.empty(count, 3, dtype=torch.float64)
    for j in range(count):
        idx = torch.nonzero(keep[j::count])[0, 0]
        out[j] = w[j + count * idx]
    return out


def _dist_k(p: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """An upper bound on the distance of ``(N, 3)`` points to K_α (0 inside): the cost of the
    cheapest of three feasible repairs (lower |z|, raise x, raise y) after clipping x, y."""
    x, y, z = p.unbind(-1)
    b = 1 - a
    neg = torch.sqrt(x.clamp(max=0) ** 2 + y.clamp(max=0) ** 2)
    xp, yp, az = x.clamp(min=0), y.clamp(min=0), z.abs()
    lower_z = (az - xp**a * yp**b).clamp(min=0)
    ys, xs = torch.where(yp > 0, yp, 1.0), torch.where(xp > 0, xp, 1.0)
    raise_x = torch.where(yp > 0, ((az / ys**b) ** (1 / a) - xp).clamp(min=0), torch.inf)
    raise_y = torch.where(xp > 0, ((az / xs**a) ** (1 / b) - yp).clamp(min=0), torch.inf)
    return neg + torch.minimum(lower_z, torch.minimum(raise_x, raise_y))


def _dist_kstar(d: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """An upper bound on the distance to K_α*: T = diag(1/α, 1/(1-α), 1) maps K* onto K and
    T⁻¹ is a contraction, so dist(d, K*) <= dist(T d, K)."""
    u, v, w = d.unbind(-1)
    return _dist_k(torch.stack([u / a, v / (1 - a), w], dim=-1), a)


def _project(v: torch.Tensor, alpha: torch.Tensor, dual: bool = False) -> torch.Tensor:
    """Project ``(N, 3)`` points, each onto its own cone, through the public batched API."""
    dims = ConeDims(pow=tuple(alpha.tolist()))
    f = proj_dual if dual else proj_primal
    return f(v.reshape(1, -1), dims).reshape(-1, 3)


# --------------------------------------------------------------------------------------------
# Projections
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("region", ["cone", "polar", "plane"])
def test_closed_form_regions(region: str) -> None:
    alpha = _alphas(20, seed=1)
    v = _pow_points(region, alpha, seed=2)
    expected = {
        "cone": v,
        "polar": torch.zeros_like(v),
        "plane": torch.stack([v[:, 0].clamp(min=0), v[:, 1].clamp(min=0), v[:, 2]], dim=1),
    }[region]
    torch.testing.assert_close(_project(v, alpha), expected, rtol=0, atol=0)


@pytest.mark.parametrize("region", ["cone", "polar", "plane", "hard"])
def test_against_cvxpy(region: str) -> None:
    alpha = _alphas(20, seed=3)
    v = _pow_points(region, alpha, seed=4)
    a = alpha.numpy()
    ref = _cvxpy_projection(v.numpy(), lambda p: [cp.PowCone3D(p[:, 0], p[:, 1], p[:, 2], a)])
    np.testing.assert_allclose(_project(v, alpha).numpy(), ref, atol=TOL["solver"])
    # The dual cone through CVXPY's primal one: (u, v, w) ∈ K* iff (u/α, v/(1-α), w) ∈ K.
    dual_ref = _cvxpy_projection(
        v.numpy(), lambda p: [cp.PowCone3D(p[:, 0] / a, p[:, 1] / (1 - a), p[:, 2], a)]
    )
    np.testing.assert_allclose(_project(v, alpha, dual=True).numpy(), dual_ref,
                               atol=TOL["solver"])


def test_against_high_precision() -> None:
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 50
    alpha = _alphas(12, seed=5)
    v = _pow_points("hard", alpha, seed=6)
    p = _project(v, alpha)
    for vi, pi, ai in zip(v.tolist(), p.tolist(), alpha.tolist()):
        # Reference: Hien's equation Φ(r) = 0 in r itself, in 50 digits, on (0, |z0|).
        x0, y0, z0 = map(mp.mpf, vi)
        a, c = mp.mpf(ai), abs(mp.mpf(vi[2]))

        def xy(r):
            mu = c - r
            x = (x0 + mp.sqrt(x0**2 + 4 * a * r * mu)) / 2
            return x, (y0 + mp.sqrt(y0**2 + 4 * (1 - a) * r * mu)) / 2

        def phi(r):
            x, y = xy(r)
            return x**a * y ** (1 - a) - r

        lo, hi = mp.mpf(0), c  # Φ > 0 near 0 and Φ(c) < 0: plain bisection, 200 halvings
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if phi(mid) > 0 else (lo, mid)
        r = (lo + hi) / 2
        x, y = xy(r)
        ref = [float(x), float(y), float(mp.sign(z0) * r)]
        np.testing.assert_allclose(pi, ref, rtol=0, atol=1e-14 * max(1.0, max(map(abs, vi))))


def test_moreau_on_wide_dynamic_range() -> None:
    # Every sign and magnitudes from e^-20 to e^20 in each coordinate (Friberg's exp-cone grid),
    # for exponents near both ends and in between, in one call.
    mags = [math.exp(k) for k in range(-20, 21, 10)]
    grid = torch.tensor([-m for m in mags] + [0.0] + mags, dtype=torch.float64)
    points = torch.cartesian_prod(grid, grid, grid)
    exponents = [0.02, 0.3, 0.5, 0.7, 0.98]
    v = points.repeat(len(exponents), 1)
    alpha = torch.tensor(exponents, dtype=torch.float64).repeat_interleave(points.shape[0])
    p = _project(v, alpha)
    d = _project(-v, alpha, dual=True)  # Π_{K°}(v) = -Π_{K*}(-v)
    scale = torch.linalg.vector_norm(v, dim=1).clamp(min=1)
    assert torch.isfinite(p).all() and torch.isfinite(d).all()
    assert ((p - d - v).norm(dim=1) / scale).max() <= 1e-15
    assert (_dist_k(p, alpha) / scale).max() <= 1e-13
    assert (_dist_kstar(d, alpha) / scale).max() <= 1e-13
    assert ((p * d).sum(1).abs() / scale**2).max() <= 1e-14


def test_extreme_magnitudes() -> None:
    big, tiny = 1e300, 1e-300
    v = torch.tensor(
        [[big, -big, 1.0], [-1e-3, 1e-7, -big], [-big, tiny, -1e-17], [tiny, tiny, -tiny],
         [1.0, big, -big], [-big, big, big], [tiny, -tiny, 1.0]],
        dtype=torch.float64,
    )
    alpha = torch.tensor([0.3, 0.5, 0.7, 0.5, 0.1, 0.9, 0.5], dtype=torch.float64)
    p = _project(v, alpha)
    assert torch.isfinite(p).all()
    scale = v.abs().amax(1, keepdim=True)
    p, v = p / scale, v / scale
    assert (_dist_k(p, alpha) <= 1e-12).all()
    assert ((p * (p - v)).sum(1).abs() <= 1e-12).all()
    jac = dproj_dual(v.reshape(1, -1), ConeDims(pow=tuple(alpha.tolist()))).dense()
    assert torch.isfinite(jac).all()


def test_mixed_cones_moreau_and_float32() -> None:
    dims = ConeDims(zero=1, nonneg=2, soc=(3,), psd=(2,), exp=2, pow=(0.3, 0.5, 0.8))
    v = torch.randn(10, dims.size, generator=torch.Generator().manual_seed(7),
                    dtype=torch.float64)
    p, d = proj_primal(v, dims), proj_dual(-v, dims)
    torch.testing.assert_close(p - d, v, rtol=0, atol=TOL["exact"])
    assert (p * d).sum(1).abs().max() <= TOL["exact"]
    torch.testing.assert_close(proj_primal(p, dims), p, rtol=0, atol=TOL["exact"])
    out = proj_primal(v.float(), dims)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), p, rtol=0, atol=TOL["float32"])
    assert dproj_dual(v.float(), dims).dense().dtype == torch.float32


# --------------------------------------------------------------------------------------------
# Jacobian
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("region", ["cone", "polar", "hard"])
def test_jacobian_against_finite_differences(region: str) -> None:
    # proj_dual at v evaluates Π_K at -v, so -points of each region probe each branch; the
    # check also covers symmetry, eigenvalues in [0, 1] and matvec against the dense matrix.
    alpha = _alphas(20, seed=8)
    v = -_pow_points(region, alpha, seed=9)
    dims = ConeDims(pow=tuple(alpha[:5].tolist()))
    _check_jacobian(v[torch.arange(20).reshape(4, 5)].reshape(4, 15), dims)


def test_jacobian_of_primal_projection_small_alpha() -> None:
    # Small α puts the root where p_x is ~1e-28 of |z0|: the formula must not cancel there.
    alpha = torch.tensor([0.02, 0.05, 0.95], dtype=torch.float64)
    v = torch.tensor([[-0.4, 1.3, 0.03, 0.06, -0.06, 0.02, 1.2, -0.5, 0.04]],
                     dtype=torch.float64)
    _check_jacobian(-v, ConeDims(pow=tuple(alpha.tolist())))


@pytest.mark.parametrize("alpha_value", [0.3, 0.5, 0.7])
def test_jacobian_on_the_plane_is_the_limit(alpha_value: float) -> None:
    # On z0 = 0 the projection has a kink; the Jacobian returned there is the limit z0 → 0.
    v = torch.tensor([[-0.7, 1.3, 0.0], [1.3, -0.7, 0.0]], dtype=torch.float64)
    dims = ConeDims(pow=(alpha_value, alpha_value))
    at_plane = dproj_dual(-v.reshape(1, -1), dims).dense()
    near = v.clone()
    near[:, 2] = 1e-9
    nearby = dproj_dual(-near.reshape(1, -1), dims).dense()
    torch.testing.assert_close(at_plane, nearby, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Backends and layers
# --------------------------------------------------------------------------------------------


def _power_problem():
    x, a = cp.Variable(3), cp.Parameter(3)
    prob = cp.Problem(cp.Minimize(cp.sum(cp.power(x, 1.5, approx=False)) - a @ x), [x <= 2])
    return prob, [a], [x], lambda rng, B: [rng.uniform(0.3, 2.5, (*B, 3))]


def _pnorm_problem():
    x, A, b = cp.Variable(3), cp.Parameter((5, 3)), cp.Parameter(5)
    prob = cp.Problem(cp.Minimize(cp.pnorm(A @ x - b, 3, approx=False) + cp.sum_squares(x)))
    return prob, [A, b], [x], lambda rng, B: [rng.standard_normal((*B, 5, 3)),
                                              rng.standard_normal((*B, 5))]


def _geo_mean_problem():
    x, c, d = cp.Variable(3), cp.Parameter(3), cp.Parameter()
    con = c @ x <= d
    prob = cp.Problem(cp.Maximize(cp.geo_mean(x, [0.2, 0.3, 0.5], approx=False)), [con])
    return prob, [c, d], [x, con.dual_variables[0]], lambda rng, B: [
        rng.uniform(0.5, 2.0, (*B, 3)), rng.uniform(0.5, 2.0, B)]


def _pow_cone_problem():
    x, z = cp.Variable(3), cp.Parameter(3)
    con = cp.PowCone3D(x[0], x[1], x[2], 0.3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - z)), [con])

    def sample(rng, B):  # outside K and K°: the constraint is active, the dual nonzero
        z = rng.standard_normal((*B, 3))
        z[..., 2] = 3 + np.abs(z[..., 2])
        return [z]

    # PowCone3D has one dual variable per coordinate (x, y, z rows); return all three.
    return prob, [z], [x, *con.dual_variables], sample


PROBLEMS = {"power": _power_problem, "pnorm": _pnorm_problem, "geo_mean": _geo_mean_problem,
            "pow_cone": _pow_cone_problem}


def _cvxpy_reference(prob, params, outputs, values):
    for p, val in zip(params, values):
        p.value = val
    # CVXPY hands geo_mean to Clarabel as an n-dimensional power cone, on which Clarabel reports
    # "almost solved" below 1e-9 even where it is accurate to 1e-11 (against w d / c).
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    assert prob.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE), prob.status
    return [np.asarray(o.value) for o in outputs]


@pytest.mark.parametrize("solver", ["clarabel", "scs"])
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_layer_matches_cvxpy(name: str, solver: str) -> None:
    prob, params, outputs, sample = PROBLEMS[name]()
    layer = CvxpyLayer(prob, params, outputs, solver=solver, solver_args=LAYER_ARGS[solver])
    rng = np.random.default_rng(10)
    batched = sample(rng, (3,))
    outs = layer(*map(torch.as_tensor, batched))
    for i in range(3):
        ref = _cvxpy_reference(prob, params, outputs, [v[i] for v in batched])
        for out, r in zip(outs, ref):
            tol = LAYER_TOL[solver] * max(1.0, np.abs(r).max())
            np.testing.assert_allclose(out[i].numpy(), r, rtol=0, atol=tol)
    single = [v[0] for v in batched]  # unbatched call: no leading dimension in or out
    outs1 = layer(*map(torch.as_tensor, single))
    for out1, out in zip(outs1, outs):
        assert out1.shape == out.shape[1:]
        np.testing.assert_allclose(out1.numpy(), out[0].numpy(), rtol=0,
                                   atol=LAYER_TOL[solver])


@pytest.mark.parametrize("batch", [(), (2,)], ids=["unbatched", "batched"])
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_layer_gradcheck(name: str, batch: tuple) -> None:
    prob, params, outputs, sample = PROBLEMS[name]()
    layer = CvxpyLayer(prob, params, outputs, solver="scs", solver_args=LAYER_ARGS["scs"])
    values = tuple(torch.as_tensor(v).requires_grad_() for v in sample(np.random.default_rng(11),
                                                                        batch))
    # eps = 1e-5: SCS's ~1e-11 solution noise over a 1e-6 step would reach gradcheck's atol.
    assert torch.autograd.gradcheck(lambda *t: layer(*t), values, eps=1e-5, atol=1e-5, rtol=1e-4)


def test_layer_gradient_with_clarabel() -> None:
    # Clarabel's gradients are as accurate as its solution: compare with SCS's tight ones.
    prob, params, outputs, sample = _geo_mean_problem()
    values = [torch.as_tensor(v) for v in sample(np.random.default_rng(12), (3,))]
    grads = {}
    for solver in ("clarabel", "scs"):
        layer = CvxpyLayer(prob, params, outputs, solver=solver, solver_args=LAYER_ARGS[solver])
        req = [v.clone().requires_grad_() for v in values]
        x, _ = layer(*req)
        grads[solver] = torch.autograd.grad((x * torch.arange(1.0, 4.0)).sum(), req)
    for g, g_ref in zip(grads["clarabel"], grads["scs"]):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=LAYER_TOL["clarabel"])


def test_auto_picks_clarabel_and_others_refuse_clearly() -> None:
    prob, params, outputs, _ = _power_problem()
    assert CvxpyLayer(prob, params, outputs).template.dims.kinds() == frozenset({"nonneg", "pow"})
    dims = ConeDims(nonneg=3, pow=(0.5,))
    assert get_backend("auto", dims).name == "clarabel"
    for solver in ("native", "ecos"):
        with pytest.raises(ProblemError, match=f"solver '{solver}' does not support the "
                                               "cone\\(s\\) \\['pow'\\]; choose another solver"):
            CvxpyLayer(prob, params, outputs, solver=solver)
