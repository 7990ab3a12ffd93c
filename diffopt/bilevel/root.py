"""Bring your own inner solver: attach the implicit hypergradient to any computed solution.

Whatever code found :math:`w^\\star(\\lambda)` (a closed form, SciPy, a convex-optimization
layer, a simulator run to equilibrium), the implicit function theorem needs only the condition
that characterises it:

- :func:`~diffopt.bilevel.argmin`: :math:`w^\\star` minimises ``fn(w, hparams)``
  (:math:`\\nabla_w f = 0`; in :mod:`diffopt.bilevel.minimize`);
- :func:`root`: :math:`F(w^\\star, \\lambda) = 0` for a given ``optimality`` function;
- :func:`fixed_point`: :math:`w^\\star = T(w^\\star, \\lambda)`;
- :func:`custom_root`: a decorator wrapping a solver function with :func:`root`.

:func:`~diffopt.bilevel.minimize` with :class:`~diffopt.bilevel.Implicit` is its own inner loop
followed by :func:`~diffopt.bilevel.argmin`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch

from diffopt.bilevel._capture import CapturedTensorWarning, warn_captured
from diffopt.bilevel._params import Leaves, Structure, flatten
from diffopt.bilevel.implicit import ImplicitSolution, _Spec
from diffopt.bilevel.strategies import Diagnostics, Implicit, NotConvergedWarning


def _norm(tensors: Leaves) -> float:
    return float(torch.sqrt(sum((t.detach() ** 2).sum() for t in tensors)))


def _check_strategy(backward: Any, symmetric: bool) -> Implicit:
    if not isinstance(backward, Implicit):
        raise TypeError(
            f"backward must be an Implicit(...) strategy here (the solution was computed "
            f"elsewhere, so there are no iterates to unroll); received {backward!r}."
        )
    if backward.solver == "cg" and not symmetric:
        raise ValueError(
            "Implicit(solver='cg') needs a symmetric Jacobian of the optimality condition (a "
            "gradient, as in argmin); this condition was not declared symmetric. Use "
            "Implicit(solver='neumann') (fixed points of contractions) or "
            "Implicit(solver='direct') (small problems), or pass symmetric=True if F is the "
            "gradient of a scalar function of w."
        )
    return backward


def attach(
    optimality: Callable[[Leaves, Leaves], Leaves],
    w: Leaves,
    h: Leaves,
    backward: Implicit,
    diagnostics: Diagnostics,
    *,
    symmetric: bool,
    batched: bool = False,
) -> Leaves:
    """Wire detached solution leaves ``w`` to ``h`` through the implicit backward.

    The one place where :class:`~diffopt.bilevel.implicit.ImplicitSolution` is applied; the
    public functions below and :func:`~diffopt.bilevel.minimize` go through it.
    """
    if batched:
        sizes = [tuple(x.shape[:1]) for x in w]
        if any(s == () for s in sizes) or len(set(sizes)) != 1:
            raise ValueError(
                f"batched=True needs every solution tensor to lead with the same batch "
                f"dimension (one row per independent problem); received shapes "
                f"{[tuple(x.shape) for x in w]}. Stack the problems along dim 0, or pass "
                f"batched=False."
            )
    spec = _Spec(optimality, len(w), backward, diagnostics, symmetric, batched)
    return ImplicitSolution.apply(spec, *(x.detach() for x in w), *h)


def _residual_check(F: Leaves, threshold: float, what: str) -> float:
    norm = _norm(F)
    if not norm <= threshold:
        warnings.warn(
            NotConvergedWarning(
                f"the given solution does not satisfy {what}: its residual norm is {norm:.2e} > "
                f"Implicit(stationarity_tol={threshold:.0e}), and the implicit hypergradient is "
                f"exact only at a solution. Solve more accurately or raise stationarity_tol."
            ),
            stacklevel=3,
        )
    return norm


def _leaf_fn(
    fn: Callable[[Any, Any], Any], ws: Structure, hs: Structure, like: Leaves, what: str
) -> Callable[[Leaves, Leaves], Leaves]:
    """``fn`` on caller containers turned into a map from leaves to leaves shaped like ``w``."""

    def leaves(w: Leaves, h: Leaves) -> Leaves:
        out = fn(ws.build(w), hs.build(h))
        got = (out,) if isinstance(out, torch.Tensor) else out
        if not isinstance(got, (tuple, list)) or [tuple(t.shape) for t in got] != [
            tuple(t.shape) for t in like
        ]:
            received = (
                [tuple(t.shape) for t in got]
                if isinstance(got, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in got)
                else type(out).__name__
            )
            raise ValueError(
                f"{what} must return tensor(s) shaped like the solution, "
                f"{[tuple(t.shape) for t in like]}; received {received}."
            )
        return tuple(got)

    return leaves


def _prepare(solution: Any, hparams: Any) -> tuple[Leaves, Structure, Leaves, Structure]:
    w, ws = flatten(solution, "solution")
    h, hs = flatten(hparams, "hparams")
    return tuple(x.detach() for x in w), ws, h, hs


def root(
    optimality: Callable[[Any, Any], Any],
    solution: Any,
    hparams: Any,
    *,
    backward: Implicit = Implicit(solver="direct"),
    symmetric: bool = False,
    batched: bool = False,
    return_diagnostics: bool = False,
) -> Any:
    """Attach the implicit hypergradient to a solution of :math:`F(w, \\lambda) = 0`.

    ``solution`` may come from any code; it is used as a constant. The returned copy is wired to
    ``hparams``: backpropagating :math:`v = \\partial L/\\partial w^\\star` solves
    :math:`(\\partial_w F)^{\\top} u = v` with vector-Jacobian products of ``optimality`` and
    returns :math:`-(\\partial_\\lambda F)^{\\top} u`.

    Args:
        optimality: ``F(w, hparams)`` returning tensor(s) shaped like ``solution``, zero at the
            solution, differentiable in both arguments by autograd.
        solution: the solution :math:`w^\\star` (a tensor or a tuple of tensors).
        hparams: the outer variables :math:`\\lambda` (a tensor, tuple, or ``nn.Module``).
        backward: the linear solve: ``Implicit(solver="direct")`` by default (any nonsingular
            Jacobian, ``n`` products); ``"neumann"`` for contractions; ``"cg"`` only with
            ``symmetric=True``.
        symmetric: ``F`` is the gradient of a scalar function of ``w`` (its Jacobian is a
            symmetric Hessian); allows conjugate gradients.
        batched: the solution tensors lead with a batch dimension of independent problems
            (row ``b`` of ``F`` depends only on row ``b`` of ``w``; ``hparams`` may be shared or
            batched). The Jacobian is then block diagonal, and ``solver="direct"`` assembles
            every block with as many products as one problem has variables, not all of them.
            ``"cg"`` and ``"neumann"`` solve the stacked system as is.
        return_diagnostics: also return a :class:`~diffopt.bilevel.Diagnostics` record
            (``steps=0``; ``inner_grad_norm`` holds :math:`\\|F(w^\\star, \\lambda)\\|`).

    Returns:
        The solution in the form it was passed, and optionally the diagnostics.

    Warns:
        NotConvergedWarning: when :math:`\\|F(w^\\star,\\lambda)\\|` exceeds
            ``backward.stationarity_tol``, or the backward linear solve misses its tolerance.
        CapturedTensorWarning: when ``optimality`` captures tensors requiring grad that are
            not in ``hparams`` (they would get no gradient).

    Raises:
        TypeError: for a non-:class:`~diffopt.bilevel.Implicit` strategy or bad containers.
        ValueError: for ``solver="cg"`` without ``symmetric=True``, an ``optimality`` whose
            output is not shaped like ``solution``, or ``batched=True`` with solution tensors
            that do not share a leading dimension.

    Examples:
        The root of :math:`F(w, a) = w^3 - a` is :math:`a^{1/3}`, found here by bisection:

        >>> import torch
        >>> import diffopt.bilevel as bl
        >>> a = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)
        >>> lo, hi = 0.0, 10.0
        >>> for _ in range(60):
        ...     mid = (lo + hi) / 2
        ...     lo, hi = (mid, hi) if mid ** 3 < a.item() else (lo, mid)
        >>> w = bl.root(lambda w, a: w ** 3 - a, torch.tensor(lo, dtype=torch.float64), a)
        >>> w.backward()  # d a^(1/3) / da = 1 / (3 a^(2/3)) = 1/12
        >>> round(a.grad.item(), 10)
        0.0833333333
    """
    strategy = _check_strategy(backward, symmetric)
    w, ws, h, hs = _prepare(solution, hparams)
    warn_captured(optimality, h, "optimality")
    F = _leaf_fn(optimality, ws, hs, w, "optimality(w, hparams)")
    with torch.no_grad():
        residual = _residual_check(F(w, h), strategy.stationarity_tol, "optimality(w, hparams) = 0")
    diagnostics = Diagnostics(strategy, 0, residual, residual <= strategy.stationarity_tol)
    out = ws.build(attach(F, w, h, strategy, diagnostics, symmetric=symmetric, batched=batched))
    return (out, diagnostics) if return_diagnostics else out


def fixed_point(
    mapping: Callable[[Any, Any], Any],
    solution: Any,
    hparams: Any,
    *,
    backward: Implicit = Implicit(solver="neumann", alpha=1.0),
    batched: bool = False,
    return_diagnostics: bool = False,
) -> Any:
    """Attach the implicit hypergradient to a fixed point :math:`w^\\star = T(w^\\star, \\lambda)`.

    :func:`root` applied to :math:`F(w, \\lambda) = w - T(w, \\lambda)`. The default backward,
    a Neumann series with ``alpha=1``, is :math:`u = \\sum_j (\\partial_w T^{\\top})^j v`: it
    converges whenever :math:`T` is a contraction, as the forward iteration does.

    Args:
        mapping: ``T(w, hparams)`` returning tensor(s) shaped like ``solution``.
        solution: the fixed point (a tensor or a tuple of tensors), computed by any code.
        hparams: the outer variables :math:`\\lambda`.
        backward: an :class:`~diffopt.bilevel.Implicit` strategy (``"neumann"`` or
            ``"direct"``).
        batched: a leading batch dimension of independent problems, as in :func:`root`.
        return_diagnostics: as in :func:`root`.

    Returns:
        The fixed point wired for hypergradients, in the form it was passed.

    Examples:
        :math:`T(w, b) = \\cos(w) / 2 + b` is a contraction; its fixed point moves with ``b``
        as :math:`\\mathrm{d}w^\\star/\\mathrm{d}b = 1/(1 + \\sin(w^\\star)/2)`:

        >>> import torch
        >>> import diffopt.bilevel as bl
        >>> b = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        >>> T = lambda w, b: torch.cos(w) / 2 + b
        >>> w = torch.zeros((), dtype=torch.float64)
        >>> with torch.no_grad():
        ...     for _ in range(100):
        ...         w = T(w, b)
        >>> w_star = bl.fixed_point(T, w, b)
        >>> w_star.backward()
        >>> abs(b.grad.item() - 1 / (1 + torch.sin(w).item() / 2)) < 1e-9
        True
    """
    if isinstance(backward, Implicit) and backward.solver == "cg":
        raise ValueError(
            "fixed_point cannot use Implicit(solver='cg'): the Jacobian of w - T(w, hparams) is "
            "not symmetric in general. Use solver='neumann' (the default, for contractions) or "
            "'direct'; if T is a gradient step w - eta * grad f, use argmin(f, ...) with CG."
        )
    strategy = _check_strategy(backward, symmetric=False)
    warn_captured(mapping, flatten(hparams, "hparams")[0], "mapping")
    _, ws = flatten(solution, "solution")

    def optimality(w: Any, h: Any) -> Any:
        mapped = mapping(w, h)
        if isinstance(mapped, torch.Tensor) and isinstance(w, torch.Tensor):
            return w - mapped
        if not isinstance(mapped, (tuple, list)) or len(mapped) != len(w):
            raise ValueError(
                f"mapping(w, hparams) must return the same kind of container as the solution "
                f"({ws.kind}); received {type(mapped).__name__}."
            )
        return tuple(a - b for a, b in zip(w, mapped))

    with warnings.catch_warnings():  # already checked on `mapping`; the wrapper captures it
        warnings.simplefilter("ignore", category=CapturedTensorWarning)
        return root(
            optimality,
            solution,
            hparams,
            backward=strategy,
            batched=batched,
            return_diagnostics=return_diagnostics,
        )


def custom_root(
    optimality: Callable[[Any, Any], Any],
    *,
    backward: Implicit = Implicit(solver="direct"),
    symmetric: bool = False,
    batched: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: make ``solver(hparams, *args, **kwargs) -> w`` differentiable in ``hparams``.

    The solver runs under ``torch.no_grad()`` (its own graph is never needed) and its output is
    passed through :func:`root` with ``optimality``.

    Args:
        optimality: ``F(w, hparams)``, zero at the solver's output.
        backward: the linear solve, as in :func:`root`.
        symmetric: as in :func:`root`.
        batched: as in :func:`root`.

    Returns:
        The decorator.

    Examples:
        Ridge regression in closed form; the optimality condition is the gradient of its loss:

        >>> import torch
        >>> import diffopt.bilevel as bl
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(30, 4, generator=g, dtype=torch.float64)
        >>> y = torch.randn(30, generator=g, dtype=torch.float64)
        >>> def grad_loss(w, lam):
        ...     return X.T @ (X @ w - y) + lam * w
        >>> @bl.custom_root(grad_loss, backward=bl.Implicit(solver="cg"), symmetric=True)
        ... def ridge(lam):
        ...     return torch.linalg.solve(X.T @ X + lam * torch.eye(4, dtype=X.dtype), X.T @ y)
        >>> lam = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        >>> ridge(lam).sum().backward()
        >>> A = X.T @ X + 2.0 * torch.eye(4, dtype=X.dtype)
        >>> exact = -(torch.linalg.solve(A, torch.linalg.solve(A, X.T @ y))).sum()
        >>> abs(lam.grad - exact).item() < 1e-10
        True
    """
    _check_strategy(backward, symmetric)

    def decorate(solver: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(solver)
        def solve(hparams: Any, *args: Any, **kwargs: Any) -> Any:
            with torch.no_grad():
                solution = solver(hparams, *args, **kwargs)
            return root(
                optimality,
                solution,
                hparams,
                backward=backward,
                symmetric=symmetric,
                batched=batched,
            )

        return solve

    return decorate
