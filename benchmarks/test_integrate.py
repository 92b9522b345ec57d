"""Benchmarks of `fastbound.integrate_step`, the estimators' per-timestep step.

One step reads a (B, L, V) denoiser output and adds each sequence's weighted loss sum
and its square to a float64 (B, 2) accumulator, for the DCE loss (MDLM) and the
absorbing DSE loss (SEDD), with per-sequence sigma and weight as the estimators pass
them (float64 (B,)). The oracle is `fastbound.reference.integrate_step`: the dense
reference loss, a per-sequence sum and an ``index_add`` into a copy of the
accumulator. The op only reads the output, so the floor is one read of it (``sum()``,
`benchmarks.harness.read_floor`), not a ``clone()``.

fastbound accumulates in place; its provider hands it a fresh copy of the zero
accumulator each call (a (B, 2) copy, negligible) so every call, and the agreement
check, starts from zero like the oracle's.
"""

from __future__ import annotations

import torch

import fastbound
from fastbound import reference

from . import data
from .harness import Case, Shape, read_floor

RTOL = 2e-5
"""Relative tolerance on the sums and their squares (as `tests/test_integrate.py`): both sides
compute the per-token loss in fp32 from the same inputs and sum in float64, in different orders."""


def integrate_inputs(shape: Shape, dtype: torch.dtype, generator: torch.Generator, loss: str) -> dict:
    t = data.times(shape, generator)
    x0 = data.clean_ids(shape, shape.vocab - 1, generator)
    sigma, dsigma = data.SCHEDULE(t)
    weight = data.SCHEDULE.dce_weight(t) if loss == "dce" else dsigma
    return dict(
        out=data.scores(shape, dtype, generator),
        x_t=data.corrupt(x0, t, shape.vocab - 1, generator),
        x0=x0,
        sigma=sigma[:, 0].double(),
        weight=weight[:, 0].double(),
        acc=torch.zeros(shape.batch, 2, dtype=torch.float64, device=generator.device),
    )


def dce_inputs(shape: Shape, dtype: torch.dtype, generator: torch.Generator) -> dict:
    return integrate_inputs(shape, dtype, generator, "dce")


def dse_inputs(shape: Shape, dtype: torch.dtype, generator: torch.Generator) -> dict:
    return integrate_inputs(shape, dtype, generator, "dse")


def fastbound_dce(out, x_t, x0, sigma, weight, acc):
    return fastbound.integrate_step(out, x_t, x0, sigma, weight, acc.clone(), loss="dce")


def eager_dce(out, x_t, x0, sigma, weight, acc):
    return reference.integrate_step(out, x_t, x0, sigma, weight, acc, loss="dce")


def fastbound_dse(out, x_t, x0, sigma, weight, acc):
    return fastbound.integrate_step(out, x_t, x0, sigma, weight, acc.clone(), loss="dse", graph="absorb")


def eager_dse(out, x_t, x0, sigma, weight, acc):
    return reference.integrate_step(out, x_t, x0, sigma, weight, acc, loss="dse", graph="absorb")


def check_integrate(actual: dict, expected: dict, inputs: dict) -> None:
    """The (B, 2) accumulators agree within `RTOL` (absolute: `RTOL` of the largest entry)."""
    got, want = actual["output0"], expected["output0"]
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * scale,
                               msg=lambda m: f"the accumulator disagrees with the oracle: {m}")


CASES = [
    Case(name, make, fast, eager, floor="out", check=check_integrate, floor_call=read_floor("out"), floor_op="sum")
    for name, make, fast, eager in (
        ("integrate_dce", dce_inputs, fastbound_dce, eager_dce),
        ("integrate_dse_absorb", dse_inputs, fastbound_dse, eager_dse),
    )
]


def test_integrate_step(spec, measure):
    measure(spec)
