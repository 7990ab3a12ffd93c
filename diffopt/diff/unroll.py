r"""Unrolled differentiation: backpropagation through the native solver's iterations.

Implicit differentiation (:class:`~diffopt.diff.smoothing.Exact`) differentiates the optimality
conditions at the returned point. Unrolling instead differentiates the *algorithm*: the native
interior-point method runs with autograd recording every iteration, and the backward pass is
plain backpropagation through its Newton steps (factorizations, triangular solves, step
lengths). As the iterations converge on a problem with a unique, strictly complementary
solution, the derivative of the iterate converges to the implicit one; truncating the recording
to the last ``k`` iterations trades that accuracy for memory (``O(k)`` instead of ``O(T)``
factorizations kept for the backward pass).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from diffopt.diff.smoothing import GradientMode
from diffopt.errors import InputError, ProblemError
from diffopt.solve import _Call, cone_solve
from diffopt.solvers.base import Backend, ConeProgram, Solution


def _vmapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is batched by a torch.func.vmap at some level."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        if torch._C._functorch.is_batchedtensor(t):
            return True
        t = torch._C._functorch.get_unwrapped(t)
    return False


class _Solved(Backend):
    """A backend that returns a solution computed beforehand (for cone_solve's bookkeeping)."""

    name = "native"
    cones = frozenset({"zero", "nonneg"})
    quadratic_objective = True
    equilibrate = False  # the solution is of the program as given

    def __init__(self, solution: Solution) -> None:
        self._solution = solution

    def solve(self, program: ConeProgram, options: dict) -> Solution:
        return self._solution


@dataclass(frozen=True)
class UnrolledIPM(GradientMode):
    r"""Backpropagation through the native interior-point iterations (full or truncated).

    The forward pass is the native solver's solution. The backward pass differentiates the
    iterations that produced it, as recorded by autograd:

    .. math:: \frac{\partial x_T}{\partial\theta} = \sum_{t=T-k+1}^{T}
        \frac{\partial x_T}{\partial x_t}\,\frac{\partial \Phi_t}{\partial\theta},
        \qquad x_t = \Phi_t(x_{t-1};\theta),

    over the last ``k`` steps ``Φ_t`` (all of them for ``k=None``), with the iterate entering
    step ``T − k + 1`` held constant. This deliberately bypasses the custom backward of
    :func:`~diffopt.solve.cone_solve` (no implicit differentiation and no differentiator); it
    is meant for measuring the memory/accuracy trade-off against :class:`Exact`. Memory grows
    with the number of recorded iterations; ``k`` bounds it. The loop first runs without
    recording to count its iterations, then repeats the last ``k`` with recording (at most
    one extra pass of the solver).

    Needs the native solver, so only zero and nonnegative cones (LPs, QPs). Solver options in
    ``solver_args`` (``tol``, ``max_iters``, ``mu``, ...) apply; with ``mu > 0`` the centering
    phase is always recorded. ``torch.func.jacrev``, ``jacfwd`` and ``grad`` differentiate the
    recorded iterations too; ``torch.func.vmap`` is refused (the loop stops per item; batch the
    inputs along the layer's own leading dimension instead).

    Args:
        k: number of final iterations to differentiate through (``None``: all of them).

    Examples:
        >>> import torch
        >>> from diffopt import QPLayer
        >>> from diffopt.diff import UnrolledIPM
        >>> P = torch.eye(2, dtype=torch.float64)
        >>> q = torch.tensor([-2.0, 0.5], dtype=torch.float64, requires_grad=True)
        >>> G, h = torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
        >>> x = QPLayer(gradient=UnrolledIPM(k=5))(P, q, G, h)   # x = min(-q, 1) = (1, -0.5)
        >>> x.sum().backward()
        >>> q.grad.round(decimals=4) + 0.0   # x₁ at its bound, x₂ = −q₂
        tensor([ 0., -1.], dtype=torch.float64)
    """

    k: int | None = None

    def __post_init__(self):
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int)
                                   or self.k < 1):
            raise InputError(
                f"UnrolledIPM: k must be None (all iterations) or an int >= 1, received "
                f"{self.k!r}"
            )

    def solve(self, P_values, c, A_values, b, call: _Call):
        from diffopt.solvers.ipm import NativeIPM

        if any(_vmapped(t) for t in (P_values, c, A_values, b) if t is not None):
            raise InputError(
                "UnrolledIPM cannot run under torch.func.vmap: the iterations stop per item, "
                "which a vmapped loop cannot do. Pass the batch along the layer's own leading "
                "dimension instead (one solve), or use Exact(), whose solve vmap maps onto it; "
                "jacrev and jacfwd work with UnrolledIPM."
            )
        native = NativeIPM()
        why = native.supports(call.dims, call.P_pattern is not None)
        if why is not None:
            raise ProblemError(f"UnrolledIPM needs the native LP/QP solver, but {why}")
        program = ConeProgram(call.P_pattern, P_values, c, call.A_pattern, A_values, b,
                              call.dims)
        sol = native.solve_unrolled(program, call.options, last=self.k)
        # cone_solve's bookkeeping (layer.info, statuses, residuals, on_failure) on the
        # solution already computed; its own backward is not used.
        detached = dataclasses.replace(sol, x=sol.x.detach(), y=sol.y.detach(),
                                       s=sol.s.detach())
        book = dataclasses.replace(call, backend=_Solved(detached))
        try:
            with torch.no_grad():
                cone_solve(P_values, c, A_values, b, book)
        finally:
            call.info = book.info
        ok = book.ok.unsqueeze(1)
        nan = torch.tensor(float("nan"), dtype=c.dtype, device=c.device)
        return tuple(torch.where(ok, t.to(c.dtype), nan) for t in (sol.x, sol.y, sol.s))
