"""Exceptions and warnings raised by diffopt."""

from __future__ import annotations

from cvxpy.error import SolverError as _CvxpySolverError

try:  # diffcp (cvxpylayers' solver layer) is optional
    from diffcp import SolverError as _DiffcpSolverError
except ImportError:  # pragma: no cover - depends on the environment
    _DiffcpSolverError = _CvxpySolverError


class DiffoptError(Exception):
    """Base class of every diffopt exception.

    Examples:
        >>> import torch
        >>> from diffopt import DiffoptError, QPLayer
        >>> try:
        ...     QPLayer()(torch.eye(2), torch.ones(3))
        ... except DiffoptError as err:
        ...     print(type(err).__name__)
        InputError
    """


class ProblemError(DiffoptError, ValueError):
    """The CVXPY problem cannot be turned into a layer (not DPP, wrong parameter list, ...).

    Examples:
        >>> import cvxpy as cp
        >>> from diffopt import CvxpyLayer, ProblemError
        >>> x = cp.Variable(2)
        >>> try:
        ...     CvxpyLayer(cp.Problem(cp.Minimize(cp.sum_squares(x))), [], [x])
        ... except ProblemError as err:
        ...     print(str(err)[:40])
        the problem has no cvxpy.Parameter: a la
    """


class InputError(DiffoptError, ValueError):
    """A value passed to a layer call is malformed (shape, batch size, dtype, NaN, sign...).

    Examples:
        >>> import torch
        >>> from diffopt import InputError, QPLayer
        >>> try:
        ...     QPLayer()(torch.eye(2), torch.ones(3))
        ... except InputError as err:
        ...     print(err)
        P: expected shape (3, 3) or (batch, *(3, 3)) for n=3, m=0, p=0, received (2, 2)
    """


# Code written for cvxpylayers catches diffcp's (and CVXPY's) SolverError: ours is one of both.
_FOREIGN_SOLVER_ERRORS = tuple(dict.fromkeys((_DiffcpSolverError, _CvxpySolverError)))


class SolverError(DiffoptError, RuntimeError, *_FOREIGN_SOLVER_ERRORS):
    """One or more items of a batch were not solved; ``failed`` maps item index to status.

    It is also a ``cvxpy.error.SolverError`` and (when diffcp is installed) a
    ``diffcp.SolverError``, so that ``except`` clauses written for cvxpylayers catch it.

    Attributes:
        failed: ``{item index: Status}`` of the items that did not reach an optimal solution.

    Examples:
        >>> import torch
        >>> from diffopt import QPLayer, SolverError
        >>> P, q = torch.eye(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        >>> G = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
        >>> h = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)  # 1: x ≤ −1, x ≥ 0
        >>> try:
        ...     QPLayer()(P, q, G, h)
        ... except SolverError as err:
        ...     print(err.failed)
        {1: <Status.INFEASIBLE: 'the problem is primal infeasible for these parameter values: no point satisfies the constraints'>}
    """

    def __init__(self, message: str, failed: dict | None = None) -> None:
        super().__init__(message)
        self.failed = dict(failed or {})


class DegenerateWarning(UserWarning):
    """The KKT system of an item was singular; its gradient came from a least-squares solve.

    Examples:
        >>> import warnings, cvxpy as cp, torch
        >>> from diffopt import CvxpyLayer, DegenerateWarning
        >>> x, z = cp.Variable(1), cp.Parameter(1)
        >>> twice = [x <= 1, 2 * x <= 2]  # the same constraint twice: singular KKT at x = 1
        >>> layer = CvxpyLayer(cp.Problem(cp.Minimize(cp.sum_squares(x - z)), twice), [z], [x],
        ...                    solver="clarabel")
        >>> zt = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     layer(zt)[0].sum().backward()
        >>> caught[0].category is DegenerateWarning, layer.info.degenerate
        (True, [True])
    """
