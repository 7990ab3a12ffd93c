"""diffopt: differentiable convex optimization layers and bi-level learning for PyTorch."""

from diffopt import bilevel
from diffopt.errors import DegenerateWarning, DiffoptError, InputError, ProblemError, SolverError
from diffopt.layers import CvxpyLayer, QPLayer
from diffopt.solve import SolveInfo
from diffopt.solvers.base import Status

__version__ = "0.1.0"

__all__ = [
    "CvxpyLayer",
    "DegenerateWarning",
    "DiffoptError",
    "InputError",
    "ProblemError",
    "QPLayer",
    "SolveInfo",
    "SolverError",
    "Status",
    "__version__",
    "bilevel",
]
