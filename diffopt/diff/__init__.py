"""Differentiators and gradient modes."""

from diffopt.diff.kkt import KKTDifferentiator
from diffopt.diff.smoothing import (
    LPGD,
    Exact,
    GradientMode,
    LogBarrier,
    Perturbed,
    QuadraticSmoothing,
)
from diffopt.diff.unroll import UnrolledIPM

__all__ = ["LPGD", "Exact", "GradientMode", "KKTDifferentiator", "LogBarrier", "Perturbed",
           "QuadraticSmoothing", "UnrolledIPM"]
