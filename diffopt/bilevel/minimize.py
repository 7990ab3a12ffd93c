"""``minimize``: solve an inner problem and return its solution wired for hypergradients."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from diffopt.bilevel import optimizers
from diffopt.bilevel._capture import warn_captured
from diffopt.bilevel._params import Leaves, Structure, flatten
from diffopt.bilevel.root import _norm, attach
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
        return self.loss_and_grad(w, h, create_graph=create_graph)[1]

    def loss_and_grad(
        self, w: Leaves, h: Leaves, *, create_graph: bool
    ) -> tuple[torch.Tensor, Leaves]:
        """The loss and :math:`\\nabla_w f(w, h)`."""
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
        return loss, grads

    def detached_grad(self, w: Leaves, h: Leaves) -> Leaves:
        """Gradient at ``w`` with no graph kept (neither to ``w`` nor to ``h``)."""
        with torch.enable_grad():
            w_ = tuple(x.detach().requires_grad_() for x in w)
            g = self.grad(w_, optimizers.detach_all(h), create_graph=False)
        return optimizers.detach_all(g)


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
    """Detached inner loop driven by a ``torch.optim`` optimizer (for :class:`Implicit` only).

    Each step gets a closure that recomputes loss and gradient, so line-search optimizers such
    as ``torch.optim.LBFGS`` (which call it several times per step) work too.
    """
    params = [x.detach().clone().requires_grad_() for x in w]
    opt = cls(params, lr=lr, **options)
    h = optimizers.detach_all(h)

    def closure() -> torch.Tensor:
        with torch.enable_grad():
            loss, grads = obj.loss_and_grad(tuple(params), h, create_graph=False)
        for p, g in zip(params, grads):
            p.grad = g
        return loss.detach()

    for t in range(steps):
        closure()
        if tol is not None and _norm(tuple(p.grad for p in params)) <= tol:
            return optimizers.detach_all(params), t
        opt.step(closure)
    return optimizers.detach_all(params), steps


def _check_lr(lr: Any, backward: Any, options: dict[str, Any]) -> float | torch.Tensor:
    """A positive number, or a positive scalar tensor (learnable under unrolling)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point() or not bool(lr.detach() > 0):
            raise ValueError(
                f"lr must be a positive number or a positive floating-point scalar tensor; "
                f"received a tensor of shape {tuple(lr.shape)} and dtype {lr.dtype}."
            )
        lr = lr.reshape(())
    elif isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number; received {lr!r}.")
    learnable = [
        name
        for name, value in [("lr", lr), *options.items()]
        if isinstance(value, torch.Tensor) and value.requires_grad
    ]
    if learnable and isinstance(backward, Implicit):
        raise ValueError(
            f"{', '.join(learnable)} require(s) grad, but backward=Implicit() differentiates the "
            f"optimum, which does not depend on the optimizer's settings (their gradient is "
            f"zero by the implicit function theorem). Use Unrolled() or Truncated(k) to learn "
            f"inner optimizer hyperparameters, or pass them detached."
        )
    return lr


