r"""Held-out evaluation: the NLL bound of the denoiser in bits per token, with its standard error.

`fastbound.estimate_nll` gives an unbiased Monte-Carlo estimate of the diffusion bound on
:math:`-\log p(x_0)` for each held-out sequence. On the absorbing graph it is the time-free
I-MDCE estimator (Jeon et al. 2025; the any-order form of Ou et al. 2024, RADD): it draws how
many tokens to mask instead of a time, which removes the variance of the time weight; the logits
are a denoiser whichever loss trained them. On the uniform graph it is the I-MDSE Monte-Carlo
estimator over the training schedule, plus the analytic terminal term (SEDD's bound).

The reported standard error is that of the mean over sequences, so it covers both the
Monte-Carlo noise and the spread between sequences (the true entropy is an expectation over
sequences).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch

import fastbound

from .objective import Objective


@dataclass(frozen=True)
class Evaluation:
    bits_per_token: float
    stderr: float  # standard error of bits_per_token
    estimate: fastbound.NLLEstimate  # per sequence, with the per-draw integrand


def evaluate(
    model: torch.nn.Module,
    x0: torch.Tensor,
    objective: Objective,
    *,
    n_samples: int,
    seed: int,
    dtype: torch.dtype | None = None,
    fused_head: bool = False,
) -> Evaluation:
    """Estimates the bound on the held-out sequences ``x0`` (n, L), running the model in ``dtype``.

    With ``fused_head`` the model returns its features (``model(x_t, sigma, features=True)``) and
    the estimate takes its linear ``head`` as ``head=``, so the (n, L, V) logits are never formed.
    """
    autocast = torch.autocast(x0.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    extra = dict(features=True) if fused_head else {}

    def denoiser(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with autocast:
            return model(x_t, sigma, **extra).float()

    if objective.graph == "absorb":
        options = dict(method="time_free", loss="dce", mask_id=objective.mask_id)
    else:
        options = dict(method="mc", loss="dse", graph="uniform", schedule=objective.schedule)
    if fused_head:
        options["head"] = (model.head.weight.float(), None if model.head.bias is None else model.head.bias.float())
    est = fastbound.estimate_nll(denoiser, x0, vocab_size=objective.num_tokens, n_samples=n_samples,
                                 seed=seed, backend=objective.backend, **options)
    per_token = est.bits_per_token
    n = per_token.numel()
    if n > 1:
        stderr = float(per_token.std() / math.sqrt(n))
    else:
        stderr = float(est.stderr[0] / (est.n_tokens[0] * math.log(2)))
    return Evaluation(float(per_token.mean()), stderr, est)


def integrand_curve(est: fastbound.NLLEstimate, bins: int = 20) -> tuple[np.ndarray, np.ndarray, str]:
    """The estimate's integrand averaged in ``bins`` equal bins of its time axis, in bits per token.

    For the time-free estimate the axis is the mask ratio k/M and the value
    :math:`\\frac{M}{k}\\sum_{i\\in I}\\ell_i / (M \\ln 2)`, the mean cross-entropy of the masked
    tokens; for the Monte-Carlo estimate the axis is t and the value the weighted loss per token.
    Either way the area under the curve is the bound in bits per token.
    """
    x = est.times.double().flatten().cpu().numpy()
    y = (est.integrand.double() / (est.n_tokens.double()[:, None] * math.log(2))).flatten().cpu().numpy()
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(x, edges) - 1, 0, bins - 1)
    centres, means = [], []
    for b in range(bins):
        if (which == b).any():
            centres.append(0.5 * (edges[b] + edges[b + 1]))
            means.append(y[which == b].mean())
    label = "mask ratio k / L" if est.method.startswith("time_free") else "t"
    return np.array(centres), np.array(means), label
