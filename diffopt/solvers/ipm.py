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

Linear algebra. Every Newton system is the quasidefinite KKT system

.. math::

    K = \\begin{bmatrix} P & A^\\top \\\\ A & -D \\end{bmatrix},\\qquad
    D = \\operatorname{diag}(s / z) \\text{ on inequality rows},\\ 0 \\text{ on equality rows},

solved through its regularized reduction ``H = P + δI + Aᵀ(D + δ)⁻¹A = LLᵀ`` (one batched
Cholesky per iteration for the whole batch, ``n × n``), with iterative refinement against the
unregularized ``K``. The derivative of the returned point uses the same matrix: for the
interior-point method the internal variables are ``(x, y)`` and ``s`` is tied to ``y`` by
``s ∘ y = μ`` (inequality rows), so ``∂s/∂y = −D`` and the Jacobian of the optimality conditions is
exactly ``K`` at the returned point. The loop factors ``K`` at the current point *before* deciding
to stop, so the factorization kept for the backward pass is the one of the returned point's
system (no refactorization).

Stopping at ``mu > 0`` (the ``mu`` option) returns the point on the central path with
``s ∘ y = μ``: the minimizer of the log-barrier-smoothed problem
``½xᵀPx + cᵀx − μ Σ log sᵢ``, a smooth surrogate for LPs whose Jacobian is ``K`` as well. The
embedding's iterations then keep ``s ∘ z ≥ μτ²`` and hand each item, once near that point, to a
few damped Newton steps on ``[Px + Aᵀy + c; Ax + s − b; s ∘ y − μ] = 0`` with ``τ`` fixed.

Known limits: inconsistent *and* rank-deficient equality rows end as ``NUMERICAL_ERROR`` rather
than ``INFEASIBLE``; constraints active with a zero multiplier (no strict complementarity)
converge only like ``√μ``, and there ``K`` (hence the derivative) is ill-conditioned; there is no
data equilibration, so badly scaled data needs scaling by the caller.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from diffopt.solvers.base import Backend, ConeProgram, Solution, Status

__all__ = ["NativeIPM"]

# Per-dtype defaults of the data: ``tol`` for residuals and gap, ``tol_infeas`` for the
# certificate tests.
_DEFAULTS: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"tol": 1e-9, "tol_infeas": 1e-8},
    torch.float32: {"tol": 1e-5, "tol_infeas": 1e-4},
}
# Default δ per dtype of the KKT linear algebra: small enough for refinement to remove it in one
# or two steps, large enough that H = P + δI + Aᵀ(D + δ)⁻¹A stays factorizable (cond ≲ 1/δ²).
_REG = {torch.float64: 1e-7, torch.float32: 1e-3}
_OPTION_KEYS = (
    "tol", "tol_infeas", "max_iters", "mu", "warm_start", "reg", "refine", "kkt_dtype",
    "verbose", "n_jobs",
)
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
    """Merge ``options`` with the defaults of ``dtype`` and validate them."""
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
    opts: dict[str, Any] = {
        "max_iters": 100, "mu": 0.0, "warm_start": None, "refine": 1, "kkt_dtype": None,
        "verbose": False,
    }
    opts.update(_DEFAULTS[dtype])
    opts.update({k: v for k, v in options.items() if v is not None})
    if opts["kkt_dtype"] not in (None, torch.float32, torch.float64):
        raise ValueError(
            f"NativeIPM: option 'kkt_dtype' must be torch.float32 or torch.float64, received "
            f"{opts['kkt_dtype']!r}."
        )
    opts["kkt_dtype"] = opts["kkt_dtype"] or torch.float64
    opts.setdefault("reg", _REG[opts["kkt_dtype"]])
    for key in ("tol", "tol_infeas", "reg"):
        if not float(opts[key]) > 0:
            raise ValueError(f"NativeIPM: option {key!r} must be positive, received {opts[key]!r}.")
    if not float(opts["mu"]) >= 0:
        raise ValueError(
            f"NativeIPM: option 'mu' (target barrier parameter) must be >= 0, received "
            f"{opts['mu']!r}; use 0 for the exact solution."
        )
    for key in ("max_iters", "refine"):
        if isinstance(opts[key], bool) or not isinstance(opts[key], int) or opts[key] < 0:
            raise ValueError(
                f"NativeIPM: option {key!r} must be a non-negative integer, received {opts[key]!r}."
            )
    return opts


