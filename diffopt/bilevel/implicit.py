"""The implicit-function-theorem backward: the one hand-derived derivative of the bi-level module.

At a solution of the inner problem the stationarity condition holds,

.. math::

    F(w^\\star, \\lambda) := \\nabla_w f(w^\\star, \\lambda) = 0 .

Differentiating it in :math:`\\lambda` gives :math:`H\\,\\partial w^\\star/\\partial\\lambda =
-\\nabla^2_{w\\lambda} f` with :math:`H = \\nabla^2_{ww} f` (symmetric). A vector-Jacobian product
with the upstream gradient :math:`v = \\partial L/\\partial w^\\star` therefore needs one solve,

.. math::

    H u = v, \\qquad
    \\frac{\\partial L}{\\partial \\lambda} = -\\left(\\nabla^2_{w\\lambda} f\\right)^{\\top} u
    = -\\nabla_\\lambda \\langle \\nabla_w f(w^\\star, \\lambda), u \\rangle .

Both :math:`Hp` and the last product are double-backward passes through ``fn`` at the saved
point, so nothing of the inner loop is stored: only :math:`w^\\star` and :math:`\\lambda`.

For a general condition :math:`F(w^\\star, \\lambda) = 0` (:mod:`diffopt.bilevel.root`) the same
derivation solves :math:`(\\partial_w F)^{\\top} u = v` with vector-Jacobian products of
:math:`F`; the Jacobian is symmetric only when :math:`F` is a gradient, as above.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from diffopt.bilevel import linear_solve
from diffopt.bilevel._params import Leaves
from diffopt.bilevel.strategies import Diagnostics, Implicit, NotConvergedWarning


@dataclass(frozen=True)
class _Spec:
    """Everything the backward needs besides tensors.

    ``optimality`` maps flat leaves ``(w, hparams)`` to the leaves of :math:`F(w, \\lambda)`,
    which vanish at the solution; ``symmetric`` says its Jacobian in ``w`` is symmetric (it is a
    gradient), which conjugate gradients and the symmetrised direct solve rely on. ``batched``
    says every leaf of ``w`` leads with the same batch dimension of independent problems (item
    ``b`` of ``F`` depends only on item ``b`` of ``w``), so the direct solve needs only the
    per-item size in products.
    """

    optimality: Callable[[Leaves, Leaves], Leaves]
    n_w: int
    strategy: Implicit
    diagnostics: Diagnostics
    symmetric: bool
    batched: bool = False


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(vec: torch.Tensor, like: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    out, start = [], 0
    for t in like:
        out.append(vec[start : start + t.numel()].view_as(t))
        start += t.numel()
    return tuple(out)


def _rows(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Leaves with a common leading batch dimension as one ``(batch, n)`` matrix."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)


def _unrows(mat: torch.Tensor, like: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    out, start = [], 0
    for t in like:
        size = t[0].numel()
        out.append(mat[:, start : start + size].reshape(t.shape))
        start += size
    return tuple(out)


def _grad_or_zero(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    grad_outputs: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, ...]:
    grads = torch.autograd.grad(
        outputs, inputs, grad_outputs=grad_outputs, retain_graph=True, allow_unused=True
    )
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs))


def _solve(strategy: Implicit, matvec: linear_solve.Matvec, v: torch.Tensor, symmetric: bool):
    warm = strategy.warm_start
    x0 = None if warm is None else warm.initial(v)
    if strategy.solver == "cg":
        u, info = linear_solve.cg(matvec, v, maxiter=strategy.iterations(), tol=strategy.tol, x0=x0)
    elif strategy.solver == "neumann":
        u, info = linear_solve.neumann(
            matvec, v, maxiter=strategy.iterations(), tol=strategy.tol, alpha=strategy.alpha, x0=x0
        )
    else:
        u, info = linear_solve.direct(matvec, v, tol=strategy.tol, symmetric=symmetric)
    if warm is not None:
        warm.solution = u.detach()
    return u, info


class ImplicitSolution(torch.autograd.Function):
    """Identity on :math:`w^\\star` in the forward; the IFT vector-Jacobian product backward.

    Inputs are ``(spec, *w_star, *hparams)``; outputs are copies of ``w_star``.
    """

    @staticmethod
    def forward(spec: _Spec, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(w.detach().clone() for w in tensors[: spec.n_w])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.spec = inputs[0]
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grad_w: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        spec: _Spec = ctx.spec
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[1 + spec.n_w :]
        none_for_w: tuple[None, ...] = (None,) * (1 + spec.n_w)
        if not any(needs):
            return none_for_w + (None,) * len(needs)

        with torch.enable_grad():
            w = tuple(t.detach().requires_grad_() for t in saved[: spec.n_w])
            lam = tuple(
                t.detach().requires_grad_(need) for t, need in zip(saved[spec.n_w :], needs)
            )
            # F kept with its graph: every product below is one more backward of it.
            F = spec.optimality(w, lam)

            def vjp(p: torch.Tensor) -> torch.Tensor:  # (dF/dw)^T p: H p for F = grad_w f
                return _flat(_grad_or_zero(F, w, _unflat(p, w)))

            v = _flat(grad_w)
            if spec.batched and spec.strategy.solver == "direct":
                # Block-diagonal Jacobian: one product per per-item coordinate gives every block.
                def block_vjp(P: torch.Tensor) -> torch.Tensor:
                    return _rows(_unflat(vjp(_flat(_unrows(P, w))), w))

                u_rows, info = _solve(spec.strategy, block_vjp, _rows(grad_w), spec.symmetric)
                u = _flat(_unrows(u_rows, w))
            else:
                u, info = _solve(spec.strategy, vjp, v, spec.symmetric)
            spec.diagnostics.linear_solve = info
            if not info.converged:
                warnings.warn(
                    NotConvergedWarning(
                        f"the implicit linear solve (solver={info.solver!r}) stopped at relative "
                        f"residual {info.residual:.2e} > tol={spec.strategy.tol:.0e} after "
                        f"{info.iterations} Hessian-vector products; the hypergradient is "
                        f"inaccurate. Raise Implicit(maxiter=...), use solver='cg' (symmetric "
                        f"problems) or 'direct' (small ones), or check that the Jacobian of the "
                        f"optimality condition is nonsingular (the inner Hessian positive "
                        f"definite)."
                    ),
                    stacklevel=2,
                )
            # dL/dlambda = -(dF/dlambda)^T u = -grad_lambda <F, u>
            wanted = [x for x, need in zip(lam, needs) if need]
            mixed = iter(_grad_or_zero(F, wanted, _unflat(u, w)))
        lam_grads = tuple(-next(mixed) if need else None for need in needs)
        return none_for_w + lam_grads
