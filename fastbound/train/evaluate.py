r"""Held-out evaluation: the NLL bound of the denoiser in bits per token, with its standard error.

`fastbound.estimate_nll` gives an unbiased Monte-Carlo estimate of the diffusion bound on
:math:`-\log p(x_0)` for each held-out sequence. On the absorbing graph it uses the time-free
I-MDCE estimator (Jeon et al. 2025; the "any-order" form of Ou et al. 2024): draw how many
tokens to mask instead of a time, which removes the variance of the time weight.
The reported standard error is that of the mean over sequences, so it covers both the Monte-Carlo
noise and the spread between sequences; the true entropy is an expectation over sequences.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

import fastbound

from .objective import Objective


@dataclass(frozen=True)
class Evaluation:
    bits_per_token: float
    stderr: float  # standard error of bits_per_token
    estimate: object  # the fastbound.NLLEstimate, for its per-timestep integrand


def evaluate(
    model: torch.nn.Module,
    x0: torch.Tensor,
    objective: Objective,
    *,
    n_samples: int,
    seed: int,
    dtype: torch.dtype | None = None,
) -> Evaluation:
    """Estimates the bound on the held-out sequences ``x0`` (n, L)."""
    autocast = torch.autocast(x0.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def denoiser(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with autocast:
            return model(x_t, sigma).float()

    method = "time_free" if objective.graph == "absorb" else "time"
    est = fastbound.estimate_nll(
        denoiser, x0, method=method, loss=objective.loss if objective.graph == "uniform" else "dce",
        graph=objective.graph, schedule=objective.schedule, n_samples=n_samples,
        mask_id=objective.mask_id, seed=seed,
    )
    per_token = est.nll.double() / (x0.shape[1] * math.log(2))
    n = per_token.numel()
    stderr = float(per_token.std() / math.sqrt(n)) if n > 1 else float(est.stderr[0]) / (x0.shape[1] * math.log(2))
    return Evaluation(float(per_token.mean()), stderr, est)
