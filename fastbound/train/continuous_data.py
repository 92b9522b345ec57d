"""Data of the continuous reference run: a 2-D source with a known density, and 8-bit digit images.

* `mixture_source`: three isotropic 2-D Gaussians (`fastbound.testing.continuous.GaussianMixture`),
  whose warm-started entropy is computed in the same run by Monte Carlo on its exact density.
* `load_digits_8bit`: scikit-learn's bundled 8×8 handwritten digits (1797 images shipped inside
  the wheel, no download), values 0..16 mapped to 8 bits by x8 = round(v · 255/16) (17 levels
  0, 16, 32, …, 255), split into a fixed train / test set.
* `gaussian_baseline_bits`: a full-covariance Gaussian fitted to the training images, scored
  on the test images as a discrete 8-bit model by uniform dequantisation.
* `expected_nll_bits`: the true NLL of the mixture's warm-started test points, the quantity
  the bound bounds on those same points.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fastbound.continuous import BIN_WIDTH_8BIT, from_8bit
from fastbound.testing.continuous import GaussianMixture


def mixture_source() -> GaussianMixture:
    # Three well-separated components: a small MLP closes most of the gap to the exact bound in
    # ~1.5k steps on 2 CPU cores (an 8-component ring at std 0.25 needs many more).
    return GaussianMixture([1.0, 1.0, 1.0], [[-1.5, 0.0], [1.5, 0.5], [0.0, 1.8]], [0.4, 0.4, 0.4])


def load_digits_8bit(seed: int = 0, n_test: int = 297) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) uint8 tensors (N, 64) of 8-bit digits; a seeded permutation picks the test set."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("the digits data needs scikit-learn: pip install scikit-learn (or pass --part a)") from None
    values = load_digits().data  # (1797, 64), integers 0..16
    x8 = np.rint(values * (255 / 16)).astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(x8))
    x8 = torch.from_numpy(x8[order])
    return x8[n_test:], x8[:n_test]


def gaussian_baseline_bits(train8: torch.Tensor, test8: torch.Tensor) -> tuple[float, float]:
    r"""Bits/dim (and standard error over test images) of a full-covariance Gaussian as an 8-bit model.

    Fit: mean and covariance of the training bin centres y plus Δ²/12 I (the covariance of
    uniformly dequantised y + u) plus tr Σ/(dN) I, one pseudo-sample of average spread (the
    rule of the diffusion models' Gaussian base: without it three pixels constant in training
    give one test image 241 bits/dim and the mean 7.22 ± 0.79 bits/dim).
    Score: :math:`-\log P(x) \le \mathbb E_{u\sim U(\mathrm{bin})}
    [-\log N(y + u; \mu, \Sigma)] - d\log\Delta` (Jensen), in closed form
    :math:`-\log N(y; \mu, \Sigma) + \tfrac{\Delta^2}{24}\mathrm{tr}\,\Sigma^{-1} - d\log\Delta`.
    """
    y_train, y_test = from_8bit(train8, torch.float64), from_8bit(test8, torch.float64)
    d = y_train.shape[1]
    mu = y_train.mean(0)
    cov = torch.cov(y_train.T)
    cov = cov + (BIN_WIDTH_8BIT**2 / 12 + cov.diagonal().mean() / len(y_train)) * torch.eye(d, dtype=torch.float64)
    dist = torch.distributions.MultivariateNormal(mu, covariance_matrix=cov)
    nll = -dist.log_prob(y_test) + BIN_WIDTH_8BIT**2 / 24 * torch.linalg.inv(cov).trace() \
        - d * math.log(BIN_WIDTH_8BIT)
    bits = nll / (d * math.log(2))
    return float(bits.mean()), float(bits.std() / math.sqrt(bits.numel()))


def expected_nll_bits(source: GaussianMixture, x: torch.Tensor, warm_std: float, n_draws: int = 256,
                      seed: int = 0) -> tuple[float, float]:
    r"""The true :math:`\mathbb E_u[-\log q(x + \sigma_0 u)]` averaged over the rows of x, in bits/dim, with its s.e.

    The quantity `nll_bound` bounds per x, on the same points (Gaussian u, exact density,
    ``n_draws`` draws of u per point); the standard error is the Monte-Carlo one over u.
    """
    n, d = x.shape
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n_draws, n, d, generator=g, dtype=torch.float64)
    values = source.nll((x.double() + warm_std * u).reshape(-1, d), warm_std).view(n_draws, n)
    scale = 1 / (d * math.log(2))
    se = values.var(0).div(n_draws).sum().sqrt() / n
    return float(values.mean()) * scale, float(se) * scale
