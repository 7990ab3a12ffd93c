"""Matrix-free solves of :math:`H u = v` for a symmetric Hessian given by its products.

The implicit backward (see :mod:`diffopt.bilevel.implicit`) needs one solve with the inner
Hessian :math:`H = \\nabla^2_{ww} f(w^\\star, \\lambda)`, available only through Hessian-vector
products (one double-backward each). All solvers work on flat vectors and report the relative
residual :math:`\\|Hu - v\\| / \\|v\\|` they reached and the number of products they used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LinearSolveInfo:
    """Outcome of one linear solve in an implicit backward pass.

    Attributes:
        solver: ``"cg"``, ``"neumann"`` or ``"direct"``.
        iterations: Hessian-vector products spent (for ``"direct"``: the matrix dimension).
        residual: relative residual :math:`\\|Hu - v\\| / \\|v\\|` of the returned solution.
        converged: whether ``residual`` reached the requested tolerance.

    Examples:
        >>> import torch
        >>> import diffopt.bilevel as bl
        >>> lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        >>> f = lambda w, lam: ((w - 3.0) ** 2).sum() + lam * (w ** 2).sum()
        >>> w, diag = bl.minimize(f, torch.zeros(2, dtype=torch.float64), lam, steps=200, lr=0.2,
        ...                       backward=bl.Implicit(solver="cg"), return_diagnostics=True)
        >>> w.sum().backward()
        >>> diag.linear_solve.converged, diag.linear_solve.residual < 1e-10
        (True, True)
    """

    solver: str
    iterations: int
    residual: float
    converged: bool


def _relative(r: torch.Tensor, v_norm: torch.Tensor) -> float:
    return float(r.norm() / v_norm) if v_norm > 0 else 0.0


class WarmStart:
    """The previous implicit solve's solution, kept to start the next solve from it.

    In an outer loop the hyperparameters, the inner solution and the upstream gradient change
    little from one step to the next, and so does the solution :math:`u` of :math:`Hu = v`.
    Pass one instance as ``Implicit(warm_start=...)`` and reuse the strategy across outer steps:
    ``"cg"`` and ``"neumann"`` then start from the last :math:`u` (when its shape, dtype and
    device match) instead of zero. The tolerance, and so the accuracy, is unchanged.

    Examples:
        >>> import torch
        >>> H = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> state = WarmStart()
        >>> v = torch.ones(2, dtype=torch.float64)
        >>> u, cold = cg(lambda p: H @ p, v, maxiter=10, tol=1e-12, x0=state.initial(v))
        >>> state.solution = u
        >>> _, warm = cg(lambda p: H @ p, v, maxiter=10, tol=1e-12, x0=state.initial(v))
        >>> cold.iterations, warm.iterations  # warm: one product to check the residual
        (2, 1)
    """

    def __init__(self) -> None:
        self.solution: torch.Tensor | None = None

    def initial(self, v: torch.Tensor) -> torch.Tensor | None:
        """The stored solution if it fits ``v``, else ``None`` (start from zero)."""
        u = self.solution
        if u is None or u.shape != v.shape or u.dtype != v.dtype or u.device != v.device:
            return None
        return u


def _start(
    matvec: Matvec, v: torch.Tensor, x0: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Initial iterate, residual and products spent: zero, or ``x0`` (one product)."""
    if x0 is None:
        return torch.zeros_like(v), v.clone(), 0
    return x0.clone(), v - matvec(x0), 1


def cg(
    matvec: Matvec, v: torch.Tensor, *, maxiter: int, tol: float, x0: torch.Tensor | None = None
) -> tuple[torch.Tensor, LinearSolveInfo]:
    """Conjugate gradients for a symmetric positive-definite ``H``, started at ``x0`` or zero.

    Examples:
        >>> import torch
        >>> H = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> u, info = cg(lambda p: H @ p, torch.ones(2, dtype=torch.float64), maxiter=10, tol=1e-12)
        >>> info.iterations, info.converged
        (2, True)
    """
    u, r, it = _start(matvec, v, x0)
    p = r.clone()
    rr = r @ r
    v_norm = v.norm()
    while it < maxiter and _relative(r, v_norm) > tol:
        Hp = matvec(p)
        pHp = p @ Hp
        if pHp <= 0:  # H is not positive definite along p: CG cannot continue
            break
        alpha = rr / pHp
        u = u + alpha * p
        r = r - alpha * Hp
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
        it += 1
    res = _relative(r, v_norm)
    return u, LinearSolveInfo("cg", it, res, res <= tol)


