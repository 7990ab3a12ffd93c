"""Euclidean projection onto the exponential cone and its Jacobian, batched in torch."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# K = cl{(x, y, z): y > 0, y exp(x/y) <= z},  K* = cl{(u, v, w): u < 0, -u exp(v/u) <= e w},
# polar K° = -K*.  Outside K, K° and the orthant-like region {x <= 0, y <= 0}, the Moreau pieces
# v0 = p + d (p = Π_K(v0) ∈ ∂K, d ∈ ∂K°, p ⊥ d) lie on the rays
#
#     p = s (ρ, 1, e^ρ),    d = a (1, 1 - ρ, -e^{-ρ}),    s, a > 0,
#
# for one ρ (the rays are orthogonal for every ρ). Matching the first two coordinates gives
#
#     s(ρ) = ((ρ - 1) x0 + y0) / q(ρ),   a(ρ) = (x0 - ρ y0) / q(ρ),   q(ρ) = ρ² - ρ + 1 > 0,
#
# and matching the third gives the scalar equation of Friberg (2021), "Projection onto the
# exponential cone: a univariate root-finding problem":
#
#     h(ρ) = ((ρ - 1) x0 + y0) e^ρ - (x0 - ρ y0) e^{-ρ} - q(ρ) z0 = 0.
#
# s > 0 and a > 0 confine ρ to (1 - y0/x0, x0/y0) (an end is infinite when x0 <= 0 or y0 <= 0).
# The root there is unique (the Moreau decomposition is), h < 0 at the low end (v0 ∉ K°) and
# h > 0 at the high end (v0 ∉ K), so bisection on the sign of h converges to it.


def _exp_hsign(rho: Tensor, x0: Tensor, y0: Tensor, z0: Tensor) -> Tensor:
    """``h(ρ) e^{-|ρ|}``: the sign of Friberg's ``h`` without overflowing ``exp``."""
    absr = rho.abs()
    q = rho * rho - rho + 1
    return (
        ((rho - 1) * x0 + y0) * torch.exp(rho - absr)
        - (x0 - rho * y0) * torch.exp(-rho - absr)
        - q * z0 * torch.exp(-absr)
    )


def _exp_bracket(x0: Tensor, y0: Tensor, z0: Tensor) -> tuple[Tensor, Tensor]:
    """A finite bracket ``[lo, hi]`` of the root of ``h``, assuming ``x0 > 0`` or ``y0 > 0``.

    Besides the ends ``1 - y0/x0`` (if ``x0 > 0``) and ``x0/y0`` (if ``y0 > 0``), bound ρ with
    nonexpansiveness, ``|p|, |d| <= N = ||v0||``:
      * if x0 > 0: ``s = x0 (ρ - (1 - y0/x0)) / q`` and ``p_z = s e^ρ <= N``. For
        ``ρ >= max(1 - y0/x0 + 1, 20)``, ``q <= ρ²`` and ``e^{ρ/2} >= ρ²`` give
        ``e^{ρ/2} <= N / x0``, so ``ρ <= max(1 - y0/x0 + 1, 20, 2 log(2N / x0))``;
      * if y0 > 0: symmetrically ``a = y0 (x0/y0 - ρ) / q`` and ``|d_z| = a e^{-ρ} <= N`` give
        ``ρ >= min(x0/y0 - 1, -20, -2 log(2N / y0))``.
    """
    norm = torch.sqrt(x0 * x0 + y0 * y0 + z0 * z0)
    xpos, ypos = x0 > 0, y0 > 0
    x_safe = torch.where(xpos, x0, 1.0)
    y_safe = torch.where(ypos, y0, 1.0)
    base_lo = 1 - y0 / x_safe
    base_hi = x0 / y_safe
    bound_hi = torch.maximum(
        torch.clamp(base_lo + 1, min=20.0), 2 * (torch.log(2 * norm) - torch.log(x_safe))
    )
    bound_lo = torch.minimum(
        torch.clamp(base_hi - 1, max=-20.0), -2 * (torch.log(2 * norm) - torch.log(y_safe))
    )
    hi = torch.where(xpos, bound_hi, base_hi)
    hi = torch.where(xpos & ypos, torch.minimum(base_hi, bound_hi), hi)
    lo = torch.where(ypos, bound_lo, base_lo)
    lo = torch.where(xpos & ypos, torch.maximum(base_lo, bound_lo), lo)
    return lo, hi


def _exp_root(x0: Tensor, y0: Tensor, z0: Tensor) -> Tensor:
    """Solve ``h(ρ) = 0`` by bisection on a guaranteed bracket, to machine precision."""
    lo, hi = _exp_bracket(x0, y0, z0)
    eps = torch.finfo(x0.dtype).eps
    # The bracket is at most a few thousand wide; 2**-200 of that is far below eps.
    for it in range(200):
        mid = 0.5 * (lo + hi)
        below = _exp_hsign(mid, x0, y0, z0) < 0
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
        if it % 8 == 7 and bool(((hi - lo) <= 2 * eps * torch.clamp(mid.abs(), min=1.0)).all()):
            break
    return 0.5 * (lo + hi)


