"""Solution refinement: Newton steps on the residual map of the optimality conditions.

After a per-item backend (Clarabel, SCS, ECOS) has solved a batch, a few semismooth Newton
steps on the same square system the derivative uses (Busseti, Moursi & Boyd, "Solution
refinement at regular points of conic problems", 2019),

.. math::

    R(x, v) = \\begin{bmatrix} Px + A^\\top Π(v) + c \\\\ Ax + Π(v) − v − b \\end{bmatrix},
    \\qquad (x, v) \\leftarrow (x, v) − J^{-1} R(x, v),

drive ``(x, y, s) = (x, Π(v), Π(v) − v)`` to machine precision at regular points. ``J`` is
factored once, at the backend's answer, by :class:`~diffopt.diff.kkt.KKTDifferentiator` (in the
row-scaled coordinates the derivative uses); the later steps are chord steps with the same
factors, which this close to a regular solution reach the same residuals as fresh
factorizations at half the cost. An item keeps a step only when it lowers its relative residual
(:func:`relative_residual`: primal, dual and gap), and stops refining at the first step that
does not, or below ``100·eps``; an item no step helped keeps the backend's answer unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from diffopt.cones import proj_dual
from diffopt.diff.kkt import KKTDifferentiator, inf_norm, row_scale
from diffopt.solvers.base import (ConeProgram, Solution, Status, one_torch_thread,
                                  pattern_matvec)

#: Newton steps at most per call (from an interior-point answer, one or two reach the floor).
MAX_STEPS = 3
#: Relative residual at or below which an item's answer counts as solved (status OPTIMAL).
ACCEPT_TOL = 1e-9


@dataclass
class Refinement:
    """The outcome of :func:`refine` per item.

    Attributes:
        x, y, s: the refined solution, the input where no step was kept.
        steps: ``(B,)`` Newton steps kept (0: the input is returned).
        before, after: ``(B,)`` relative residuals of the input and of the output.
    """

    x: torch.Tensor
    y: torch.Tensor
    s: torch.Tensor
    steps: torch.Tensor
    before: torch.Tensor
    after: torch.Tensor


def _products(program: ConeProgram, x, y):
    """``(Ax, Aᵀy, Px)`` per item."""
    Ax = pattern_matvec(program.A_values, program.A_pattern, x)
    Aty = pattern_matvec(program.A_values, program.A_pattern, y, transpose=True)
    quadratic = program.P_values is not None and program.P_pattern is not None
    Px = (pattern_matvec(program.P_values, program.P_pattern, x) if quadratic
          else torch.zeros_like(x))
    return Ax, Aty, Px


def residual_scales(program: ConeProgram, x, y, s, rho) -> tuple[torch.Tensor, torch.Tensor]:
    """The primal and dual scales of :func:`relative_residual` at ``(x, y, s)``: the largest of
    ``‖ρb‖∞, ‖ρAx‖∞, ‖ρs‖∞, max|ρA|·‖x‖∞`` and of ``‖c‖∞, ‖Px‖∞, ‖Aᵀy‖∞, max|P|·‖x‖∞``
    (the last terms keep a scale where the solution makes the others vanish, as ``Px = 0``,
    ``y = 0``). Taken once, at the backend's answer: scales read at each iterate would excuse an
    iterate that blows up."""
    Ax, Aty, Px = _products(program, x, y)
    tiny = torch.finfo(x.dtype).tiny
    rows = torch.as_tensor(program.A_pattern.rows, device=x.device)
    size = inf_norm(x)
    primal = torch.stack([inf_norm(rho * program.b), inf_norm(rho * Ax), inf_norm(s * rho),
                          inf_norm(program.A_values * rho[:, rows]) * size])
    P = program.P_values if program.P_pattern is not None else None
    dual = torch.stack([inf_norm(program.c), inf_norm(Px), inf_norm(Aty),
                        (inf_norm(P) if P is not None else torch.zeros_like(size)) * size])
    return primal.amax(0).clamp(min=tiny), dual.amax(0).clamp(min=tiny)


def relative_residual(program: ConeProgram, x, y, s, rho, scales) -> torch.Tensor:
    """The largest of the relative residuals of ``(x, y, s)``, per item, in the program with rows
    scaled by ``rho`` (so that a row's scale does not weigh it), over the ``scales`` of
    :func:`residual_scales`: primal ``‖ρ(Ax + s − b)‖∞`` and dual ``‖Px + Aᵀy + c‖∞`` over their
    scales, and the gap ``|sᵀy|`` over their product. Non-finite values count as infinite.

    The distances of ``s`` to ``K`` and ``y`` to ``K*`` are left out: they are zero at the refined
    points (Moreau's decomposition), so leaving them out of the backend's answer only makes a
    step harder to keep."""
    primal, dual = scales
    Ax, Aty, Px = _products(program, x, y)
    parts = [
        inf_norm(rho * (Ax + s - program.b)) / primal,
        inf_norm(Px + Aty + program.c) / dual,
        (s * y).sum(1).abs() / primal / dual,
    ]
    out = torch.stack(parts).amax(0)
    return torch.where(torch.isfinite(out), out, torch.inf)


def _items(program: ConeProgram, idx: torch.Tensor) -> ConeProgram:
    """The items ``idx`` of a batched program."""
    return replace(program, c=program.c[idx], b=program.b[idx], A_values=program.A_values[idx],
                   P_values=None if program.P_values is None else program.P_values[idx])


def refine(program: ConeProgram, x, y, s, candidates: torch.Tensor, method: str = "auto",
           max_steps: int = MAX_STEPS) -> Refinement:
    """Newton steps on ``R(x, v)`` from ``(x, y, s)`` for the items ``candidates``.

    Args:
        program: the batched program, in the dtype of ``x``.
        x, y, s: ``(B, n)``, ``(B, m)``, ``(B, m)``; rows of non-candidates are not read.
        candidates: ``(B,)`` bool, the items to refine.
        method: the factorization of ``J`` (as in :class:`~diffopt.diff.kkt.KKTDifferentiator`).
        max_steps: Newton steps at most.

    Returns:
        The :class:`Refinement`.
    """
    B = x.shape[0]
    x0, y0, s0 = (torch.where(candidates[:, None], t, torch.zeros_like(t)) for t in (x, y, s))
    rho = row_scale(program, x0, y0, s0)
    scales = residual_scales(program, x0, y0, s0, rho)
    before = relative_residual(program, x0, y0, s0, rho, scales)
    x, y, s, best = x0.clone(), y0.clone(), s0.clone(), before.clone()
    v = y0 / rho - s0 * rho  # the current iterate, in the scaled coordinates of J
    pv = proj_dual(v, program.dims)  # and Π(v): y' and s' = Π(v) − v by Moreau's decomposition
    steps = torch.zeros(B, dtype=torch.long, device=x.device)
    floor = 100 * torch.finfo(x.dtype).eps  # nothing left to gain below it
    active = candidates & (before > floor)
    kkt = None
    for _ in range(max_steps):
        idx = torch.nonzero(active).flatten()
        if idx.numel() == 0:
            break
        sub, r = _items(program, idx), rho[idx]
        xi, vi, pi = x[idx], v[idx], pv[idx]
        yi, si = pi * r, (pi - vi) / r
        Ax, Aty, Px = _products(sub, xi, yi)
        r1, r2 = Px + Aty + sub.c, Ax + si - sub.b  # R(x, v)
        if kkt is None:  # J at the backend's answer; the later (chord) steps reuse its factors
            ok = torch.ones(idx.numel(), dtype=torch.bool, device=x.device)
            kkt = KKTDifferentiator(sub, xi, yi, si, ok, method, rho=r, warn=False)
            pos = torch.full((B,), -1, dtype=torch.long, device=x.device)
            pos[idx] = torch.arange(idx.numel(), device=x.device)
        k = pos[idx]  # rows of the items in the factored batch; the others get zero
        R1, R2 = (t.new_zeros(kkt.rho.shape[0], t.shape[1]).index_copy_(0, k, t) for t in (r1, r2))
        dx, dy, ds = (t[k] for t in kkt.tangent(R1, R2))  # J dz = −R
        xn, vn = xi + dx, vi + dy / r - ds * r
        pn = proj_dual(vn, program.dims)
        yn, sn = pn * r, (pn - vn) / r
        res = relative_residual(sub, xn, yn, sn, r, (scales[0][idx], scales[1][idx]))
        better = res < best[idx]
        keep = idx[better]
        x[keep], y[keep], s[keep], best[keep], v[keep], pv[keep] = (
            xn[better], yn[better], sn[better], res[better], vn[better], pn[better])
        steps[keep] += 1
        active[idx] = better & (res > floor)
    return Refinement(x, y, s, steps, before, best)


def refine_solution(program: ConeProgram, sol: Solution, mode, method: str = "auto",
                    one_thread: bool = False) -> Solution:
    """``sol`` refined per ``mode`` (``True``, ``False`` or ``"auto"``), statuses updated.

    Refines the solutions of backends that come without their own derivative (the per-item
    backends): items ``OPTIMAL`` or ``INACCURATE``, except that ``"auto"`` refines only the
    ``INACCURATE`` items of LPs and QPs (zero and nonnegative cones), whose interior-point answers
    are accurate already and whose degenerate vertices make every step a least-squares solve
    (see ``docs/solvers.rst``). An ``INACCURATE`` item whose refined relative residual is at
    most :data:`ACCEPT_TOL` becomes ``OPTIMAL``. ``sol.refine_steps``
    records the Newton steps kept per item. The solution comes back in float64 (the derivative
    is then computed in float64 too). ``one_thread``: run on one torch thread (as the
    derivative does, see :meth:`~diffopt.solvers.base.Backend.one_thread_derivative`).
    """
    if mode is False or sol.differentiator is not None:
        return sol
    status = sol.status
    # float64 whatever the inputs' dtype: refining in float32 gains nothing (its floor is 1e-5)
    dt = torch.float32 if sol.x.device.type == "mps" else torch.float64
    sol = replace(sol, x=sol.x.to(dt), y=sol.y.to(dt), s=sol.s.to(dt))
    conic = bool(program.dims.soc or program.dims.psd or program.dims.exp or program.dims.pow)
    wanted = (Status.OPTIMAL, Status.INACCURATE) if mode is True or conic else (Status.INACCURATE,)
    cand = torch.tensor([st in wanted for st in status], dtype=torch.bool, device=sol.x.device)
    cand &= torch.isfinite(torch.cat([sol.x, sol.y, sol.s], 1)).all(1)
    if not bool(cand.any()):
        return replace(sol, refine_steps=[0] * len(status))
    work = replace(program, c=program.c.detach().to(dt), b=program.b.detach().to(dt),
                   A_values=program.A_values.detach().to(dt),
                   P_values=None if program.P_values is None else program.P_values.detach().to(dt))
    with one_torch_thread(one_thread):
        out = refine(work, sol.x, sol.y, sol.s, cand, method)
    steps = out.steps.tolist()
    after = out.after.tolist()
    status = [Status.OPTIMAL if st is Status.INACCURATE and k > 0 and a <= ACCEPT_TOL else st
              for st, k, a in zip(status, steps, after)]
    keep = cand[:, None]
    return replace(sol, x=torch.where(keep, out.x, sol.x), y=torch.where(keep, out.y, sol.y),
                   s=torch.where(keep, out.s, sol.s), status=status, refine_steps=steps)
