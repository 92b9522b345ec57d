"""Benchmarks of `fastbound.dse_loss` (SEDD's score entropy), absorbing and uniform graphs.

Inputs as in SEDD's training step: sigma and the weight dsigma per sequence, (batch, 1).
Besides the per-position loss (``dse_absorb``, ``dse_uniform``), the backward forms users
write (issue 14), each timed forward+backward at the headline shape against the same
expression on the oracle:

* ``dse_fast``: ``weight=dsigma / B, reduction="sum"`` (the free backward, the reference form);
* ``dse_sedd``: SEDD's own ``(dsigma[:, None] * loss).sum(-1).mean()``;
* ``dse_sum_div_B``: ``reduction="sum"`` then ``/ B`` (the README's old example);
* ``dse_scaler``: the fast form times a GradScaler's scale 65536;
* ``dse_accumulate``: ``reduction="mean"`` divided by 4 accumulation steps.

``dse_small`` times 4x64 tokens at small vocabularies and one token, with the bare
``torch.ops`` call as an extra provider (the fixed cost of the Python layer).
"""

from __future__ import annotations

import torch

import fastbound
from fastbound import reference

from . import data
from .harness import HEADLINE, SMALL_GRIDS, Case, Shape


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


FORMS = {
    "fast": lambda loss, score, w: loss(weight=w / score.shape[0], reduction="sum"),
    "sedd": lambda loss, score, w: (w * loss(reduction="none")).sum(-1).mean(),
    "sum_div_B": lambda loss, score, w: loss(weight=w, reduction="sum") / score.shape[0],
    "scaler": lambda loss, score, w: loss(weight=w / score.shape[0], reduction="sum") * 65536.0,
    "accumulate": lambda loss, score, w: loss(weight=w, reduction="mean") / 4,
}
"""Backward forms: ``form(loss, score, weight)``, ``loss(**kw)`` the loss of the case's inputs."""


def form_case(form: str) -> Case:
    def run(module):
        def call(score, sigma, x_t, x0, weight):
            return FORMS[form](lambda **kw: module.dse_loss(score, sigma, x_t, x0, **kw), score, weight)

        return call

    return Case(f"dse_{form}", absorb_inputs, run(fastbound), run(reference), floor="score",
                grad_inputs=("score",), shapes=HEADLINE, mode_only="fwd_bwd")


def bare_op(score, sigma, x_t, x0, weight):
    """The raw kernel on ready (N, V) inputs: what a call costs without the Python layer."""
    n, n_cols = x_t.numel(), score.shape[-1]
    sigma_rows = sigma.expand(x_t.shape).reshape(n).float()
    rows = weight.expand(x_t.shape).reshape(n).float()
    ints = (0, n_cols - 1, -100)
    return torch.ops.fastbound.dse_forward(score.reshape(n, n_cols), sigma_rows, x_t.reshape(n), x0.reshape(n),
                                           rows, *ints, score.requires_grad)[0].view(x_t.shape)


CASES = [
    Case("dse_absorb", absorb_inputs, fastbound_absorb, eager_absorb, floor="score", grad_inputs=("score",)),
    Case("dse_uniform", uniform_inputs, fastbound_uniform, eager_uniform, floor="score", grad_inputs=("score",)),
    *(form_case(form) for form in FORMS),
    Case("dse_small", absorb_inputs, fastbound_absorb, eager_absorb, floor="score", grad_inputs=("score",),
         shapes=SMALL_GRIDS, extra_providers={"bare_op": bare_op}, dtypes=(torch.float32,)),
]


def test_dse_loss(spec, measure):
    measure(spec)
