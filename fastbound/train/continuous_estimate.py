r"""The reference run's low-variance estimate of the warm-start bound: antithetic ε pairs and a fitted proposal.

`fastbound.continuous.nll_bound` estimates the bound's λ-integral by importance sampling,
one (λ, u, ε) per draw, :math:`S = (\lVert\varepsilon - \hat\varepsilon(z_+)\rVert^2
- \mathrm{sigmoid}(\lambda)\lVert\varepsilon\rVert^2)/(2p(\lambda))`, :math:`z_+ = \alpha\tilde x + \sigma\varepsilon`.
`antithetic_bound` estimates the *same* bound with each draw's pair

.. math:: S = \frac{1}{2p(\lambda)}\cdot\frac12\Big[\big(\lVert\varepsilon - \hat\varepsilon(z_+)\rVert^2
          - \mathrm{sigmoid}(\lambda)\lVert\varepsilon\rVert^2\big)
          + \big(\lVert{-\varepsilon} - \hat\varepsilon(z_-)\rVert^2 - \mathrm{sigmoid}(\lambda)\lVert\varepsilon\rVert^2\big)\Big],
          \qquad z_- = \alpha\tilde x - \sigma\varepsilon ,

the same λ and x̃ = x + σ0 u for both halves. **Unbiased:** ε ~ N(0, I) is symmetric, so
(−ε, z_−) has the law of (ε, z_+) given (λ, x̃); each half has the mean of nll_bound's draw,
hence so has their average, and the draws are i.i.d. over k, so the mean of n draws is an
unbiased estimate of the bound and its standard error is the usual
:math:`\sqrt{(\overline{S^2} - \bar S^2)/(n-1)}` (Hammersley & Morton 1956, antithetic variates).
**Why it helps:** at high SNR :math:`\hat\varepsilon(z_\pm) \approx \hat\varepsilon(\alpha\tilde x)
\pm \sigma\,\partial\hat\varepsilon\,\varepsilon`, so the odd term :math:`-2\varepsilon\cdot\hat\varepsilon(\alpha\tilde x)`
cancels within the pair; it is the term whose variance, weighted by 1/p(λ)², dominated
the upper tail. Measured on the run's 2-D mixture with the exact denoiser, 1000 points × 32
draws: the standard error falls from 0.029 to 0.013 bits/dim with ITD's data-driven proposal
and from 0.018 to 0.0095 with the fitted one. On the digits, whose variance comes from the
model's own error at mid SNR (even in ε), it changes little; the cost is two denoiser rows per draw.

`fit_proposal` picks the truncated logistic proposal (loc, scale) that minimises the
estimator's per-draw variance :math:`\int V(\lambda)/p(\lambda)\,d\lambda - I^2`,
:math:`V(\lambda) = \mathbb E[S_\lambda^2]` the second moment of the unweighted pair at λ,
measured on a λ grid with a pilot denoiser on training data (the optimum over all densities is
:math:`p \propto \sqrt V`). Any proposal on the range gives an unbiased estimate; the fit only
lowers the variance. Scales below 1 are not tried: in both tails √V decays like
:math:`e^{-|\lambda|}` (measured on the run's mixture; the pair's error is O(α²) at low SNR and
O(σ²) at high SNR), and a proposal with a lighter tail would let V/p grow towards the ends of
the range, where the grid has few points.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from fastbound.continuous import ContinuousNLLEstimate, LogisticProposal, from_8bit, integrate_step, nll_bound, perturb
from fastbound.continuous.schedules import alpha, sigma

# Counters of the λ uniforms (the warm and ε noise uses perturb's own key at counters [0, rows · d)),
# the same layout as nll_bound's.
_LOGSNR_STREAM = 3 << 60


def _zero(z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(z)


def _pair_integrand(denoiser, y: torch.Tensor, lam: torch.Tensor, *, warm, warm_std: float, seed: int,
                    offset: int) -> torch.Tensor:
    r"""Per row, ½[(‖ε − ε̂(z₊)‖² − sigmoid(λ)‖ε‖²) + (‖ε + ε̂(z₋)‖² − sigmoid(λ)‖ε‖²)], float64 (no 1/p)."""
    n = y.shape[0]
    noised = perturb(y, lam, warm=warm, warm_std=warm_std, seed=seed, offset=offset, return_warm=True)
    shape = (n,) + (1,) * (y.dim() - 1)
    a, s = alpha(lam).to(y.dtype).view(shape), sigma(lam).to(y.dtype).view(shape)
    z_minus = a * noised.x_warm - s * noised.eps
    eps_hat = denoiser(torch.cat([noised.z, z_minus]), torch.cat([lam, lam]).to(torch.float32))
    if not isinstance(eps_hat, torch.Tensor) or eps_hat.shape != (2 * n,) + tuple(y.shape[1:]):
        raise ValueError(f"the denoiser must return eps_hat of z's shape {(2 * n,) + tuple(y.shape[1:])}")
    eps_sq = torch.linalg.vector_norm(noised.eps.reshape(n, -1), dim=1, dtype=torch.float64) ** 2
    baseline = torch.sigmoid(lam) * eps_sq
    acc = torch.zeros(2 * n, 2, dtype=torch.float64, device=y.device)
    integrate_step(eps_hat, torch.cat([noised.eps, -noised.eps]), acc, weight=1.0,
                   baseline=torch.cat([baseline, baseline]))
    return 0.5 * (acc[:n, 0] + acc[n:, 0])


def _continuous(x: torch.Tensor, data: str) -> torch.Tensor:
    return from_8bit(x) if data == "8bit" else x


def _importance_mean(row_values, n_seq: int, n_samples: int, proposal: LogisticProposal, seed: int,
                     batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per sample b, the mean of n_samples draws :math:`f/(2p(\lambda))` and its standard error.

    Draw k of sample b is row g = k·B + b, λ from counter ``_LOGSNR_STREAM + g``;
    ``row_values(b, lam, offset)`` returns f for rows b (its noise from perturb counters
    [offset, offset + rows·d), offset = g₀·d at the chunk's first row g₀).
    """
    sums = torch.zeros(2, n_seq, dtype=torch.float64)
    for g0 in range(0, n_samples * n_seq, batch_size):
        g = torch.arange(g0, min(n_samples * n_seq, g0 + batch_size))
        lam = proposal.sample(g.numel(), seed=seed, offset=_LOGSNR_STREAM + g0)
        draw = row_values(g % n_seq, lam, g0) / (2 * proposal.density(lam))
        sums[0].index_add_(0, g % n_seq, draw)
        sums[1].index_add_(0, g % n_seq, draw**2)
    if not bool(torch.isfinite(sums).all()):
        raise ValueError("the denoiser returned non-finite values (NaN or infinity) in eps_hat")
    mean = sums[0] / n_samples
    return mean, ((sums[1] / n_samples - mean**2).clamp_min(0) / (n_samples - 1)).sqrt()


