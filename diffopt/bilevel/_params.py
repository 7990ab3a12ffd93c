"""Parameter containers: a tensor, a tuple of tensors, or an ``nn.Module``, seen as flat leaves.

Every algorithm in :mod:`diffopt.bilevel` works on a flat tuple of tensors (the *leaves*). A
:class:`Structure` remembers how the caller passed them, so user callbacks receive the same
shape they passed in: a tensor, a tuple, or (for a module) a :class:`FunctionalModule` that runs
the module with the given leaves through :func:`torch.func.functional_call`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Leaves = tuple[torch.Tensor, ...]


class FunctionalModule:
    """An ``nn.Module`` evaluated with parameters that are not its own.

    Calling it runs ``torch.func.functional_call(module, params, args, kwargs)``, so the result is
    differentiable with respect to the tensors it holds (for example the iterates of an unrolled
    inner loop). Buffers are taken from the module itself.

    Args:
        module: the module whose ``forward`` is used.
        params: a mapping from parameter name (as in ``module.named_parameters()``) to tensor.

    Examples:
        >>> import torch
        >>> net = torch.nn.Linear(2, 1)
        >>> zero = {name: torch.zeros_like(p) for name, p in net.named_parameters()}
        >>> FunctionalModule(net, zero)(torch.ones(3, 2)).abs().sum().item()
        0.0
    """

    def __init__(self, module: nn.Module, params: dict[str, torch.Tensor]) -> None:
        self.module = module
        self._params = dict(params)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.module, self._params, args, kwargs)

    def named_parameters(self) -> dict[str, torch.Tensor]:
        """The parameter tensors by name (a new dict; the tensors are shared)."""
        return dict(self._params)

    def parameters(self) -> Leaves:
        """The parameter tensors, in the order of ``module.named_parameters()``."""
        return tuple(self._params.values())

    def __repr__(self) -> str:
        return f"FunctionalModule({type(self.module).__name__}, {len(self._params)} parameters)"


@dataclass(frozen=True)
class Structure:
    """How a parameter container was passed: ``"tensor"``, ``"tuple"`` or ``"module"``."""

    kind: str
    module: nn.Module | None = None
    names: tuple[str, ...] = ()

    def build(self, leaves: Sequence[torch.Tensor]) -> Any:
        """Rebuild the caller-facing container from flat leaves."""
        if self.kind == "tensor":
            return leaves[0]
        if self.kind == "tuple":
            return tuple(leaves)
        assert self.module is not None
        return FunctionalModule(self.module, dict(zip(self.names, leaves)))


def flatten(obj: Any, what: str) -> tuple[Leaves, Structure]:
    """Split a tensor / sequence of tensors / module / FunctionalModule into leaves.

    Args:
        obj: the container.
        what: the argument name, used in error messages (``"init"``, ``"hparams"``...).

    Raises:
        TypeError: when ``obj`` is none of the accepted kinds or holds a non-floating tensor.
    """
    if isinstance(obj, torch.Tensor):
        leaves, structure = (obj,), Structure("tensor")
    elif isinstance(obj, nn.Module):
        named = dict(obj.named_parameters())
        leaves, structure = tuple(named.values()), Structure("module", obj, tuple(named))
    elif isinstance(obj, FunctionalModule):
        named = obj.named_parameters()
        leaves, structure = tuple(named.values()), Structure("module", obj.module, tuple(named))
    elif isinstance(obj, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in obj):
        leaves, structure = tuple(obj), Structure("tuple")
    else:
        raise TypeError(
            f"{what} must be a tensor, a tuple/list of tensors, or an nn.Module; received "
            f"{_describe(obj)}. Wrap several tensors in a tuple, e.g. {what}=(a, b)."
        )
    for i, leaf in enumerate(leaves):
        if not leaf.is_floating_point():
            raise TypeError(
                f"{what} must hold floating-point tensors (gradients are taken with respect to "
                f"them); leaf {i} has dtype {leaf.dtype}. Convert it, e.g. with .double()."
            )
    return leaves, structure


def _describe(obj: Any) -> str:
    if isinstance(obj, (tuple, list)):
        kinds = sorted({type(t).__name__ for t in obj})
        return f"a {type(obj).__name__} of {', '.join(kinds) or 'nothing'}"
    return f"an object of type {type(obj).__name__}"
