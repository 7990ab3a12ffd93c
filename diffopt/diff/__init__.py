"""Differentiators: linear solves with the Jacobian of the optimality conditions."""

from diffopt.diff.kkt import KKTDifferentiator

__all__ = ["KKTDifferentiator"]
