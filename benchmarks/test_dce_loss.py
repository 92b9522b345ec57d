"""Benchmarks of `fastbound.dce_loss` (MDLM's masked cross-entropy), mask in the last column.

Inputs as in MDLM's training step: the weight dsigma / expm1(sigma) (1/t) per sequence.
"""

from __future__ import annotations

import torch

import fastbound
from fastbound import reference

from . import data
from .harness import Case, Shape


def dce_inputs(shape: Shape, dtype: torch.dtype, generator: torch.Generator) -> dict:
    t = data.times(shape, generator)
    x0 = data.clean_ids(shape, shape.vocab - 1, generator)
    return dict(
        logits=data.scores(shape, dtype, generator),
        x_t=data.corrupt(x0, t, shape.vocab - 1, generator),
        x0=x0,
        weight=data.SCHEDULE.dce_weight(t),
    )


def fastbound_dce(logits, x_t, x0, weight):
    return fastbound.dce_loss(logits, x_t, x0, weight=weight)


def eager_dce(logits, x_t, x0, weight):
    return reference.dce_loss(logits, x_t, x0, weight=weight)


CASES = [Case("dce", dce_inputs, fastbound_dce, eager_dce, floor="logits", grad_inputs=("logits",))]


def test_dce_loss(spec, measure):
    measure(spec)