def largest_eigenvalue(matvec: Matvec, like: torch.Tensor, iters: int = 20) -> float:
    """Power-iteration estimate of the largest eigenvalue magnitude of ``H`` (from below)."""
    gen = torch.Generator(device=like.device).manual_seed(0)
    x = torch.randn(like.shape, generator=gen, dtype=like.dtype, device=like.device)
    x = x / x.norm()
    est = 0.0
    for _ in range(iters):
        y = matvec(x)
        est = float(y.norm())
        if est == 0.0:
            break
        x = y / est
    return est


def neumann(
    matvec: Matvec,
    v: torch.Tensor,
    *,
    maxiter: int,
    tol: float,
    alpha: float | None,
    x0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LinearSolveInfo]:
    """Truncated Neumann series :math:`H^{-1} \\approx \\alpha\\sum_{j\\ge0}(I-\\alpha H)^j`.

    Written as the equivalent Richardson iteration :math:`u \\leftarrow u + \\alpha(v - Hu)`,
    which lets the residual decide when to stop. It converges when
    :math:`0 < \\alpha < 2/\\lambda_{\\max}(H)` for positive-definite ``H``, at a linear rate
    :math:`1 - \\alpha\\lambda_{\\min}`; with ``alpha=None`` it is set to
    :math:`1/\\hat\\lambda_{\\max}` from 20 power iterations (not counted in ``iterations``).
    With ``alpha`` equal to a gradient-descent step size, the series is what unrolling that many
    GD steps at the fixed point computes.

    Examples:
        >>> import torch
        >>> H = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> u, info = neumann(lambda p: H @ p, torch.ones(2, dtype=torch.float64),
        ...                   maxiter=200, tol=1e-10, alpha=None)
        >>> [round(x, 6) for x in u.tolist()], info.converged
        ([0.5, 1.0], True)
    """
    if alpha is None:
        lam_max = largest_eigenvalue(matvec, v)
        alpha = 1.0 / lam_max if lam_max > 0 else 1.0
    u, r, it = _start(matvec, v, x0)
    v_norm = v.norm()
    while it < maxiter and _relative(r, v_norm) > tol:
        u = u + alpha * r
        r = v - matvec(u)
        it += 1
    res = _relative(r, v_norm)
    return u, LinearSolveInfo("neumann", it, res, res <= tol)


def direct(
    matvec: Matvec, v: torch.Tensor, *, tol: float, symmetric: bool = True
) -> tuple[torch.Tensor, LinearSolveInfo]:
    """Assemble ``H`` column by column (``n`` products) and solve it with a dense LU.

    With ``symmetric`` the assembled matrix is symmetrised first (for a Hessian); without it any
    nonsingular matrix works (the Jacobian of a general optimality or fixed-point condition).

    Exact up to rounding and independent of conditioning, but costs ``n`` Hessian-vector products
    and :math:`O(n^2)` memory: for inner problems with a few thousand variables at most.

    ``v`` may have leading batch dimensions, ``(..., n)``, for independent systems (a
    block-diagonal ``H``): ``matvec`` then maps ``(..., n)`` to ``(..., n)`` and the ``n``
    products assemble every block at once.

    Examples:
        >>> import torch
        >>> H = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> v = torch.tensor([5.0, 4.0], dtype=torch.float64)
        >>> u, info = direct(lambda p: H @ p, v, tol=1e-10)
        >>> [round(x, 12) for x in u.tolist()], info.iterations
        ([1.0, 1.0], 2)
    """
    n = v.shape[-1]
    eye = torch.eye(n, dtype=v.dtype, device=v.device)
    H = torch.stack([matvec(eye[i].expand_as(v)) for i in range(n)], dim=-1)
    if symmetric:
        H = 0.5 * (H + H.mT)  # symmetrise away the rounding of the double backward
    try:
        u = torch.linalg.solve(H, v.unsqueeze(-1)).squeeze(-1)
    except torch.linalg.LinAlgError:  # singular H: least-squares solution; the residual tells
        u = torch.linalg.lstsq(H, v.unsqueeze(-1)).solution.squeeze(-1)
    res = _relative(v - (H @ u.unsqueeze(-1)).squeeze(-1), v.norm())
    return u, LinearSolveInfo("direct", n, res, res <= tol)
