"""Bi-level optimization: differentiate through the solution of an inner problem.

:func:`argmin`, :func:`root`, :func:`fixed_point` and the :func:`custom_root` decorator attach
the implicit hypergradient to a solution computed by any code (bring your own inner solver).

:func:`minimize` solves :math:`w^\\star(\\lambda) = \\arg\\min_w f(w, \\lambda)` with a
(differentiable) optimizer loop and returns :math:`w^\\star` wired to the autograd graph of
:math:`\\lambda`, with the hypergradient computed by one of three strategies:
:class:`Implicit` (implicit function theorem, O(1) memory in the number of steps),
:class:`Unrolled` (backpropagation through every step) and :class:`Truncated` (through the last
``k`` steps). :func:`maml_adapt` and :func:`imaml_adapt` build meta-learning on top of it.
:func:`spo_plus`, :func:`perturbed_fenchel_young`, :func:`regret` and :func:`normalized_regret`
are decision-focused losses and metrics for learning the costs of linear programs.
"""

from diffopt.bilevel._capture import CapturedTensorWarning
from diffopt.bilevel._params import FunctionalModule
from diffopt.bilevel.linear_solve import LinearSolveInfo, WarmStart
from diffopt.bilevel.losses import normalized_regret, perturbed_fenchel_young, regret, spo_plus
from diffopt.bilevel.maml import imaml_adapt, maml_adapt
from diffopt.bilevel.minimize import argmin, minimize
from diffopt.bilevel.root import custom_root, fixed_point, root
from diffopt.bilevel.strategies import (
    Diagnostics,
    Implicit,
    NotConvergedWarning,
    Truncated,
    Unrolled,
)

__all__ = [
    "CapturedTensorWarning",
    "Diagnostics",
    "FunctionalModule",
    "Implicit",
    "LinearSolveInfo",
    "NotConvergedWarning",
    "Truncated",
    "Unrolled",
    "WarmStart",
    "argmin",
    "custom_root",
    "fixed_point",
    "imaml_adapt",
    "maml_adapt",
    "minimize",
    "normalized_regret",
    "perturbed_fenchel_young",
    "regret",
    "root",
    "spo_plus",
]
