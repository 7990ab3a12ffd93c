"""Solver backends behind one interface (:class:`~diffopt.solvers.base.Backend`)."""

from __future__ import annotations

from diffopt.solvers.base import Backend, ConeProgram, Differentiator, Solution, Status
from diffopt.solvers.clarabel import ClarabelBackend
from diffopt.solvers.ecos import ECOSBackend
from diffopt.solvers.ipm import NativeIPM
from diffopt.solvers.scs import SCSBackend

BACKENDS: dict[str, type[Backend]] = {
    cls.name: cls for cls in (NativeIPM, ClarabelBackend, SCSBackend, ECOSBackend)
}


def get_backend(name: str, dims=None, quadratic: bool = False) -> Backend:
    """Instantiate the backend registered under ``name`` (case-insensitive).

    ``"auto"`` picks the native batched solver when the cones allow it (LPs and QPs: zero and
    nonnegative cones only) and Clarabel otherwise; it needs the program's ``dims``.
    """
    if isinstance(name, str) and name.lower() == "auto":
        native = NativeIPM()
        if dims is not None and native.supports(dims, quadratic) is None:
            return native
        return ClarabelBackend()
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(
            f"unknown solver {name!r}; expected 'auto' or one of {sorted(BACKENDS)}"
        )
    return BACKENDS[name.lower()]()


__all__ = ["BACKENDS", "Backend", "ConeProgram", "Differentiator", "Solution", "Status",
           "get_backend"]
