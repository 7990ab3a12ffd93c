"""Native batched interior-point solver for LPs and QPs, written in torch.

The backend solves a batch of programs in the standard form with zero and nonnegative cones,

.. math::

    \\min_x \\tfrac12 x^\\top P x + c^\\top x \\quad\\text{s.t.}\\quad Ax + s = b,\\quad
    s \\in \\{0\\}^{p} \\times \\mathbb R_+^{l},

with a primal-dual Mehrotra predictor-corrector method on the homogeneous self-dual embedding
for quadratic objectives (the form used by Clarabel):

.. math::

    Px + A^\\top z + c\\tau = 0,\\qquad Ax + s - b\\tau = 0,\\qquad
    \\kappa + c^\\top x + b^\\top z + x^\\top P x/\\tau = 0,\\qquad
    s \\circ z = 0,\\ \\tau\\kappa = 0,

with ``s, z`` in the cone (equality rows: ``s = 0``, ``z`` free) and ``τ, κ ≥ 0``. A solution with
``τ > 0`` gives the optimum ``(x, y, s) = (x, z, s)/τ``; one with ``τ → 0, κ > 0`` gives a
certificate: ``Aᵀz = 0, bᵀz < 0`` (primal infeasible) or ``Px = 0, Ax + s = 0, cᵀx < 0``
(unbounded). Statuses are only declared from these conditions, checked to a tolerance.

Starting point. The start solves ``K(D = I)[x; z] = [−c; b]``, sets ``s = −z`` and shifts ``s``
and ``z`` into the cone with a margin that grows with their size (Clarabel's rule,
``max(1, Σ max(vᵢ, 0)/10)``). A fixed margin of 1 next to slacks of order 100 (QPs in large
boxes whose constraints are all inactive) started so badly centered that the predictor-corrector
could fall into a cycle with ``μ/τ²`` constant while the whole embedding shrank toward 0
(``MAX_ITERATIONS``). The ``τ`` pivot of each step (the denominator of ``dτ``, which tends to 0
like ``μ``) carries a static regularization of ``1e-12`` in float64 so that round-off does not
turn into ``O(ε/μ)`` steps of ``τ`` at tight tolerances.

Linear algebra. Every Newton system is the quasidefinite KKT system

.. math::

    K = \\begin{bmatrix} P & A^\\top \\\\ A & -D \\end{bmatrix},\\qquad
    D = \\operatorname{diag}(s / z) \\text{ on inequality rows},\\ 0 \\text{ on equality rows},

solved through its regularized reduction ``H = P + δI + Aᵀ(D + δ)⁻¹A = LLᵀ`` (one batched
Cholesky per iteration for the whole batch, ``n × n``), with iterative refinement against the
unregularized ``K`` (in float64 at ``tol ≥ 1e-10``, the dual and bounds reductions below take a
δ small enough to need none where the structure keeps them well conditioned). When ``P`` is
diagonal and each inequality row has one nonzero (bounds, as in ``0 ≤ x ≤ 1``), the reduction
goes one step further, to the Schur complement on the ``p < n`` equality rows (``p × p``).
When ``P`` is positive definite (and ``m`` is not much larger than ``n``), ``x`` is eliminated
instead: ``S = A(P + δI)⁻¹Aᵀ + D + δI`` (``m × m``), whose first term is formed once per solve,
so an iteration only adds the diagonal and factors.
Constraint matrices shared by the whole batch are stored once, so that each product is one
matrix multiplication for the batch. On CPU, large batches are solved in cache-sized chunks
(option ``chunk_size``), optionally on threads (``n_jobs``).

The derivative of the returned point uses the same matrix: for the interior-point method the
internal variables are ``(x, y)`` and ``s`` is tied to ``y`` by ``s ∘ y = μ`` (inequality
rows), so ``∂s/∂y = −D`` and the Jacobian of the optimality conditions is exactly ``K`` at the
returned point. The loop factors ``K`` at the current point *before* deciding
to stop, so the factorization kept for the backward pass is the one of the returned point's
system (no refactorization). That is the derivative used for ``mu > 0``. For ``mu = 0`` the
derivative is that of the exact KKT conditions instead: ``K`` with the active set snapped
(``D = 0`` where ``y > s``, ``dy = 0`` where ``s > y``), since at a point returned at
tolerance ``tol`` the barrier's ``D = s/y ≈ μ/y²`` on the active rows biases the gradient by
``O(μ/y²)`` (~1e-4 at ``tol = 1e-9``). It is solved by a few steps of iterative refinement
preconditioned with the kept factorization, with a dense LU of the snapped system for the
items that do not converge (see ``_IPMDifferentiator``).

Stopping at ``mu > 0`` (the ``mu`` option) returns the point on the central path with
``s ∘ y = μ``: the minimizer of the log-barrier-smoothed problem
``½xᵀPx + cᵀx − μ Σ log sᵢ``, a smooth surrogate for LPs whose Jacobian is ``K`` as well. The
embedding's iterations then keep ``s ∘ z ≥ μτ²`` and hand each item, once near that point, to a
few damped Newton steps on ``[Px + Aᵀy + c; Ax + s − b; s ∘ y − μ] = 0`` with ``τ`` fixed.

Known limits: inconsistent *and* rank-deficient equality rows end as ``NUMERICAL_ERROR`` rather
than ``INFEASIBLE``; constraints active with a zero multiplier (no strict complementarity)
converge only like ``√μ``, and there ``K`` (hence the derivative) is ill-conditioned. Objectives
far from unit size are scaled to it by a power of two per item (``_objective_scale``; not with
``mu > 0``); the constraint rows are not equilibrated, so badly scaled constraint data needs
scaling by the caller.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffopt.solvers.base import (
    Backend,
    ConeProgram,
    Solution,
    Status,
    _available_cores,
    lu_factor,
    one_torch_thread,
    parallel_map,
    to_numpy,
)

__all__ = ["NativeIPM"]

# Per-dtype defaults of the iterates: ``tol`` for residuals and gap, ``tol_infeas`` for the
# certificate tests.
_DEFAULTS: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"tol": 1e-9, "tol_infeas": 1e-8},
    torch.float32: {"tol": 1e-5, "tol_infeas": 1e-4},
}
# Default δ per dtype of the KKT linear algebra: small enough for refinement to remove it in one
# or two steps, large enough that H = P + δI + Aᵀ(D + δ)⁻¹A stays factorizable (cond ≲ 1/δ²).
_REG = {torch.float64: 1e-7, torch.float32: 1e-3}
# δ of the dual form in float64: S = A(P + δI)⁻¹Aᵀ + D + δI needs no large shift to stay
# factorizable (P is well conditioned, D ≥ 0), and with this one the iterations need no
# refinement (same iterations and residuals as δ = 1e-7 with one refinement step on random QPs,
# 15-30 % faster; the derivative still refines against the exact system).
_DUAL_REG = 1e-12
# The same for the bounds form when G = diag(P) + δ + Σ w a² stays away from δ: P a positive
# diagonal, or a bound row on every variable (LPs such as the shortest path: same iterations and
# answers as δ = 1e-7 with refinement, 15 % faster). Not smaller: the weights w = 1/(D + δ) of
# active bounds enter S = A_E G⁻¹ A_Eᵀ inverted, and with δ = 1e-12 some QuadraticSmoothing
# batches of the shortest-path example stalled (with 1e-9 they take 14 iterations, as with 1e-7
# and refinement). Other bounds-form problems keep δ = 1e-7 and refinement: a variable without
# bounds or quadratic term has G_jj = δ.
_BOUNDS_REG = 1e-9
# The unrefined small δ only down to this tolerance: below it the unrefined directions stall
# (shortest-path LP and its QuadraticSmoothing at tol = 1e-12: 1 and 73 of 1600 items hit the
# iteration limit; none with δ = 1e-7 and refinement, none at tol = 1e-11).
_SMALL_REG_MIN_TOL = 1e-10
_OPTION_KEYS = (
    "tol", "tol_infeas", "max_iters", "mu", "warm_start", "reg", "kkt_refine", "dtype", "kkt_dtype",
    "verbose", "n_jobs", "chunk_size",
)
# Automatic chunks on CPU: about this many bytes of per-item matrices (see _chunk_bounds) per
# chunk, so that a chunk's working set stays in the last-level cache (tuned on a 32 MiB L3: the
# (50, 45) QP at B = 1024 took 761 ms in one chunk and 410 ms in chunks of 64, 1 thread).
_CHUNK_BYTES = 3 * 2**20
_CHUNK_MIN = 32  # below this, the per-chunk cost of launching ~3,000 small ops dominates
_CHUNK_MIN_THREAD = 8  # smallest chunk made only to give each of n_jobs threads one
# Below this many per-item matrix entries in the whole batch (see _per_item_entries) a CPU solve
# runs on one intra-op thread: the (50, 45) QP at B = 64 has 274k (same speed either way).
_ONE_THREAD_ENTRIES = 300_000
# From this many per-item matrix entries (see _per_item_entries), several chunks are solved on
# threads by default (n_jobs=None): OptNet's QP (n = m = 100, 20k entries, four chunks at
# B = 128) on 2 cores, forward 160-207 -> 138-152 ms (one chunk at a time on torch's 2 threads).
_PARALLEL_ENTRIES = 10_000
# Static regularization of the τ pivot (the denominator of dτ), per dtype of the iterates.
_TAU_REG = {torch.float64: 1e-12, torch.float32: 0.0}
# Smallest λ_min/λ_max (estimated from the Cholesky factor's diagonal) of P + δI for the dual
# form of the KKT solves.
_DUAL_COND = 1e-6
_SAME_HEAD = 64  # entries compared first by _same_for_all
_SNAP_STEPS = 4  # preconditioned refinement steps of the exact derivative before the dense LU
# A factorization of the bounds form is weak when some item's G = P + δ + A_Iᵀ W A_I has a
# diagonal entry below _WEAK_PIVOT δ: a variable with neither a quadratic term nor an active bound,
# as on the optimal face of a degenerate LP (ties). K_δ is then far from K in that variable (G_jj
# ~ μ ≪ δ), each refinement step recovers little of the difference, and the iterations' solves
# get _WEAK_REFINE steps against the exact K. 5x5 shortest-path LPs, 20 batches of 64 per cost
# kind: with integer costs in {0, 1, 2}, 58 of 1280 items stalled at max_iters with no
# refinement (small δ) and 1-7 with one step; costs 1 + 1e-7·N(0, 1) failed with δ = 1e-7. With
# 4 steps, none, in at most 8 iterations (3: 8, 6: 7). Untied shortest paths stay above ~1e7 δ.
_WEAK_PIVOT = 1e4
_WEAK_REFINE = 4
# ... stopping early once the residual's largest entry is below _WEAK_TOL times the right-hand
# side's: a bounds-form LP with box bounds has G_jj → δ on its basic variables (strictly inside
# their boxes), so every late pass is weak; always 4 steps cost it 25 % (14.2 -> 17.7 ms, B = 32,
# n = 40); stopping at 1e-14 takes 13.8 ms (one cheap step, the old default: 14.2), with the
# ties and infeasible families above still solved (1e-12 failed 21 of 128 near-tied paths at
# δ = 1e-7; 1e-13 failed 1 of 192 integer-cost shortest paths written with all 25 (dependent)
# conservation rows; 1e-15 took 15.8 ms).
_WEAK_TOL = 1e-14
# The general form's δ in weak passes: those where some item has every inequality row's D = s/z
# below _WEAK_PIVOT δ. That is the certificate regime of an infeasible problem (x, s → 0 with τ,
# z along the certificate): K is nearly singular along the certificate, and with δ = 1e-7 the
# solves' relative residual grew from 1e-10 to 1e-2 in two iterations, before τ reached the ~1e-8
# that the certificate test needs: 78 of 320 infeasible LPs (1ᵀx = 5 against caps summing to 3)
# and 39 of 320 of another family ended NUMERICAL_ERROR, certified with 1e-8 and _WEAK_REFINE
# exact steps (all in <= 12 iterations; 1e-9 did as well, 1e-7 with 4 steps left 26 and 3).
_WEAK_REG = 1e-8
# Smallest 1 − (step fraction) near the solution (see step_fraction in _solve): closer to the
# boundary, the next factorization was too ill-conditioned (an integer-cost item at relative
# error 3e-9 stepped to 1 − 3e-9 of the boundary, then took 22 more iterations).
_STEP_GAP_MIN = 1e-6
# Objectives whose scale max(‖P‖∞, ‖c‖∞) lies outside [2^-6, 2^6] are scaled to 1 (see
# _objective_scale): far from it, the starting point and the unboundedness test lose their scale.
_OBJECTIVE_BAND = 6
_STEP_FRACTION = 0.99  # fraction of the distance to the boundary taken by a combined step
_WARM_SHIFT = 1e-3  # distance from the boundary of a warm-started point (relative)

# Per-item state codes of the loop.
_RUNNING, _OPTIMAL, _INFEASIBLE, _UNBOUNDED, _NUMERICAL, _CENTERING = range(6)
_CODE_STATUS = {
    _RUNNING: Status.MAX_ITERATIONS,
    _OPTIMAL: Status.OPTIMAL,
    _INFEASIBLE: Status.INFEASIBLE,
    _UNBOUNDED: Status.UNBOUNDED,
    _NUMERICAL: Status.NUMERICAL_ERROR,
    _CENTERING: Status.MAX_ITERATIONS,
}


def _options(options: dict, dtype: torch.dtype) -> dict[str, Any]:
    """Merge ``options`` with the defaults of the iterates' dtype and validate them (``dtype`` is
    the data's)."""
    unknown = sorted(set(options) - set(_OPTION_KEYS))
    if unknown:
        raise ValueError(
            f"NativeIPM: unknown option(s) {unknown}; expected keys among {list(_OPTION_KEYS)}."
        )
    if dtype not in _DEFAULTS:
        raise ValueError(
            f"NativeIPM: expected float32 or float64 problem data, received {dtype}; "
            "convert the parameters with .double() or .float()."
        )
    for key in ("dtype", "kkt_dtype"):
        if options.get(key) not in (None, torch.float32, torch.float64):
            raise ValueError(
                f"NativeIPM: option {key!r} must be torch.float32 or torch.float64, received "
                f"{options[key]!r}."
            )
    opts: dict[str, Any] = {
        "max_iters": 100, "mu": 0.0, "warm_start": None, "kkt_refine": 1,
        "verbose": False, "n_jobs": None, "chunk_size": None,
    }
    opts.update(_DEFAULTS[options.get("dtype") or torch.float64])
    opts.update({k: v for k, v in options.items() if v is not None})
    opts.setdefault("dtype", torch.float64)
    opts.setdefault("kkt_dtype", torch.float64)
    # Internal: whether the forms that allow it take their smaller float64 δ (unless the user set
    # one), and the refinement of the iterations' solves unless the user set it (None: by form).
    opts["small_reg"] = ("reg" not in opts and opts["kkt_dtype"] == torch.float64
                         and float(opts["tol"]) >= _SMALL_REG_MIN_TOL)
    opts["refine_iters"] = opts["kkt_refine"] if options.get("kkt_refine") is not None else None
    opts.setdefault("reg", _REG[opts["kkt_dtype"]])
    for key in ("tol", "tol_infeas", "reg"):
        if not float(opts[key]) > 0:
            raise ValueError(f"NativeIPM: option {key!r} must be positive, received {opts[key]!r}.")
    if not float(opts["mu"]) >= 0:
        raise ValueError(
            f"NativeIPM: option 'mu' (target barrier parameter) must be >= 0, received "
            f"{opts['mu']!r}; use 0 for the exact solution."
        )
    for key, low in (("max_iters", 0), ("kkt_refine", 0), ("n_jobs", 1), ("chunk_size", 1)):
        v = opts[key]
        if key in ("chunk_size", "n_jobs") and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            kind = "non-negative" if low == 0 else "positive"
            raise ValueError(f"NativeIPM: option {key!r} must be a {kind} integer, received {v!r}.")
    return opts


