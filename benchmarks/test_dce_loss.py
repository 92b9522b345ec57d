"""Benchmarks of `fastbound.dce_loss` (MDLM's masked cross-entropy), mask in the last column.

Inputs as in MDLM's training step: the weight dsigma / expm1(sigma) (1/t) per sequence.
``dce_per_position`` is the form ``(loss(reduction="none") * weight).sum()`` (a factor after
the call, issue 14), timed forward+backward at the headline shape. ``dce_small`` times 4x64
tokens at small vocabularies and one token against ``F.cross_entropy`` (what MDLM-style code
writes: the real-token columns, targets -100 where unmasked) and the bare ``torch.ops`` call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastbound
from fastbound import reference

from . import data
from .harness import HEADLINE, SMALL_GRIDS, Case, Shape


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


def fastbound_per_position(logits, x_t, x0, weight):
    return (fastbound.dce_loss(logits, x_t, x0) * weight).sum()


def eager_per_position(logits, x_t, x0, weight):
    return (reference.dce_loss(logits, x_t, x0) * weight).sum()


def cross_entropy(logits, x_t, x0, weight):
    """torch's cross entropy over the real tokens (the mask is the last column), 0 where unmasked."""
    n_real = logits.shape[-1] - 1
    target = torch.where(x_t == n_real, x0, -100)
    per_token = F.cross_entropy(logits[..., :n_real].flatten(0, -2), target.flatten(), reduction="none")
    return per_token.view(x_t.shape) * weight


def bare_op(logits, x_t, x0, weight):
    """The raw kernel on ready (N, V) inputs: what a call costs without the Python layer."""
    n, n_cols = x_t.numel(), logits.shape[-1]
    rows = weight.expand(x_t.shape).reshape(n).float()
    return torch.ops.fastbound.dce_forward(logits.reshape(n, n_cols), x_t.reshape(n), x0.reshape(n), rows,
                                           n_cols - 1, -100, logits.requires_grad)[0].view(x_t.shape)


CASES = [
    Case("dce", dce_inputs, fastbound_dce, eager_dce, floor="logits", grad_inputs=("logits",)),
    Case("dce_per_position", dce_inputs, fastbound_per_position, eager_per_position, floor="logits",
         grad_inputs=("logits",), shapes=HEADLINE, mode_only="fwd_bwd"),
    Case("dce_small", dce_inputs, fastbound_dce, eager_dce, floor="logits", grad_inputs=("logits",),
         shapes=SMALL_GRIDS, dtypes=(torch.float32,),
         extra_providers={"cross_entropy": cross_entropy, "bare_op": bare_op}),
]


def test_dce_loss(spec, measure):
    measure(spec)