def _bdot(u: Tensor, v: Tensor) -> Tensor:
    """Row-wise inner product of ``(B, k)`` tensors."""
    return (u * v).sum(dim=1)


def _mv(M: Tensor, v: Tensor) -> Tensor:
    """Batched matrix-vector product ``(B, r, k) @ (B, k) -> (B, r)``."""
    return torch.bmm(M, v.unsqueeze(-1)).squeeze(-1)


def _inf_norm(v: Tensor) -> Tensor:
    return v.abs().amax(dim=1) if v.shape[1] else v.new_zeros(v.shape[0])


def _inf_norms(v: Tensor) -> Tensor:
    """``‖·‖∞`` along the last axis of a ``(B, k, r)`` stack of vectors."""
    return v.abs().amax(dim=2) if v.shape[2] else v.new_zeros(v.shape[:2])


def _log_iteration(phase: str, k: int, live: Tensor, pres: Tensor, dres: Tensor, gap: Tensor,
                   mu: Tensor, running: Tensor) -> None:
    """The ``verbose`` line of one iteration: maxima over the items that were running."""
    if not bool(live.any()):
        return
    p, d, g, u = torch.stack((pres, dres, gap, mu))[:, live].amax(1).tolist()
    print(f"{phase} {k:3d}  pres {p:8.2e}  dres {d:8.2e}  gap {g:8.2e}  mu {u:8.2e}  "
          f"running {int(running.sum())}")


def _boundary_step(v: Tensor, dv: Tensor) -> Tensor:
    """Largest ``α`` with ``v + α dv ≥ 0`` per item (``inf`` when nothing decreases)."""
    return torch.where(dv < 0, v / -dv, math.inf).amin(dim=1)


class _KKT:
    """Factorization and solves of ``K = [[P, Aᵀ], [A, −D]]`` for a batch.

    ``factor`` forms ``H = P + δI + Aᵀ(D + δ)⁻¹A`` and its Cholesky factor (a regularized,
    quasidefinite version of ``K`` reduced to the ``x`` block); ``solve`` solves the regularized
    system and refines against the exact ``K`` so that δ does not bias the answer.
    """

    def __init__(self, P: Tensor, A: Tensor, reg: float, has_P: bool,
                 dtype: torch.dtype) -> None:
        # The linear algebra runs in ``dtype`` (the data's, or float64 for float32 data when
        # asked); vectors are cast on the way in and out of ``factor`` and ``solve``.
        self.dtype, self.out_dtype = dtype, A.dtype
        P, A = P.to(dtype), A.to(dtype)
        self.P, self.A, self.At = P, A, A.transpose(1, 2).contiguous()
        self.has_P = has_P
        self.reg = reg
        self.P_reg = P.clone()
        self.P_reg.diagonal(dim1=1, dim2=2).add_(reg)
        self.L = P.new_empty(P.shape)
        self.D = A.new_zeros(A.shape[:2])
        self.w = A.new_zeros(A.shape[:2])

    def factor(self, D: Tensor) -> Tensor:
        """Factor at the diagonal ``D`` (``(B, m)``, zero on equality rows); return failures."""
        self.D = D = D.to(self.dtype)
        self.w = 1.0 / (D + self.reg)
        H = torch.baddbmm(self.P_reg, self.At, self.A * self.w.unsqueeze(-1))
        L, info = torch.linalg.cholesky_ex(H)
        failed = info > 0
        if bool(failed.any()):
            # Rare: round-off made H indefinite. Retry those items with a larger shift; the
            # refinement steps against the exact K still remove its effect on the solutions.
            bump = failed.to(H.dtype) * (1e4 * self.reg) * H.diagonal(dim1=1, dim2=2).amax(1)
            H.diagonal(dim1=1, dim2=2).add_(bump.unsqueeze(-1))
            L, info = torch.linalg.cholesky_ex(H)
            failed = info > 0
        self.L = L
        return failed

    def _solve_reg(self, r1: Tensor, r2: Tensor) -> tuple[Tensor, Tensor]:
        # Eliminate y = (A x − r2)/(D + δ) from the regularized system, then H x = r1 + Aᵀ(r2 w).
        rhs = torch.baddbmm(r1, self.At, r2 * self.w.unsqueeze(-1))
        x = torch.linalg.solve_triangular(self.L, rhs, upper=False)
        x = torch.linalg.solve_triangular(self.L.mT, x, upper=True)
        y = torch.baddbmm(r2, self.A, x, beta=-1.0) * self.w.unsqueeze(-1)
        return x, y

    def solve(self, r1: Tensor, r2: Tensor, refine: int) -> tuple[Tensor, Tensor]:
        """Solve ``K [x; y] = [r1; r2]`` for ``(B, n, k)``, ``(B, m, k)`` right-hand sides."""
        r1, r2 = r1.to(self.dtype), r2.to(self.dtype)
        x, y = self._solve_reg(r1, r2)
        for _ in range(refine):
            e1 = torch.baddbmm(r1, self.At, y, alpha=-1.0)
            if self.has_P:
                e1 = torch.baddbmm(e1, self.P, x, alpha=-1.0)
            e2 = torch.baddbmm(r2, self.A, x, alpha=-1.0) + self.D.unsqueeze(-1) * y
            dx, dy = self._solve_reg(e1, e2)
            x, y = x + dx, y + dy
        return x.to(self.out_dtype), y.to(self.out_dtype)


