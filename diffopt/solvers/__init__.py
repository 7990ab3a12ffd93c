"""Solver backends behind one interface (:class:`~diffopt.solvers.base.Backend`)."""

from __future__ import annotations

from diffopt.solvers.base import Backend, ConeProgram, Differentiator, Solution, Status
from diffopt.solvers.clarabel import ClarabelBackend
from diffopt.solvers.ecos import ECOSBackend
from diffopt.solvers.scs import SCSBackend

BACKENDS: dict[str, type[Backend]] = {
    cls.name: cls for cls in (ClarabelBackend, SCSBackend, ECOSBackend)
}


def get_backend(name: str) -> Backend:
    """Instantiate the backend registered under ``name`` (case-insensitive)."""
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(
            f"unknown solver {name!r}; expected one of {sorted(BACKENDS)}"
        )
    return BACKENDS[name.lower()]()


__all__ = ["BACKENDS", "Backend", "ConeProgram", "Differentiator", "Solution", "Status",
           "get_backend"]
