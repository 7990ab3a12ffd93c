r"""The status rule: an item's status comes from its verified residuals, not from the backend's
label.

Residuals are measured on the original program, in the norms of its equilibrated form
(:mod:`diffopt.scaling`), where the data are of order one; so they are relative, and the same
for a problem and any rescaling of it:

.. math::

    r_p = \frac{\max(\|ρE(Ax + s - b)\|_\infty,\ \|ρE(s - Π_K s)\|_\infty)}
               {1 + \max(\|ρEAx\|_\infty, \|ρEs\|_\infty, \|ρEb\|_\infty)},\qquad
    r_d = \frac{\max(\|σD(Px + A^\top y + c)\|_\infty,\ \|σE^{-1}(y - Π_{K^*} y)\|_\infty)}
               {1 + \max(\|σDPx\|_\infty, \|σDA^\top y\|_\infty, \|σDc\|_\infty)},

and :math:`r_g = ρσ|s^\top y| / (1 + ρσ\max(|x^\top Px + c^\top x|, |b^\top y|))`. An item is
``OPTIMAL`` when all three are at most the acceptance tolerance (:func:`tolerance`), and
``INACCURATE`` when they are at most its square root. Certificates are normalized the same way:
infeasibility ``y ∈ K*`` with ``Aᵀy ≈ 0`` and ``bᵀy < 0``; unboundedness ``(x, s)`` with
``Px ≈ 0``, ``Ax + s ≈ 0``, ``s ∈ K`` and ``cᵀx < 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffopt.cones import proj_dual, proj_primal
from diffopt.scaling import Scaling
from diffopt.solvers.base import ConeProgram, Solution, Status, pattern_matvec

#: Acceptance tolerance of the relative residuals at the default solver tolerance (1e-9).
ACCEPT_TOL = 1e-6


def tolerance(options: dict) -> float:
    """The acceptance tolerance for a call's backend ``options``: :data:`ACCEPT_TOL`, or ten
    times a looser ``tol`` given there (1e-4 at least for the native solver's float32 iterates).
    """
    floor = 1e-4 if options.get("dtype") == torch.float32 else ACCEPT_TOL
    return max(floor, 10.0 * float(options.get("tol", 0.0) or 0.0))


@dataclass
class Verdict:
    """Per item: the status, the relative residuals, and whether the answer is returned."""

    status: list[Status]
    primal: list[float]
    dual: list[float]
    gap: list[float]
    ok: torch.Tensor  # (B,) bool


def _inf(t: torch.Tensor) -> torch.Tensor:
    return t.abs().amax(1) if t.shape[1] else t.new_zeros(t.shape[0])


def verify(program: ConeProgram, sol: Solution, scaling: Scaling, options: dict,
           allow_inaccurate: bool = False) -> Verdict:
    """Classify each item of ``sol`` (an answer to ``program``, the original data, solved with
    the backend ``options``) by its residuals (see the module docstring): ``OPTIMAL`` at most
    ``tol`` (:func:`tolerance`), ``INACCURATE`` at most ``√tol``, ``NOT_FINITE`` for NaN or Inf
    in the item's data or answer; an unverified certificate or a failed answer labeled a
    solution is a ``NUMERICAL_ERROR``; other labels stay. A point of the barrier path
    (``mu > 0``) has a gap by design: only its residuals count. ``ok``: ``OPTIMAL`` items, and
    ``INACCURATE`` ones with ``allow_inaccurate``."""
    tol = tolerance(options)

    p, dims = program, program.dims
    D, E, sig, rho = scaling.D, scaling.E, scaling.sigma[:, 0], scaling.rho[:, 0]
    data_ok = torch.isfinite(p.c).all(1) & torch.isfinite(p.b).all(1) & torch.isfinite(
        p.A_values).all(1)
    if p.P_values is not None:
        data_ok &= torch.isfinite(p.P_values).all(1)
    fin = [torch.isfinite(t).all(1) & data_ok for t in (sol.x, sol.y, sol.s)]
    x, y, s = (torch.where(f[:, None], t, torch.zeros_like(t))
               for f, t in zip(fin, (sol.x, sol.y, sol.s)))
    A = torch.where(data_ok[:, None], p.A_values, torch.zeros_like(p.A_values))
    Ax = pattern_matvec(A, p.A_pattern, x)
    Aty = pattern_matvec(A, p.A_pattern, y, transpose=True)
    Px = torch.zeros_like(x)
    if p.P_values is not None and p.P_pattern is not None:
        Px = pattern_matvec(torch.where(data_ok[:, None], p.P_values, 0.0), p.P_pattern, x)
    c = torch.where(data_ok[:, None], p.c, 0.0)
    b = torch.where(data_ok[:, None], p.b, 0.0)
    s_out = s - proj_primal(s, dims)  # the parts outside the cones
    y_out = y - proj_dual(y, dims)
    pe, sd, se = rho[:, None] * E, sig[:, None] * D, sig[:, None] / E
    primal = torch.maximum(_inf(pe * (Ax + s - b)), _inf(pe * s_out)) / (
        1 + torch.stack([_inf(pe * Ax), _inf(pe * s), _inf(pe * b)]).amax(0))
    dual = torch.maximum(_inf(sd * (Px + Aty + c)), _inf(se * y_out)) / (
        1 + torch.stack([_inf(sd * Px), _inf(sd * Aty), _inf(sd * c)]).amax(0))
    rs = rho * sig
    pobj, bty, cx = (x * Px).sum(1) + (c * x).sum(1), (b * y).sum(1), (c * x).sum(1)
    gap = rs * (s * y).sum(1).abs() / (1 + rs * torch.maximum(pobj.abs(), bty.abs()))
    # Certificates, normalized by |b̃ᵀỹ| (infeasibility) and |c̃ᵀx̃| (unboundedness).
    tiny = torch.finfo(x.dtype).tiny
    ny = (rho * bty.abs()).clamp(min=tiny)
    infeasible = (bty < 0) & (torch.maximum(_inf(D * Aty), _inf(y_out / E)) <= tol * ny)
    nx = (sig * cx.abs()).clamp(min=tiny)
    unbounded = (cx < 0) & (torch.stack([
        _inf(D * Px) * sig / rho, _inf(E * (Ax + s)), _inf(E * s_out)]).amax(0) <= tol * nx)
    barrier = float(options.get("mu", 0.0) or 0.0) > 0
    worst = torch.stack([primal, dual] if barrier else [primal, dual, gap]).amax(0)
    host = [t.tolist() for t in (worst, infeasible, unbounded, *fin, data_ok)]
    limit = options.get("max_iters")

    def stopped(i: int) -> bool:
        return limit is not None and i < len(sol.iterations) and sol.iterations[i] >= limit

    status = []
    for i, label in enumerate(sol.status):
        r, inf_ok, unb_ok, fx, fy, fs, dok = (h[i] for h in host)
        if not dok:
            status.append(Status.NOT_FINITE)
        elif label is Status.INFEASIBLE:
            status.append(label if inf_ok or not fy else Status.NUMERICAL_ERROR)
        elif label is Status.UNBOUNDED:
            status.append(label if unb_ok or not (fx and fs) else Status.NUMERICAL_ERROR)
        elif fx and fy and fs and r <= tol:
            status.append(Status.OPTIMAL)
        elif fx and fy and fs and r <= tol ** 0.5:
            status.append(Status.INACCURATE)
        elif label is Status.INACCURATE and stopped(i):
            status.append(Status.MAX_ITERATIONS)  # a backend's last iterate, e.g. SCS's
        elif label in (Status.OPTIMAL, Status.INACCURATE):
            status.append(Status.NUMERICAL_ERROR if fx and fy and fs else Status.NOT_FINITE)
        else:
            status.append(label)
    keep = [st.ok or (allow_inaccurate and st is Status.INACCURATE) for st in status]
    return Verdict(status, primal.tolist(), dual.tolist(), gap.tolist(),
                   torch.tensor(keep, device=x.device))
