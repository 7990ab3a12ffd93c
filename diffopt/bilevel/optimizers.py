"""Differentiable inner-loop optimizers written as pure tensor updates.

``torch.optim`` updates parameters in place under ``no_grad``, so an unrolled hypergradient cannot
flow through them. The optimizers here return *new* tensors computed by ordinary torch operations:
when the gradients they receive carry a graph (``create_graph=True``), the update is
differentiable with respect to everything that produced them, and with respect to ``lr`` (and
``momentum``) when those are tensors that require grad. The same code runs the detached
phase of :class:`~diffopt.bilevel.Truncated` and the inner loop of
:class:`~diffopt.bilevel.Implicit`, so all strategies follow the same iterates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Leaves = tuple[torch.Tensor, ...]
State = tuple[Leaves, ...]


@dataclass(frozen=True)
class GD:
    """Plain gradient descent, :math:`w_{t+1} = w_t - \\eta \\nabla f(w_t)`.

    Examples:
        >>> import torch
        >>> w, _ = GD(lr=0.5).step((torch.tensor([2.0]),), (torch.tensor([2.0]),), ())
        >>> w[0].item()
        1.0
    """

    lr: float | torch.Tensor

    def init(self, params: Leaves) -> State:
        """Optimizer state for ``params`` (none for plain gradient descent)."""
        return ()

    def step(self, params: Leaves, grads: Leaves, state: State) -> tuple[Leaves, State]:
        """One update; returns the new parameters and state without modifying the inputs."""
        return tuple(p - self.lr * g for p, g in zip(params, grads)), state


@dataclass(frozen=True)
class SGD:
    """Gradient descent with (heavy-ball or Nesterov) momentum, as in ``torch.optim.SGD``.

    .. math::

        b_{t+1} = \\mu b_t + \\nabla f(w_t), \\qquad w_{t+1} = w_t - \\eta\\, b_{t+1}

    (Nesterov: :math:`w_{t+1} = w_t - \\eta(\\nabla f(w_t) + \\mu b_{t+1})`).

    Examples:
        >>> import torch
        >>> opt = SGD(lr=0.1, momentum=0.9)
        >>> w, g = (torch.tensor([1.0]),), (torch.tensor([1.0]),)
        >>> w, s = opt.step(w, g, opt.init(w))
        >>> w, s = opt.step(w, g, s)
        >>> round(w[0].item(), 4)
        0.71
    """

    lr: float | torch.Tensor
    momentum: float | torch.Tensor = 0.0
    nesterov: bool = False

    def init(self, params: Leaves) -> State:
        """Momentum buffers, zero-initialised."""
        return (tuple(torch.zeros_like(p) for p in params),)

    def step(self, params: Leaves, grads: Leaves, state: State) -> tuple[Leaves, State]:
        """One update; returns the new parameters and state without modifying the inputs."""
        (bufs,) = state
        bufs = tuple(self.momentum * b + g for b, g in zip(bufs, grads))
        if self.nesterov:
            dirs = tuple(g + self.momentum * b for g, b in zip(grads, bufs))
        else:
            dirs = bufs
        return tuple(p - self.lr * d for p, d in zip(params, dirs)), (bufs,)


@dataclass(frozen=True)
class Adam:
    """Adam with bias correction, as in ``torch.optim.Adam`` (no weight decay).

    .. math::

        m_{t} = \\beta_1 m_{t-1} + (1-\\beta_1) g_t,\\quad
        v_{t} = \\beta_2 v_{t-1} + (1-\\beta_2) g_t^2,\\quad
        w_{t} = w_{t-1} - \\eta\\,\\frac{m_t/(1-\\beta_1^t)}{\\sqrt{v_t/(1-\\beta_2^t)}+\\epsilon}

    Differentiating through :math:`\\sqrt{v_t}` is singular where a gradient entry is exactly
    zero at every step so far; unroll Adam only on problems where that does not happen.

    Examples:
        >>> import torch
        >>> opt = Adam(lr=0.1)
        >>> w = (torch.tensor([1.0]),)
        >>> w, _ = opt.step(w, (torch.tensor([5.0]),), opt.init(w))
        >>> round(w[0].item(), 4)  # the first Adam step has length lr
        0.9
    """

    lr: float | torch.Tensor
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def init(self, params: Leaves) -> State:
        """Step counter and zero first/second moment estimates."""
        first = tuple(torch.zeros_like(p) for p in params)
        return (first, first, (torch.zeros((), dtype=torch.long),))

    def step(self, params: Leaves, grads: Leaves, state: State) -> tuple[Leaves, State]:
        """One update; returns the new parameters and state without modifying the inputs."""
        m, v, (t,) = state
        t = t + 1
        b1, b2 = self.betas
        m = tuple(b1 * mi + (1 - b1) * g for mi, g in zip(m, grads))
        v = tuple(b2 * vi + (1 - b2) * g * g for vi, g in zip(v, grads))
        c1 = 1 - b1 ** int(t)
        c2 = 1 - b2 ** int(t)
        new = tuple(
            p - self.lr * (mi / c1) / ((vi / c2).sqrt() + self.eps)
            for p, mi, vi in zip(params, m, v)
        )
        return new, (m, v, (t,))


Optimizer = GD | SGD | Adam

_BY_NAME: dict[str, type[GD] | type[SGD] | type[Adam]] = {"gd": GD, "sgd": SGD, "adam": Adam}


def make(name: str, lr: float | torch.Tensor, options: dict[str, object]) -> Optimizer:
    """Build the functional optimizer called ``name`` (``"gd"``, ``"sgd"`` or ``"adam"``).

    Raises:
        ValueError: for an unknown name.
        TypeError: for an option the optimizer does not take.
    """
    try:
        cls = _BY_NAME[name.lower()]
    except KeyError:
        raise ValueError(
            f"optimizer must be one of {sorted(_BY_NAME)} or a torch.optim.Optimizer subclass; "
            f"received {name!r}."
        ) from None
    try:
        return cls(lr=lr, **options)  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeError(
            f"optimizer {name!r} does not accept the options {sorted(options)}: {err}. "
            f"Pass only the fields of diffopt.bilevel.optimizers.{cls.__name__}."
        ) from None


def detach_all(tensors: Sequence[torch.Tensor]) -> Leaves:
    """Detach every tensor (used to cut the graph of parameters and optimizer state)."""
    return tuple(t.detach() for t in tensors)
