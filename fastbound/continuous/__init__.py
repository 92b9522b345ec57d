"""fastbound.continuous: the warm-start NLL bound for continuous data and its fused kernels (issue 12).

Public API:
    perturb                 x -> z = α (x + σ0 u) + σ ε and ε in one pass (warm-up laws WARM_LAWS)
    denoising_loss          ½ w ‖ε − ε̂‖² per sample, fused forward + backward
    integrate_step          the bound's per-draw float64 accumulation (one read of ε̂)
    nll_bound               the warm-start information-theoretic NLL bound with a standard error
                            (antithetic=True: antithetic ε pairs, a smaller one)
    fit_proposal            the LogisticProposal of least estimator variance, fitted on a pilot
    ContinuousNLLEstimate   what nll_bound returns
    from_8bit               8-bit values to the bin centres in (−1, 1) that nll_bound(data="8bit") uses
    schedules               VP log-SNR schedules (LinearLogSNR, CosineLogSNR) and LogisticProposal
"""

from . import schedules
from .bound import BIN_WIDTH_8BIT, ContinuousNLLEstimate, fit_proposal, from_8bit, nll_bound, uniform_dequantisation_std
from .integrate import integrate_step
from .loss import denoising_loss
from .noise import WARM_LAWS, ContinuousPerturbed, perturb
from .schedules import CosineLogSNR, LinearLogSNR, LogisticProposal

__all__ = [
    "perturb", "ContinuousPerturbed", "WARM_LAWS", "denoising_loss", "integrate_step", "nll_bound", "fit_proposal",
    "ContinuousNLLEstimate", "BIN_WIDTH_8BIT", "from_8bit", "uniform_dequantisation_std", "schedules", "LinearLogSNR",
    "CosineLogSNR", "LogisticProposal",
]
