"""Euclidean projection onto the 3D power cone and its Jacobian, batched in torch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# K_α = {(x, y, z): x^α y^(1-α) >= |z|, x, y >= 0},
# K_α* = {(u, v, w): (u/α)^α (v/(1-α))^(1-α) >= |w|, u, v >= 0},  polar K° = -K*.
# Outside K, K° and the plane z0 = 0, the projection p of v0 lies on the boundary of K with
# p_x, p_y > 0 and |p_z| = r ∈ (0, |z0|). Stationarity of ½||p - v0||² + μ (|p_z| - p_x^α p_y^(1-α))
# gives μ = |z0| - r and, with p_x^α p_y^(1-α) = r,
#
#     p_x = x(r) = ½ (x0 + sqrt(x0² + 4 α r μ)),   p_y = y(r) = ½ (y0 + sqrt(y0² + 4 (1-α) r μ)),
#
# so r is a root of Φ(r) = x(r)^α y(r)^(1-α) - r on (0, |z0|) (Hien 2015, "Differential properties
# of Euclidean projection onto power cone"). Φ > 0 for small r > 0 (as v0 ∉ K°) and Φ(|z0|) < 0
# (as v0 ∉ K). Every root gives an orthogonal pair p ∈ ∂K, v0 - p ∈ ∂K°, i.e. the Moreau
# decomposition, which is unique: so is the root, and bisection on the sign of Φ finds it.
#
# The root can lie closer to either end than a float near |z0| resolves (for small α,
# p_x ≈ (r/p_y)^{1/α} and μ ∝ p_x can be 1e-26 |z0|), so the search runs on s = log(r/μ), with
# r, μ and the sign of Φ evaluated through logarithms.

# Half-width of the bracket of s: e^{-1500} is far below any float's smallest positive number.
_POW_S_MAX = 1500.0


def _softplus(t: Tensor) -> Tensor:
    """``log(1 + e^t)`` to full precision (torch's softplus switches to ``t`` at ``t > 20``)."""
    return t.clamp(min=0) + torch.log1p(torch.exp(-t.abs()))


def _pow_log_xy(
    lr: Tensor, lm: Tensor, x0: Tensor, y0: Tensor, alpha: Tensor
) -> tuple[Tensor, Tensor]:
    """``log x(r)`` and ``log y(r)`` from ``log r`` and ``log μ``, with no cancellation for
    negative ``x0, y0`` and no underflow of ``r μ``."""

    def part(c0: Tensor, k: Tensor) -> Tensor:
        lprod = lr + lm + torch.log(4 * k)  # log(4 k r μ)
        disc = torch.sqrt(c0 * c0 + torch.exp(lprod))
        # c0 < 0: ½ (c0 + disc) cancels; (disc - c0)(disc + c0) = 4 k r μ gives it exactly.
        neg = lprod - torch.log(2 * torch.where(c0 < 0, disc - c0, 1.0))
        pos = torch.log(0.5 * (c0 + disc))
        return torch.where(c0 < 0, neg, torch.where(c0 > 0, pos, 0.5 * lprod - math.log(2)))

    return part(x0, alpha), part(y0, 1 - alpha)


@dataclass
class _PowRoot:
    """The root case of the power-cone projection of ``(N, 3)`` points.

    ``hard`` marks the points of that case. For them, in coordinates scaled by ``1 / scale``
    (``max |v_i| = 1``), the projection is ``(x, y, sign · r)``, ``mu = |z0| - r``, and ``log_*``
    are the logarithms of ``x, y, r, mu`` (finite where the values underflow). The other points
    carry a harmless stand-in.
    """

    hard: Tensor
    log_x: Tensor
    log_y: Tensor
    log_r: Tensor
    log_mu: Tensor
    sign: Tensor
    scale: Tensor


def _pow_root(x0: Tensor, y0: Tensor, z0: Tensor, alpha: Tensor) -> tuple[Tensor, ...]:
    """Solve ``Φ(r) = 0`` on ``(0, |z0|)`` by bisection on ``s = log(r / μ)``.

    Returns ``(log x, log y, log r, log μ)`` at the root. ``r = |z0| σ(s)`` and ``μ = |z0| σ(-s)``
    keep their relative precision wherever the root is; the bisection stops at machine
    precision in ``s``.
    """
    log_a = torch.log(z0.abs())
    lo = torch.full_like(log_a, -_POW_S_MAX)
    hi = torch.full_like(log_a, _POW_S_MAX)
    eps = torch.finfo(z0.dtype).eps

    def at(s: Tensor) -> tuple[Tensor, ...]:
        lr, lm = log_a - _softplus(-s), log_a - _softplus(s)
        return (*_pow_log_xy(lr, lm, x0, y0, alpha), lr, lm)

    for it in range(200):  # log2(3000 / eps) ≈ 64 halvings suffice in float64
        mid = 0.5 * (lo + hi)
        lx, ly, lr, _ = at(mid)
        positive = alpha * lx + (1 - alpha) * ly > lr
        lo = torch.where(positive, mid, lo)
        hi = torch.where(positive, hi, mid)
        if it % 8 == 7 and bool(((hi - lo) <= 2 * eps * mid.abs().clamp(min=1.0)).all()):
            break
    return at(0.5 * (lo + hi))


def _pow_regions(v: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Masks (in K, in the polar K°, on the plane z = 0 outside both) for ``(N, 3)`` points."""
    x, y, z = v.unbind(-1)
    az, beta = z.abs(), 1 - alpha
    in_k = (x >= 0) & (y >= 0) & (x.clamp(min=0) ** alpha * y.clamp(min=0) ** beta >= az)
    in_polar = (
        (x <= 0) & (y <= 0)
        & ((-x / alpha).clamp(min=0) ** alpha * (-y / beta).clamp(min=0) ** beta >= az)
    )
    flat = (z == 0) & ~in_k & ~in_polar
    return in_k, in_polar, flat


def _pow_solve(v: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor, _PowRoot]:
    """Regions (in K, on the plane) and the root case of the projection of ``(N, 3)`` points
    onto ``K_α`` (``alpha``: ``(N,)``)."""
    in_k, in_polar, flat = _pow_regions(v, alpha)
    hard = ~(in_k | in_polar | flat)
    # Π is positively homogeneous: root-search unit-scale points; (0, 0, 1) stands in for others.
    scale = v.abs().amax(dim=-1)
    scale = torch.where(hard, scale, 1.0)
    w = torch.where(hard[..., None], v / scale[..., None], v.new_tensor([0.0, 0.0, 1.0]))
    x0, y0, z0 = w.unbind(-1)
    lx, ly, lr, lm = _pow_root(x0, y0, z0, alpha)
    sign = torch.where(z0 < 0, -1.0, 1.0).to(v.dtype)
    return in_k, flat, _PowRoot(hard, lx, ly, lr, lm, sign, scale)


def _proj_pow(v: Tensor, alpha: Tensor) -> Tensor:
    """Project ``(..., 3)`` points onto ``K_α``; ``alpha`` broadcasts against ``v[..., 0]``."""
    shape = v.shape
    flat_v = v.reshape(-1, 3)
    alpha = torch.broadcast_to(alpha.to(v), shape[:-1]).reshape(-1)
    in_k, flat, root = _pow_solve(flat_v, alpha)
    point = torch.stack(
        [torch.exp(root.log_x), torch.exp(root.log_y), root.sign * torch.exp(root.log_r)], dim=-1
    )
    x, y, _ = flat_v.unbind(-1)
    plane = torch.stack([x.clamp(min=0), y.clamp(min=0), torch.zeros_like(x)], dim=-1)
    out = torch.where(root.hard[..., None], point * root.scale[..., None], torch.zeros_like(flat_v))
    out = torch.where(flat[..., None], plane, out)
    out = torch.where(in_k[..., None], flat_v, out)
    return out.reshape(shape)


def _pow_plane_jac(v: Tensor, alpha: Tensor) -> Tensor:
    """The limit of ``DΠ_K`` at a point ``(x0, y0, 0)`` with ``x0 y0 < 0`` as ``z0 → 0``.

    For ``x0 < 0 < y0``: ``p → (0, y0, 0)`` and the root satisfies ``r / |z0| → 0`` if
    ``α > ½``, ``→ 1`` if ``α < ½`` and ``→ y0 / (2|x0| + y0)`` if ``α = ½`` (expand ``Φ`` for
    small ``z0``), so the limit is ``diag(0, 1, c)`` with ``c`` that ratio. The case
    ``y0 < 0 < x0`` is the mirror image (swap x with y and α with 1 - α).
    """
    x, y, _ = v.unbind(-1)
    one, zero = torch.ones_like(x), torch.zeros_like(x)

    def ratio(neg: Tensor, pos: Tensor, k: Tensor) -> Tensor:  # neg < 0 < pos; k: neg's exponent
        half = pos / torch.where(pos > 0, 2 * neg.abs() + pos, 1.0)
        return torch.where(k > 0.5, zero, torch.where(k < 0.5, one, half))

    c = torch.where(x < 0, ratio(x, y, alpha), ratio(y, x, 1 - alpha))
    c = torch.where((x < 0) ^ (y < 0), c, zero)
    return torch.diag_embed(torch.stack([(x > 0).to(v.dtype), (y > 0).to(v.dtype), c], dim=-1))


def _dproj_pow(v: Tensor, alpha: Tensor) -> Tensor:
    """Jacobian ``(..., 3, 3)`` of the projection onto ``K_α``.

    Identity in K, zero in K°, the limit :func:`_pow_plane_jac` on the plane ``z0 = 0``.
    Otherwise ``p`` solves ``min ½||p - v0||²  s.t.  f(p) = σ p_z - p_x^α p_y^(1-α) <= 0``
    (``σ = sign z0``) with the constraint active; differentiating ``p - v0 + μ ∇f(p) = 0``,
    ``f(p) = 0`` gives ``dp = (H⁻¹ - H⁻¹n nᵀH⁻¹ / nᵀH⁻¹n) dv0`` with ``H = I + μ ∇²f`` and
    ``n ∥ ∇f``. At ``p = (x, y, σ r)``: ``∇f = (-α r / x, -(1-α) r / y, σ)`` and
    ``∇²f = α (1-α) r w̃ w̃ᵀ``, ``w̃ = (1/x, -1/y, 0)``, a rank-one matrix. In the orthonormal
    basis ``e1 = (x, y, 0) / ρ``, ``e2 = (0, 0, 1)``, ``e3 = (y, -x, 0) / ρ`` (``ρ = |(x, y)|``),
    with ``D = (xy)² + μ α (1-α) r ρ²`` and ``t = r ((1-α) x² - α y²) / ρ``:

    ``H⁻¹ = diag(1, 1, (xy)² / D)``,  ``n = (-r / ρ, σ, t / (xy))``,
    ``H⁻¹n = (-r / ρ, σ, t xy / D)``,  ``nᵀH⁻¹n = r² / ρ² + 1 + t² / D >= 1``.

    ``xy`` and ``D`` are formed from logarithms, so a tiny ``x`` or ``y`` (small α) neither
    underflows nor cancels. The result is symmetric with eigenvalues in [0, 1].
    """
    shape = v.shape
    flat_v = v.reshape(-1, 3)
    alpha = torch.broadcast_to(alpha.to(v), shape[:-1]).reshape(-1)
    beta = 1 - alpha
    in_k, flat, root = _pow_solve(flat_v, alpha)
    lx, ly = root.log_x, root.log_y
    log_rho = 0.5 * torch.logaddexp(2 * lx, 2 * ly)
    ex, ey = torch.exp(lx - log_rho), torch.exp(ly - log_rho)  # (x, y) / ρ
    r = torch.exp(root.log_r)
    t = r * (beta * torch.exp(lx) * ex - alpha * torch.exp(ly) * ey)
    log_d = torch.logaddexp(
        2 * (lx + ly), root.log_mu + torch.log(alpha * beta) + root.log_r + 2 * log_rho
    )
    lam = torch.exp(2 * (lx + ly) - log_d)
    hn = torch.stack([-r * torch.exp(-log_rho), root.sign, t * torch.exp(lx + ly - log_d)], -1)
    inner = 1 + hn[..., 0] ** 2 + t * t * torch.exp(-log_d)
    one, zero = torch.ones_like(r), torch.zeros_like(r)
    jac_basis = torch.diag_embed(torch.stack([one, one, lam], -1))
    jac_basis = jac_basis - hn[..., :, None] * hn[..., None, :] / inner[..., None, None]
    Q = torch.stack(
        [torch.stack([ex, ey, zero], -1), torch.stack([zero, zero, one], -1),
         torch.stack([ey, -ex, zero], -1)],
        dim=-1,
    )  # columns e1, e2, e3
    jac = Q @ jac_basis @ Q.mT

    eye = torch.eye(3, dtype=v.dtype, device=v.device)
    plane_jac = _pow_plane_jac(flat_v, alpha)
    # A guard (no test point reaches it): a non-finite formula falls back to the plane's limit.
    out = torch.where(torch.isfinite(jac).all(-1).all(-1)[..., None, None], jac, plane_jac)
    out = torch.where(root.hard[..., None, None], out, torch.zeros_like(jac))
    out = torch.where(flat[..., None, None], plane_jac, out)
    out = torch.where(in_k[..., None, None], eye, out)
    return out.reshape(*shape, 3)
