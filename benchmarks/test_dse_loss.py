"""Benchmarks of `fastbound.dse_loss` (SEDD's score entropy), absorbing and uniform graphs.

Inputs as in SEDD's training step: sigma and the weight dsigma per sequence, (batch, 1).
"""

from __future__ import annotations

import torch

import fastbound
from fastbound import reference

from . import data
from .harness import Case, Shape


def absorb_inputs(shape: Shape, dtype: torch.dtype, generator: torch.Generator) -> dict:
    t = data.times(shape, generator)
    x0 = data.clean_ids(shape, shape.vocab - 1, generator)
    sigma, dsigma = data.SCHEDULE(t)
    return dict(
        score=data.scores(shape, dtype, generator),
        sigma=sigma,
        x_t=data.corrupt(x0, t, shape.vocab - 1, generator),
        x0=x0,
        weight=dsigma,
    )


def uniform_inputs(shape: Shape, dtype: torch.dtype, generator: torch.Generator) -> dict:
    t = data.times(shape, generator)
    x0 = data.clean_ids(shape, shape.vocab, generator)
    sigma, dsigma = data.SCHEDULE(t)
    return dict(
        score=data.scores(shape, dtype, generator),
        sigma=sigma,
        x_t=data.corrupt(x0, t, data.clean_ids(shape, shape.vocab, generator), generator),
        x0=x0,
        weight=dsigma,
    )


def fastbound_absorb(score, sigma, x_t, x0, weight):
    return fastbound.dse_loss(score, sigma, x_t, x0, graph="absorb", weight=weight)


def eager_absorb(score, sigma, x_t, x0, weight):
    return reference.dse_loss(score, sigma, x_t, x0, graph="absorb", weight=weight)


def fastbound_uniform(score, sigma, x_t, x0, weight):
    return fastbound.dse_loss(score, sigma, x_t, x0, graph="uniform", weight=weight)


def eager_uniform(score, sigma, x_t, x0, weight):
    return reference.dse_loss(score, sigma, x_t, x0, graph="uniform", weight=weight)


CASES = [
    Case("dse_absorb", absorb_inputs, fastbound_absorb, eager_absorb, floor="score", grad_inputs=("score",)),
    Case("dse_uniform", uniform_inputs, fastbound_uniform, eager_uniform, floor="score", grad_inputs=("score",)),
]


def test_dse_loss(spec, measure):
    measure(spec)
