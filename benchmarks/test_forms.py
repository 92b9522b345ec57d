"""Benchmarks of the forms users write around the fused losses (issue 14, items 1 and 3).

Backward forms of `fastbound.dce_loss` at the headline shape, forward+backward, against the
same expression on the oracle; ``dce_fast`` (``weight=w / B, reduction="sum"``: the free
backward) is the reference the others are measured against (target: at most 1.3x):

* ``dce_fast``, ``dce_sum_div_B`` (``reduction="sum"`` then ``/ B``), ``dce_scaler`` (times
  a GradScaler's scale 65536), ``dce_accumulate`` (``reduction="mean"`` / 4 accumulation
  steps), ``dce_mean`` (``reduction="none"`` then ``.mean()``) and ``dce_weight_after``
  (``(loss(reduction="none") * w).sum()``, the per-position factor after the call);
* ``dse_weight_after``: the same per-position form for the absorbing score entropy
  (`benchmarks.test_dse_loss` holds SEDD's own forms).

Small sizes (4x64 tokens, V in {5, 27, 258}, and one token): ``forms_small_dce`` and
``forms_small_dse`` time ``reduction="sum"`` (what a training step calls) forward and
forward+backward, with ``F.cross_entropy`` (DCE) and the bare ``torch.ops`` call as extra
providers; the per-position calls are `benchmarks.test_dce_loss`'s ``dce_small`` and
`benchmarks.test_dse_loss`'s ``dse_small``.
"""

from __future__ import annotations

import torch

import fastbound
from fastbound import reference

from .harness import HEADLINE, SMALL_GRIDS, Case
from .test_dce_loss import bare_op as dce_bare_op
from .test_dce_loss import cross_entropy, dce_inputs
from .test_dse_loss import absorb_inputs
from .test_dse_loss import bare_op as dse_bare_op

FORMS = {
    "fast": lambda loss, w: loss(weight=w / w.shape[0], reduction="sum"),
    "sum_div_B": lambda loss, w: loss(weight=w, reduction="sum") / w.shape[0],
    "scaler": lambda loss, w: loss(weight=w / w.shape[0], reduction="sum") * 65536.0,
    "accumulate": lambda loss, w: loss(weight=w, reduction="mean") / 4,
    "mean": lambda loss, w: (w * loss(reduction="none")).mean(),
    "weight_after": lambda loss, w: (loss(reduction="none") * w).sum(),
}
"""Backward forms: ``form(loss, weight)``, ``loss(**kw)`` the loss of the case's inputs."""


def _dce(module):
    return lambda form: lambda logits, x_t, x0, weight: FORMS[form](
        lambda **kw: module.dce_loss(logits, x_t, x0, **kw), weight)


def _dse(module):
    return lambda form: lambda score, sigma, x_t, x0, weight: FORMS[form](
        lambda **kw: module.dse_loss(score, sigma, x_t, x0, **kw), weight)


def dce_form(form: str) -> Case:
    return Case(f"dce_{form}", dce_inputs, _dce(fastbound)(form), _dce(reference)(form), floor="logits",
                grad_inputs=("logits",), shapes=HEADLINE, mode_only="fwd_bwd")


def _summed(fn):
    """A per-position provider summed, as ``reduction="sum"``."""
    return lambda **inputs: fn(**inputs).sum()


def _small(name, make_inputs, module_call, floor, extra):
    return Case(name, make_inputs, module_call(fastbound), module_call(reference), floor=floor, grad_inputs=(floor,),
                shapes=SMALL_GRIDS, dtypes=(torch.float32,), extra_providers={k: _summed(f) for k, f in extra.items()})


CASES = [
    *(dce_form(form) for form in FORMS),
    Case("dse_weight_after", absorb_inputs, _dse(fastbound)("weight_after"), _dse(reference)("weight_after"),
         floor="score", grad_inputs=("score",), shapes=HEADLINE, mode_only="fwd_bwd"),
    _small("forms_small_dce", dce_inputs, lambda m: lambda logits, x_t, x0, weight: m.dce_loss(
        logits, x_t, x0, weight=weight, reduction="sum"), "logits",
        {"cross_entropy": cross_entropy, "bare_op": dce_bare_op}),
    _small("forms_small_dse", absorb_inputs, lambda m: lambda score, sigma, x_t, x0, weight: m.dse_loss(
        score, sigma, x_t, x0, weight=weight, reduction="sum"), "score", {"bare_op": dse_bare_op}),
]


def test_forms(spec, measure):
    measure(spec)
