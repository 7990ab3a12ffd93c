"""diffopt: differentiable convex optimization layers and bi-level learning for PyTorch."""

from diffopt import bilevel
from diffopt.diff import LPGD, Exact, LogBarrier, Perturbed, QuadraticSmoothing, UnrolledIPM
from diffopt.errors import DegenerateWarning, DiffoptError, InputError, ProblemError, SolverError
from diffopt.layers import CvxpyLayer, QPLayer
from diffopt.solve import SolveInfo
from diffopt.solvers.base import Status

__version__ = "0.1.0"

__all__ = [
    "LPGD",
    "CvxpyLayer",
    "Exact",
    "LogBarrier",
    "Perturbed",
    "QuadraticSmoothing",
    "UnrolledIPM",
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
