"""``minimize``: solve an inner problem and return its solution wired for hypergradients."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from diffopt.bilevel import optimizers
from diffopt.bilevel._params import Leaves, Structure, flatten
from diffopt.bilevel.implicit import ImplicitSolution, _Spec
from diffopt.bilevel.strategies import (
    Diagnostics,
    Implicit,
    NotConvergedWarning,
    Strategy,
    Truncated,
    Unrolled,
)

InnerFn = Callable[[Any, Any], torch.Tensor]


class _Objective:
    """``fn`` bound to the caller's containers: evaluates gradients on flat leaves."""

    def __init__(self, fn: InnerFn, w_structure: Structure, h_structure: Structure) -> None:
        self.fn = fn
        self.w_structure = w_structure
        self.h_structure = h_structure

    def grad(self, w: Leaves, h: Leaves, *, create_graph: bool) -> Leaves:
        """:math:`\\nabla_w f(w, h)`; with ``create_graph`` it is itself differentiable."""
        loss = self.fn(self.w_structure.build(w), self.h_structure.build(h))
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"fn(w, hparams) must return a scalar tensor (the inner loss); received {shape}. "
                f"Reduce it, e.g. with .sum() or .mean()."
            )
        grads = torch.autograd.grad(loss, w, create_graph=create_graph, allow_unused=True)
        unused = [i for i, g in enumerate(grads) if g is None]
        if unused:
            raise ValueError(
                f"fn(w, hparams) does not depend on the inner parameter(s) at position {unused} "
                f"of init, so the inner problem is not defined for them. Compute the loss from "
                f"the w argument it receives (not from a captured copy), or drop those "
                f"parameters from init."
            )
        return grads

    def detached_grad(self, w: Leaves, h: Leaves) -> Leaves:
        """Gradient at ``w`` with no graph kept (neither to ``w`` nor to ``h``)."""
        with torch.enable_grad():
            w_ = tuple(x.detach().requires_grad_() for x in w)
            g = self.grad(w_, optimizers.detach_all(h), create_graph=False)
        return optimizers.detach_all(g)


def _norm(tensors: Leaves) -> float:
    return float(torch.sqrt(sum((t.detach() ** 2).sum() for t in tensors)))


def _detach_state(state: optimizers.State) -> optimizers.State:
    return tuple(optimizers.detach_all(part) for part in state)


def _iterate(
    obj: _Objective,
    w: Leaves,
    h: Leaves,
    opt: optimizers.Optimizer,
    state: optimizers.State,
    steps: int,
    tol: float | None,
    *,
    differentiable: bool,
    first_order: bool = False,
) -> tuple[Leaves, optimizers.State, int]:
    """Run up to ``steps`` optimizer updates; stop early once ``||grad|| <= tol``.

    Detached: no graph is built, memory is independent of ``steps``. Differentiable: each update
    is recorded, with second-order terms unless ``first_order``.
    """
    if differentiable:
        w = tuple(x if x.requires_grad else x.detach().requires_grad_() for x in w)
    for t in range(steps):
        if differentiable:
            g = obj.grad(w, h, create_graph=not first_order)
        else:
            g = obj.detached_grad(w, h)
        if tol is not None and _norm(g) <= tol:
            return w, state, t
        if differentiable:
            w, state = opt.step(w, g, state)
        else:
            with torch.no_grad():
                w, state = opt.step(w, g, state)
    return w, state, steps


def _iterate_torch_optimizer(
    obj: _Objective,
    w: Leaves,
    h: Leaves,
    cls: type[torch.optim.Optimizer],
    lr: float,
    options: dict[str, Any],
    steps: int,
    tol: float | None,
) -> tuple[Leaves, int]:
    """Detached inner loop driven by a ``torch.optim`` optimizer (for :class:`Implicit` only)."""
    params = [x.detach().clone().requires_grad_() for x in w]
    opt = cls(params, lr=lr, **options)
    h = optimizers.detach_all(h)
    for t in range(steps):
        with torch.enable_grad():
            grads = obj.grad(tuple(params), h, create_graph=False)
        if tol is not None and _norm(grads) <= tol:
            return optimizers.detach_all(params), t
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    return optimizers.detach_all(params), steps


