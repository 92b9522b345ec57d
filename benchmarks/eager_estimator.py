"""The speed baseline of the estimator benchmarks: fastbound's estimators with the eager-oracle step.

Same arguments, same draws (seed for seed) and the same result up to float rounding as
`fastbound.estimate_nll` / `fastbound.log_likelihood_ratio`; the denoiser output goes through
the dense reference loss (`fastbound.reference.integrate_step`) and a sum instead of the fused
kernel.
"""

from __future__ import annotations

import torch

from fastbound import reference
from fastbound.estimators import api
from fastbound.estimators.options import Options


def reference_step(out, x_t, x0, sigma, weight, acc, *, loss, graph, mask_id, ignore_index, index, backend=None):
    """`fastbound.integrate_step`'s contract (``acc`` updated in place) on the oracle."""
    acc.copy_(reference.integrate_step(out, x_t, x0, sigma, weight, acc, loss=loss, graph=graph, mask_id=mask_id,
                                       ignore_index=ignore_index, index=index))
    return acc


def estimate_nll(denoiser, x0: torch.Tensor, *, maskable=None, **options):
    """`fastbound.estimate_nll` (same keyword arguments) with the eager-oracle step."""
    return api.nll(denoiser, x0, maskable, Options(**options), step=reference_step)


def log_likelihood_ratio(denoiser, x_a: torch.Tensor, x_b: torch.Tensor, *, coupled=True, maskable=None, **options):
    """`fastbound.log_likelihood_ratio` (same keyword arguments) with the eager-oracle step."""
    return api.ratio(denoiser, x_a, x_b, coupled, maskable, Options(**options), step=reference_step)