def _check_args(
    steps: Any, tol: Any, backward: Any, optimizer: Any, lr: Any, optimizer_options: Any
) -> tuple[float | torch.Tensor, dict[str, Any]]:
    """Validate :func:`minimize`'s arguments; return the checked ``lr`` and the options dict."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer; received {steps!r}.")
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
    elif not isinstance(optimizer, str):
        raise TypeError(
            f"optimizer must be 'gd', 'sgd', 'adam' or a torch.optim.Optimizer subclass; "
            f"received {optimizer!r}."
        )
    options = dict(optimizer_options or {})
    return _check_lr(lr, backward, options), options


def _implicit(
    obj: _Objective,
    w: Leaves,
    h: Leaves,
    backward: Implicit,
    taken: int,
    tol: float | None,
    grad_norm: float,
    batched: bool,
) -> tuple[Leaves, Diagnostics]:
    """Check stationarity at ``w`` and wire it to ``h`` through the implicit backward."""
    threshold = backward.stationarity_tol if tol is None else tol
    converged = grad_norm <= threshold
    diagnostics = Diagnostics(backward, taken, grad_norm, converged)
    if not converged:
        warnings.warn(
            NotConvergedWarning(
                f"the inner problem is not converged: ||grad_w f|| = {grad_norm:.2e} > "
                f"{threshold:.0e} after {taken} steps, and the implicit hypergradient is "
                f"exact only at the optimum. Raise steps, tune lr, or use Unrolled() / "
                f"Truncated(k) to differentiate the iterates actually computed."
            ),
            stacklevel=4,
        )

    def optimality(w: Leaves, h: Leaves) -> Leaves:
        return obj.grad(w, h, create_graph=True)

    w = attach(optimality, w, h, backward, diagnostics, symmetric=True, batched=batched)
    return w, diagnostics


def _attach_backward(
    obj: _Objective,
    w: Leaves,
    h: Leaves,
    backward: Strategy,
    taken: int,
    tol: float | None,
    return_diagnostics: bool,
    batched: bool = False,
) -> Any:
    """Diagnose ``w`` and, for :class:`Implicit`, wire it to ``h``; build the caller's result."""
    grad_norm = _norm(obj.detached_grad(w, h))
    if isinstance(backward, Implicit):
        w, diagnostics = _implicit(obj, w, h, backward, taken, tol, grad_norm, batched)
    else:  # Unrolled/Truncated: the graph to h is already in the recorded iterates.
        converged = None if tol is None else grad_norm <= tol
        diagnostics = Diagnostics(backward, taken, grad_norm, converged)
    w_star = obj.w_structure.build(w)
    return (w_star, diagnostics) if return_diagnostics else w_star


def argmin(
    fn: InnerFn,
    solution: Any,
    hparams: Any,
    *,
    backward: Implicit = Implicit(),
    batched: bool = False,
    return_diagnostics: bool = False,
) -> Any:
    """Attach the implicit hypergradient to a minimiser of ``fn`` computed by any code.

    ``solution`` (for example from SciPy, a closed form or a CvxpyLayer solve) is taken as a
    constant :math:`w^\\star` with :math:`\\nabla_w f(w^\\star, \\lambda) = 0`; the result is
    a copy wired to ``hparams`` exactly as :func:`minimize` with :class:`Implicit` wires its
    own solution (the same code path, with ``steps=0``).

    Args:
        fn: the inner loss ``fn(w, hparams) -> scalar tensor``, as in :func:`minimize`.
        solution: the minimiser: a tensor, a tuple of tensors, or an ``nn.Module``.
        hparams: the outer variables :math:`\\lambda`.
        backward: an :class:`Implicit` strategy (conjugate gradients by default).
        batched: the solution tensors lead with a batch dimension of independent problems
            (``fn`` is a sum of per-problem losses, so its Hessian is block diagonal); with
            ``solver="direct"`` the blocks take as many products as one problem has variables.
        return_diagnostics: also return the :class:`Diagnostics` record.

    Returns:
        The solution in the form it was passed, and optionally the diagnostics.

    Warns:
        NotConvergedWarning: when :math:`\\|\\nabla_w f\\|` at ``solution`` exceeds
            ``backward.stationarity_tol``, or the backward linear solve misses its tolerance.
        CapturedTensorWarning: when ``fn`` captures tensors requiring grad that are not in
            ``hparams``.

    Examples:
        SciPy's L-BFGS-B solves the inner problem; the hypergradient comes from the IFT:

        >>> import numpy as np, scipy.optimize, torch
        >>> import diffopt.bilevel as bl
        >>> lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        >>> f = lambda w, lam: ((w - 3.0) ** 2).sum() + lam * (w ** 2).sum()
        >>> res = scipy.optimize.minimize(
        ...     lambda x: float(f(torch.from_numpy(x), lam.detach())), np.zeros(2),
        ...     jac=lambda x: 2 * (x - 3.0) + 2 * lam.item() * x, method="L-BFGS-B",
        ...     options={"gtol": 1e-12})
        >>> w = bl.argmin(f, torch.from_numpy(res.x), lam)
        >>> w.sum().backward()  # w* = 3/(1+λ): dΣw*/dλ = −6/(1+λ)²
        >>> round(lam.grad.item(), 6)
        -2.666667
    """
    backward = _check_implicit(backward)
    w, w_structure = flatten(solution, "solution")
    h, h_structure = flatten(hparams, "hparams")
    warn_captured(fn, h, "fn")
    obj = _Objective(fn, w_structure, h_structure)
    w = optimizers.detach_all(w)
    return _attach_backward(obj, w, h, backward, 0, None, return_diagnostics, batched)


