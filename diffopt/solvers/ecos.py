"""ECOS backend (interior point for LPs and SOCPs; optional dependency ``ecos``)."""

from __future__ import annotations

import time

import numpy as np

from diffopt.cones import ConeDims
from diffopt.solvers.base import COMMON_OPTIONS, ItemResult, PerItemBackend, Status

#: ECOS's keyword settings (those of a continuous problem).
SETTINGS = frozenset({"feastol", "abstol", "reltol", "feastol_inacc", "abstol_inacc",
                      "reltol_inacc", "max_iters", "nitref", "verbose"})

_STATUS = {0: Status.OPTIMAL, 1: Status.INFEASIBLE, 2: Status.UNBOUNDED,
           10: Status.INACCURATE, 11: Status.INFEASIBLE, 12: Status.UNBOUNDED,
           -1: Status.MAX_ITERATIONS}


def _exp_permutation(dims: ConeDims) -> np.ndarray:
    """ECOS orders each exponential cone as (x, z, y) relative to diffopt's (x, y, z)."""
    perm = np.arange(dims.size)
    start = dims.size - 3 * dims.exp
    for k in range(dims.exp):
        o = start + 3 * k
        perm[o + 1], perm[o + 2] = o + 2, o + 1
    return perm


class ECOSBackend(PerItemBackend):
    """ECOS (Domahidi et al.), an interior-point method for LPs, SOCPs and exponential cones.

    No quadratic objective and no PSD cone. Options: ``tol`` (sets ``abstol``, ``reltol`` and
    ``feastol``, default 1e-9), ``max_iters``, ``verbose``, ``n_jobs``, and any ECOS keyword.
    """

    name = "ecos"
    cones = frozenset({"zero", "nonneg", "soc", "exp"})
    quadratic_objective = False

    def accepted_options(self) -> frozenset[str]:
        return COMMON_OPTIONS | SETTINGS

    def solve_one(self, P, c, A, b, dims: ConeDims, options: dict) -> ItemResult:
        try:
            import ecos
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("solver='ecos' needs the ecos package: pip install ecos") from err
        options = dict(options)
        tol = options.pop("tol", 1e-9)
        kwargs = {"abstol": tol, "reltol": tol, "feastol": tol,
                  "max_iters": int(options.pop("max_iters", 200)),
                  "verbose": bool(options.pop("verbose", False))}
        kwargs.update(options)
        z = dims.zero
        cone = {"l": dims.nonneg, "q": list(dims.soc), "e": dims.exp}
        start = time.perf_counter()
        if z:
            sol = ecos.solve(c, A[z:], b[z:], cone, A[:z], b[:z], **kwargs)
        else:
            sol = ecos.solve(c, A[z:], b[z:], cone, **kwargs)
        elapsed = time.perf_counter() - start
        status = _STATUS.get(sol["info"]["exitFlag"], Status.NUMERICAL_ERROR)
        y = np.concatenate([np.asarray(sol["y"]).ravel() if z else np.zeros(0), sol["z"]])
        s = np.concatenate([np.zeros(z), sol["s"]])
        return ItemResult(np.asarray(sol["x"]), y, s, status, int(sol["info"]["iter"]), elapsed)

    def row_permutation(self, dims: ConeDims) -> np.ndarray | None:
        return _exp_permutation(dims) if dims.exp else None