class _IPMDifferentiator:
    """Linear solves with ``J = [[P, Aᵀ], [A, −D]]`` at the returned point (see module doc).

    Reuses the Cholesky factor of the last iteration (taken at the returned point), with
    ``refine`` steps of iterative refinement against the exact ``J``. Inputs are ``(B, n)`` /
    ``(B, m)`` vectors or ``(B, n, k)`` / ``(B, m, k)`` stacks of ``k`` of them.
    """

    def __init__(self, kkt: _KKT, refine: int) -> None:
        self._kkt = kkt
        self._refine = refine

    def _solve(self, r1: Tensor, r2: Tensor) -> tuple[Tensor, Tensor]:
        vec = r1.dim() == 2
        if vec:
            r1, r2 = r1.unsqueeze(-1), r2.unsqueeze(-1)
        u1, u2 = self._kkt.solve(r1, r2, self._refine)
        return (u1.squeeze(-1), u2.squeeze(-1)) if vec else (u1, u2)

    def _ds_dy(self, v: Tensor) -> Tensor:
        """``(∂s/∂y) v = −D v`` (symmetric, so also the transpose)."""
        D = self._kkt.D.to(v.dtype)
        return -(D if v.dim() == 2 else D.unsqueeze(-1)) * v

    def adjoint(self, gx: Tensor, gy: Tensor, gs: Tensor) -> tuple[Tensor, Tensor]:
        """``λ = −J⁻ᵀ (g_x, g_y + (∂s/∂y)ᵀ g_s)``; ``J`` is symmetric."""
        return self._solve(-gx, -(gy + self._ds_dy(gs)))

    def tangent(self, dr1: Tensor, dr2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(dx, dy) = −J⁻¹ (dR₁, dR₂)`` and ``ds = (∂s/∂y) dy``."""
        dx, dy = self._solve(-dr1, -dr2)
        return dx, dy, self._ds_dy(dy)


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


class NativeIPM(Backend):
    """Batched primal-dual interior-point method for LPs and QPs in torch (CPU or CUDA).

    Options (keys of the ``options`` dict, all optional):

    - ``tol``: relative tolerance of the primal and dual residuals and of the duality gap
      (default ``1e-9`` in float64, ``1e-5`` in float32).
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
      float64 factorization, ``1e-3`` with float32).
    - ``kkt_dtype``: dtype of the KKT factorization and solves (default ``torch.float64``).
      With float32 data the iterates, residuals and results stay float32 and only the linear
      algebra runs in float64, which keeps the late, ill-conditioned iterations solvable;
      ``torch.float32`` is faster on GPUs with slow float64 but fails more often on larger
      problems (``NUMERICAL_ERROR``).
    - ``refine``: iterative-refinement steps per Newton solve (default 1); the derivative
      uses ``refine + 3``.
    - ``verbose``: print one line per iteration for the whole batch: the largest relative
      primal and dual residuals and duality gap and the largest barrier parameter ``μ`` over
      the items still running, and how many are still running (``hsde`` lines; with ``mu > 0``
      the centering phase prints ``path`` lines, whose ``gap`` is ``‖s∘y − μ‖∞ / μ``).
    - ``n_jobs``: accepted and ignored (the batch is solved at once, not item by item), so
      that ``solver_args`` written for the per-item conic backends also work here.

    The solution carries a differentiator whose linear solves reuse the final Cholesky factor,
    which is that of ``J = [[P, Aᵀ], [A, −diag(s/y)]]`` at the returned point.

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
        with torch.no_grad():
            out, kkt = _solve(program, opts, quadratic)
        out.differentiator = _IPMDifferentiator(kkt, opts["refine"] + 3)
        elapsed = (time.perf_counter() - start) / max(program.batch_size, 1)
        out.solve_time = [elapsed] * program.batch_size
        return out


