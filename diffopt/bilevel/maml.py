"""Meta-learning on top of :func:`~diffopt.bilevel.minimize`: MAML, first-order MAML and iMAML.

All three adapt meta-parameters :math:`\\theta` to one task with a few gradient steps on the
task's support loss and differentiate the adapted parameters :math:`\\phi(\\theta)`; they differ
in how :math:`\\mathrm{d}\\phi/\\mathrm{d}\\theta` is obtained:

* MAML unrolls the adaptation (second derivatives, memory linear in the number of steps);
* first-order MAML drops the second derivatives, :math:`\\mathrm{d}\\phi/\\mathrm{d}\\theta
  \\approx I`;
* implicit MAML adapts with a proximal term and differentiates the optimum of
  :math:`\\mathcal L(\\phi) + \\tfrac{\\rho}{2}\\|\\phi-\\theta\\|^2`, for which
  :math:`\\mathrm{d}\\phi^\\star/\\mathrm{d}\\theta = (I + \\nabla^2\\mathcal L/\\rho)^{-1}`,
  at a memory cost independent of the number of steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from diffopt.bilevel._params import flatten
from diffopt.bilevel.minimize import minimize
from diffopt.bilevel.strategies import Implicit, Unrolled

TaskLoss = Callable[[Any], torch.Tensor]


def maml_adapt(
    loss: TaskLoss,
    params: Any,
    *,
    lr: float,
    steps: int = 1,
    first_order: bool = False,
    optimizer: str = "gd",
    optimizer_options: dict[str, Any] | None = None,
) -> Any:
    """MAML inner adaptation: ``steps`` differentiable updates of ``params`` on ``loss``.

    .. math::

        \\phi_0 = \\theta, \\qquad \\phi_{t+1} = \\phi_t - \\alpha \\nabla \\mathcal L(\\phi_t)

    Backpropagating a query loss of the result to ``params`` gives the MAML meta-gradient
    :math:`\\prod_t (I - \\alpha \\nabla^2 \\mathcal L(\\phi_t))\\, \\nabla \\mathcal L_q(\\phi_T)`,
    or with ``first_order=True`` the first-order approximation
    :math:`\\nabla \\mathcal L_q(\\phi_T)`.

    Args:
        loss: the task's support loss, ``loss(params) -> scalar``; ``params`` arrives in the
            form it was passed (a module as a :class:`FunctionalModule`).
        params: meta-parameters: a tensor, a tuple of tensors or an ``nn.Module``; they must
            require grad for a meta-gradient to reach them.
        lr: inner step size :math:`\\alpha`.
        steps: number of adaptation steps.
        first_order: drop second derivatives (FOMAML).
        optimizer: ``"gd"``, ``"sgd"`` or ``"adam"`` (differentiable versions).
        optimizer_options: extra optimizer fields, e.g. ``{"momentum": 0.9}``.

    Returns:
        The adapted parameters, in the form of ``params``.

    Examples:
        One step on :math:`\\mathcal L(\\theta) = \\theta^3` gives
        :math:`\\phi = \\theta - 3\\alpha\\theta^2` and :math:`\\mathrm{d}\\phi/\\mathrm{d}\\theta
        = 1 - 6\\alpha\\theta`:

        >>> import torch
        >>> theta = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        >>> phi = maml_adapt(lambda p: p ** 3, theta, lr=0.1)
        >>> phi.backward()
        >>> round(phi.item(), 6), round(theta.grad.item(), 6)
        (0.7, 0.4)
    """
    return minimize(
        lambda w, _: loss(w),
        params,
        (),
        steps=steps,
        lr=lr,
        optimizer=optimizer,
        backward=Unrolled(first_order=first_order),
        optimizer_options=optimizer_options,
    )


def imaml_adapt(
    loss: TaskLoss,
    meta_params: Any,
    *,
    reg: float,
    lr: float,
    steps: int,
    optimizer: str = "gd",
    backward: Implicit = Implicit(solver="cg", maxiter=20),
    tol: float | None = None,
    optimizer_options: dict[str, Any] | None = None,
    return_diagnostics: bool = False,
) -> Any:
    """Implicit MAML: solve the proximal task problem and differentiate its optimum implicitly.

    .. math::

        \\phi^\\star(\\theta) = \\arg\\min_\\phi\\ \\mathcal L(\\phi)
        + \\frac{\\rho}{2}\\|\\phi - \\theta\\|^2 ,

    started at :math:`\\theta`. The meta-gradient of a query loss is
    :math:`(I + \\nabla^2 \\mathcal L(\\phi^\\star)/\\rho)^{-1}
    \\nabla \\mathcal L_q(\\phi^\\star)`,
    one conjugate-gradient solve; nothing of the inner loop is stored.

    Args:
        loss: the task's support loss, ``loss(phi) -> scalar``.
        meta_params: :math:`\\theta`: a tensor, a tuple of tensors or an ``nn.Module``.
        reg: proximal strength :math:`\\rho > 0` (larger keeps :math:`\\phi^\\star` closer to
            :math:`\\theta` and the linear system better conditioned).
        lr: inner step size.
        steps: maximum inner steps.
        optimizer: ``"gd"``, ``"sgd"``, ``"adam"`` or a ``torch.optim.Optimizer`` subclass.
        backward: the :class:`Implicit` settings (few CG iterations usually suffice, as the
            proximal term makes the system well conditioned).
        tol: inner stopping tolerance on the gradient norm (see :func:`minimize`).
        optimizer_options: extra optimizer fields.
        return_diagnostics: also return the :class:`Diagnostics` record.

    Returns:
        :math:`\\phi^\\star` in the form of ``meta_params`` (and the diagnostics if requested).

    Raises:
        ValueError: when ``reg`` is not positive.
        TypeError: when ``backward`` is not an :class:`Implicit` instance.

    Examples:
        For :math:`\\mathcal L(\\phi) = \\tfrac12\\|\\phi\\|^2`,
        :math:`\\phi^\\star = \\rho\\theta/(1+\\rho)`:

        >>> import torch
        >>> theta = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
        >>> phi = imaml_adapt(lambda p: 0.5 * (p ** 2).sum(), theta, reg=1.0, lr=0.5, steps=100)
        >>> phi.sum().backward()
        >>> round(phi.item(), 6), round(theta.grad.item(), 6)
        (1.0, 0.5)
    """
    if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not reg > 0:
        raise ValueError(
            f"reg is the proximal strength of implicit MAML and must be positive; received "
            f"{reg!r}. Typical values are 0.1 to 10."
        )
    if not isinstance(backward, Implicit):
        raise TypeError(
            f"implicit MAML differentiates the proximal optimum and needs backward=Implicit(...); "
            f"received {type(backward).__name__}. Use maml_adapt for unrolled adaptation."
        )

    def proximal(phi: Any, theta: Any) -> torch.Tensor:
        phi_leaves, _ = flatten(phi, "phi")
        theta_leaves, _ = flatten(theta, "meta_params")
        prox = sum(((p - t) ** 2).sum() for p, t in zip(phi_leaves, theta_leaves))
        return loss(phi) + 0.5 * reg * prox

    return minimize(
        proximal,
        meta_params,
        meta_params,
        steps=steps,
        lr=lr,
        optimizer=optimizer,
        backward=backward,
        tol=tol,
        optimizer_options=optimizer_options,
        return_diagnostics=return_diagnostics,
    )