def _check_draws(n_samples: int) -> None:
    if n_samples < 2:
        raise ValueError(f"n_samples must be >= 2 (the standard error needs two draws), got {n_samples}")


def antithetic_bound(denoiser, x: torch.Tensor, *, warm, warm_std: float, logsnr_min: float, logsnr_max: float,
                     proposal: LogisticProposal, n_samples: int, seed: int = 0, data: str = "continuous",
                     batch_size: int = 4096) -> ContinuousNLLEstimate:
    r"""`nll_bound`'s importance-sampling estimate of the same bound with antithetic ε pairs (module docstring).

    The closed-form terms (prior, reference, decoder, discretisation, tail bound) and the checks
    of the arguments come from `nll_bound` itself, run with one draw of the zero denoiser
    (its integral is replaced). ``n_samples`` ≥ 2 pairs per sample (`_importance_mean`'s
    counters); the denoiser sees 2 · ``batch_size`` rows per call.
    """
    _check_draws(n_samples)
    common = dict(warm=warm, warm_std=warm_std, logsnr_min=logsnr_min, logsnr_max=logsnr_max, data=data)
    closed = nll_bound(_zero, x, n_samples=1, proposal=proposal, seed=seed, **common)
    y = _continuous(x, data)
    d = math.prod(y.shape[1:])
    with torch.inference_mode():
        integral, stderr = _importance_mean(
            lambda b, lam, g0: _pair_integrand(denoiser, y[b], lam, warm=warm, warm_std=warm_std, seed=seed,
                                               offset=g0 * d), y.shape[0], n_samples, proposal, seed, batch_size)
    nll = closed.nll - closed.integral + integral
    return dataclasses.replace(closed, nll=nll, stderr=stderr, bits_per_dim=nll / (d * math.log(2)),
                               integral=integral, method="antithetic")