def _solve(program: ConeProgram, opts: dict[str, Any], has_P: bool) -> tuple[Solution, _KKT]:
    """The two-phase loop: HSDE predictor-corrector, then (for ``mu > 0``) barrier Newton."""
    c = program.c.detach()
    b = program.b.detach()
    A = program.dense_A().detach()
    P = program.dense_P().detach()
    B, n, m = c.shape[0], c.shape[1], b.shape[1]
    p, l = program.dims.zero, program.dims.nonneg
    tol, tol_inf, mu_t = float(opts["tol"]), float(opts["tol_infeas"]), float(opts["mu"])
    if l == 0:
        mu_t = 0.0  # no inequality: no barrier
    refine, max_iters = opts["refine"], opts["max_iters"]

    ineq = c.new_zeros(m)
    ineq[p:] = 1.0
    is_eq = ineq == 0
    kkt_dtype = opts["kkt_dtype"]
    kkt = _KKT(P, A, float(opts["reg"]), has_P, kkt_dtype)
    At = kkt.At if kkt_dtype == c.dtype else A.transpose(1, 2).contiguous()
    norm_b, norm_c = _inf_norm(b), _inf_norm(c)

    def Pmv(v: Tensor) -> Tensor:
        return _mv(P, v) if has_P else torch.zeros_like(v)

    def inverse_z(z: Tensor) -> Tensor:
        # 1/z on inequality rows, 0 on equality rows (there s = 0 and z is free), so that
        # D = s/z is the KKT diagonal on every row.
        return ineq / torch.where(is_eq, 1.0, z)

    # ---- starting point: K(D = I on inequality rows) [x; z] = [−c; b], then shift into the cone.
    kkt.factor(ineq.expand(B, m))
    x, z = kkt.solve(-c.unsqueeze(-1), b.unsqueeze(-1), refine)
    x, z = x.squeeze(-1), z.squeeze(-1)
    s = -z * ineq
    s = s + ineq * torch.clamp(1.0 - s[:, p:].amin(1, keepdim=True), min=0.0) if l else s
    z = z + ineq * torch.clamp(1.0 - z[:, p:].amin(1, keepdim=True), min=0.0) if l else z
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

    code = torch.full((B,), _RUNNING, dtype=torch.int8, device=c.device)
    iters = torch.zeros(B, dtype=torch.int64, device=c.device)
    verbose = bool(opts["verbose"])
    if verbose:
        print(f"NativeIPM: {B} problem(s), n={n}, {p} equality and {l} inequality rows; "
              "columns: maxima over the running items of the relative residuals and gap")

    # ---- phase 1: Mehrotra predictor-corrector on the homogeneous embedding.
    for k in range(max_iters + 1):
        Px, Atz, Ax = Pmv(x), _mv(At, z), _mv(A, x)
        xPx, cx, bz = _bdot(x, Px), _bdot(c, x), _bdot(b, z)
        rx = torch.addcmul(Px + Atz, c, tau.unsqueeze(1))
        rz = torch.addcmul(Ax + s, b, tau.unsqueeze(1), value=-1.0)
        rtau = kappa + cx + bz + xPx / tau
        sz = _bdot(s, z * ineq)
        mu = (sz + tau * kappa) / (l + 1)

        # Convergence tests on the normalized point (x, z, s)/τ, and certificate tests.
        n_rz, n_Ax, n_s, n_Axs = _inf_norms(torch.stack((rz, Ax, s, Ax + s), 1)).unbind(1)
        n_rx, n_Px, n_Atz = _inf_norms(torch.stack((rx, Px, Atz), 1)).unbind(1)
        pscale = torch.maximum(norm_b * tau, torch.maximum(n_Ax, n_s)) + tau
        dscale = torch.maximum(norm_c * tau, torch.maximum(n_Px, n_Atz)) + tau
        feasible = (n_rz <= tol * pscale) & (n_rx <= tol * dscale)
        if mu_t > 0:
            # Hand over to the barrier Newton phase near the μ-central path.
            near = sz <= (10.0 * mu_t * l) * tau * tau
            done = near & (n_rz <= 1e-2 * pscale) & (n_rx <= 1e-2 * dscale)
            new_code = torch.where(done, _CENTERING, _RUNNING)
        pobj = (0.5 * xPx / tau + cx) / tau
        dobj = (-0.5 * xPx / tau - bz) / tau
        rel_gap = (pobj - dobj).abs() / torch.clamp(torch.minimum(pobj.abs(), dobj.abs()), min=1.0)
        if mu_t == 0:
            new_code = torch.where(feasible & (rel_gap <= tol), _OPTIMAL, _RUNNING)
        unbounded = (cx < 0) & (n_Px <= tol_inf * -cx) & (n_Axs <= tol_inf * -cx)
        new_code = torch.where((new_code == _RUNNING) & unbounded, _UNBOUNDED, new_code)
        infeasible = (bz < 0) & (n_Atz <= tol_inf * -bz)
        new_code = torch.where((new_code == _RUNNING) & infeasible, _INFEASIBLE, new_code)
        new_code = torch.where(torch.isfinite(mu + n_rz + n_rx + rtau), new_code, _NUMERICAL)

        zinv = inverse_z(z)
        D = s * zinv
        new_code = torch.where(kkt.factor(D), _NUMERICAL, new_code)
        live = code == _RUNNING
        code = torch.where(live, new_code.to(code.dtype), code)
        active = code == _RUNNING
        if verbose:
            _log_iteration("hsde", k, live, n_rz / pscale, n_rx / dscale, rel_gap, mu / tau**2,
                           active)
        if k == max_iters or not bool(active.any()):
            break
        iters += active

        # Predictor: the affine direction and the shared solve K [x1; z1] = [−c; b].
        xi = x / tau.unsqueeze(1)
        g = torch.addcmul(c, Px, 2.0 / tau.unsqueeze(1))  # ∇ₓ(cᵀx + xᵀPx/τ) at ξ = x/τ
        r1 = torch.stack((-c, -rx), dim=2)
        r2 = torch.stack((b, s - rz), dim=2)  # d_s/z = s on inequality rows, 0 on equalities
        u1, u2 = kkt.solve(r1, r2, refine)
        x1, z1 = u1[..., 0], u2[..., 0]
        x2, z2 = u1[..., 1], u2[..., 1]
        den = -_bdot(z1, D * z1) - kappa / tau  # < 0: the τ-equation's pivot
        if has_P:
            e = x1 - xi
            den = den - _bdot(e, _mv(P, e))
        cone = torch.cat((s[:, p:], z[:, p:], tau.unsqueeze(1), kappa.unsqueeze(1)), 1)

        def direction(
            x2: Tensor, z2: Tensor, d_tau: Tensor, d_s: Tensor, d_kap: Tensor
        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
            # Back-substitution of dτ, then (dx, dz) = (x2, z2) + dτ (x1, z1), ds and dκ;
            # returns them with the largest step that keeps (s, z, τ, κ) in the cone.
            dt = (d_kap / tau - d_tau - _bdot(g, x2) - _bdot(b, z2)) / den
            dz = torch.addcmul(z2, dt.unsqueeze(1), z1)
            dx = torch.addcmul(x2, dt.unsqueeze(1), x1)
            ds = -(d_s * zinv + D * dz)
            dk = -(d_kap + kappa * dt) / tau
            dcone = torch.cat((ds[:, p:], dz[:, p:], dt.unsqueeze(1), dk.unsqueeze(1)), 1)
            ratio = _boundary_step(cone, dcone)
            return dx, dz, ds, dt, dk, ratio

        dx, dz, ds, dt, dk, ratio = direction(x2, z2, rtau, s * z * ineq, tau * kappa)
        sigma = (1.0 - torch.clamp(ratio, max=1.0)) ** 3
        target = torch.maximum(sigma * mu, mu_t * tau * tau)

        # Corrector: Mehrotra's second-order term and centering toward σμ.
        eta = 1.0 - sigma
        d_s = (s * z + ds * dz - target.unsqueeze(1)) * ineq
        d_kap = tau * kappa + dt * dk - target
        r2 = torch.addcmul(d_s * zinv, eta.unsqueeze(1), rz, value=-1.0)
        u1, u2 = kkt.solve((-eta.unsqueeze(1) * rx).unsqueeze(-1), r2.unsqueeze(-1), refine)
        dx, dz, ds, dt, dk, ratio = direction(
            u1.squeeze(-1), u2.squeeze(-1), eta * rtau, d_s, d_kap
        )
        alpha = torch.where(active, torch.clamp(_STEP_FRACTION * ratio, max=1.0), 0.0)
        a1 = alpha.unsqueeze(1)
        x, z, s = torch.addcmul(x, a1, dx), torch.addcmul(z, a1, dz), torch.addcmul(s, a1, ds)
        tau, kappa = torch.addcmul(tau, alpha, dt), torch.addcmul(kappa, alpha, dk)

    # Normalize: (x, y, s) = (x, z, s)/τ.
    x, z, s = x / tau.unsqueeze(1), z / tau.unsqueeze(1), s / tau.unsqueeze(1)

    # ---- phase 2 (mu > 0): Newton on [Px + Aᵀy + c; Ax + s − b; s∘y − μ] = 0 from near the path.
    centering = code == _CENTERING
    if mu_t > 0 and bool(centering.any()):
        code = torch.where(centering, _RUNNING, code)
        for k in range(max_iters + 1):
            Px, Atz, Ax = Pmv(x), _mv(At, z), _mv(A, x)
            r1 = Px + Atz + c
            r2 = Ax + s - b
            rc = (s * z - mu_t) * ineq
            n_r2, n_Ax, n_s, n_rc = _inf_norms(torch.stack((r2, Ax, s, rc), 1)).unbind(1)
            n_r1, n_Px, n_Atz = _inf_norms(torch.stack((r1, Px, Atz), 1)).unbind(1)
            conv = n_r2 <= tol * (1.0 + torch.maximum(norm_b, torch.maximum(n_Ax, n_s)))
            conv &= n_r1 <= tol * (1.0 + torch.maximum(norm_c, torch.maximum(n_Px, n_Atz)))
            new_code = torch.where(conv & (n_rc <= tol * mu_t), _OPTIMAL, _RUNNING)
            new_code = torch.where(torch.isfinite(n_r1 + n_r2 + n_rc), new_code, _NUMERICAL)
            zinv = inverse_z(z)
            D = s * zinv
            new_code = torch.where(kkt.factor(D), _NUMERICAL, new_code)
            live = code == _RUNNING
            code = torch.where(live, new_code.to(code.dtype), code)
            active = code == _RUNNING
            if verbose:
                gap_c = _bdot(s, z * ineq) / l
                _log_iteration("path", k, live, n_r2 / (1.0 + torch.maximum(norm_b, n_Ax)),
                               n_r1 / (1.0 + torch.maximum(norm_c, n_Px)), n_rc / mu_t, gap_c,
                               active)
            if k == max_iters or not bool(active.any()):
                break
            iters += active
            # y∘ds + s∘dy = −rc gives ds = −rc/y − D dy, so K [dx; dy] = [−r1; rc/y − r2].
            u1, u2 = kkt.solve((-r1).unsqueeze(-1), (rc * zinv - r2).unsqueeze(-1), refine)
            dx, dz = u1.squeeze(-1), u2.squeeze(-1)
            ds = -(rc * zinv + D * dz)
            ratio = _boundary_step(torch.cat((s[:, p:], z[:, p:]), 1),
                                   torch.cat((ds[:, p:], dz[:, p:]), 1))
            alpha = torch.where(active, torch.clamp(_STEP_FRACTION * ratio, max=1.0), 0.0)
            a1 = alpha.unsqueeze(1)
            x, z, s = torch.addcmul(x, a1, dx), torch.addcmul(z, a1, dz), torch.addcmul(s, a1, ds)

    # ---- diagnostics, computed once, and NaN rows for the items without a solution.
    ok = (code == _OPTIMAL).unsqueeze(1)
    nan = torch.full_like
    x = torch.where(ok, x, nan(x, math.nan))
    z = torch.where(ok, z, nan(z, math.nan))
    s = torch.where(ok, s, nan(s, math.nan))
    pres = _inf_norm(_mv(A, x) + s - b)
    dres = _inf_norm(Pmv(x) + _mv(At, z) + c)
    gap = _bdot(s, z).abs()
    status = [_CODE_STATUS[int(v)] for v in code.tolist()]
    sol = Solution(
        x=x, y=z, s=s, status=status,
        iterations=iters.tolist(),
        primal_residual=pres.tolist(), dual_residual=dres.tolist(), gap=gap.tolist(),
    )
    return sol, kkt
