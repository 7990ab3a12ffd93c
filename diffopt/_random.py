"""Random draws of the stochastic estimators."""

from __future__ import annotations

import torch


def gaussian(shape: tuple[int, ...], seed: int | None, like: torch.Tensor) -> torch.Tensor:
    """Standard normal draws with ``like``'s dtype and device.

    With a ``seed``, from a generator of their own seeded with it (the same draws on every call).
    With ``seed=None``, from torch's default generator of the device: fresh on every call and
    reproducible under ``torch.manual_seed``, which they advance but never reseed.
    """
    gen = None if seed is None else torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=like.dtype, device=like.device)