def _bdot(u: Tensor, v: Tensor) -> Tensor:
    """Row-wise inner product of ``(B, k)`` tensors."""
    return (u * v).sum(dim=1)


def _inf_norm(v: Tensor) -> Tensor:
    return v.abs().amax(dim=1) if v.shape[1] else v.new_zeros(v.shape[0])


def _inf_norms(v: Tensor) -> Tensor:
    """``‖·‖∞`` along the last axis of a ``(B, k, r)`` stack of vectors."""
    return v.abs().amax(dim=2) if v.shape[2] else v.new_zeros(v.shape[:2])


def _log_iteration(phase: str, k: int, live: np.ndarray, report: tuple[np.ndarray, ...],
                   running: np.ndarray) -> None:
    """The ``verbose`` line of one iteration: maxima over the items that were running of the
    relative primal and dual residuals, the gap and μ (``report``)."""
    if not live.any():
        return
    p, d, g, u = np.stack(report)[:, live].max(1).tolist()
    print(f"{phase} {k:3d}  pres {p:8.2e}  dres {d:8.2e}  gap {g:8.2e}  mu {u:8.2e}  "
          f"running {int(running.sum())}")


def _host(*vectors: Tensor) -> np.ndarray:
    """``(B,)`` tensors as the rows of one host array (one transfer)."""
    return to_numpy(torch.stack(vectors))


# The per-item tests of an iteration run in NumPy on the host, from one transfer of the ``(B,)``
# quantities they read: as torch operations they were ~50 per iteration, a fifth of a small LP's
# (~1 µs each on a CPU, one kernel launch each on a GPU); in NumPy they take ~20 µs in all. The
# B = 32 shortest-path LP's solve took 4 % less time on the CPU, and 10-30 % less on an H100.
@np.errstate(all="ignore")  # τ → 0 and NaN items: their tests are False, and they are caught
def _hsde_codes(h: np.ndarray, norm_b: np.ndarray, norm_c: np.ndarray, tol: float,
                tol_inf: float, mu_t: float, l: int) -> tuple[np.ndarray, tuple]:
    """New state codes of phase 1 from the rows of ``h`` (see ``_solve``), and the verbose
    report."""
    n_rz, n_rx, n_Ax, n_s, n_Px, n_Atz, n_Axs, tau, cx, bz, sz, xPx_t, rtau, mu, failed = h
    # Convergence tests on the normalized point (x, z, s)/τ, and certificate tests.
    pscale = np.maximum(norm_b * tau, np.maximum(n_Ax, n_s)) + tau
    dscale = np.maximum(norm_c * tau, np.maximum(n_Px, n_Atz)) + tau
    # pobj − dobj = (xᵀPx/τ + cᵀx + bᵀz)/τ, relative to max(min(|pobj|, |dobj|), 1).
    pobj = (0.5 * xPx_t + cx) / tau
    gap = (xPx_t + cx + bz) / tau
    rel_gap = np.abs(gap) / np.maximum(np.minimum(np.abs(pobj), np.abs(pobj - gap)), 1.0)
    if mu_t > 0:
        # Hand over to the barrier Newton phase near the μ-central path.
        done = (sz <= (10.0 * mu_t * l) * tau * tau) & (n_rz <= 1e-2 * pscale) & (
            n_rx <= 1e-2 * dscale)
        code = np.where(done, _CENTERING, _RUNNING)
    else:
        done = (n_rz <= tol * pscale) & (n_rx <= tol * dscale) & (rel_gap <= tol)
        code = np.where(done, _OPTIMAL, _RUNNING)
    # Certificates (only for items not done): infeasible, else unbounded. A problem can be both
    # primal and dual infeasible; the primal certificate then decides (as in Clarabel): LPs with
    # two contradictory rows, 10 batches of 16, were 69 UNBOUNDED / 83 INFEASIBLE with the other
    # order, 20 / 132 with this one (8 NUMERICAL_ERROR either way; Clarabel: 2 / 158).
    infeasible = (bz < 0) & (n_Atz <= tol_inf * -bz) & ~done
    unbounded = (cx < 0) & (np.maximum(n_Px, n_Axs) <= tol_inf * -cx) & ~done & ~infeasible
    code[unbounded] = _UNBOUNDED
    code[infeasible] = _INFEASIBLE
    code[~np.isfinite(mu + n_rz + n_rx + rtau) | (failed != 0)] = _NUMERICAL
    return code, (n_rz / pscale, n_rx / dscale, rel_gap, mu / tau**2)


@np.errstate(all="ignore")
def _path_codes(h: np.ndarray, norm_b: np.ndarray, norm_c: np.ndarray, tol: float,
                mu_t: float) -> tuple[np.ndarray, tuple]:
    """New state codes of phase 2 from the rows of ``h`` (see ``_solve``), and the first three
    columns of the verbose report."""
    n_r2, n_Ax, n_s, n_rc, n_r1, n_Px, n_Atz, failed = h
    conv = n_r2 <= tol * (1.0 + np.maximum(norm_b, np.maximum(n_Ax, n_s)))
    conv &= n_r1 <= tol * (1.0 + np.maximum(norm_c, np.maximum(n_Px, n_Atz)))
    code = np.where(conv & (n_rc <= tol * mu_t), _OPTIMAL, _RUNNING)
    code[~np.isfinite(n_r1 + n_r2 + n_rc) | (failed != 0)] = _NUMERICAL
    return code, (n_r2 / (1.0 + np.maximum(norm_b, n_Ax)),
                  n_r1 / (1.0 + np.maximum(norm_c, n_Px)), n_rc / mu_t)


def _boundary_step(v: Tensor, dv: Tensor) -> Tensor:
    """Largest ``α`` with ``v + α dv ≥ 0`` per item (``inf`` when nothing decreases)."""
    if not (torch.is_grad_enabled() and (v.requires_grad or dv.requires_grad)):
        # min over dv < 0 of v/(−dv) = −max of v/dv over the same entries.
        return (v / dv).masked_fill_(dv >= 0, -math.inf).amax(dim=1).neg_()
    neg = dv < 0
    # The inner where keeps the division finite where it is not taken, so that its gradient
    # stays finite too when the iterations are differentiated.
    return torch.where(neg, v / torch.where(neg, -dv, 1.0), math.inf).amin(dim=1)


def _step_length(frac: Tensor, ratio: Tensor) -> Tensor:
    """Per item, ``min(frac · ratio, 1)`` for the step to the boundary ``ratio`` (``inf`` when
    nothing blocks) and the fraction ``frac`` (0 for the stopped items, else ≥ 0.99): 0 for a
    stopped item whatever its ratio (``0 · inf`` would be NaN and wreck its returned point)."""
    return torch.clamp(frac * torch.clamp(ratio, max=2.0), max=1.0)


def _shift_into_cone(v: Tensor, p: int, ineq: Tensor) -> Tensor:
    """Shift the inequality rows of ``v`` to a margin ``max(1, Σᵢ max(vᵢ, 0)/10)`` (if smaller).

    The margin grows with the size of the positive entries (as Clarabel's starting point does):
    a fixed margin of 1 next to entries of order 100 (large right-hand sides) starts badly
    centered, with products ``sᵢzᵢ`` spread over orders of magnitude, and the predictor-corrector
    can then stall in a cycle that shrinks the whole embedding toward 0 instead of reducing ``μ``
    (loose-box QPs whose constraints are all inactive).
    """
    vi = v[:, p:]
    lo = vi.amin(1, keepdim=True)
    target = torch.clamp(0.1 * vi.clamp(min=0.0).sum(1, keepdim=True), min=1.0)
    return v + ineq * torch.clamp(target - lo, min=0.0)


