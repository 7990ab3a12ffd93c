r"""Gradient modes: the exact KKT derivative and smoothed surrogates for LPs.

An LP's solution sits at a vertex of the feasible polytope, so ``x*(c)`` is piecewise constant
in the cost: its exact derivative is zero almost everywhere (and undefined at ties). The modes
below replace it by something useful for learning. Each is chosen per layer (``gradient=`` in the
constructor) or per call (``layer(..., gradient=...)``).

- :class:`Exact`: the solution; the KKT derivative (default).
- :class:`QuadraticSmoothing`: the solution of the problem with ``+ γ/2‖x‖²``; its exact
  derivative (QPTL).
- :class:`LogBarrier`: the central-path point ``s∘y = μ`` of the native solver; its exact
  derivative.
- :class:`Perturbed`: ``E[x*(c + σZ)]`` by Monte Carlo; ``E[x*(c+σZ) Zᵀ]/σ`` (Stein's lemma).
- :class:`LPGD`: the solution; ``(x*(c + τ g) − x*(c)) / τ`` for the upstream gradient ``g``.

The perturbation and LPGD estimators differentiate the *cost* ``c`` only; gradients with respect
to the constraint data are zero under these modes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffopt._random import gaussian
from diffopt.errors import InputError, ProblemError
from diffopt.solve import _Call, cone_solve
from diffopt.solvers.base import SparsePattern


class GradientMode:
    """Base class: how a layer solves its batch and what its backward pass returns."""

    def solve(self, P_values, c, A_values, b, call: _Call):
        """Return ``(x, y, s)`` for the batch, differentiable as the mode prescribes."""
        raise NotImplementedError


@dataclass(frozen=True)
class Exact(GradientMode):
    """The exact derivative of the solution map, by implicit differentiation of the KKT system.

    Examples:
        >>> import cvxpy as cp, torch
        >>> from diffopt import CvxpyLayer, Exact
        >>> x, c = cp.Variable(3), cp.Parameter(3)
        >>> lp = cp.Problem(cp.Minimize(c @ x), [cp.sum(x) == 1, x >= 0])
        >>> layer = CvxpyLayer(lp, [c], [x], gradient=Exact())
        >>> cost = torch.tensor([0.0, 0.3, 0.6], dtype=torch.float64, requires_grad=True)
        >>> (sol,) = layer(cost)
        >>> sol[2].backward()  # an LP vertex: the exact gradient vanishes
        >>> cost.grad.abs().max() < 1e-6
        tensor(True)
    """

    def solve(self, P_values, c, A_values, b, call):
        return cone_solve(P_values, c, A_values, b, call)


def _with_diagonal(P_pattern: SparsePattern | None, P_values, n: int, diag):
    """Add ``diag`` (``(B, n)``) to the diagonal of ``P``, growing the pattern if needed."""
    B = diag.shape[0]
    if P_pattern is None:
        idx = np.arange(n)
        return SparsePattern(idx, idx, (n, n)), diag
    keys = P_pattern.rows * n + P_pattern.cols
    all_keys = np.union1d(keys, np.arange(n) * (n + 1))
    pos = torch.as_tensor(np.searchsorted(all_keys, keys), device=diag.device)
    dpos = torch.as_tensor(np.searchsorted(all_keys, np.arange(n) * (n + 1)), device=diag.device)
    values = diag.new_zeros(B, all_keys.size)
    values = values.index_add(1, pos, P_values).index_add(1, dpos, diag)
    return SparsePattern(all_keys // n, all_keys % n, (n, n)), values


@dataclass(frozen=True)
class QuadraticSmoothing(GradientMode):
    r"""Quadratic regularization (QPTL, Wilder et al. 2019): solve and differentiate

    .. math:: \min_x\ c^\top x + \tfrac{\gamma}{2}\|x\|^2 + (\text{the problem's own terms})

    over the same feasible set. The solution becomes a continuous, piecewise-affine function of
    ``c`` whose derivative is nonzero; ``γ → 0`` recovers the LP solution. The regularizer acts on
    every variable of the canonical program (for LPs written directly in CVXPY, the user's
    variables).

    Args:
        gamma: regularization strength ``γ > 0``.

    Examples:
        >>> import cvxpy as cp, torch
        >>> from diffopt import CvxpyLayer, QuadraticSmoothing
        >>> x, c = cp.Variable(3), cp.Parameter(3)
        >>> lp = cp.Problem(cp.Minimize(c @ x), [cp.sum(x) == 1, x >= 0])
        >>> layer = CvxpyLayer(lp, [c], [x], gradient=QuadraticSmoothing(1.0))
        >>> cost = torch.tensor([0.0, 0.3, 0.6], dtype=torch.float64, requires_grad=True)
        >>> (sol,) = layer(cost)  # the smoothed solution: projection of −c/γ on the simplex
        >>> sol.detach().round(decimals=4)
        tensor([0.6333, 0.3333, 0.0333], dtype=torch.float64)
        >>> sol[1].backward()
        >>> cost.grad.round(decimals=4)
        tensor([ 0.3333, -0.6667,  0.3333], dtype=torch.float64)
    """

    gamma: float = 0.1

    def __post_init__(self):
        if not self.gamma > 0:
            raise InputError(f"QuadraticSmoothing: gamma must be > 0, received {self.gamma!r}")

    def solve(self, P_values, c, A_values, b, call):
        diag = c.new_full(c.shape, float(self.gamma))
        call.P_pattern, P_values = _with_diagonal(call.P_pattern, P_values, c.shape[1], diag)
        select = call.backend.supports(call.dims, True)
        if select is not None:
            raise ProblemError(f"QuadraticSmoothing needs a quadratic objective, but {select}")
        return cone_solve(P_values, c, A_values, b, call)


@dataclass(frozen=True)
class LogBarrier(GradientMode):
    r"""Log-barrier (central-path) smoothing (Mandi & Guns 2020, "IntOpt"-style).

    The native interior-point solver stops on the central path at ``s ∘ y = μ``: the minimizer of

    .. math:: \tfrac12 x^\top P x + c^\top x - \mu \textstyle\sum_i \log s_i
        \quad\text{s.t.}\quad Ax + s = b \text{ (inequality rows)},

    a strictly interior, smooth function of the data, differentiated exactly. ``μ → 0`` recovers
    the exact solution. Needs the native solver, so only zero and nonnegative cones (LPs, QPs).

    Args:
        mu: barrier parameter ``μ > 0``.

    Examples:
        >>> import cvxpy as cp, torch
        >>> from diffopt import CvxpyLayer, LogBarrier
        >>> x, c = cp.Variable(3), cp.Parameter(3)
        >>> lp = cp.Problem(cp.Minimize(c @ x), [cp.sum(x) == 1, x >= 0])
        >>> layer = CvxpyLayer(lp, [c], [x], gradient=LogBarrier(0.1))
        >>> cost = torch.tensor([0.0, 0.3, 0.6], dtype=torch.float64, requires_grad=True)
        >>> (sol,) = layer(cost)
        >>> bool((sol > 0).all())  # strictly interior
        True
        >>> sol[2].backward()
        >>> bool(cost.grad[2] < 0)  # raising c₃'s weight needs a lower c₃
        True
    """

    mu: float = 0.1

    def __post_init__(self):
        if not self.mu > 0:
            raise InputError(f"LogBarrier: mu must be > 0, received {self.mu!r}")

    def solve(self, P_values, c, A_values, b, call):
        from diffopt.solvers.ipm import NativeIPM

        native = NativeIPM()
        why = native.supports(call.dims, call.P_pattern is not None)
        if why is not None:
            raise ProblemError(f"LogBarrier needs the native LP/QP solver, but {why}")
        call.backend = native
        call.options = {**call.options, "mu": float(self.mu)}
        return cone_solve(P_values, c, A_values, b, call)


def _plain_solve(P_values, c, A_values, b, call):
    """Solve without recording a graph (the surrogates below supply their own backward)."""
    with torch.no_grad():
        return cone_solve(P_values, c, A_values, b, call)


def _refuse_torch_func(name: str, *tensors) -> None:
    """A clear error for the modes whose estimators torch.func cannot transform."""
    if any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        raise InputError(
            f"{name} cannot run under torch.func transforms (grad, jacrev, jacfwd, vmap): its "
            "backward is a Monte-Carlo or re-solve estimator, not a function torch.func can "
            "transform. Differentiate with loss.backward() or torch.autograd.grad instead."
        )


def _first_order_only(name: str, grad_c: torch.Tensor, c: torch.Tensor) -> tuple:
    """A surrogate's backward result (``grad_c``, then None for the other inputs). Under
    ``create_graph=True`` the gradient is tied to ``c`` through a node that raises when
    differentiated (the estimators have no derivative of their own): a clear error instead of
    a silently zero second derivative."""
    if torch.is_grad_enabled():
        err = torch._C._functions.DelayedError(
            f"second-order derivatives are not available through the {name} surrogate "
            "gradient: its backward is an estimator, not a differentiable function. Use "
            "gradient='exact' (exact second derivatives for LPs and QPs) or differentiate once.",
            2)
        grad_c, _ = err(grad_c.detach().requires_grad_(), c)
    return grad_c, None, None, None, None, None


def _expand(t, M):
    return None if t is None else t.repeat(M, *([1] * (t.ndim - 1)))


class _PerturbedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, c, P_values, A_values, b, mode, call):
        B, n = c.shape
        half = (mode.samples + 1) // 2 if mode.antithetic else mode.samples
        Z = gaussian((half, B, n), mode.seed, c)
        if mode.antithetic:
            Z = torch.cat([Z, -Z])[: mode.samples]
        M = Z.shape[0]
        cc = (c.unsqueeze(0) + mode.sigma * Z).reshape(M * B, n)
        x, y, s = _plain_solve(_expand(P_values, M), cc, _expand(A_values, M), _expand(b, M), call)
        xs, ys, ss = (t.reshape(M, B, -1) for t in (x, y, s))
        ctx.save_for_backward(c, Z, xs, ys, ss)
        ctx.sigma = mode.sigma
        return xs.mean(0), ys.mean(0), ss.mean(0)

    @staticmethod
    def backward(ctx, gx, gy, gs):
        c, Z, xs, ys, ss = ctx.saved_tensors
        # d/dc E[f(c + σZ)] = E[f(c + σZ) Z] / σ for Gaussian Z, applied to f = ⟨g, solution⟩
        w = (gx.unsqueeze(0) * xs).sum(-1)
        w = w + (gy.unsqueeze(0) * ys).sum(-1) + (gs.unsqueeze(0) * ss).sum(-1)
        grad_c = (w.unsqueeze(-1) * Z).mean(0) / ctx.sigma
        return _first_order_only("Perturbed", grad_c, c)


@dataclass(frozen=True)
class Perturbed(GradientMode):
    r"""Perturbed optimizer (Berthet et al. 2020): the forward pass returns the Monte-Carlo mean

    .. math:: \bar x(c) = \mathbb E_Z\,[x^\star(c + \sigma Z)],\qquad Z \sim \mathcal N(0, I),

    a smooth function of ``c``, and the backward pass the unbiased estimator of its Jacobian
    ``E[x*(c + σZ) Zᵀ] / σ`` on the same samples. All ``samples × batch`` problems are solved as
    one batch.

    Args:
        sigma: perturbation scale ``σ > 0``.
        samples: Monte-Carlo samples per item.
        seed: seed of the perturbations (reproducible estimates); None draws them from torch's
            default generator (fresh each call, reproducible under ``torch.manual_seed``).
        antithetic: use pairs ``±Z`` (lower variance, same cost).

    Examples:
        >>> import cvxpy as cp, torch
        >>> from diffopt import CvxpyLayer, Perturbed
        >>> x, c = cp.Variable(3), cp.Parameter(3)
        >>> lp = cp.Problem(cp.Minimize(c @ x), [cp.sum(x) == 1, x >= 0])
        >>> layer = CvxpyLayer(lp, [c], [x], gradient=Perturbed(sigma=0.5, samples=32, seed=0))
        >>> cost = torch.tensor([0.0, 0.3, 0.6], dtype=torch.float64, requires_grad=True)
        >>> (sol,) = layer(cost)  # the mean of perturbed vertices
        >>> round(float(sol.sum().detach()), 9)
        1.0
        >>> sol[2].backward()
        >>> bool(cost.grad[2] < 0)
        True
    """

    sigma: float = 1.0
    samples: int = 10
    seed: int | None = None
    antithetic: bool = True

    def __post_init__(self):
        if not self.sigma > 0:
            raise InputError(f"Perturbed: sigma must be > 0, received {self.sigma!r}")
        if not (isinstance(self.samples, int) and self.samples >= 1):
            raise InputError(f"Perturbed: samples must be an int >= 1, received {self.samples!r}")

    def solve(self, P_values, c, A_values, b, call):
        _refuse_torch_func("Perturbed", P_values, c, A_values, b)
        return _PerturbedFn.apply(c, P_values, A_values, b, self, call)


class _LPGDFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, c, P_values, A_values, b, mode, call):
        x, y, s = _plain_solve(P_values, c, A_values, b, call)
        ctx.mode, ctx.call = mode, call
        ctx.data = (P_values, A_values, b)
        ctx.save_for_backward(c, x)
        return x, y, s

    @staticmethod
    def backward(ctx, gx, gy, gs):
        c, x = ctx.saved_tensors
        mode, call = ctx.mode, ctx.call
        P_values, A_values, b = ctx.data
        n = c.shape[1]
        # Re-solve with the cost moved along the upstream gradient; the optional proximal term
        # ρ/2‖x − x*‖² keeps the re-solve unique (it vanishes at x* for τ = 0).
        cost = c + mode.tau * gx
        pattern = call.P_pattern
        if mode.rho > 0:
            pattern, P_values = _with_diagonal(pattern, P_values, n, c.new_full(c.shape, mode.rho))
            cost = cost - mode.rho * x
        resolve = _Call(pattern, call.A_pattern, call.dims, call.backend, call.options,
                        call.on_failure, call.allow_inaccurate, call.kkt)
        x_tau, _, _ = _plain_solve(P_values, cost, A_values, b, resolve)
        if mode.central:
            x_back, _, _ = _plain_solve(P_values, cost - 2 * mode.tau * gx, A_values, b, resolve)
            grad_c = (x_tau - x_back) / (2 * mode.tau)
        else:
            grad_c = (x_tau - x) / mode.tau
        return _first_order_only("LPGD", grad_c, c)


@dataclass(frozen=True)
class LPGD(GradientMode):
    r"""Lagrangian proximal gradient descent (Paulus et al. 2024) for the cost vector.

    The forward pass returns the exact solution; the backward pass replaces the (zero almost
    everywhere) derivative by a finite difference of re-solves along the upstream gradient
    ``g = ∂L/∂x``:

    .. math:: \nabla_c L \approx \frac{x^\star(c + \tau g) - x^\star(c)}{\tau},

    which equals the exact VJP when ``x*`` is differentiable and ``τ → 0``, and gives informative
    directions for LPs when ``τ`` is large enough to cross to another vertex.

    Args:
        tau: step ``τ > 0`` of the re-solve.
        rho: optional proximal term ``ρ/2‖x − x*‖²`` added to the re-solve (``ρ ≥ 0``).
        central: use the central difference ``(x*(c + τg) − x*(c − τg)) / 2τ``.

    Examples:
        >>> import cvxpy as cp, torch
        >>> from diffopt import LPGD, CvxpyLayer
        >>> x, c = cp.Variable(3), cp.Parameter(3)
        >>> lp = cp.Problem(cp.Minimize(c @ x), [cp.sum(x) == 1, x >= 0])
        >>> layer = CvxpyLayer(lp, [c], [x], gradient=LPGD(tau=1.0))
        >>> cost = torch.tensor([0.0, 0.3, 0.6], dtype=torch.float64, requires_grad=True)
        >>> (sol,) = layer(cost)
        >>> (-sol[2]).backward()  # want more of vertex 3: g = (0, 0, −1), re-solve at c + τg
        >>> cost.grad.round(decimals=4) + 0.0
        tensor([-1.,  0.,  1.], dtype=torch.float64)
    """

    tau: float = 1.0
    rho: float = 0.0
    central: bool = False

    def __post_init__(self):
        if not self.tau > 0:
            raise InputError(f"LPGD: tau must be > 0, received {self.tau!r}")
        if not self.rho >= 0:
            raise InputError(f"LPGD: rho must be >= 0, received {self.rho!r}")

    def solve(self, P_values, c, A_values, b, call):
        _refuse_torch_func("LPGD", P_values, c, A_values, b)
        return _LPGDFn.apply(c, P_values, A_values, b, self, call)


def as_mode(gradient) -> GradientMode:
    """Accept a :class:`GradientMode` instance, None or ``"exact"``."""
    if gradient is None or gradient == "exact":
        return Exact()
    if isinstance(gradient, GradientMode):
        return gradient
    raise InputError(
        f"gradient must be a diffopt.diff GradientMode (Exact(), QuadraticSmoothing(gamma), "
        f"LogBarrier(mu), Perturbed(sigma, samples), LPGD(tau)) or 'exact', received {gradient!r}"
    )
