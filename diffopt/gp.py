"""Log-log convex programs (DGP) as layers, through CVXPY's DGP -> DCP reduction.

A DGP problem in positive variables ``x`` and positive parameters ``a`` becomes a DCP problem in
``u = log x`` whose parameters are ``log a`` (and, where a parameter is an exponent such as in
``x**a``, ``a`` itself). The cone program of that DCP problem is built by
:class:`~diffopt.canon.ConeTemplate` as for any DCP problem; this module maps the user's tensors
onto its parameters (``log``) and its solution back (``exp`` for primal variables; constraint
duals are those of the log-space constraints, as CVXPY and cvxpylayers report them). Both maps
are plain torch, so autograd carries the gradient through them. A ``symmetric`` parameter
enters as ``log S``, of which the template uses the symmetric part (off the diagonal,
``√(S_ij S_ji)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import cvxpy as cp
import torch

from diffopt.errors import InputError, ProblemError


def _dgp_culprit(expr):
    """Deepest sub-expression (or constraint) of ``expr`` that breaks DGP with DPP."""
    for arg in getattr(expr, "args", []):
        if not arg.is_dgp(dpp=True):
            return _dgp_culprit(arg)
    return expr


class GpReduction:
    """The DCP form of a DGP problem, and the maps between the two.

    Args:
        problem: a log-log convex ``cvxpy.Problem`` (``problem.is_dgp(dpp=True)``).
        parameters: the DGP problem's parameters, in the order of the layer's tensors.
        variables: its positive variables and/or constraint dual variables to return.

    Attributes:
        problem: the reduced (DCP) problem.
        parameters: the DCP problem's parameters, one per entry of :attr:`sources`.
        variables: the DCP counterparts of ``variables`` (log-space variables, duals of the
            log-space constraints).
        sources: for each DCP parameter, ``(k, log)``: it is the layer's ``k``-th tensor, or its
            logarithm when ``log``.
        exp_outputs: for each requested output, whether it comes back through ``exp``.
    """

    def __init__(self, problem: cp.Problem, parameters: Sequence, variables: Sequence) -> None:
        if not isinstance(problem, cp.Problem):
            raise ProblemError(
                f"expected a cvxpy.Problem, received {type(problem).__name__}; build the problem "
                "with cvxpy.Problem(objective, constraints) and pass it as the first argument"
            )
        if not problem.is_dgp(dpp=True):
            parts = [problem.objective] + list(problem.constraints)
            bad = next(p for p in parts if not p.is_dgp(dpp=True))
            hint = ("it is DCP: drop gp=True" if problem.is_dcp() else
                    "variables and parameters must be declared pos=True, and parameters may only "
                    "enter as log-log affine terms (https://www.cvxpy.org/tutorial/dgp)")
            raise ProblemError(
                f"gp=True expects a log-log convex (DGP, DPP) problem, but `{_dgp_culprit(bad)}` "
                f"breaks the DGP rules; {hint}"
            )
        reduction = cp.reductions.Dgp2Dcp(problem)
        self.problem, inverse = reduction.apply(problem)
        # DGP parameter/variable id -> its log-space parameter/variable
        logs = {p.id: lp for p, lp in reduction.canon_methods._parameters.items()}
        log_vars = {v.id: lv for v, lv in reduction.canon_methods._variables.items()}
        direct = {p.id for p in self.problem.parameters()}  # kept as is (exponents)
        in_problem = {p.id for p in problem.parameters()}

        self.parameters, self.sources = [], []
        for k, p in enumerate(parameters):
            pid = getattr(p, "id", None)
            if pid in logs:
                self.parameters.append(logs[pid])
                self.sources.append((k, True))
            if pid in direct or pid not in in_problem:
                # an exponent enters as itself; an unknown entry passes through so that the
                # template's check names it
                self.parameters.append(p)
                self.sources.append((k, False))

        reduced_cons = {c.id: c for c in self.problem.constraints}
        owner = {d.id: (c, j) for c in problem.constraints
                 for j, d in enumerate(c.dual_variables)}
        self.variables, self.exp_outputs = [], []
        for v in variables:
            vid = getattr(v, "id", None)
            if vid in log_vars:
                self.variables.append(log_vars[vid])
                self.exp_outputs.append(True)
            elif vid in owner:
                con, j = owner[v.id]
                self.variables.append(
                    reduced_cons[inverse.cons_id_map[con.id]].dual_variables[j])
                self.exp_outputs.append(False)
            else:  # not in the problem: the template's check names it
                self.variables.append(v)
                self.exp_outputs.append(False)
        self._names = [p.name() if isinstance(p, cp.Parameter) else repr(p) for p in parameters]

    def check_value(self, k: int, value: torch.Tensor) -> None:
        """Raise an InputError unless the ``k``-th tensor may enter through its logarithm."""
        if any(j == k and log for j, log in self.sources) and not bool((value > 0).all()):
            raise InputError(
                f"parameter {self._names[k]!r} of the geometric program (gp=True) enters through "
                f"its logarithm and must be positive, but received values <= 0 "
                f"(min {float(value.min()):.3g}); pass positive values"
            )

    def to_dcp(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The DCP problem's parameter values from the layer's (positive) tensors."""
        return [torch.log(tensors[k]) if log else tensors[k] for k, log in self.sources]

    def from_dcp(self, outputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The requested outputs from the DCP solution: ``exp`` of the log-space variables."""
        return tuple(torch.exp(o) if e else o for o, e in zip(outputs, self.exp_outputs))
