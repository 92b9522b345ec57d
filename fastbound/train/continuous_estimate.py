r"""A diagnostic of the reference run: how far a model's warm-start bound lies above the exact denoiser's.

The run's held-out bounds are `fastbound.continuous.nll_bound` with antithetic pairs and the
proposal of `fastbound.continuous.fit_proposal` (their derivation is in
`fastbound.continuous.bound`). On the 2-D mixture, whose exact denoiser is known, the run also
measures the model's excess directly: `denoiser_gap`.
"""

from __future__ import annotations

import math

import torch

from fastbound.continuous import LogisticProposal, integrate_step, perturb

# Counters of the λ uniforms (the warm and ε noise uses perturb's own key at counters [0, rows · d)),
# the same layout as nll_bound's: draw k of sample b is row g = k·B + b, λ at counter _LOGSNR_STREAM + g.
_LOGSNR_STREAM = 3 << 60


def denoiser_gap(denoiser, reference, x: torch.Tensor, *, warm, warm_std: float, proposal: LogisticProposal,
                 n_samples: int, seed: int = 0, batch_size: int = 4096) -> tuple[float, float]:
    r""":math:`\tfrac12\int\mathbb E\lVert\hat\varepsilon - \hat\varepsilon_{ref}\rVert^2 d\lambda` over the rows of x, in bits/dim, with its s.e.

    For the optimal :math:`\hat\varepsilon_{ref} = \mathbb E[\varepsilon\mid z]`,
    :math:`\mathbb E\lVert\varepsilon - \hat\varepsilon\rVert^2 = \mathbb E\lVert\varepsilon - \hat\varepsilon_{ref}\rVert^2
    + \mathbb E\lVert\hat\varepsilon_{ref} - \hat\varepsilon\rVert^2` (ε − ε̂_ref is orthogonal to
    every function of z), so this is exactly how far ε̂'s bound lies above ε̂_ref's on the
    same range (the closed-form terms are shared). Every draw
    :math:`\lVert\hat\varepsilon - \hat\varepsilon_{ref}\rVert^2/(2p(\lambda))` is ≥ 0: unlike the
    difference of two bound estimates it has no ε noise to cancel. Continuous data, (B, d) x;
    ``n_samples`` ≥ 2 importance draws (λ ~ ``proposal``) per row, ``batch_size`` rows per call,
    accumulated per row by `integrate_step` (ε̂_ref in the place of ε).
    """
    if n_samples < 2:
        raise ValueError(f"n_samples must be >= 2 (the standard error needs two draws), got {n_samples}")
    n_seq, d = x.shape
    acc = torch.zeros(n_seq, 2, dtype=torch.float64)
    with torch.inference_mode():
        for g0 in range(0, n_samples * n_seq, batch_size):
            g = torch.arange(g0, min(n_samples * n_seq, g0 + batch_size))
            lam = proposal.sample(g.numel(), seed=seed, offset=_LOGSNR_STREAM + g0)
            noised = perturb(x[g % n_seq], lam, warm=warm, warm_std=warm_std, seed=seed, offset=g0 * d)
            cond = lam.to(torch.float32)
            integrate_step(denoiser(noised.z, cond), reference(noised.z, cond).to(x.dtype), acc,
                           weight=0.5 / proposal.density(lam), index=g % n_seq)
    if not bool(torch.isfinite(acc).all()):
        raise ValueError("the denoiser returned non-finite values (NaN or infinity) in eps_hat")
    mean = acc[:, 0] / n_samples
    stderr = ((acc[:, 1] / n_samples - mean**2).clamp_min(0) / (n_samples - 1)).sqrt()
    scale = 1 / (n_seq * d * math.log(2))
    return float(mean.sum()) * scale, float(stderr.pow(2).sum().sqrt()) * scale
