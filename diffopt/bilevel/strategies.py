"""Hypergradient strategies, the diagnostics record and the non-convergence warning.

Which strategy to pick (``T`` inner steps, ``n`` inner variables):

==============  ======================  =====================================================
strategy        memory of the graph     hypergradient
==============  ======================  =====================================================
Implicit        O(n), independent of T  exact at the inner optimum; wrong when not converged
Unrolled        O(T n)                  exact for the T steps actually run; may vanish/explode
Truncated(k)    O(k n), independent of  biased: ignores how the first T-k steps depend on
                T                       the hyperparameters
==============  ======================  =====================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffopt.bilevel.linear_solve import LinearSolveInfo, WarmStart

SOLVERS = ("cg", "neumann", "direct")


class NotConvergedWarning(UserWarning):
    """The inner problem or the implicit linear solve stopped short of its tolerance.

    The implicit hypergradient assumes :math:`\\nabla_w f(w^\\star, \\lambda) = 0`; away from the
    optimum it is the gradient of a different problem. Raise ``steps``, tune ``lr``, or switch to
    :class:`Unrolled` / :class:`Truncated`, which differentiate the iterates actually computed.

    Examples:
        >>> import warnings, torch
        >>> import diffopt.bilevel as bl
        >>> lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        >>> f = lambda w, lam: ((w - 3.0) ** 2).sum() + lam * (w ** 2).sum()
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     w = bl.minimize(f, torch.zeros(2, dtype=torch.float64), lam, steps=2, lr=0.01)
        >>> caught[0].category is bl.NotConvergedWarning
        True
    """


@dataclass(frozen=True)
class Implicit:
    """Implicit differentiation at the inner optimum (implicit function theorem).

    The inner loop runs without recording a graph; the backward pass solves one linear system with
    the inner Hessian using Hessian-vector products, so memory does not grow with ``steps``.

    .. math::

        \\nabla_w f(w^\\star(\\lambda), \\lambda) = 0
        \\;\\Rightarrow\\;
        \\frac{\\partial w^\\star}{\\partial \\lambda}
        = -\\left[\\nabla^2_{ww} f\\right]^{-1} \\nabla^2_{w\\lambda} f,
        \\qquad
        \\frac{dL}{d\\lambda} = \\nabla_\\lambda L - \\left(\\nabla^2_{\\lambda w} f\\right) u,\\quad
        \\nabla^2_{ww} f\\, u = \\nabla_{w} L .

    Args:
        solver: ``"cg"`` (conjugate gradients; the default, needs a positive-definite Hessian),
            ``"neumann"`` (Neumann series / Richardson iteration) or ``"direct"`` (assemble the
            Hessian with ``n`` products and factor it; small problems only).
        maxiter: maximum Hessian-vector products for ``"cg"`` and ``"neumann"``; ``None``
            picks 100 for ``"cg"`` (enough for a few hundred well-spread eigenvalues) and 10000
            for ``"neumann"``, whose linear rate :math:`1 - \\lambda_{\\min}/\\lambda_{\\max}`
            needs about :math:`\\kappa\\log(1/tol)` products. Both stop as soon as ``tol`` is
            reached and warn when they do not reach it.
        tol: relative residual :math:`\\|Hu - v\\|/\\|v\\|` at which the solve stops.
        alpha: step size of the Neumann series; ``None`` estimates :math:`1/\\lambda_{\\max}(H)`.
        stationarity_tol: when :func:`minimize` gets ``tol=None``, the inner gradient norm above
            which a :class:`NotConvergedWarning` is emitted.
        warm_start: a :class:`~diffopt.bilevel.linear_solve.WarmStart` shared across outer
            steps: ``"cg"`` and ``"neumann"`` start from the previous solve's solution.

    Examples:
        >>> Implicit(solver="neumann", maxiter=500).solver
        'neumann'
    """

    solver: str = "cg"
    maxiter: int | None = None
    tol: float = 1e-10
    alpha: float | None = None
    stationarity_tol: float = 1e-5
    warm_start: WarmStart | None = None

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(
                f"Implicit(solver=...) must be one of {list(SOLVERS)}; received {self.solver!r}."
            )
        if self.maxiter is not None and self.maxiter < 1:
            raise ValueError(f"Implicit(maxiter=...) must be at least 1; received {self.maxiter}.")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(
                f"Implicit(alpha=...) is the Neumann step size and must be positive; received "
                f"{self.alpha}. Leave it as None to estimate 1/lambda_max(H)."
            )

    def iterations(self) -> int:
        """The product budget: ``maxiter``, or the solver's default when it is ``None``."""
        if self.maxiter is not None:
            return self.maxiter
        return 10_000 if self.solver == "neumann" else 100


@dataclass(frozen=True)
class Unrolled:
    """Backpropagate through every inner step (``create_graph=True``).

    Exact for the iterates actually computed, also away from the optimum, and the only strategy
    that also differentiates with respect to a ``init`` that requires grad (as MAML needs). The
    graph of all ``steps`` iterations is kept until backward: memory grows linearly in ``steps``.

    Args:
        first_order: treat inner gradients as constants (no second derivatives). Gradients then
            reach ``init`` through the identity path only, and ``hparams`` get none through the
            inner loop: the first-order MAML approximation.

    Examples:
        >>> Unrolled(first_order=True).first_order
        True
    """

    first_order: bool = False


@dataclass(frozen=True)
class Truncated:
    """Backpropagate through the last ``k`` inner steps only.

    The first ``steps - k`` steps run without a graph and their result is treated as a constant:
    memory is O(k) whatever ``steps`` is, and the hypergradient is biased (the bias shrinks as
    ``k`` grows, geometrically for a strongly convex inner problem solved by gradient descent).

    Args:
        k: number of differentiated final steps, ``1 <= k <= steps``.

    Examples:
        >>> Truncated(10).k
        10
    """

    k: int

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(
                f"Truncated(k) needs a positive integer number of steps; received {self.k!r}."
            )


Strategy = Implicit | Unrolled | Truncated


@dataclass
class Diagnostics:
    """What :func:`minimize` observed; returned with ``return_diagnostics=True``.

    Attributes:
        strategy: the hypergradient strategy used.
        steps: inner steps actually taken (fewer than requested when ``tol`` was reached).
        inner_grad_norm: :math:`\\|\\nabla_w f(w, \\lambda)\\|` at the returned point.
        converged: whether ``inner_grad_norm`` is within the tolerance (``tol``, or for
            :class:`Implicit` with ``tol=None`` its ``stationarity_tol``); ``None`` when no
            tolerance applies (unrolled or truncated with ``tol=None``).
        linear_solve: filled in by the implicit backward pass (the latest one), else ``None``.

    Examples:
        >>> import torch
        >>> import diffopt.bilevel as bl
        >>> lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        >>> f = lambda w, lam: ((w - 3.0) ** 2).sum() + lam * (w ** 2).sum()
        >>> w, diag = bl.minimize(f, torch.zeros(2, dtype=torch.float64), lam, steps=200, lr=0.2,
        ...                       return_diagnostics=True)
        >>> diag.steps, diag.converged
        (200, True)
        >>> w.sum().backward()  # w* = 3/(1+λ): dΣw*/dλ = −6/(1+λ)² = −2.667
        >>> round(float(lam.grad), 4), diag.linear_solve.solver
        (-2.6667, 'cg')
    """

    strategy: Strategy
    steps: int
    inner_grad_norm: float
    converged: bool | None
    linear_solve: LinearSolveInfo | None = field(default=None)