def _take(v: Tensor, idx: Tensor) -> Tensor:
    """``v[..., idx]``: a gather along the last axis with the index expanded over the leading
    ones, ~2 µs for a ``(32, 40)`` batch against ~5.5 µs for ``index_select`` or indexing."""
    return torch.gather(v, -1, idx.expand(*v.shape[:-1], idx.shape[0]))


def _same_for_all(values: Tensor) -> bool:
    """Whether every item of a ``(B, k)`` batch has the same values (stored once then)."""
    # Not when recording gradients: each item's values must get its own gradient.
    if values.shape[0] == 1 or values.stride(0) == 0 and not values.requires_grad:
        return True  # one item, or one row expanded (a layer's constant matrix)
    if values.requires_grad and torch.is_grad_enabled():
        return False
    # The first entries first: per-item data differ there, and comparing the whole batch took
    # 0.7 ms for OptNet's A at B = 32 (four chunks, two matrices and the chunking's own test).
    head = values[:, :_SAME_HEAD]
    return bool((head == head[:1]).all()) and bool((values == values[:1]).all())


class _Matrix:
    """A batch of ``(r, k)`` matrices, stored once when every item has the same one.

    Vectors are rows: ``v`` is ``(B, k)`` or a stack ``(B, j, k)`` of ``j`` of them, and
    ``mv(v) = v Mᵀ`` (i.e. ``M v`` per item), ``rmv(u) = u M`` (``Mᵀ u``). A shared matrix turns
    every product of the batch into one GEMM instead of ``B`` small ones, the common case of
    decision-focused LPs (only the cost varies).
    """

    def __init__(self, M: Tensor, shared: bool | None = None) -> None:
        if shared is None:
            shared = M.shape[0] == 1 or bool((M == M[:1]).all())
        self.M = M[0].contiguous() if shared else M.contiguous()
        self.MT = self.M.mT.contiguous()
        self.shared = shared

    @staticmethod
    def from_pattern(values: Tensor, pattern: Any) -> _Matrix:
        """The dense matrices of ``(B, nnz)`` values on a :class:`SparsePattern`."""
        shared = _same_for_all(values)
        if shared:
            values = values[:1]
        r, c = pattern.shape
        if pattern.is_full:
            return _Matrix(values.reshape(values.shape[0], r, c), shared)  # no scatter
        out = values.new_zeros(values.shape[0], r * c)
        flat = torch.as_tensor(pattern.rows * c + pattern.cols, device=out.device)
        out.index_copy_(1, flat, values)
        return _Matrix(out.view(values.shape[0], r, c), shared)

    def to(self, dtype: torch.dtype) -> _Matrix:
        out = _Matrix.__new__(_Matrix)
        out.M, out.MT, out.shared = self.M.to(dtype), self.MT.to(dtype), self.shared
        return out

    @staticmethod
    def _apply(v: Tensor, N: Tensor) -> Tensor:
        if N.dim() == 2 or v.dim() == 3:
            return v @ N
        return (v.unsqueeze(1) @ N).squeeze(1)

    def mv(self, v: Tensor) -> Tensor:
        return self._apply(v, self.MT)

    def rmv(self, u: Tensor) -> Tensor:
        return self._apply(u, self.M)

    def dense(self, B: int) -> Tensor:
        return self.M.expand(B, -1, -1) if self.shared else self.M


class _Gram:
    """``Aᵀ diag(w) A`` for a batch of weights ``w`` (``(B, m)``), ``(B, n·n)`` flattened.

    With a sparse ``A`` (rows with few nonzeros, as in bound and flow constraints) the product
    is a sum over the pairs of nonzeros that share a row, ``Σᵢ wᵢ A_ij A_ik → H_jk``: one gather
    and one scatter-add over ``Σᵢ nnz(row i)²`` terms. Dense ``A`` uses a batched GEMM.
    """

    def __init__(self, A: _Matrix, B: int) -> None:
        m, n = A.M.shape[-2:]
        self.A, self.B, self.n = A, B, n
        nz = A.M != 0
        if not A.shared:
            nz = nz.any(0)
        rows, cols = np.nonzero(to_numpy(nz))
        counts = np.bincount(rows, minlength=m)
        self.sparse = int((counts * counts).sum()) * 8 <= m * n * n
        if not self.sparse:
            return
        # Pairs (e1, e2) of the nonzeros of each row (``rows`` is sorted: row-major order).
        first = np.cumsum(counts) - counts
        rep = counts[rows]
        e1 = np.repeat(np.arange(rows.size), rep)
        e2 = first[rows[e1]] + (np.arange(e1.size) - np.repeat(np.cumsum(rep) - rep, rep))
        dev = A.M.device
        self.row = torch.as_tensor(rows[e1], device=dev)
        self.dst = torch.as_tensor(cols[e1] * n + cols[e2], device=dev)
        r, c1, c2 = (torch.as_tensor(v, device=dev) for v in (rows[e1], cols[e1], cols[e2]))
        self.V = A.M[..., r, c1] * A.M[..., r, c2]

    def __call__(self, base: Tensor, w: Tensor) -> Tensor:
        """``base + Aᵀ diag(w) A`` with ``base`` of shape ``(B, n·n)``."""
        if self.sparse:
            return base.index_add(1, self.dst, _take(w, self.row) * self.V)
        Aw = self.A.M * w.unsqueeze(-1)  # diag(w) A, (B, m, n)
        if self.A.shared:
            return base + (self.A.MT @ Aw).reshape(self.B, -1)
        return torch.baddbmm(base.view(self.B, self.n, self.n), self.A.MT, Aw).view(self.B, -1)


def _chol_solve(U: Tensor, r: Tensor) -> Tensor:
    """``H⁻¹ r`` for stacks of row vectors ``r`` (``(B, k, q)``), ``H = UᵀU``, ``U`` upper.

    Two triangular solves, which read the factor in place (``torch.cholesky_solve`` copies it
    on every call: the largest cost of the solves for ``q ~ 100``).
    """
    w = torch.linalg.solve_triangular(U.mT, r.mT, upper=False)
    return torch.linalg.solve_triangular(U, w, upper=True).mT


