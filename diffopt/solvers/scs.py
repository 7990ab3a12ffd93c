"""SCS backend (operator splitting; first order, scales to large problems)."""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp

from diffopt.cones import ConeDims
from diffopt.solvers.base import COMMON_OPTIONS, ItemResult, PerItemBackend, Status

#: SCS 3's settings (its documentation's list, and the Python wrapper's linear_solver).
SETTINGS = frozenset({
    "normalize", "scale", "adaptive_scale", "rho_x", "max_iters", "eps_abs", "eps_rel",
    "eps_infeas", "alpha", "time_limit_secs", "verbose", "warm_start", "acceleration_lookback",
    "acceleration_interval", "write_data_filename", "log_csv_filename", "linear_solver",
})


# SCS's status_val codes (scs.SOLVED, ...). SOLVED_INACCURATE is SCS's best guess when it stops
# at max_iters or time_limit_secs before the tolerance ("solved (inaccurate - reached ...)").
_STATUS = {1: Status.OPTIMAL, 2: Status.INACCURATE, -1: Status.UNBOUNDED, -6: Status.UNBOUNDED,
           -2: Status.INFEASIBLE, -7: Status.INFEASIBLE}


class SCSBackend(PerItemBackend):
    """SCS (O'Donoghue et al.), ADMM on the homogeneous self-dual embedding.

    SCS is first order: at tight tolerances it needs many iterations, and its solutions (and so
    the gradients) are only as accurate as ``tol``. Options: ``tol`` (sets ``eps_abs`` and
    ``eps_rel``, default 1e-9), ``max_iters`` (default 100000), ``verbose``, ``n_jobs``, and any
    SCS setting by name.
    """

    name = "scs"
    cones = frozenset({"zero", "nonneg", "soc", "psd", "exp", "pow"})
    quadratic_objective = True

    def accepted_options(self) -> frozenset[str]:
        return COMMON_OPTIONS | SETTINGS

    def solve_one(self, P, c, A, b, dims: ConeDims, options: dict) -> ItemResult:
        import scs

        unknown = sorted(set(options) - SETTINGS - {"tol"})
        if unknown:
            raise ValueError(f"unknown SCS option(s) {unknown}; expected tol, max_iters, "
                             f"verbose, n_jobs or SCS settings among {sorted(SETTINGS)}")
        options = dict(options)
        tol = options.pop("tol", 1e-9)
        settings = {"eps_abs": tol, "eps_rel": tol, "eps_infeas": 1e-9,
                    "max_iters": int(options.pop("max_iters", 100_000)),
                    "verbose": bool(options.pop("verbose", False))}
        settings.update(options)
        m = b.size
        if m == 0:  # SCS needs at least one row: add the trivial equality 0·x = 0
            A, b = sp.csc_matrix((1, c.size)), np.zeros(1)
        # SCS's "p": a positive α is the primal cone {x^α y^(1-α) >= |z|} (a negative one would
        # be its dual), rows (x, y, z), after the exponential cones as in diffopt's order.
        cone = {"z": max(dims.zero, 1 - m), "l": dims.nonneg, "q": list(dims.soc),
                "s": list(dims.psd), "ep": dims.exp, "p": list(dims.pow)}
        data = {"A": A, "b": b, "c": c}
        if P is not None:
            data["P"] = P
        start = time.perf_counter()
        try:
            sol = scs.SCS(data, cone, **settings).solve()
        except ValueError as err:  # SCS validates its settings in C
            raise ValueError(f"SCS rejected the options {options}: {err}") from err
        elapsed = time.perf_counter() - start
        info = sol["info"]
        status = _STATUS.get(int(info["status_val"]), Status.NUMERICAL_ERROR)
        return ItemResult(np.asarray(sol["x"]), np.asarray(sol["y"])[:m], np.asarray(sol["s"])[:m],
                          status, int(info["iter"]), elapsed)
