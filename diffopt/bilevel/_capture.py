"""Find tensors that a callback reaches outside its arguments (closure cells, globals, ``self``).

The implicit backward re-evaluates the callback at the solution and differentiates it only with
respect to the tensors passed as ``hparams``. A tensor that requires grad but is captured from
the enclosing scope would silently get no gradient from it (an unrolled loop gives it one), so
the entry points warn about such tensors.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn


class CapturedTensorWarning(UserWarning):
    """A callback uses a tensor that requires grad but is not among ``hparams``.

    The implicit backward gives such a tensor no gradient. Pass it through ``hparams`` to get
    its hypergradient, or ``.detach()`` it where no gradient is wanted.

    Examples:
        >>> import torch, warnings
        >>> import diffopt.bilevel as bl
        >>> scale = torch.tensor(2.0, requires_grad=True)  # captured, not passed as hparams
        >>> lam = torch.tensor(0.5, requires_grad=True)
        >>> f = lambda w, lam: ((w - scale) ** 2).sum() + lam * (w ** 2).sum()
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     w = bl.argmin(f, torch.full((2,), 2.0 / 1.5), lam)
        >>> [type(c.message).__name__ for c in caught]
        ['CapturedTensorWarning']
    """


def _tensors_in(name: str, obj: Any) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield name, obj
    elif isinstance(obj, nn.Module):
        for pname, p in obj.named_parameters():
            yield f"{name}.{pname}", p
    elif isinstance(obj, (tuple, list)):
        for i, item in enumerate(obj):
            if isinstance(item, torch.Tensor):
                yield f"{name}[{i}]", item
    elif isinstance(obj, dict):
        for key, item in obj.items():
            if isinstance(item, torch.Tensor):
                yield f"{name}[{key!r}]", item


def _reachable(fn: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors one level away from ``fn``: bound ``self``, partial arguments, cells, globals."""
    if isinstance(fn, functools.partial):
        for i, arg in enumerate(fn.args):
            yield from _tensors_in(f"partial argument {i}", arg)
        for key, arg in fn.keywords.items():
            yield from _tensors_in(f"partial argument {key!r}", arg)
        fn = fn.func
    if isinstance(fn, nn.Module):
        yield from _tensors_in("the module", fn)
        return
    if hasattr(fn, "__self__") and hasattr(fn, "__func__"):
        yield from _tensors_in("self", fn.__self__)
        fn = fn.__func__
    code = getattr(fn, "__code__", None)
    if code is None:
        return
    for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
        try:
            value = cell.cell_contents
        except ValueError:  # a cell not yet assigned
            continue
        yield from _tensors_in(name, value)
    module_globals = getattr(fn, "__globals__", {})
    for name in code.co_names:
        if name in module_globals:
            yield from _tensors_in(name, module_globals[name])


def warn_captured(fn: Callable[..., Any], hparams: Sequence[torch.Tensor], what: str) -> None:
    """Warn when ``fn`` captures tensors requiring grad that are not among ``hparams``.

    Only what ``fn`` itself references is inspected (not the functions it calls), so the check
    catches the common case of a hyperparameter read from the enclosing scope.
    """
    known = {id(t) for t in hparams}
    names = sorted(
        {name for name, t in _reachable(fn) if t.requires_grad and id(t) not in known}
    )
    if names:
        warnings.warn(
            CapturedTensorWarning(
                f"{what} uses tensor(s) that require grad but are not in hparams: "
                f"{', '.join(names)}. The implicit backward differentiates only with respect "
                f"to hparams, so these get no gradient from it (Unrolled() would give them one). "
                f"Pass them through hparams, or .detach() them if no gradient is wanted."
            ),
            stacklevel=3,
        )
