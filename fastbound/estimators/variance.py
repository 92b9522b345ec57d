r"""Standard errors of the estimators' means, from per-draw values or per-node sums.

* Stratified draws (``"mc"``, ``"time_free"``: one uniform per stratum of [0, 1)) form a
  systematic sample of u; the variance of their mean is the successive-difference estimator
  over the draws sorted by u, :math:`\sum_i (y_{(i+1)} - y_{(i)})^2 / (2 n (n-1))` (Wolter,
  "Introduction to Variance Estimation", 1985), which, unlike the i.i.d. formula, does not
  count the trend in u that the stratification removes.
* Quadrature: independent draws at each node; the estimate is the sum over nodes of the
  node means and its variance the sum of the nodes' variances of the mean.
"""

from __future__ import annotations

import math

import torch


def successive_difference(values: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, standard error) over the last axis of ``values`` (B, n), whose draws have uniforms ``u`` (B, n)."""
    n = values.shape[1]
    if n == 1:
        return values[:, 0], torch.full_like(values[:, 0], math.nan)
    ordered = values.gather(1, u.argsort(1))
    var_of_mean = ordered.diff(dim=1).pow(2).sum(1) / (2 * n * (n - 1))
    return values.mean(1), var_of_mean.sqrt()


def node_moments(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-node mean and sample variance of (B, nodes, samples) values (variance NaN for one sample)."""
    var = values.var(-1) if values.shape[-1] > 1 else torch.full_like(values[..., 0], math.nan)
    return values.mean(-1), var


def node_moments_from_sums(sums: torch.Tensor, n_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The same from running sums (B, nodes, 2) of :math:`(y, y^2)` over ``n_samples`` draws per node."""
    mean = sums[..., 0] / n_samples
    if n_samples == 1:
        return mean, torch.full_like(mean, math.nan)
    return mean, (sums[..., 1] - n_samples * mean**2).clamp_min(0) / (n_samples - 1)


def quadrature_error(node_mean: torch.Tensor, node_var: torch.Tensor, n_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(estimate, standard error): the sum of the (B, nodes) node means and its standard error."""
    return node_mean.sum(-1), (node_var.sum(-1) / n_samples).sqrt()
