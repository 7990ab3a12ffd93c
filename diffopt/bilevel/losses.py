r"""Decision-focused losses and metrics for learning the cost vector of a linear program.

All functions take an *oracle*: a callable mapping a batch of cost vectors ``(B, n)`` to the
minimizers ``(B, n)`` of ``min_x cᵀx`` over the fixed feasible set — for instance a
:class:`~diffopt.CvxpyLayer` whose only parameter is the cost (it is then called without
recording a graph). Problems are minimizations throughout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffopt._random import gaussian
from diffopt.errors import InputError

Oracle = Callable[[torch.Tensor], torch.Tensor]


def _solve(oracle, cost: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = oracle(cost)
    if isinstance(out, tuple):  # a layer returns a tuple of variables
        out = out[0]
    if out.shape != cost.shape:
        raise InputError(
            f"the oracle must map costs of shape (B, n) to solutions of the same shape, "
            f"received {tuple(out.shape)} for costs {tuple(cost.shape)}"
        )
    return out


def _check(pred_cost: torch.Tensor, **others: torch.Tensor) -> None:
    if pred_cost.ndim != 2:
        raise InputError(f"pred_cost: expected shape (B, n), received {tuple(pred_cost.shape)}")
    for name, t in others.items():
        if t.shape[0] != pred_cost.shape[0]:
            raise InputError(
                f"{name}: expected batch size {pred_cost.shape[0]} (as pred_cost), "
                f"received shape {tuple(t.shape)}"
            )


class _SPOPlus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, cost, sol, obj, oracle):
        x_tilde = _solve(oracle, 2 * pred - cost)
        # ℓ = max_x (c − 2ĉ)ᵀx + 2ĉᵀx*(c) − z*(c),  the max attained at x*(2ĉ − c)
        loss = ((cost - 2 * pred) * x_tilde).sum(1) + 2 * (pred * sol).sum(1) - obj
        ctx.save_for_backward(sol, x_tilde)
        return loss

    @staticmethod
    def backward(ctx, g):
        sol, x_tilde = ctx.saved_tensors
        return 2 * g.unsqueeze(1) * (sol - x_tilde), None, None, None, None


def spo_plus(pred_cost, true_cost, true_sol, true_obj, oracle: Oracle,
             reduction: str = "mean") -> torch.Tensor:
    r"""SPO+ loss (Elmachtoub & Grigas, "Smart predict, then optimize").

    .. math::

        \ell_{\text{SPO+}}(\hat c, c) = \max_{x \in S}\{(c - 2\hat c)^\top x\}
            + 2\hat c^\top x^\star(c) - z^\star(c),

    a convex upper bound on the regret, with subgradient ``2(x*(c) − x*(2ĉ − c))``.

    Args:
        pred_cost: predicted costs ``ĉ``, ``(B, n)``.
        true_cost: true costs ``c``, ``(B, n)``.
        true_sol: ``x*(c)``, ``(B, n)``.
        true_obj: ``z*(c) = cᵀx*(c)``, ``(B,)``.
        oracle: LP solver, costs -> minimizers.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Examples:
        >>> import torch
        >>> oracle = lambda c: torch.nn.functional.one_hot(c.argmin(1), c.shape[1]).to(c)
        >>> c = torch.tensor([[1.0, 2.0, 3.0]])
        >>> x = oracle(c)
        >>> c_hat = torch.tensor([[3.0, 2.0, 1.0]], requires_grad=True)
        >>> loss = spo_plus(c_hat, c, x, (c * x).sum(1), oracle)
        >>> loss.backward()
        >>> c_hat.grad
        tensor([[ 2.,  0., -2.]])
    """
    _check(pred_cost, true_cost=true_cost, true_sol=true_sol, true_obj=true_obj)
    return _reduce(_SPOPlus.apply(pred_cost, true_cost, true_sol, true_obj, oracle), reduction)


class _PerturbedFY(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, sol, oracle, sigma, samples, seed):
        B, n = pred.shape
        Z = gaussian((samples, B, n), seed, pred)
        costs = pred.unsqueeze(0) + sigma * Z
        xs = _solve(oracle, costs.reshape(samples * B, n)).reshape(samples, B, n)
        x_bar = xs.mean(0)
        # ℓ = ĉᵀx_true − E[min_x (ĉ + σZ)ᵀx]  (≥ 0);  ∇ℓ = x_true − E[x*(ĉ + σZ)]
        loss = (pred * sol).sum(1) - (costs * xs).sum(2).mean(0)
        ctx.save_for_backward(sol, x_bar)
        return loss

    @staticmethod
    def backward(ctx, g):
        sol, x_bar = ctx.saved_tensors
        return g.unsqueeze(1) * (sol - x_bar), None, None, None, None, None


def perturbed_fenchel_young(pred_cost, true_sol, oracle: Oracle, sigma: float = 1.0,
                            samples: int = 1, seed: int | None = None,
                            reduction: str = "mean") -> torch.Tensor:
    r"""Perturbed Fenchel–Young loss (Berthet et al. 2020) for a minimization problem.

    .. math::

        \ell(\hat c, x) = \hat c^\top x - \mathbb E_Z\big[\min_{x' \in S}(\hat c + \sigma Z)^\top x'\big],
        \qquad \nabla_{\hat c}\,\ell = x - \mathbb E_Z[x^\star(\hat c + \sigma Z)],

    estimated with ``samples`` Gaussian draws per item (solved as one batch).

    Args:
        pred_cost: predicted costs, ``(B, n)``.
        true_sol: target solutions, ``(B, n)``.
        oracle: LP solver, costs -> minimizers.
        sigma: perturbation scale.
        samples: Monte-Carlo samples per item.
        seed: seed of the perturbations (None: drawn from torch's default generator, fresh
            each call and reproducible under ``torch.manual_seed``).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Examples:
        >>> import torch
        >>> oracle = lambda c: torch.nn.functional.one_hot(c.argmin(1), c.shape[1]).to(c)
        >>> target = torch.tensor([[1.0, 0.0, 0.0]])
        >>> c_hat = torch.tensor([[3.0, 2.0, 1.0]], requires_grad=True)
        >>> loss = perturbed_fenchel_young(c_hat, target, oracle, sigma=0.1, samples=4, seed=0)
        >>> loss.backward()
        >>> c_hat.grad  # x_true − mean perturbed solution: lower ĉ₁, raise ĉ₃
        tensor([[ 1.,  0., -1.]])
    """
    _check(pred_cost, true_sol=true_sol)
    if not sigma > 0 or not (isinstance(samples, int) and samples >= 1):
        raise InputError(f"expected sigma > 0 and samples >= 1, received {sigma!r}, {samples!r}")
    return _reduce(_PerturbedFY.apply(pred_cost, true_sol, oracle, sigma, samples, seed),
                   reduction)


def regret(pred_cost, true_cost, true_obj, oracle: Oracle) -> torch.Tensor:
    """Per-item regret ``cᵀx*(ĉ) − z*(c)`` of deciding with the predicted costs, ``(B,)``.

    Examples:
        >>> import torch
        >>> oracle = lambda c: torch.nn.functional.one_hot(c.argmin(1), c.shape[1]).to(c)
        >>> c = torch.tensor([[1.0, 2.0, 3.0]])
        >>> regret(torch.tensor([[3.0, 2.0, 1.0]]), c, torch.tensor([1.0]), oracle)
        tensor([2.])
    """
    _check(pred_cost, true_cost=true_cost, true_obj=true_obj)
    x_hat = _solve(oracle, pred_cost.detach())
    return (true_cost * x_hat).sum(1) - true_obj


def normalized_regret(pred_cost, true_cost, true_obj, oracle: Oracle) -> torch.Tensor:
    """``Σ regret / Σ |z*(c)|`` over the batch (PyEPO's normalized regret), a scalar.

    Examples:
        >>> import torch
        >>> oracle = lambda c: torch.nn.functional.one_hot(c.argmin(1), c.shape[1]).to(c)
        >>> c = torch.tensor([[1.0, 2.0, 3.0], [2.0, 1.0, 4.0]])
        >>> normalized_regret(c.flip(1), c, torch.tensor([1.0, 1.0]), oracle)
        tensor(1.)
    """
    return regret(pred_cost, true_cost, true_obj, oracle).sum() / true_obj.abs().sum()


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise InputError(f"reduction must be 'mean', 'sum' or 'none', received {reduction!r}")
