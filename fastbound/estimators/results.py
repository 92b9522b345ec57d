"""The records the estimators return: `NLLEstimate` and `RatioEstimate`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class NLLEstimate:
    r"""An estimate of -log p(x0) per sequence, in nats.

    Attributes:
        nll: (B,) float64, the estimate.
        stderr: (B,) its Monte-Carlo standard error (0 for ``time_free_exact``; NaN with
            one sample): the successive-difference estimate for the stratified draws of
            ``"time_free"`` / ``"mc"``, the per-node sample variance for ``"quadrature"``
            (whose discretisation error is not included). Sequences are independent, so
            the batch's standard error is the root sum of squares.
        n_tokens: (B,) int64, the number of positions scored (maskable positions).
        bits_per_token: (B,) ``nll / (n_tokens ln 2)``.
        method: the method used.
        times: (B, n) the time of each column of ``integrand``: t for ``"mc"`` and
            ``"quadrature"``, the mask ratio k/M for ``"time_free"``; None for
            ``"time_free_exact"``.
        integrand: (B, n) an estimate of the integrand there, for plots: the weighted
            loss :math:`w(t)\sum_i \ell_i` of each draw (``"mc"``; the draws have density
            :math:`1/(2\sqrt t)`), the node's mean weighted loss
            :math:`w(t)\,\mathbb E[\ell_t]` (``"quadrature"``), or
            :math:`M/k \sum_{i\in I}\ell_i` (``"time_free"``). The terminal term of the
            uniform graph is not part of it.
    """

    nll: torch.Tensor
    stderr: torch.Tensor
    n_tokens: torch.Tensor
    bits_per_token: torch.Tensor
    method: str
    times: torch.Tensor | None = None
    integrand: torch.Tensor | None = None

    def overall_bits_per_token(self) -> tuple[float, float]:
        """(bits per token, standard error) over the whole batch: sum of nll / sum of tokens."""
        scale = 1.0 / (float(self.n_tokens.sum()) * math.log(2))
        return float(self.nll.sum()) * scale, float(self.stderr.pow(2).sum().sqrt()) * scale


class RatioEstimate(NamedTuple):
    """``value`` (B,): log p(x_a) - log p(x_b) in nats; ``stderr`` (B,): its standard error."""

    value: torch.Tensor
    stderr: torch.Tensor
