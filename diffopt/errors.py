"""Exceptions and warnings raised by diffopt."""

from __future__ import annotations


class DiffoptError(Exception):
    """Base class of every diffopt exception."""


class ProblemError(DiffoptError, ValueError):
    """The CVXPY problem cannot be turned into a layer (not DPP, wrong parameter list, ...)."""


class InputError(DiffoptError, ValueError):
    """A value passed to a layer call is malformed (shape, batch size, dtype, NaN, sign...)."""


class SolverError(DiffoptError, RuntimeError):
    """One or more items of a batch were not solved; ``failed`` maps item index to status.

    Attributes:
        failed: ``{item index: Status}`` of the items that did not reach an optimal solution.
    """

    def __init__(self, message: str, failed: dict | None = None) -> None:
        super().__init__(message)
        self.failed = dict(failed or {})


class DegenerateWarning(UserWarning):
    """The KKT system of an item was singular; its gradient came from a least-squares solve."""
