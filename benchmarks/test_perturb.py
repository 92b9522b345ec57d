"""Benchmarks of `fastbound.perturb`: absorbing forward noise drawn with a counter-based RNG.

Skipped until `fastbound.perturb(x0, *, sigma, vocab_size, seed, offset=0) -> (x_t, mask)`
exists. ``vocab_size`` is the number of real tokens, V - 1, so the mask id (perturb's default,
``vocab_size``) is the last score column, as in `fastbound.dse_loss`. The eager baseline is
``torch.rand`` + ``torch.where``. Providers draw different random numbers, so the check is
statistical rather than elementwise (`check_perturb`).
"""

from __future__ import annotations

import pytest
import torch

import fastbound

from . import data
from .harness import Case, Shape

if not hasattr(fastbound, "perturb"):
    pytest.skip("fastbound.perturb does not exist yet", allow_module_level=True)

Z_MAX = 6.0
"""Largest accepted deviation of a masked count from its expectation, in standard deviations."""


def perturb_inputs(shape: Shape, dtype: torch.dtype, generator: torch.Generator) -> dict:
    sigma, _ = data.SCHEDULE(data.times(shape, generator))
    x0 = data.clean_ids(shape, shape.vocab - 1, generator).to(dtype)
    return dict(x0=x0, sigma=sigma, vocab_size=shape.vocab - 1)


def fastbound_perturb(x0, sigma, vocab_size):
    return fastbound.perturb(x0, sigma=sigma, vocab_size=vocab_size, seed=0)


def eager_perturb(x0, sigma, vocab_size):
    mask = torch.rand(x0.shape, device=x0.device) < -torch.expm1(-sigma)
    return torch.where(mask, vocab_size, x0), mask


def check_perturb(actual: dict, expected: dict, inputs: dict) -> None:
    """x_t keeps x0 where not masked and holds the oracle's mask id where masked; the number
    of masked positions, per sequence and in total, is within `Z_MAX` standard deviations
    (+1 for discreteness) of its expectation sum(1 - exp(-sigma))."""
    x0, sigma = inputs["x0"], inputs["sigma"]
    x_t, mask = actual["output0"], actual["output1"]
    assert x_t.shape == x0.shape and x_t.dtype == x0.dtype, f"x_t is {x_t.dtype}{tuple(x_t.shape)}"
    assert mask.shape == x0.shape and mask.dtype == torch.bool, f"mask is {mask.dtype}{tuple(mask.shape)}"
    assert torch.equal(x_t[~mask], x0[~mask]), "x_t differs from x0 at unmasked positions"
    mask_ids = expected["output0"][expected["output1"]].unique()
    assert bool((x_t[mask] == mask_ids).all()), f"masked positions must hold the mask id {mask_ids.tolist()}"
    p = (-torch.expm1(-sigma.double())).expand(mask.shape)
    for dims in ((-1,), tuple(range(mask.dim()))):
        deviation = (mask.sum(dims).double() - p.sum(dims)).abs()
        bound = Z_MAX * (p * (1 - p)).sum(dims).sqrt() + 1
        assert bool((deviation <= bound).all()), f"masked counts off by {deviation.max().item():.1f}"


SHAPES = {
    "default": (Shape(4, 512, 32769), Shape(64, 1024, 32769)),
    "full": (Shape(4, 512, 32769), Shape(64, 1024, 32769), Shape(256, 1024, 50257)),
}
SHAPES["smoke"] = SHAPES["default"][:1]

CASES = [
    Case(
        "perturb",
        perturb_inputs,
        fastbound_perturb,
        eager_perturb,
        floor="x0",
        dtypes=(torch.int64,),
        check=check_perturb,
        shapes=SHAPES,
        working_set=lambda shape: 64 * shape.tokens,
    )
]


def test_perturb(spec, measure):
    measure(spec)