def denoiser_gap(denoiser, reference, x: torch.Tensor, *, warm, warm_std: float, proposal: LogisticProposal,
                 n_samples: int, seed: int = 0, batch_size: int = 4096) -> tuple[float, float]:
    r""":math:`\tfrac12\int\mathbb E\lVert\hat\varepsilon - \hat\varepsilon_{ref}\rVert^2 d\lambda` over the rows of x, in bits/dim, with its s.e.

    For the optimal :math:`\hat\varepsilon_{ref} = \mathbb E[\varepsilon\mid z]`,
    :math:`\mathbb E\lVert\varepsilon - \hat\varepsilon\rVert^2 = \mathbb E\lVert\varepsilon - \hat\varepsilon_{ref}\rVert^2
    + \mathbb E\lVert\hat\varepsilon_{ref} - \hat\varepsilon\rVert^2` (ε − ε̂_ref is orthogonal to
    every function of z), so this is exactly how far ε̂'s bound lies above ε̂_ref's on the
    same range (the closed-form terms are shared). Every draw
    :math:`\lVert\hat\varepsilon - \hat\varepsilon_{ref}\rVert^2/(2p(\lambda))` is ≥ 0: unlike the
    difference of two bound estimates it has no ε noise to cancel. Continuous data, (B, d) x.
    """
    _check_draws(n_samples)
    n_seq, d = x.shape

    def gap(b, lam, g0):
        noised = perturb(x[b], lam, warm=warm, warm_std=warm_std, seed=seed, offset=g0 * d)
        acc = torch.zeros(b.numel(), 2, dtype=torch.float64)
        cond = lam.to(torch.float32)
        integrate_step(denoiser(noised.z, cond), reference(noised.z, cond).to(x.dtype), acc, weight=1.0)
        return acc[:, 0]

    with torch.inference_mode():
        mean, stderr = _importance_mean(gap, n_seq, n_samples, proposal, seed, batch_size)
    scale = 1 / (n_seq * d * math.log(2))
    return float(mean.sum()) * scale, float(stderr.pow(2).sum().sqrt()) * scale


def fit_proposal(denoiser, x: torch.Tensor, *, warm, warm_std: float, logsnr_min: float, logsnr_max: float,
                 seed: int, data: str = "continuous", n_grid: int = 53, n_pilot: int = 512) -> LogisticProposal:
    r"""The logistic (loc, scale) minimising :math:`\int V/p\,d\lambda` (module docstring) on a pilot.

    V(λ) is the mean square of `antithetic_bound`'s unweighted pair over the first ``n_pilot``
    rows of x at ``n_grid`` evenly spaced λ (trapezoid rule); the candidates are loc on a 0.25
    grid over the range and scale in {1, 1.25, …, 4}.
    """
    y = _continuous(x[:n_pilot], data)
    grid = torch.linspace(logsnr_min, logsnr_max, n_grid, dtype=torch.float64)
    n, d = y.shape[0], math.prod(y.shape[1:])
    second = torch.empty(n_grid, dtype=torch.float64)
    with torch.inference_mode():
        for j, lam in enumerate(grid):
            pair = _pair_integrand(denoiser, y, lam.repeat(n), warm=warm, warm_std=warm_std, seed=seed,
                                   offset=j * n * d)
            second[j] = pair.pow(2).mean()
    step = grid[1] - grid[0]
    trapezoid = torch.full((n_grid,), float(step), dtype=torch.float64)
    trapezoid[[0, -1]] /= 2
    best = None
    for loc in torch.arange(logsnr_min, logsnr_max + 1e-9, 0.25).tolist():
        for scale in torch.arange(1.0, 4.0 + 1e-9, 0.25).tolist():
            candidate = LogisticProposal(logsnr_min, logsnr_max, loc=loc, scale=scale)
            cost = float((trapezoid * second / candidate.density(grid)).sum())
            if best is None or cost < best[0]:
                best = (cost, candidate)
    return best[1]
