"""Clarabel backend (interior point; the default for cones beyond LP/QP)."""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp

from diffopt.cones import ConeDims
from diffopt.solvers.base import COMMON_OPTIONS, ItemResult, PerItemBackend, Status


def psd_permutation(dims: ConeDims) -> np.ndarray:
    """Row permutation from diffopt's PSD svec (lower, column-major) to Clarabel's (upper).

    For a symmetric matrix, the upper triangle read column by column is the lower triangle read
    row by row; both use the same √2 scaling of off-diagonal entries. ``A_clarabel =
    A[perm]`` and ``y = y_clarabel[argsort(perm)]`` (non-PSD rows stay in place).
    """
    perm = np.arange(dims.size)
    start = dims.zero + dims.nonneg + sum(dims.soc)
    for k in dims.psd:
        pos = {}
        for j in range(k):
            for i in range(j, k):
                pos[(i, j)] = len(pos)
        upper = [pos[(j, i)] for j in range(k) for i in range(j + 1)]
        perm[start: start + len(upper)] = start + np.asarray(upper)
        start += len(upper)
    return perm


_STATUS = {
    "Solved": Status.OPTIMAL,
    "AlmostSolved": Status.INACCURATE,
    "PrimalInfeasible": Status.INFEASIBLE,
    "AlmostPrimalInfeasible": Status.INFEASIBLE,
    "DualInfeasible": Status.UNBOUNDED,
    "AlmostDualInfeasible": Status.UNBOUNDED,
    "MaxIterations": Status.MAX_ITERATIONS,
    "MaxTime": Status.MAX_ITERATIONS,
    "NumericalError": Status.NUMERICAL_ERROR,
    "InsufficientProgress": Status.NUMERICAL_ERROR,
}


class ClarabelBackend(PerItemBackend):
    """Clarabel (Goulart & Chen), a primal-dual interior-point method for conic programs.

    Options: ``tol`` (sets gap and feasibility tolerances, default 1e-9), ``max_iters``,
    ``verbose``, ``n_jobs``, and any ``clarabel.DefaultSettings`` attribute by name.
    """

    name = "clarabel"
    cones = frozenset({"zero", "nonneg", "soc", "psd", "exp", "pow"})
    quadratic_objective = True

    def accepted_options(self) -> frozenset[str]:
        import clarabel

        settings = clarabel.DefaultSettings()
        names = (key for key in dir(settings) if not key.startswith("_"))
        return COMMON_OPTIONS | {key for key in names if not callable(getattr(settings, key))}

    def solve_one(self, P, c, A, b, dims: ConeDims, options: dict) -> ItemResult:
        import clarabel

        options = dict(options)
        settings = clarabel.DefaultSettings()
        settings.verbose = bool(options.pop("verbose", False))
        tol = options.pop("tol", 1e-9)
        settings.tol_gap_abs = settings.tol_gap_rel = settings.tol_feas = tol
        settings.tol_ktratio = max(tol, 1e-10) * 1e2
        if "max_iters" in options:
            settings.max_iter = int(options.pop("max_iters"))
        for key, val in options.items():
            if not hasattr(settings, key):
                raise ValueError(
                    f"unknown Clarabel option {key!r}; expected one of tol, max_iters, verbose, "
                    "n_jobs or a clarabel.DefaultSettings attribute"
                )
            setattr(settings, key, val)
        cones = []
        if dims.zero:
            cones.append(clarabel.ZeroConeT(dims.zero))
        if dims.nonneg:
            cones.append(clarabel.NonnegativeConeT(dims.nonneg))
        cones += [clarabel.SecondOrderConeT(q) for q in dims.soc]
        cones += [clarabel.PSDTriangleConeT(k) for k in dims.psd]
        cones += [clarabel.ExponentialConeT() for _ in range(dims.exp)]
        # Clarabel's PowerConeT(α) is diffopt's {x^α y^(1-α) >= |z|}, rows (x, y, z).
        cones += [clarabel.PowerConeT(alpha) for alpha in dims.pow]
        n = c.size
        P = sp.csc_matrix((n, n)) if P is None else P
        start = time.perf_counter()
        sol = clarabel.DefaultSolver(P, c, A, b, cones, settings).solve()
        elapsed = time.perf_counter() - start
        status = _STATUS.get(str(sol.status), Status.NUMERICAL_ERROR)
        return ItemResult(np.asarray(sol.x), np.asarray(sol.z), np.asarray(sol.s), status,
                          int(sol.iterations), elapsed)

    def row_permutation(self, dims: ConeDims) -> np.ndarray | None:
        return psd_permutation(dims) if dims.psd else None