def _exp_root_point(rho: Tensor, x0: Tensor, y0: Tensor, z0: Tensor) -> Tensor:
    """The projection ``p`` from the root ρ, by the better-conditioned of two formulas.

    ``p = s (ρ, 1, e^ρ)`` and ``p = v0 - a (1, 1 - ρ, -e^{-ρ})`` agree at the exact root, but
    the unavoidable error ``δρ ≈ eps |ρ|`` of the root (and the cancellation in the numerators
    of ``s`` and ``a``) is amplified by ``e^ρ`` in the first and by ``e^{-ρ}`` in the second.
    Estimate both errors to first order and keep, per point, the smaller.
    """
    eps = torch.finfo(rho.dtype).eps
    q = rho * rho - rho + 1
    dq = 2 * rho - 1
    num_s = (rho - 1) * x0 + y0
    num_a = x0 - rho * y0
    s = torch.clamp(num_s / q, min=0)
    a = torch.clamp(num_a / q, min=0)
    drho = eps * torch.clamp(rho.abs(), min=1.0)
    err_s = ((x0 * q - num_s * dq).abs() / (q * q)) * drho + eps * (
        (rho - 1).abs() * x0.abs() + y0.abs()
    ) / q
    err_a = ((y0 * q + num_a * dq).abs() / (q * q)) * drho + eps * (
        x0.abs() + rho.abs() * y0.abs()
    ) / q
    # Error estimates only: cap the exponent so that 0 * inf never makes them NaN.
    cap = 0.5 * math.log(torch.finfo(rho.dtype).max)
    exp_pos, exp_neg = torch.exp(rho.clamp(max=cap)), torch.exp((-rho).clamp(max=cap))
    err_primal = err_s * (rho.abs() + 1 + exp_pos)
    err_dual = err_a * (rho.abs() + 2 + exp_neg)
    # s e^ρ and a e^{-ρ} through logarithms: each is bounded by ||v0|| while e^{±ρ} may overflow.
    s_exp = torch.where(s > 0, torch.exp(rho + torch.log(torch.where(s > 0, s, 1.0))), 0.0)
    a_exp = torch.where(a > 0, torch.exp(-rho + torch.log(torch.where(a > 0, a, 1.0))), 0.0)
    primal = torch.stack([s * rho, s, s_exp], dim=-1)
    dual = torch.stack([x0 - a, y0 - a * (1 - rho), z0 + a_exp], dim=-1)
    point = torch.where((err_primal <= err_dual)[..., None], primal, dual)
    # Every point of K has y, z >= 0; clipping only removes rounding (or underflow) debris.
    return torch.cat([point[..., :1], point[..., 1:].clamp(min=0)], dim=-1)


