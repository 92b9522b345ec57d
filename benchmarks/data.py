"""Realistic benchmark inputs: noise levels and noised sequences as SEDD / MDLM training draws them."""

from __future__ import annotations

import torch

from fastbound.schedules import LogLinear

from .harness import Shape

SCHEDULE = LogLinear()
"""MDLM's and SEDD's default schedule; t ~ U(T_MIN, 1) gives about half the tokens masked."""
T_MIN = 0.05


def times(shape: Shape, generator: torch.Generator) -> torch.Tensor:
    """One diffusion time per sequence, shaped (batch, 1) to broadcast over positions."""
    t = torch.rand(shape.batch, 1, generator=generator, device=generator.device)
    return T_MIN + (1 - T_MIN) * t


def clean_ids(shape: Shape, high: int, generator: torch.Generator) -> torch.Tensor:
    """x0: (batch, length) ids uniform in [0, high)."""
    return torch.randint(0, high, (shape.batch, shape.length), generator=generator, device=generator.device)


def corrupt(x0: torch.Tensor, t: torch.Tensor, replacement: torch.Tensor | int, generator: torch.Generator):
    """x_t: each id of x0 replaced, with probability 1 - exp(-sigma(t)), by ``replacement``."""
    noise = torch.rand(x0.shape, generator=generator, device=generator.device)
    return torch.where(noise < SCHEDULE.mask_prob(t), replacement, x0)


def scores(shape: Shape, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """(batch, length, vocab) standard-normal model outputs."""
    size = (shape.batch, shape.length, shape.vocab)
    return torch.randn(size, generator=generator, device=generator.device, dtype=dtype)