def _check_args(
    steps: Any, lr: Any, tol: Any, backward: Any, optimizer: Any
) -> type[torch.optim.Optimizer] | None:
    """Validate scalar arguments; return the torch optimizer class if one was given."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer; received {steps!r}.")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number; received {lr!r}.")
    if tol is not None and not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"tol must be None or a non-negative number; received {tol!r}.")
    if isinstance(backward, type) and issubclass(backward, (Implicit, Unrolled, Truncated)):
        raise TypeError(
            f"backward must be a strategy instance; received the class {backward.__name__}. "
            f"Call it: backward={backward.__name__}()."
        )
    if not isinstance(backward, (Implicit, Unrolled, Truncated)):
        raise TypeError(
            f"backward must be Implicit(...), Unrolled() or Truncated(k); received "
            f"{type(backward).__name__}."
        )
    if isinstance(backward, Truncated) and backward.k > steps:
        raise ValueError(
            f"Truncated(k={backward.k}) cannot differentiate more steps than are run "
            f"(steps={steps}); lower k or use Unrolled() to differentiate all of them."
        )
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        if not isinstance(backward, Implicit):
            raise ValueError(
                f"torch.optim.{optimizer.__name__} updates parameters in place and cannot be "
                f"differentiated, so it works only with backward=Implicit(); received "
                f"{type(backward).__name__}. Use optimizer='gd', 'sgd' or 'adam' to unroll."
            )
        return optimizer
    if not isinstance(optimizer, str):
        raise TypeError(
            f"optimizer must be 'gd', 'sgd', 'adam' or a torch.optim.Optimizer subclass; "
            f"received {optimizer!r}."
        )
    return None


def minimize(
    fn: InnerFn,
    init: Any,
    hparams: Any,
    *,
    steps: int,
    lr: float,
    optimizer: str | type[torch.optim.Optimizer] = "gd",
    backward: Strategy = Implicit(),
    tol: float | None = None,
    optimizer_options: dict[str, Any] | None = None,
    return_diagnostics: bool = False,
) -> Any:
    """Approximately solve :math:`w^\\star(\\lambda) = \\arg\\min_w f(w, \\lambda)`, differentiably.

    The returned :math:`w^\\star` is connected to the autograd graph of ``hparams``: any outer
    loss :math:`L(w^\\star, \\lambda)` can be backpropagated to get the hypergradient
    :math:`\\mathrm{d}L/\\mathrm{d}\\lambda`, computed by the chosen ``backward`` strategy.

    With :class:`Implicit` the inner loop records nothing and the backward pass solves

    .. math::

        \\nabla^2_{ww} f(w^\\star, \\lambda)\\, u = \\nabla_{w} L, \\qquad
        \\frac{\\mathrm{d}L}{\\mathrm{d}\\lambda} = \\nabla_\\lambda L
        - \\nabla^2_{\\lambda w} f(w^\\star, \\lambda)\\, u ,

    with Hessian-vector products; :class:`Unrolled` and :class:`Truncated` backpropagate through
    the (last ``k``) optimizer updates instead.

    Args:
        fn: the inner loss ``fn(w, hparams) -> scalar tensor``. ``w`` and ``hparams`` arrive in
            the form they were passed (a module arrives as a :class:`FunctionalModule`). Every
            tensor that should receive a hypergradient must reach ``fn`` through ``hparams``:
            :class:`Implicit` re-evaluates ``fn`` at the solution and differentiates only
            with respect to ``hparams``.
        init: starting point: a tensor, a tuple of tensors, or an ``nn.Module`` (its parameters).
            Only :class:`Unrolled` differentiates with respect to an ``init`` that requires grad.
        hparams: the outer variables :math:`\\lambda`: a tensor, a tuple of tensors (possibly
            empty), or an ``nn.Module``.
        steps: maximum number of inner updates ``T``.
        lr: inner step size.
        optimizer: ``"gd"``, ``"sgd"`` (momentum), ``"adam"``, or a ``torch.optim.Optimizer``
            subclass (with :class:`Implicit` only, as its in-place updates are not
            differentiable).
        backward: :class:`Implicit` (default), :class:`Unrolled` or :class:`Truncated`.
        tol: stop once :math:`\\|\\nabla_w f\\| \\le` ``tol``. With :class:`Truncated` it ends
            the undifferentiated phase early; the last ``k`` steps always run.
        optimizer_options: extra fields of the optimizer, e.g. ``{"momentum": 0.9}``.
        return_diagnostics: also return a :class:`Diagnostics` record.

    Returns:
        :math:`w^\\star` in the form of ``init`` (a :class:`FunctionalModule` for a module), and
        with ``return_diagnostics=True`` the pair ``(w_star, diagnostics)``. The record's
        ``linear_solve`` field is filled in when an implicit backward pass runs.

    Warns:
        NotConvergedWarning: with :class:`Implicit`, when the inner gradient norm at the returned
            point exceeds ``tol`` (or ``Implicit.stationarity_tol`` when ``tol`` is None), and
            when the backward linear solve misses its tolerance.

    Raises:
        TypeError: for containers or strategies of the wrong type.
        ValueError: for non-positive ``steps``/``lr``, unknown optimizers, ``Truncated(k)`` with
            ``k > steps``, a torch optimizer with a non-implicit strategy, a non-scalar ``fn``
            or one that ignores some of ``w``.

    Examples:
        Ridge regression with a learnable penalty; the hypergradient of a validation loss:

        >>> import torch
        >>> import diffopt.bilevel as bl
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(20, 3, generator=g, dtype=torch.float64)
        >>> y = torch.randn(20, generator=g, dtype=torch.float64)
        >>> lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        >>> def inner(w, lam):
        ...     return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * lam * (w ** 2).sum()
        >>> w, info = bl.minimize(inner, torch.zeros(3, dtype=torch.float64), lam, steps=500,
        ...                       lr=0.5, backward=bl.Implicit(solver="cg"),
        ...                       return_diagnostics=True)
        >>> ((X[:5] @ w - y[:5]) ** 2).mean().backward()
        >>> info.converged, info.linear_solve.converged, lam.grad.shape
        (True, True, torch.Size([]))
    """
    torch_optimizer = _check_args(steps, lr, tol, backward, optimizer)
    options = dict(optimizer_options or {})
    w0, w_structure = flatten(init, "init")
    h, h_structure = flatten(hparams, "hparams")
    obj = _Objective(fn, w_structure, h_structure)

    if torch_optimizer is not None:
        w, taken = _iterate_torch_optimizer(obj, w0, h, torch_optimizer, lr, options, steps, tol)
    else:
        opt = optimizers.make(optimizer, float(lr), options)  # type: ignore[arg-type]
        if isinstance(backward, Unrolled):
            w, _, taken = _iterate(
                obj, w0, h, opt, opt.init(w0), steps, tol,
                differentiable=True, first_order=backward.first_order,
            )
        else:
            free = steps - backward.k if isinstance(backward, Truncated) else steps
            w0_detached = optimizers.detach_all(w0)
            w, state, taken = _iterate(
                obj, w0_detached, h, opt, opt.init(w0_detached), free, tol, differentiable=False
            )
            if isinstance(backward, Truncated):
                w, _, _ = _iterate(
                    obj, w, h, opt, _detach_state(state), backward.k, None, differentiable=True
                )
                taken += backward.k

    grad_norm = _norm(obj.detached_grad(w, h))
    if isinstance(backward, Implicit):
        threshold = backward.stationarity_tol if tol is None else tol
        converged: bool | None = grad_norm <= threshold
    else:
        converged = None if tol is None else grad_norm <= tol
    diagnostics = Diagnostics(backward, taken, grad_norm, converged)

    if isinstance(backward, Implicit):
        if not converged:
            warnings.warn(
                NotConvergedWarning(
                    f"the inner problem is not converged: ||grad_w f|| = {grad_norm:.2e} > "
                    f"{threshold:.0e} after {taken} steps, and the implicit hypergradient is "
                    f"exact only at the optimum. Raise steps, tune lr, or use Unrolled() / "
                    f"Truncated(k) to differentiate the iterates actually computed."
                ),
                stacklevel=2,
            )
        spec = _Spec(fn, w_structure, h_structure, len(w), backward, diagnostics)
        w = ImplicitSolution.apply(spec, *w, *h)
    w_star = w_structure.build(w)
    return (w_star, diagnostics) if return_diagnostics else w_star