def _exp_regions(v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Masks (in K, in the polar K°, in {x <= 0, y <= 0}) for ``(..., 3)`` points."""
    x, y, z = v.unbind(-1)
    y_safe = torch.where(y > 0, y, 1.0)
    x_safe = torch.where(x > 0, x, 1.0)
    in_k = ((y > 0) & (y * torch.exp(x / y_safe) <= z)) | ((x <= 0) & (y == 0) & (z >= 0))
    in_polar = ((x > 0) & (x * torch.exp(y / x_safe - 1) <= -z)) | (
        (x == 0) & (y <= 0) & (z <= 0)
    )
    corner = (x <= 0) & (y <= 0)
    return in_k, in_polar & ~in_k, corner & ~in_k & ~in_polar


def _exp_hard_points(v: Tensor, hard: Tensor) -> tuple[Tensor, Tensor]:
    """The root-case points scaled to ``max |v_i| = 1``, and the scales (``(N, 1)``).

    The projection is positively homogeneous, ``Π(αv) = α Π(v)``, so the root search runs on
    unit-scale points and never overflows; the other entries get a harmless stand-in point.
    """
    scale = v.abs().amax(dim=-1, keepdim=True)
    ok = hard[..., None] & (scale > 0)
    w = torch.where(ok, v / torch.where(ok, scale, 1.0), torch.ones_like(v))
    return w, torch.where(ok, scale, 1.0)


def _proj_exp_with_rho(v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Project ``(N, 3)`` points onto K_exp; also return the root ρ and the root-case mask."""
    in_k, in_polar, corner = _exp_regions(v)
    hard = ~(in_k | in_polar | corner)
    w, scale = _exp_hard_points(v, hard)
    x0, y0, z0 = w.unbind(-1)
    rho = _exp_root(x0, y0, z0)
    root_point = _exp_root_point(rho, x0, y0, z0)

    # Safeguard (as in Friberg's method): keep the closest of the root point and two feasible
    # heuristic points, so that near-degenerate inputs never end worse than a simple guess.
    def dist(p: Tensor) -> Tensor:
        return torch.linalg.vector_norm(p - w, dim=-1)

    flat = torch.stack([x0.clamp(max=0), torch.zeros_like(x0), z0.clamp(min=0)], dim=-1)
    y_pos = y0 > 0
    lift = torch.stack(
        [x0, y0, torch.maximum(z0, y0 * torch.exp(x0 / torch.where(y_pos, y0, 1.0)))], dim=-1
    )
    best = root_point
    # A root near ±inf (a coordinate at the underflow limit after scaling) gives no usable point.
    usable = torch.isfinite(rho * rho)
    best_d = torch.where(usable, dist(root_point), torch.inf)
    for cand, ok in ((flat, torch.ones_like(y_pos)), (lift, y_pos)):
        d = torch.where(ok, dist(cand), torch.inf)
        better = d < best_d
        best = torch.where(better[..., None], cand, best)
        best_d = torch.where(better, d, best_d)

    x, y, z = v.unbind(-1)
    corner_point = torch.stack([x, torch.zeros_like(y), z.clamp(min=0)], dim=-1)
    out = torch.where(hard[..., None], best * scale, torch.zeros_like(v))
    out = torch.where(corner[..., None], corner_point, out)
    out = torch.where(in_k[..., None], v, out)
    return out, rho, hard


def _proj_exp(v: Tensor) -> Tensor:
    """Project ``(..., 3)`` points onto the exponential cone K_exp."""
    shape = v.shape
    return _proj_exp_with_rho(v.reshape(-1, 3))[0].reshape(shape)


def _dproj_exp(v: Tensor) -> Tensor:
    """Jacobian ``(..., 3, 3)`` of the projection onto K_exp.

    Identity in K, zero in K°, ``diag(1, 0, 1[z > 0])`` in the region ``{x < 0, y < 0}``.
    Otherwise ``p = Π(v0)`` solves ``min ½||p - v0||²  s.t.  f(p) = y e^{x/y} - z <= 0`` with
    the constraint active: ``p - v0 + μ ∇f(p) = 0``, ``f(p) = 0``. Differentiating,

    ``(I + μ ∇²f) dp + ∇f dμ = dv0``,  ``∇fᵀ dp = 0``  ⇒  ``dp = (H⁻¹ - H⁻¹n nᵀH⁻¹ / nᵀH⁻¹n) dv0``

    with ``H = I + μ∇²f`` and ``n ∥ ∇f``. On the ray ``p = s (ρ, 1, e^ρ)``:
    ``∇f = e^ρ (1, 1 - ρ, -e^{-ρ})`` (parallel to the polar ray d), ``μ = a e^{-ρ}`` and
    ``∇²f = (e^ρ / s) w wᵀ`` with ``w = (1, -ρ, 0)``, so ``H = I + (a/s) w wᵀ`` and
    ``H⁻¹ = I - a / (s + a |w|²) w wᵀ``. The result is symmetric with eigenvalues in [0, 1].
    """
    shape = v.shape
    flat = v.reshape(-1, 3)
    _, rho, hard = _proj_exp_with_rho(flat)
    in_k, _, corner = _exp_regions(flat)
    x0, y0, _ = _exp_hard_points(flat, hard)[0].unbind(-1)
    q = rho * rho - rho + 1
    s = torch.clamp(((rho - 1) * x0 + y0) / q, min=0)
    a = torch.clamp((x0 - rho * y0) / q, min=0)

    eye = torch.eye(3, dtype=v.dtype, device=v.device)
    zero = torch.zeros_like(rho)
    one = torch.ones_like(rho)
    w = torch.stack([one, -rho, zero], dim=-1)
    coef = a / (s + a * (1 + rho * rho))
    h_inv = eye - coef[..., None, None] * w[..., :, None] * w[..., None, :]
    # The normal (1, 1 - ρ, -e^{-ρ}) rescaled by e^{min(ρ, 0)} so that nothing overflows.
    e_lo = torch.exp(torch.clamp(rho, max=0))
    n = torch.stack([e_lo, (1 - rho) * e_lo, -torch.exp(-torch.clamp(rho, min=0))], dim=-1)
    hn = (h_inv @ n[..., None]).squeeze(-1)
    jac = h_inv - hn[..., :, None] * hn[..., None, :] / (n * hn).sum(-1)[..., None, None]

    z_pos = (flat[..., 2] > 0).to(v.dtype)
    corner_jac = torch.diag_embed(torch.stack([one, zero, z_pos], dim=-1))
    # For a root at ±inf the formula's limit is the corner Jacobian (ρ → -∞: diag(1, 0, 0)).
    out = torch.where(torch.isfinite(jac), jac, corner_jac)
    out = torch.where(hard[..., None, None], out, torch.zeros_like(jac))
    out = torch.where(corner[..., None, None], corner_jac, out)
    out = torch.where(in_k[..., None, None], eye, out)
    return out.reshape(*shape, 3)