def _cholesky(H: Tensor, reg: float,
              out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Batched upper Cholesky factor ``U`` (``H = UᵀU``) of ``H`` and the items where it failed,
    written into ``out`` (a factor and an info tensor) when given.

    The upper factor is ~15% cheaper to get than the lower one from ``cholesky_ex``.
    """
    L, info = torch.linalg.cholesky_ex(H, upper=True, out=out)
    failed = info > 0
    if bool(failed.any()):
        # Rare: round-off made H indefinite. Retry those items with a larger shift; the
        # refinement steps against the exact K still remove its effect on the solutions.
        bump = failed.to(H.dtype) * (1e4 * reg) * H.diagonal(dim1=1, dim2=2).amax(1)
        H.diagonal(dim1=1, dim2=2).add_(bump.unsqueeze(-1))
        L, info = torch.linalg.cholesky_ex(H, upper=True, out=out)
        failed = info > 0
    return L, failed


class _KKT:
    """Factorization and solves of ``K = [[P, Aᵀ], [A, −D]]`` for a batch.

    ``solve`` solves the regularized, quasidefinite system
    ``K_δ = [[P + δI, Aᵀ], [A, −(D + δ)]]`` and refines against the exact ``K`` so that δ does
    not bias the answer. ``factor`` reduces ``K_δ`` to one symmetric positive definite matrix
    and factors it, in one of two ways:

    - general: eliminate every ``y``, ``H = P + δI + Aᵀ W A`` with ``W = (D + δ)⁻¹``
      (``n × n``);
    - bounds: when ``P`` is diagonal and every inequality row has at most one nonzero (bounds
      such as ``0 ≤ x ≤ 1``), ``G = P + δI + A_Iᵀ W_I A_I`` is diagonal; eliminating ``y_I`` and
      ``x`` leaves the Schur complement ``S = A_E G⁻¹ A_Eᵀ + δI`` on the ``p`` equality rows
      (``p × p``; the equality rows no longer carry the ``1/δ`` weights of the general form),
      used when ``p < n``;
    - dual: when ``P`` is positive definite (well conditioned), eliminate ``x`` instead,
      ``S = A (P + δI)⁻¹ Aᵀ + D + δI`` (``m × m``): ``A (P + δI)⁻¹ Aᵀ`` does not change between
      iterations, so it is formed once and each iteration only adds the diagonal and factors
      ``S``, instead of forming ``Aᵀ W A`` (``2mn²`` flops per item) and factoring it; used when
      ``m³ ≤ 6mn² + n³``.

    Right-hand sides and solutions are stacks of row vectors, ``(B, k, n)`` and ``(B, k, m)``.
    """

    def __init__(self, P: _Matrix | None, A: _Matrix, B: int, p: int, reg: float,
                 dtype: torch.dtype, small_reg: bool = False) -> None:
        # The linear algebra runs in ``dtype`` (the data's, or float64 for float32 data when
        # asked); vectors are cast on the way in and out of ``factor`` and ``solve``.
        self.dtype, self.out_dtype = dtype, A.M.dtype
        same = dtype == A.M.dtype
        self.A = A if same else A.to(dtype)
        self.P = None if P is None else (P if same else P.to(dtype))
        m, n = A.M.shape[-2:]
        self.B, self.n, self.p, self.reg = B, n, p, reg
        self.D = A.M.new_zeros(B, m, dtype=dtype)
        self.w = self.D
        self.weak = torch.zeros(B, dtype=torch.bool, device=A.M.device)  # see _WEAK_PIVOT
        self._scratch: dict[str, Any] = {}  # storage reused by the factorizations (_factor)
        # small_reg: the dual form, and the bounds form with a positive diagonal P or a bound on
        # every variable, take their smaller δ (_DUAL_REG, _BOUNDS_REG), with which the
        # iteration solves need no refinement (``unrefined``, set by the form).
        self.unrefined = False
        self.bounds = p < n and self._bounds_form(small_reg)
        self.dual = not self.bounds and self._dual_form(_DUAL_REG if small_reg else reg)
        self.unrefined = self.unrefined or (self.dual and small_reg)
        if self.bounds or self.dual:
            return
        base = (self.P.dense(B) if self.P is not None
                else A.M.new_zeros(1, n, n, dtype=dtype).expand(B, -1, -1))
        self.base = base.reshape(B, n * n).clone()
        self.base[:, :: n + 1] += reg
        self.gram = _Gram(self.A, B)

    def _bounds_form(self, small_reg: bool) -> bool:
        """Set up the bounds form (see the class doc) if the structure allows it."""
        M, p, n = self.A.M, self.p, self.n
        if self.P is not None:
            off = self.P.M - torch.diag_embed(self.P.M.diagonal(dim1=-2, dim2=-1))
            if bool((off != 0).any()):
                return False
        nz = M[..., p:, :] != 0
        if not self.A.shared:
            nz = nz.any(0)
        if nz.shape[0] and int(nz.sum(1).max()) > 1:
            return False
        # Inequality row i is a_i x_{j_i}; G = diag(P) + δ + Σ_i w_i a_i² e_{j_i}.
        self.col = nz.to(torch.int8).argmax(1)
        rows = torch.arange(p, M.shape[-2], device=M.device)
        self.aI = M[..., rows, self.col]
        if not self.A.shared:
            self.aI = self.aI.unsqueeze(1)  # (B, 1, l): broadcasts over stacks of vectors
        self.a2 = M[..., rows, self.col] ** 2
        pdiag = 0.0 if self.P is None else self.P.M.diagonal(dim1=-2, dim2=-1)
        if small_reg and (bool(nz.any(0).all()) or self.P is not None and bool(
                (pdiag.amin(-1) >= _DUAL_COND * pdiag.amax(-1)).all()
                & (pdiag.amin(-1) > 0).all())):
            self.reg, self.unrefined = _BOUNDS_REG, True
        elif small_reg and bool((~nz.any(0) & (torch.as_tensor(pdiag) == 0)).any()):
            # A variable with neither a bound nor a quadratic term has G_jj = δ in every pass
            # (all weak, see _WEAK_PIVOT). The unboundedness certificate along such variables
            # is only as accurate as δ: with 1e-7 its ratio stalled at 1.3e-8, above tol_infeas
            # (x free on half the coordinates, 1ᵀx = 1, integer costs: 16 of 320 NUMERICAL_ERROR,
            # up to 89 iterations); with _WEAK_REG all UNBOUNDED in <= 5.
            self.reg = _WEAK_REG
        self.gbase = (M.new_zeros(self.B, n) + pdiag + self.reg).contiguous()
        shared = self.A.shared
        lead = (lambda t: t.unsqueeze(0)) if shared else (lambda t: t)
        self.AE = _Matrix(lead(M[..., :p, :]), shared)
        ET = _Matrix(lead(self.AE.MT), shared)
        self.gram = _Gram(ET, self.B)
        self.base = M.new_zeros(self.B, p * p)
        self.base[:, :: p + 1] = self.reg
        return True

    def _dual_form(self, reg: float) -> bool:
        """Set up the dual form (see the class doc), with shift ``reg``, if ``P`` allows it and
        it is cheaper."""
        P, A, n = self.P, self.A, self.n
        m = A.M.shape[-2]
        # Per iteration: an m×m Cholesky instead of the Gram product Aᵀ W A (2mn² flops) and
        # an n×n Cholesky.
        if P is None or m**3 > 6 * m * n * n + n**3:
            return False
        eye = torch.eye(n, dtype=P.M.dtype, device=P.M.device)
        U, info = torch.linalg.cholesky_ex(P.M + reg * eye, upper=True)
        d2 = U.diagonal(dim1=-2, dim2=-1) ** 2
        # Only for a well-conditioned P: (P + δI)⁻¹ must not amplify round-off in S, and δ must
        # not dominate P (P = 0, an LP given to QPLayer, made δI a perfectly conditioned P, S =
        # AAᵀ/δ + D, and 98 of 160 degenerate LPs failed).
        low = torch.clamp(_DUAL_COND * d2.amax(-1), min=_WEAK_PIVOT * reg)
        if bool((info > 0).any()) or bool((d2.amin(-1) < low).any()):
            return False
        # Shared matrices are 2-D here and broadcast in the products.
        Pinv = torch.cholesky_inverse(U, upper=True)  # faster than solves with Aᵀ
        G = Pinv @ A.MT
        M = A.M @ G
        shared = P.shared and A.shared

        def lead(t: Tensor) -> Tensor:
            return t.unsqueeze(0) if t.dim() == 2 else t

        # Products with per-item matrices are bound by reading them from memory. With a shared
        # (P + δI)⁻¹ and per-item A, the solves use (P + δI)⁻¹ (one GEMM for the batch) and A,
        # which the iterations read anyway, and G is not kept: OptNet's QP (n = m = 100,
        # B = 128) ran 6 % faster, the (100, 90) QP at B = 32 10 % faster.
        self.Pinv = _Matrix(lead(Pinv), P.shared)
        self.G = None if P.shared and not A.shared else _Matrix(lead(G), shared)
        self.reg = reg
        # Symmetric up to round-off, and factor() reads only one triangle of S = M + D + δI
        # (symmetrizing it took a quarter of this setup: 0.43 of 1.67 ms, the (50, 45) QP, B = 64).
        self.M = M.expand(self.B, -1, -1)
        return True

    def factor(self, D: Tensor, weak: bool = False) -> Tensor:
        """Factor at the diagonal ``D`` (``(B, m)``, zero on equality rows); return failures.

        Also sets ``weak``, the items whose factorization needs refinement against the exact
        ``K`` (see ``_WEAK_PIVOT``): in the bounds form from its ``G``; in the general form
        ``weak`` is the caller's (see ``_WEAK_REG``), which also lowers δ for this factorization.
        """
        self.D = D = D.to(self.dtype)
        self.w = (D + self.reg).reciprocal()
        if self.bounds:
            p = self.p
            wI = self.w[:, p:]
            G = self.gbase.index_add(1, self.col, wI * self.a2)
            self.weak = G.amin(1) < _WEAK_PIVOT * self.reg
            ginv = 1.0 / G
            # Broadcast over stacks of right-hand sides: (B, 1, ·).
            self.wI, self.waI, self.ginv = wI.unsqueeze(1), (wI.unsqueeze(1) * self.aI), \
                ginv.unsqueeze(1)
            S = self.gram(self.base, ginv).view(self.B, p, p)
            return self._factor(S, self.reg)
        if self.dual:
            S = self._scratch.get("S")
            if S is None:
                S = self.M.clone()
                if not torch.is_grad_enabled():
                    self._scratch["S"] = S
            else:
                S.copy_(self.M)
            S.diagonal(dim1=1, dim2=2).add_(D + self.reg)
            return self._factor(S, self.reg)
        reg, base = self.reg, self.base
        if weak:  # see _WEAK_REG
            reg = min(reg, _WEAK_REG)
            base = base.clone()
            base[:, :: self.n + 1] += reg - self.reg
            self.w = (D + reg).reciprocal()
        self.weak = torch.full_like(self.weak, weak)
        H = self.gram(base, self.w).view(self.B, self.n, self.n)
        return self._factor(H, reg)

    def _factor(self, H: Tensor, reg: float) -> Tensor:
        """Set ``L`` to the Cholesky factor of ``H``; return the items where it failed.

        When autograd is not recording, each factorization of this system writes into the
        storage of the previous one (as the dual form's ``S`` does): fresh multi-MiB tensors
        page-fault on every iteration (glibc hands them back to the system when they are freed).
        OptNet's QP (n = m = 100, B = 128, chunks of 32): 10-11k page faults and 248 ms per
        forward before, 214-225 ms after.
        """
        out = self._scratch.get("L")
        if out is None and not torch.is_grad_enabled():
            out = self._scratch["L"] = (H.new_empty(0), torch.empty(0, dtype=torch.int32,
                                                                       device=H.device))
        self.L, failed = _cholesky(H, reg, out)
        return failed

    def _solve_reg(self, r1: Tensor, r2: Tensor) -> Tensor:
        """``K_δ⁻¹ [r1; r2]``, packed as ``[x, y]`` along the last axis."""
        if self.bounds:
            # y_I = W_I(A_I x − r2_I); G x + A_Eᵀ y_E = r1 + A_Iᵀ W_I r2_I =: r̃;
            # S y_E = A_E G⁻¹ r̃ − r2_E; x = G⁻¹(r̃ − A_Eᵀ y_E).
            p, wI, ginv = self.p, self.wI, self.ginv
            r2E, r2I = r2[..., :p], r2[..., p:]
            # A_I has one nonzero a_i per row, at column j_i: products are gathers/scatters.
            rt = r1.index_add(-1, self.col, r2I * self.waI)
            rhs = self.AE.mv(rt * ginv) - r2E
            yE = _chol_solve(self.L, rhs)
            x = (rt - self.AE.rmv(yE)) * ginv
            yI = (_take(x, self.col) * self.aI - r2I) * wI
            return torch.cat((x, yE, yI), -1)
        if self.dual:
            # x = (P + δI)⁻¹ (r1 − Aᵀy) and (A (P + δI)⁻¹ Aᵀ + D + δ) y = Gᵀ r1 − r2.
            if self.G is None:  # shared (P + δI)⁻¹: one GEMM each, and products with A
                xr = self.Pinv.mv(r1)
                y = _chol_solve(self.L, self.A.mv(xr) - r2)
                return torch.cat((xr - self.Pinv.mv(self.A.rmv(y)), y), -1)
            y = _chol_solve(self.L, self.G.rmv(r1) - r2)
            return torch.cat((self.Pinv.mv(r1) - self.G.mv(y), y), -1)
        # Eliminate y = (A x − r2)/(D + δ) from the regularized system, then H x = r1 + Aᵀ(r2 w).
        w = self.w.unsqueeze(1)
        rhs = r1 + self.A.rmv(r2 * w)
        x = _chol_solve(self.L, rhs)
        y = (self.A.mv(x) - r2) * w
        return torch.cat((x, y), -1)

    def solve_packed(self, r1: Tensor, r2: Tensor, refine: int, exact: bool = True,
                     until: float | None = None) -> Tensor:
        """:meth:`solve` without the cast, returning ``[x, y]`` packed along the last axis.

        With ``until`` (and ``exact``) the refinement stops early once the residual's largest
        entry is at most ``until`` times the right-hand side's (one host read per step).
        """
        if r1.dtype != self.dtype:
            r1, r2 = r1.to(self.dtype), r2.to(self.dtype)
        n = self.n
        u = self._solve_reg(r1, r2)
        d = u
        r_max = None
        for _ in range(refine):
            if exact:
                x, y = u[..., :n], u[..., n:]
                e1 = r1 - self.A.rmv(y)
                if self.P is not None:
                    e1 = e1 - self.P.mv(x)
                e2 = torch.addcmul(r2 - self.A.mv(x), self.D.unsqueeze(1), y)
                if until is not None:
                    if r_max is None:
                        r_max = torch.maximum(r1.abs().amax(), r2.abs().amax())
                    e_max = torch.maximum(e1.abs().amax(), e2.abs().amax())
                    e, r = to_numpy(torch.stack((e_max, r_max))).tolist()
                    if e <= until * r:
                        break
            else:
                # (K_δ − K) d = (δ dx, −δ dy): one product with the signed δ of each entry.
                e = d * self._signed_reg()
                e1, e2 = e[..., :n], e[..., n:]
            d = self._solve_reg(e1, e2)
            u = u + d
        return u

    def _signed_reg(self) -> Tensor:
        sr = getattr(self, "_sr", None)
        if sr is None:
            m = self.D.shape[1]
            sr = self.D.new_full((self.n + m,), self.reg)
            sr[self.n:] = -self.reg
            self._sr = sr
        return sr

    def solve(self, r1: Tensor, r2: Tensor, refine: int, exact: bool = True,
              until: float | None = None, cast: bool = True) -> tuple[Tensor, Tensor]:
        """Solve ``K [x; y] = [r1; r2]`` for ``(B, k, n)``, ``(B, k, m)`` right-hand sides.

        Each refinement step solves ``K_δ d = r − K u`` and adds ``d`` to ``u``. With ``exact``
        the residual is computed from the data; otherwise it is taken as ``(K_δ − K) d_prev =
        (δ dx, −δ dy)`` of the previous correction, which is what it equals up to the
        round-off of the previous solve (no products with ``A`` or ``P``; used by the
        iterations in the well-conditioned bounds form). ``until``: see :meth:`solve_packed`.
        """
        u = self.solve_packed(r1, r2, refine, exact, until)
        if cast and u.dtype != self.out_dtype:
            u = u.to(self.out_dtype)
        return u[..., :self.n], u[..., self.n:]


class _IPMDifferentiator:
    """Linear solves with the Jacobian of the optimality conditions at the returned point.

    With ``mu > 0`` (``exact=False``) this is the barrier system ``J = [[P, Aᵀ], [A, −D]]``,
    ``D = diag(s/y)``, whose Cholesky factor is the last one of the iterations (see the module
    doc), solved with ``kkt_refine`` steps of iterative refinement against ``J``.

    With ``mu = 0`` (``exact=True``) it is the KKT system of the exact solution, with the active
    set *snapped*: an inequality row is active where ``y > s`` (``ds = 0``: the row of ``J``
    becomes ``aᵢᵀdx = ·``, i.e. ``D = 0``) and inactive where ``s ≥ y`` (``dy = 0``, ``D = ∞``;
    then ``ds = −(aᵢᵀdx + dRᵢ)``). At ``μ → 0`` the barrier ``J`` tends to this system, but at a
    point returned at tolerance ``tol`` its ``D = s/y ≈ μ/y²`` on active rows biases the
    derivative by ``O(μ/y²)`` (relative errors ~1e-4 at ``tol = 1e-9``). The snapped system is
    solved by iterative refinement preconditioned with the barrier factorization (its error is
    ``O(μ)``, so 1–3 steps reach round-off), checking each item's backward error; items that do
    not converge in ``_SNAP_STEPS`` steps get a dense LU solve of their snapped system, and
    items where that is singular (no strict complementarity, dependent active rows) keep the
    barrier derivative, finite, and are flagged in ``degenerate``.

    Inputs are ``(B, n)`` / ``(B, m)`` vectors or ``(B, n, k)`` / ``(B, m, k)`` stacks of ``k``.
    """

    def __init__(self, kkt: _KKT, refine: int, p: int = 0, s: Tensor | None = None,
                 y: Tensor | None = None, exact: bool = False, one_thread: bool = False) -> None:
        self._kkt = kkt
        self._refine = refine
        self._one_thread = one_thread  # solves of a small problem (see NativeIPM.solve)
        self.exact = exact and s is not None and y is not None and s.shape[1] > p
        B = kkt.B
        self.degenerate = torch.zeros(B, dtype=torch.bool, device=kkt.D.device)
        self.fallback = torch.zeros_like(self.degenerate)  # items solved by the dense LU
        self._point = (s, y, p)

    @functools.cached_property
    def _snap(self) -> tuple[Tensor, Tensor, float]:
        """``(keep, valid, scale)`` of the snapped system: ``keep`` 1 on the equality and
        active rows and 0 on the inactive ones, the items with a finite point, and the scale of
        the data for the backward-error tests. Set up by the first exact solve (a forward pass
        without gradients needs none: ~80 µs of a 5 ms LP solve at B = 32)."""
        kkt, (s, y, p) = self._kkt, self._point
        dt = kkt.dtype
        s, y = s.to(dt), y.to(dt)
        valid = torch.isfinite(s).all(1) & torch.isfinite(y).all(1)
        keep = torch.ones_like(s)
        keep[:, p:] = (y[:, p:] > s[:, p:]).to(dt)
        keep = torch.where(valid.unsqueeze(1), keep, torch.ones_like(keep))
        A = kkt.A.M
        scale = A.abs().amax() if A.numel() else A.new_zeros(())
        if kkt.P is not None and kkt.P.M.numel():
            scale = torch.maximum(scale, kkt.P.M.abs().amax())
        return keep, valid, float(torch.clamp(scale, min=1.0))

    # -- the barrier system ----------------------------------------------------------------

    def _barrier(self, r1: Tensor, r2: Tensor) -> tuple[Tensor, Tensor]:
        return self._kkt.solve(r1, r2, self._refine, cast=False)

    # -- the snapped system K̃ = [[P, AᵀK], [KA, −(I − K)]], K = diag(keep) ----------------

    def _apply(self, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        kkt, k = self._kkt, self._snap[0].unsqueeze(1)
        t1 = kkt.A.rmv(v * k)
        if kkt.P is not None:
            t1 = t1 + kkt.P.mv(u)
        return t1, kkt.A.mv(u) * k - (1.0 - k) * v

    def _precondition(self, e1: Tensor, e2: Tensor) -> tuple[Tensor, Tensor]:
        # The barrier system with the inactive rows' right-hand side zeroed: its error against
        # K̃ is O(D) on the active rows and O(1/D) on the inactive ones, O(μ) in all.
        k = self._snap[0].unsqueeze(1)
        u, v = self._kkt.solve(e1, e2 * k, 1, cast=False)
        return u, v * k - (1.0 - k) * e2

    def _snapped(self, r1: Tensor, r2: Tensor) -> tuple[Tensor, Tensor]:
        """Solve ``K̃ [u; v] = [r1; r2]`` (``(B, k, ·)`` stacks, in the KKT dtype)."""
        kkt = self._kkt
        r1, r2 = r1.to(kkt.dtype), r2.to(kkt.dtype)
        eps = 1e3 * torch.finfo(kkt.dtype).eps
        u, v = self._precondition(r1, r2)
        norm_r = torch.maximum(_inf_norms(r1).amax(1), _inf_norms(r2).amax(1))
        _, valid, scale = self._snap
        done = ~valid
        for _ in range(_SNAP_STEPS):
            a1, a2 = self._apply(u, v)
            e1, e2 = r1 - a1, r2 - a2
            err = torch.maximum(_inf_norms(e1).amax(1), _inf_norms(e2).amax(1))
            size = torch.maximum(_inf_norms(u).amax(1), _inf_norms(v).amax(1))
            done = done | (err <= eps * (norm_r + scale * size))
            if bool(done.all()):
                break
            d1, d2 = self._precondition(e1, e2)
            run = (~done).to(u.dtype)[:, None, None]
            u, v = u + run * d1, v + run * d2
        else:
            a1, a2 = self._apply(u, v)
            err = torch.maximum(_inf_norms(r1 - a1).amax(1), _inf_norms(r2 - a2).amax(1))
            size = torch.maximum(_inf_norms(u).amax(1), _inf_norms(v).amax(1))
            done = done | (err <= eps * (norm_r + scale * size))
        if not bool(done.all()):
            u, v = self._dense(~done, r1, r2, u, v)
        return u, v

    def _dense(self, items: Tensor, r1: Tensor, r2: Tensor, u: Tensor,
               v: Tensor) -> tuple[Tensor, Tensor]:
        """Dense LU of K̃ for ``items``; singular ones keep the barrier solution."""
        kkt = self._kkt
        idx = torch.nonzero(items).squeeze(1)
        n = u.shape[-1]
        keep, _, scale = self._snap
        k = keep[idx]
        A = kkt.A.dense(kkt.B)[idx]
        P = (kkt.P.dense(kkt.B)[idx] if kkt.P is not None
             else A.new_zeros(idx.numel(), n, n))
        top = torch.cat((P, A.mT * k.unsqueeze(1)), 2)
        bottom = torch.cat((A * k.unsqueeze(2), torch.diag_embed(k - 1.0)), 2)
        K = torch.cat((top, bottom), 1)
        rhs = torch.cat((r1[idx], r2[idx]), 2).mT
        LU, piv, info = lu_factor(K)
        sol = torch.linalg.lu_solve(LU, piv, rhs).mT
        ok = (info == 0) & torch.isfinite(sol).all(2).all(1)
        # Reject near-singular factors: the LU solution must solve K̃ to a small backward error.
        res = (K @ sol.mT).mT - rhs.mT
        scale = scale * sol.abs().amax((1, 2)) + rhs.abs().amax((1, 2))
        ok &= res.abs().amax((1, 2)) <= 1e6 * torch.finfo(K.dtype).eps * scale
        bu, bv = self._barrier(r1, r2)  # the factorization is the whole batch's
        bu, bv = bu[idx], bv[idx]
        okc = ok[:, None, None]
        u = u.clone()
        v = v.clone()
        u[idx] = torch.where(okc, sol[..., :n], bu)
        v[idx] = torch.where(okc, sol[..., n:], bv)
        self.fallback[idx[ok]] = True
        self.degenerate[idx[~ok]] = True
        return u, v

    # -- the Differentiator protocol --------------------------------------------------------

    @staticmethod
    def _stack(*vs: Tensor) -> tuple[bool, list[Tensor]]:
        vec = vs[0].dim() == 2
        return vec, [v.unsqueeze(1) if vec else v.mT for v in vs]

    @staticmethod
    def _unstack(vec: bool, *vs: Tensor) -> tuple[Tensor, ...]:
        return tuple(v.squeeze(1) if vec else v.mT for v in vs)

    def adjoint(self, gx: Tensor, gy: Tensor, gs: Tensor) -> tuple[Tensor, Tensor]:
        with one_torch_thread(self._one_thread):
            return self._adjoint(gx, gy, gs)

    def tangent(self, dr1: Tensor, dr2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with one_torch_thread(self._one_thread):
            return self._tangent(dr1, dr2)

    def _adjoint(self, gx: Tensor, gy: Tensor, gs: Tensor) -> tuple[Tensor, Tensor]:
        """``λ = −J⁻ᵀ (g_x, g_y + (∂s/∂y)ᵀ g_s)``; ``J`` is symmetric.

        Snapped: ``λ = −K̃⁻¹ (g_x − A_Iᵀ g_{s,I}, g_{y,R})`` on the kept rows ``R`` and
        ``λ_I = −g_{s,I}`` on the inactive rows ``I`` (``ds_I = −(A_I dx + dR_I)``).
        """
        out_dt = gx.dtype
        vec, (gx, gy, gs) = self._stack(gx, gy, gs)
        if not self.exact:
            D = self._kkt.D.to(gs.dtype).unsqueeze(1)
            l1, l2 = self._barrier(-gx, -(gy - D * gs))
            return self._unstack(vec, l1.to(out_dt), l2.to(out_dt))
        dt = self._kkt.dtype
        gx, gy, gs = gx.to(dt), gy.to(dt), gs.to(dt)
        k = self._snap[0].unsqueeze(1)
        gsI = gs * (1.0 - k)
        u, v = self._snapped(-(gx - self._kkt.A.rmv(gsI)), -gy * k)
        v = v * k - gsI
        return self._unstack(vec, u.to(out_dt), v.to(out_dt))

    def _tangent(self, dr1: Tensor, dr2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(dx, dy) = −J⁻¹ (dR₁, dR₂)`` and ``ds = (∂s/∂y) dy``.

        Snapped: ``(dx, dy_R) = −K̃⁻¹ (dR₁, dR_{2,R})``, ``dy_I = 0``, ``ds_R = 0`` and
        ``ds_I = −(A_I dx + dR_{2,I})``.
        """
        out_dt = dr1.dtype
        vec, (dr1, dr2) = self._stack(dr1, dr2)
        if not self.exact:
            dx, dy = self._barrier(-dr1, -dr2)
            ds = -self._kkt.D.to(dy.dtype).unsqueeze(1) * dy
            return self._unstack(vec, dx.to(out_dt), dy.to(out_dt), ds.to(out_dt))
        dt = self._kkt.dtype
        dr1, dr2 = dr1.to(dt), dr2.to(dt)
        k = self._snap[0].unsqueeze(1)
        dx, dy = self._snapped(-dr1, -dr2 * k)
        dy = dy * k
        ds = -(self._kkt.A.mv(dx) + dr2) * (1.0 - k)
        return self._unstack(vec, dx.to(out_dt), dy.to(out_dt), ds.to(out_dt))


def _warm_point(
    warm: Any, n: int, m: int, like: Tensor
) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(x, y, s)`` of a warm start given as a Solution or a triple, on ``like``'s device."""
    if warm is None:
        return None
    if isinstance(warm, Solution):
        triple: Sequence[Any] = (warm.x, warm.y, warm.s)
    elif isinstance(warm, (tuple, list)) and len(warm) == 3:
        triple = warm
    else:
        raise ValueError(
            "NativeIPM: option 'warm_start' must be a Solution or a tuple (x, y, s), received "
            f"{type(warm).__name__}."
        )
    out = []
    for name, v, size in zip("xys", triple, (n, m, m)):
        v = torch.as_tensor(v).to(dtype=like.dtype, device=like.device).detach()
        if v.dim() == 1:
            v = v.expand(like.shape[0], -1)
        if v.shape != (like.shape[0], size):
            raise ValueError(
                f"NativeIPM: warm_start {name} must have shape {(like.shape[0], size)}, "
                f"received {tuple(v.shape)}."
            )
        out.append(v)
    return out[0], out[1], out[2]


def _per_item_entries(program: ConeProgram) -> int:
    """Entries of the per-item matrices each iteration streams: A and P unless shared, and the
    factor (at most min(n, m)² in every form of _KKT)."""
    per_item = min(program.n, program.m) ** 2
    for values in (program.A_values, program.P_values):
        if values is not None and not _same_for_all(values):
            per_item += values.shape[1]
    return per_item


def _chunk_bounds(B: int, per_item: int | None, chunk_size: int | None,
                  n_jobs: int) -> list[int]:
    """Boundaries ``[0, …, B]`` of balanced chunks of at most ``chunk_size`` items: by default
    cache-sized from the ``per_item`` matrix entries on CPU (None: on a GPU, one chunk), and at
    least one per thread while chunks keep ``_CHUNK_MIN_THREAD`` items."""
    if chunk_size is None:
        if per_item is None:
            return [0, B]
        chunk_size = max(_CHUNK_MIN, _CHUNK_BYTES // (8 * max(per_item, 1)))
        chunk_size = min(chunk_size, max(_CHUNK_MIN_THREAD, -(-B // n_jobs)))
    k = max(1, -(-B // chunk_size))
    return [round(i * B / k) for i in range(k + 1)]


def _map_data(program: ConeProgram, fn: Callable[[Tensor], Tensor]) -> ConeProgram:
    """``program`` with ``fn`` applied to each of its data tensors."""
    def f(t: Tensor | None) -> Tensor | None:
        return None if t is None else fn(t)

    return dataclasses.replace(program, c=f(program.c), b=f(program.b),
                               A_values=f(program.A_values), P_values=f(program.P_values))


def _in_dtype(program: ConeProgram, dtype: torch.dtype) -> ConeProgram:
    """``program`` with its data in ``dtype`` (differentiably: the unrolled solve records it)."""
    return program if program.c.dtype == dtype else _map_data(program, lambda t: t.to(dtype))


def _slice_program(program: ConeProgram, lo: int, hi: int) -> ConeProgram:
    """Items ``lo:hi`` of a batch (tensors with one leading item are shared and kept)."""
    return _map_data(program, lambda t: t if t.shape[0] == 1 else t[lo:hi])


def _objective_scale(program: ConeProgram) -> Tensor | None:
    """Per item, the power of two ``σ`` that brings ``max(‖P‖∞, ‖c‖∞)`` to about 1, or None when
    every item's lies within ``2^±_OBJECTIVE_BAND`` (nothing is scaled then).

    Solving ``(σP, σc, A, b)`` gives ``(x, σy, s)``: the same point, with duals in units where the
    residual tests and certificates, written relative to 1 and to ``‖c‖``, mean what they say.
    Powers of two scale exactly.
    """
    mag = _inf_norm(program.c)
    if program.P_values is not None and program.P_values.shape[1]:
        mag = torch.maximum(mag, _inf_norm(program.P_values).expand_as(mag))
    e = torch.where(mag > 0, torch.log2(mag).round(), torch.zeros_like(mag))
    e = torch.where(e.abs() > _OBJECTIVE_BAND, e, torch.zeros_like(e))
    if not bool((e != 0).any()):
        return None
    return torch.exp2(-e)


def _scale_objective(program: ConeProgram, sigma: Tensor) -> ConeProgram:
    """``program`` with ``P`` and ``c`` multiplied by ``σ`` per item (a shared ``P`` stays
    shared when every item has the same ``σ``)."""
    same = bool((sigma == sigma[0]).all())
    f = float(sigma[0]) if same else sigma.unsqueeze(1)
    P = None if program.P_values is None else program.P_values * f
    return dataclasses.replace(program, c=program.c * f, P_values=P)


class _ScaledDifferentiator:
    """The derivative of a program from that of its objective-scaled version (see
    :func:`_objective_scale`): there the solution is ``(x, σy, s)`` and the residual rows are
    ``(σR₁, R₂)``, so the tangent map is ``diag(1, 1/σ, 1) ∘ T_σ ∘ diag(σ, 1)`` and the adjoint
    its transpose."""

    def __init__(self, inner: _IPMDifferentiator, sigma: Tensor) -> None:
        self.inner, self.sigma = inner, sigma

    @property
    def degenerate(self) -> Tensor:
        return self.inner.degenerate

    @property
    def fallback(self) -> Tensor:
        return self.inner.fallback

    def _col(self, v: Tensor) -> Tensor:
        return self.sigma.to(v.dtype).view(-1, *([1] * (v.dim() - 1)))

    def adjoint(self, gx: Tensor, gy: Tensor, gs: Tensor) -> tuple[Tensor, Tensor]:
        lx, lv = self.inner.adjoint(gx, gy / self._col(gy), gs)
        return lx * self._col(lx), lv

    def tangent(self, dr1: Tensor, dr2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        dx, dy, ds = self.inner.tangent(dr1 * self._col(dr1), dr2)
        return dx, dy / self._col(dy), ds


class _ChunkedDifferentiator:
    """The differentiators of consecutive chunks of a batch, used as one."""

    def __init__(self, parts: Sequence[_IPMDifferentiator]) -> None:
        self.parts = list(parts)
        self.sizes = [int(p.degenerate.shape[0]) for p in self.parts]

    # Read when asked: the parts set their flags during their solves.
    @property
    def degenerate(self) -> Tensor:
        return torch.cat([p.degenerate for p in self.parts])

    @property
    def fallback(self) -> Tensor:
        return torch.cat([p.fallback for p in self.parts])

    def _map(self, method: str, *vs: Tensor) -> tuple[Tensor, ...]:
        pieces = zip(*(v.split(self.sizes) for v in vs))
        outs = [getattr(p, method)(*args) for p, args in zip(self.parts, pieces)]
        return tuple(torch.cat(o) for o in zip(*outs))

    def adjoint(self, gx: Tensor, gy: Tensor, gs: Tensor) -> tuple[Tensor, ...]:
        return self._map("adjoint", gx, gy, gs)

    def tangent(self, dr1: Tensor, dr2: Tensor) -> tuple[Tensor, ...]:
        return self._map("tangent", dr1, dr2)


def _concat_solutions(parts: Sequence[Solution]) -> Solution:
    """One :class:`Solution` from those of consecutive chunks."""
    def joined(name: str) -> list:
        return [v for p in parts for v in getattr(p, name)]

    return Solution(
        x=torch.cat([p.x for p in parts]), y=torch.cat([p.y for p in parts]),
        s=torch.cat([p.s for p in parts]), status=joined("status"),
        iterations=joined("iterations"), primal_residual=joined("primal_residual"),
        dual_residual=joined("dual_residual"), gap=joined("gap"),
        differentiator=_ChunkedDifferentiator([p.differentiator for p in parts]),
    )


class NativeIPM(Backend):
    """Batched primal-dual interior-point method for LPs and QPs in torch (CPU or CUDA).

    Options (keys of the ``options`` dict, all optional):

    - ``tol``: relative tolerance of the primal and dual residuals and of the duality gap
      (default ``1e-9`` with float64 iterates, ``1e-5`` with float32 ones).
    - ``tol_infeas``: tolerance of the infeasibility/unboundedness certificates (``‖Aᵀz‖∞ ≤
      tol_infeas·(−bᵀz)``, resp. ``‖Px‖∞, ‖Ax+s‖∞ ≤ tol_infeas·(−cᵀx)``; default ``1e-8`` /
      ``1e-4``).
    - ``max_iters``: iteration limit of each phase (default 100); items still running get
      ``Status.MAX_ITERATIONS``.
    - ``mu``: target barrier parameter (default 0). With ``mu > 0`` the solver stops on the
      central path at ``s ∘ y = mu`` (inequality rows): the log-barrier-smoothed solution,
      whose derivative is smooth in the data (a surrogate for LPs).
    - ``warm_start``: a previous :class:`Solution` or a triple ``(x, y, s)`` of ``(B, ·)`` tensors;
      it is pushed into the interior and used where finite (cold start elsewhere).
    - ``reg``: static regularization δ of the KKT factorization (default ``1e-7`` with a
      float64 factorization, ``1e-3`` with float32; in float64, unless ``reg`` is given, the
      dual form of :class:`_KKT` (positive definite ``P``) uses ``1e-12`` and the bounds form
      with a positive diagonal ``P`` ``1e-9``).
    - ``dtype``: dtype of the iterates (default ``torch.float64``, whatever the data's).
      float32 data are solved in float64 and the layers return the results in float32, so that
      solutions and gradients are as accurate as float32 holds them: iterating in float32
      stops at ``tol = 1e-5``, and on the benchmarks' dense QPs the gradients at such
      solutions were 15 % away from the float64 ones (the weakly active constraints are not
      resolved). ``torch.float32`` iterates in float32: faster on GPUs with slow float64.
    - ``kkt_dtype``: dtype of the KKT factorization and solves (default ``torch.float64``).
      With float32 iterates, float64 linear algebra keeps the late, ill-conditioned
      iterations solvable; ``torch.float32`` fails more often on larger problems
      (``NUMERICAL_ERROR``).
    - ``kkt_refine``: iterative-refinement steps per Newton solve (default 1, and 0 with the
      smaller float64 defaults of δ above, which do not need it); the derivative uses
      ``refine + 3``. In the bounds and dual forms (see :class:`_KKT`) the iterations take the
      residual of each refinement step from the regularization alone, ``(δ dx, −δ dy)``, with
      no products with ``A``; the derivative always recomputes it from the data.
    - ``verbose``: print one line per iteration for the whole batch: the largest relative
      primal and dual residuals and duality gap and the largest barrier parameter ``μ`` over
      the items still running, and how many are still running (``hsde`` lines; with ``mu > 0``
      the centering phase prints ``path`` lines, whose ``gap`` is ``‖s∘y − μ‖∞ / μ``).
    - ``chunk_size``: largest number of items solved together (default: on CPU, as many as keep
      about 3 MiB of per-item ``A``, ``P`` and factor entries per chunk, so that the chunk's
      matrices stay in cache, but at least 32; with ``n_jobs > 1``, smaller chunks, down to 8
      items, so that each thread gets one; on GPUs the whole batch). Chunks are balanced and
      each gets its own factorization and differentiator.
    - ``n_jobs``: threads solving chunks concurrently, each with one torch intra-op thread
      (default: on CPU, when the batch spans several default chunks of at least 10k per-item
      matrix entries, ``torch.get_num_threads()`` (at most the available cores and chunks);
      else 1). Torch releases the GIL in its kernels, so large chunks scale with free cores;
      small problems are bound by Python overhead and do not.

    Threads: a small CPU problem (under 300k per-item matrix entries in the batch) is solved,
    and later differentiated, on one torch intra-op thread (``torch.set_num_threads(1)`` for
    the duration, then restored): splitting its tiny kernels over threads only adds
    synchronization.

    The solution carries a differentiator whose linear solves reuse the final Cholesky factor,
    which is that of ``J = [[P, Aᵀ], [A, −diag(s/y)]]`` at the returned point: with ``mu > 0``
    it solves with ``J``; with ``mu = 0`` with the exact KKT system (active set snapped from
    ``y > s``), preconditioned by that factor (dense LU for the items where that does not
    converge; items where the snapped system is singular keep ``J`` and are flagged in the
    differentiator's ``degenerate``).

    Examples:
        >>> import numpy as np, torch
        >>> from diffopt.cones import ConeDims
        >>> from diffopt.solvers.base import ConeProgram, SparsePattern
        >>> # min x1 + x2  s.t.  x >= 1  (written as -x + s = -1, s >= 0)
        >>> rows, cols = np.array([0, 1]), np.array([0, 1])
        >>> prog = ConeProgram(None, None, torch.ones(1, 2, dtype=torch.float64),
        ...                    SparsePattern(rows, cols, (2, 2)),
        ...                    -torch.ones(1, 2, dtype=torch.float64),
        ...                    -torch.ones(1, 2, dtype=torch.float64), ConeDims(zero=0, nonneg=2))
        >>> sol = NativeIPM().solve(prog, {})
        >>> sol.status[0].name, [round(v, 6) for v in sol.x[0].tolist()]
        ('OPTIMAL', [1.0, 1.0])
    """

    name = "native"
    cones = frozenset({"zero", "nonneg"})
    quadratic_objective = True

    def accepted_options(self) -> frozenset[str]:
        return frozenset(_OPTION_KEYS)

    def solve(self, program: ConeProgram, options: dict) -> Solution:
        start = time.perf_counter()
        dims = program.dims
        quadratic = program.P_pattern is not None and program.P_values is not None
        reason = self.supports(dims, quadratic)
        if reason is not None:
            raise ValueError(f"NativeIPM: {reason}; use solver='clarabel' for other cones.")
        if dims.zero + dims.nonneg != program.m:
            raise ValueError(
                f"NativeIPM: the cone has {dims.zero} + {dims.nonneg} rows but A has {program.m}; "
                "the dims must cover every row of A."
            )
        opts = _options(options, program.c.dtype)
        program = _in_dtype(program, opts["dtype"])
        B = program.batch_size
        per_item = _per_item_entries(program) if program.c.device.type == "cpu" else None
        # Small CPU problems run on one intra-op thread: splitting their tiny batched kernels
        # costs more in synchronization than it saves (the 5x5 shortest-path LP at B = 32:
        # 10.4 ms with 2 threads, 6.6 ms with 1; the (100, 90) QP at B = 32 is 40 % slower on 1).
        small = per_item is not None and B * per_item < _ONE_THREAD_ENTRIES
        n_jobs = opts["n_jobs"]
        if n_jobs is None:
            # Several cache-sized chunks of large per-item matrices: torch's thread budget goes
            # to chunks, one intra-op thread each (their batched LAPACK calls release the GIL).
            # Not smaller problems, bound by Python overhead that threads only contend for (the
            # (50, 45) QP at B = 64: forward 24 -> 26-33 ms), nor one chunk split for threads
            # (the (100, 90) QP at B = 32: 33 -> 37-39 ms, against torch's own two threads).
            chunks = len(_chunk_bounds(B, per_item, opts["chunk_size"], 1)) - 1
            n_jobs = (min(torch.get_num_threads(), _available_cores(), chunks)
                      if per_item is not None and per_item >= _PARALLEL_ENTRIES else 1)
        bounds = _chunk_bounds(B, per_item, opts["chunk_size"], n_jobs)
        if opts["warm_start"] is not None and len(bounds) > 2:
            opts["warm_start"] = _warm_point(opts["warm_start"], program.n, program.m, program.c)

        def solve_chunk(lo: int, hi: int) -> Solution:
            sub, sub_opts = program, opts
            if (lo, hi) != (0, B):
                sub = _slice_program(program, lo, hi)
                if opts["warm_start"] is not None:
                    sub_opts = {**opts, "warm_start": tuple(v[lo:hi] for v in opts["warm_start"])}
            # Not with mu > 0: the central path s∘y = μ is not invariant under y -> σy.
            sigma = _objective_scale(sub) if float(opts["mu"]) == 0.0 else None
            if sigma is not None:
                sub = _scale_objective(sub, sigma)
                if sub_opts["warm_start"] is not None:
                    wx, wy, ws = _warm_point(sub_opts["warm_start"], sub.n, sub.m, sub.c)
                    sub_opts = {**sub_opts, "warm_start": (wx, wy * sigma.unsqueeze(1), ws)}
            # Inference mode: ~15 % less overhead per operation than no_grad on small problems.
            # The iterates and the factorization stay inference tensors (read-only from here);
            # the returned solution is copied out of them.
            with torch.inference_mode():
                out, kkt, _ = _solve(sub, sub_opts, quadratic)
            out.x, out.y, out.s = out.x.clone(), out.y.clone(), out.s.clone()
            out.differentiator = _IPMDifferentiator(
                kkt, opts["kkt_refine"] + 3, dims.zero, out.s, out.y, exact=float(opts["mu"]) == 0.0,
                one_thread=small)
            if sigma is not None:
                out.y = out.y / sigma.unsqueeze(1)
                inv = (1.0 / sigma).tolist()
                out.dual_residual = [r * f for r, f in zip(out.dual_residual, inv)]
                out.gap = [g * f for g, f in zip(out.gap, inv)]
                out.differentiator = _ScaledDifferentiator(out.differentiator, sigma)
            return out

        spans = list(itertools.pairwise(bounds))
        if len(spans) > 1 and n_jobs > 1:
            with one_torch_thread():  # n_jobs threads in all, not n_jobs times torch's
                parts = parallel_map(lambda k: solve_chunk(*spans[k]), len(spans), n_jobs)
        else:
            with one_torch_thread(small):
                parts = [solve_chunk(lo, hi) for lo, hi in spans]
        out = parts[0] if len(parts) == 1 else _concat_solutions(parts)
        elapsed = (time.perf_counter() - start) / max(B, 1)
        out.solve_time = [elapsed] * B
        return out

    def solve_unrolled(self, program: ConeProgram, options: dict,
                       last: int | None = None) -> Solution:
        """Solve while autograd records the iterations, for backpropagation through them.

        The returned ``x, y, s`` are differentiable functions of the program's tensors
        through the iterations themselves (no implicit differentiation, no differentiator).
        With ``last = k`` only the final ``k`` iterations of the embedding are recorded: the
        loop first runs without recording to find its iteration count ``T``, then re-runs
        iterations ``T − k + 1 … T`` with recording from the detached iterate ``T − k``
        (identical steps, so identical results); memory grows like ``k`` instead of ``T``. The
        centering phase of ``mu > 0`` is always recorded.
        """
        start = time.perf_counter()
        quadratic = program.P_pattern is not None and program.P_values is not None
        reason = self.supports(program.dims, quadratic)
        if reason is not None:
            raise ValueError(f"NativeIPM: {reason}; use solver='clarabel' for other cones.")
        opts = _options(options, program.c.dtype)
        program = _in_dtype(program, opts["dtype"])
        resume = None
        if last is not None:
            with torch.no_grad():
                _, _, states = _solve(program, opts, quadratic, keep=True, unrolled=True)
            T = len(states) - 1
            if last < T:
                state = states[T - last]
                resume = (*(t.detach() for t in state[:5]), *state[5:])
                opts = {**opts, "max_iters": opts["max_iters"] - (T - last),
                        "warm_start": None}
        with torch.enable_grad():
            out, _, _ = _solve(program, opts, quadratic, resume=resume, unrolled=True)
        elapsed = (time.perf_counter() - start) / max(program.batch_size, 1)
        out.solve_time = [elapsed] * program.batch_size
        return out


# (x, z, s, τ, κ) and the per-item state codes and iteration counts.
_State = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, np.ndarray, np.ndarray]


def _solve(
    program: ConeProgram, opts: dict[str, Any], has_P: bool, keep: bool = False,
    resume: _State | None = None, unrolled: bool = False,
) -> tuple[Solution, _KKT, list[_State]]:
    """The two-phase loop: HSDE predictor-corrector, then (for ``mu > 0``) barrier Newton.

    Records a graph when called with gradients enabled. ``keep`` returns the phase-1 state
    ``(x, z, s, τ, κ, code, iters)`` at the start of every iteration; ``resume`` starts from
    one of them instead of the starting point. ``unrolled`` (solves whose iterations are
    differentiated) keeps the step fraction fixed.
    """
    c, b = program.c, program.b
    A = _Matrix.from_pattern(program.A_values, program.A_pattern)
    P = _Matrix.from_pattern(program.P_values, program.P_pattern) if has_P else None
    B, n, m = c.shape[0], c.shape[1], b.shape[1]
    p, l = program.dims.zero, program.dims.nonneg
    tol, tol_inf, mu_t = float(opts["tol"]), float(opts["tol_infeas"]), float(opts["mu"])
    if l == 0:
        mu_t = 0.0  # no inequality: no barrier
    max_iters = opts["max_iters"]
    tau_reg = _TAU_REG[c.dtype]

    ineq = c.new_zeros(m)
    ineq[p:] = 1.0
    is_eq = ineq == 0
    kkt_dtype = opts["kkt_dtype"]
    kkt = _KKT(P, A, B, p, float(opts["reg"]), kkt_dtype, opts["small_reg"])
    refine = opts["refine_iters"]
    if refine is None:
        refine = 0 if kkt.unrefined else opts["kkt_refine"]

    def solve_mode(weak: bool) -> tuple[int, bool, float | None]:
        # Refinement steps of a solve, whether their residuals are computed from the data, and
        # the relative residual at which they may stop early.
        if weak:
            return max(refine, _WEAK_REFINE), True, _WEAK_TOL
        return refine, not (kkt.bounds or kkt.dual), None

    def kkt_solve(r1: Tensor, r2: Tensor, weak: bool = False) -> tuple[Tensor, Tensor]:
        return kkt.solve(r1, r2, *solve_mode(weak))
    norm_b, norm_c = _host(_inf_norm(b), _inf_norm(c))

    def Pmv(v: Tensor) -> Tensor:
        return P.mv(v) if P is not None else torch.zeros_like(v)

    def inverse_z(z: Tensor) -> Tensor:
        # 1/z on inequality rows, 0 on equality rows (there s = 0 and z is free), so that
        # D = s/z is the KKT diagonal on every row.
        return ineq / torch.where(is_eq, 1.0, z)

    # ---- starting point: K(D = I on inequality rows) [x; z] = [−c; b], then shift into the cone.
    if resume is not None:
        x, z, s, tau, kappa, code, iters = resume
        iters = iters.copy()
    else:
        kkt.factor(ineq.expand(B, m))
        x, z = kkt_solve(-c.unsqueeze(1), b.unsqueeze(1))
        x, z = x.squeeze(1), z.squeeze(1)
        s = -z * ineq
        if l:
            s, z = _shift_into_cone(s, p, ineq), _shift_into_cone(z, p, ineq)
        tau = c.new_ones(B)
        kappa = c.new_ones(B)
        warm = _warm_point(opts["warm_start"], n, m, c)
        if warm is not None:
            wx, wy, ws = warm
            ok = torch.isfinite(wx).all(1) & torch.isfinite(wy).all(1) & torch.isfinite(ws).all(1)
            shift = _WARM_SHIFT * (1.0 + torch.maximum(_inf_norm(ws), _inf_norm(wy))).unsqueeze(1)
            ws = torch.where(is_eq, torch.zeros_like(ws), torch.maximum(ws, shift))
            wy = torch.where(is_eq, wy, torch.maximum(wy, shift))
            okc = ok.unsqueeze(1)
            x = torch.where(okc, wx, x)
            z = torch.where(okc, wy, z)
            s = torch.where(okc, ws, s)
            mu0 = (ws * wy * ineq).sum(1) / max(l, 1)
            kappa = torch.where(ok, torch.clamp(mu0, min=torch.finfo(c.dtype).eps), kappa)

        code = np.full(B, _RUNNING, dtype=np.int64)
        iters = np.zeros(B, dtype=np.int64)
    verbose = bool(opts["verbose"])
    if verbose:
        print(f"NativeIPM: {B} problem(s), n={n}, {p} equality and {l} inequality rows; "
              "columns: maxima over the running items of the relative residuals and gap")

    def step_fraction(report: tuple[np.ndarray, ...]) -> np.ndarray | float:
        # Fraction of the distance to the boundary taken per item: 0.99 far from the solution
        # and 1 − err near it (err: the largest relative residual or gap), so that the final
        # steps are not held to a 100-fold reduction each (the B = 32 shortest-path LP took 8-9
        # iterations, now 6-7). Not toward the central path (μ > 0); not in float32, where
        # iterates that close to the boundary made the float32 factorization fail; not when the
        # iterations are differentiated: a step that stops just short of the boundary (instead
        # of a full step, α = 1) depends on the data, and its derivative ruined that of
        # truncated unrolls (UnrolledIPM(k): 47 % error for k = 1 and 2 on a QP).
        if mu_t > 0 or c.dtype != torch.float64 or unrolled:
            return _STEP_FRACTION
        return 1.0 - np.clip(np.maximum.reduce(report[:3]), _STEP_GAP_MIN, 1.0 - _STEP_FRACTION)

    # ---- phase 1: Mehrotra predictor-corrector on the homogeneous embedding.
    # s is zero on equality rows throughout (so are zinv, D and every ds), so products with s
    # need no mask. The iterate is packed in one tensor Y = [x, z, s, τ, κ] so that a step is
    # one operation, and its cone part (z_I, s, τ, κ; s_E = ds_E = 0 never limits the step) is
    # one slice of it.
    zero = c.new_zeros(B)
    vecdot = torch.linalg.vecdot
    N = n + m
    Y = torch.cat((x, z, s, tau.unsqueeze(1), kappa.unsqueeze(1)), 1)
    neg_c = -c
    cb = torch.cat((c, b), 1)
    states: list[_State] = []
    for k in range(max_iters + 1):
        x, z, s = Y[:, :n], Y[:, n:N], Y[:, N:N + m]
        tau, kappa, t1 = Y[:, -2], Y[:, -1], Y[:, -2:-1]
        if keep:
            states.append((x, z, s, tau, kappa, code, iters.copy()))
        Atz, Ax = A.rmv(z), A.mv(x)
        s_z = s * z
        cx, bz, sz = vecdot(c, x), vecdot(b, z), s_z.sum(1)
        Axs = Ax + s
        rz = torch.addcmul(Axs, b, t1, value=-1.0)
        if P is None:
            Px, xPx_t = None, zero
            rx = torch.addcmul(Atz, c, t1)
            n_rx, n_Atz = _inf_norms(torch.stack((rx, Atz), 1)).unbind(1)
            n_Px = zero
            rtau = kappa + cx + bz
        else:
            Px = P.mv(x)
            xPx_t = vecdot(x, Px) / tau
            rx = torch.addcmul(Px + Atz, c, t1)
            n_rx, n_Px, n_Atz = _inf_norms(torch.stack((rx, Px, Atz), 1)).unbind(1)
            rtau = kappa + cx + bz + xPx_t
        n_rz, n_Ax, n_s, n_Axs = _inf_norms(torch.stack((rz, Ax, s, Axs), 1)).unbind(1)
        tk = tau * kappa
        mu = (sz + tk) / (l + 1)
        zinv = inverse_z(z)
        D = s * zinv
        # General form: a weak pass (see _WEAK_REG) is decided before factoring (one host read).
        weak = (not (kkt.bounds or kkt.dual) and l > 0
                and bool((D[:, p:].amax(1) < _WEAK_PIVOT * kkt.reg).any()))
        failed = kkt.factor(D, weak)
        h = _host(n_rz, n_rx, n_Ax, n_s, n_Px, n_Atz, n_Axs, tau, cx, bz, sz, xPx_t, rtau, mu,
                  failed.to(tau.dtype), kkt.weak.to(tau.dtype))
        new_code, report = _hsde_codes(h[:-1], norm_b, norm_c, tol, tol_inf, mu_t, l)
        live = code == _RUNNING
        code = np.where(live, new_code, code)
        active = code == _RUNNING
        if verbose:
            _log_iteration("hsde", k, live, report, active)
        if k == max_iters or not active.any():
            break
        iters += active
        frac = np.where(active, step_fraction(report), 0.0)
        mode_k = solve_mode(bool(h[-1][active].any()))
        frac_t = torch.from_numpy(frac).to(c.device, c.dtype)

        # Predictor: the affine direction and the shared solve K [x1; z1] = [−c; b].
        r1 = torch.stack((neg_c, -rx), dim=1)
        r2 = torch.stack((b, s - rz), dim=1)  # d_s/z = s on inequality rows, 0 on equalities
        U = kkt.solve_packed(r1, r2, *mode_k)
        if U.dtype != c.dtype:
            U = U.to(c.dtype)
        U1 = U[:, 0]
        z1 = U1[:, n:]
        den = -vecdot(z1, D * z1) - kappa / tau  # < 0: the τ-equation's pivot
        if P is None:
            gb = cb
        else:
            g = torch.addcmul(c, Px, 2.0 / t1)  # ∇ₓ(cᵀx + xᵀPx/τ) at ξ = x/τ
            gb = torch.cat((g, b), 1)
            e = U1[:, :n] - x / t1
            den = den - vecdot(e, P.mv(e))
        # Regularize the τ pivot: den → 0 like μ at the end, where dτ = num/den turned round-off
        # in num (~ε) into steps of order ε/μ that wrecked converged items (at tol ~1e-12).
        den = den - tau_reg
        cone = Y[:, n + p:]

        def direction(
            U2: Tensor, d_tau: Tensor, d_s_zinv: Tensor, d_kap: Tensor
        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
            # Back-substitution of dτ, then (dx, dz) = (x2, z2) + dτ (x1, z1), ds and dκ,
            # packed like Y; returns them with the largest step that keeps the cone part in it.
            dt = (d_kap / tau - d_tau - vecdot(gb, U2)) / den
            dt1 = dt.unsqueeze(1)
            dU = torch.addcmul(U2, dt1, U1)
            dz = dU[:, n:]
            ds = -torch.addcmul(d_s_zinv, D, dz)
            dk = -(d_kap + kappa * dt) / tau
            dY = torch.cat((dU, ds, dt1, dk.unsqueeze(1)), 1)
            return dY, dz, ds, dt, dk, _boundary_step(cone, dY[:, n + p:])

        _, dz, ds, dt, dk, ratio = direction(U[:, 1], rtau, s, tk)
        sigma = (1.0 - torch.clamp(ratio, max=1.0)) ** 3
        target = sigma * mu if mu_t == 0 else torch.maximum(sigma * mu, mu_t * tau * tau)

        # Corrector: Mehrotra's second-order term and centering toward σμ.
        eta = 1.0 - sigma
        eta1 = eta.unsqueeze(1)
        d_s_zinv = torch.addcmul(s_z, ds, dz).sub_(target.unsqueeze(1) * ineq) * zinv
        d_kap = torch.addcmul(tk, dt, dk) - target
        r2 = torch.addcmul(d_s_zinv, eta1, rz, value=-1.0)
        U = kkt.solve_packed((-eta1 * rx).unsqueeze(1), r2.unsqueeze(1), *mode_k)
        if U.dtype != c.dtype:
            U = U.to(c.dtype)
        dY, _, _, _, _, ratio = direction(U[:, 0], eta * rtau, d_s_zinv, d_kap)
        alpha = _step_length(frac_t, ratio)
        Y = torch.addcmul(Y, alpha.unsqueeze(1), dY)

    x, z, s, tau = Y[:, :n], Y[:, n:N], Y[:, N:N + m], Y[:, -2]

    # Normalize: (x, y, s) = (x, z, s)/τ.
    x, z, s = x / tau.unsqueeze(1), z / tau.unsqueeze(1), s / tau.unsqueeze(1)

    # ---- phase 2 (mu > 0): Newton on [Px + Aᵀy + c; Ax + s − b; s∘y − μ] = 0 from near the path.
    centering = code == _CENTERING
    if mu_t > 0 and centering.any():
        code = np.where(centering, _RUNNING, code)
        for k in range(max_iters + 1):
            Px, Atz, Ax = Pmv(x), A.rmv(z), A.mv(x)
            r1 = Px + Atz + c
            r2 = Ax + s - b
            rc = (s * z - mu_t) * ineq
            n_r2, n_Ax, n_s, n_rc = _inf_norms(torch.stack((r2, Ax, s, rc), 1)).unbind(1)
            n_r1, n_Px, n_Atz = _inf_norms(torch.stack((r1, Px, Atz), 1)).unbind(1)
            zinv = inverse_z(z)
            D = s * zinv
            failed = kkt.factor(D)
            h = _host(n_r2, n_Ax, n_s, n_rc, n_r1, n_Px, n_Atz, failed.to(n_r1.dtype),
                      kkt.weak.to(n_r1.dtype))
            new_code, report = _path_codes(h[:-1], norm_b, norm_c, tol, mu_t)
            live = code == _RUNNING
            code = np.where(live, new_code, code)
            active = code == _RUNNING
            if verbose:  # the μ column: the mean s∘y of the inequality rows
                _log_iteration("path", k, live, (*report, _host(_bdot(s, z * ineq))[0] / l),
                               active)
            if k == max_iters or not active.any():
                break
            iters += active
            frac_t = torch.from_numpy(np.where(active, _STEP_FRACTION, 0.0)).to(c.device, c.dtype)
            # y∘ds + s∘dy = −rc gives ds = −rc/y − D dy, so K [dx; dy] = [−r1; rc/y − r2].
            u1, u2 = kkt_solve((-r1).unsqueeze(1), (rc * zinv - r2).unsqueeze(1),
                               bool(h[-1][active].any()))
            dx, dz = u1.squeeze(1), u2.squeeze(1)
            ds = -(rc * zinv + D * dz)
            ratio = _boundary_step(torch.cat((s[:, p:], z[:, p:]), 1),
                                   torch.cat((ds[:, p:], dz[:, p:]), 1))
            a1 = _step_length(frac_t, ratio).unsqueeze(1)
            x, z, s = torch.addcmul(x, a1, dx), torch.addcmul(z, a1, dz), torch.addcmul(s, a1, ds)

    # ---- diagnostics, computed once, and NaN rows for the items without a solution.
    ok = torch.from_numpy(code == _OPTIMAL).to(c.device).unsqueeze(1)
    nan = torch.full_like
    x = torch.where(ok, x, nan(x, math.nan))
    z = torch.where(ok, z, nan(z, math.nan))
    s = torch.where(ok, s, nan(s, math.nan))
    pres = _inf_norm(A.mv(x) + s - b)
    dres = _inf_norm(Pmv(x) + A.rmv(z) + c)
    gap = _bdot(s, z).abs()
    status = [_CODE_STATUS[int(v)] for v in code.tolist()]
    sol = Solution(
        x=x, y=z, s=s, status=status,
        iterations=iters.tolist(),
        primal_residual=pres.tolist(), dual_residual=dres.tolist(), gap=gap.tolist(),
    )
    return sol, kkt, states