def _check_implicit(backward: Any) -> Implicit:
    if not isinstance(backward, Implicit):
        raise TypeError(
            f"argmin attaches the implicit backward to a solution computed elsewhere, so "
            f"backward must be Implicit(...); received {backward!r}. To unroll, run the inner "
            f"loop with minimize(..., backward=Unrolled())."
        )
    return backward


def _run_inner(
    obj: _Objective,
    w0: Leaves,
    h: Leaves,
    optimizer: str | type[torch.optim.Optimizer],
    lr: float | torch.Tensor,
    options: dict[str, Any],
    steps: int,
    tol: float | None,
    backward: Strategy,
) -> tuple[Leaves, int]:
    """The inner loop ``backward`` needs; returns the last iterate and the steps taken.

    :class:`Implicit` records nothing, :class:`Unrolled` records every update, and
    :class:`Truncated` runs ``steps - k`` updates detached, then records the last ``k``.
    """
    if isinstance(optimizer, type):
        return _iterate_torch_optimizer(obj, w0, h, optimizer, float(lr), options, steps, tol)
    opt = optimizers.make(optimizer, lr, options)
    if isinstance(backward, Unrolled):
        w, _, taken = _iterate(
            obj, w0, h, opt, opt.init(w0), steps, tol,
            differentiable=True, first_order=backward.first_order,
        )
        return w, taken
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
    return w, taken


def minimize(
    fn: InnerFn,
    init: Any,
    hparams: Any,
    *,
    steps: int,
    lr: float | torch.Tensor,
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
            with respect to ``hparams`` (a :class:`CapturedTensorWarning` names tensors
            requiring grad that ``fn`` captures from its scope instead).
        init: starting point: a tensor, a tuple of tensors, or an ``nn.Module`` (its parameters).
            Only :class:`Unrolled` differentiates with respect to an ``init`` that requires grad.
        hparams: the outer variables :math:`\\lambda`: a tensor, a tuple of tensors (possibly
            empty), or an ``nn.Module``.
        steps: maximum number of inner updates ``T``; ``0`` takes ``init`` as the solution
            (see also :func:`argmin` for a solution computed elsewhere).
        lr: inner step size: a positive number, or a scalar tensor. Under :class:`Unrolled`
            and :class:`Truncated` a tensor that requires grad gets its hypergradient (as do
            tensor ``momentum``/``betas`` in ``optimizer_options``); :class:`Implicit` raises
            for it, since the optimum does not depend on the step size.
        optimizer: ``"gd"``, ``"sgd"`` (momentum), ``"adam"``, or a ``torch.optim.Optimizer``
            subclass (with :class:`Implicit` only, as its in-place updates are not
            differentiable); each step gets a closure, so ``torch.optim.LBFGS`` works.
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
        CapturedTensorWarning: with :class:`Implicit`, when ``fn`` reads tensors that require
            grad from its closure, globals or bound module instead of ``hparams``.

    Raises:
        TypeError: for containers or strategies of the wrong type.
        ValueError: for negative ``steps``, non-positive ``lr``, a learnable ``lr`` with
            :class:`Implicit`, unknown optimizers, ``Truncated(k)`` with
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
    lr, options = _check_args(steps, tol, backward, optimizer, lr, optimizer_options)
    (w0, w_structure), (h, h_structure) = flatten(init, "init"), flatten(hparams, "hparams")
    if isinstance(backward, Implicit):
        warn_captured(fn, h, "fn")
    obj = _Objective(fn, w_structure, h_structure)
    w, taken = _run_inner(obj, w0, h, optimizer, lr, options, steps, tol, backward)
    return _attach_backward(obj, w, h, backward, taken, tol, return_diagnostics)
