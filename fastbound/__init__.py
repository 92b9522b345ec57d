"""fastbound: fused kernels for likelihood-exact discrete diffusion.

Public API:
    dse_loss, dce_loss          fused score-entropy (SEDD) and cross-entropy (MDLM) losses
    schedules                   noise schedules (LogLinear, Geometric, Cosine)
    reference                   the pure-PyTorch oracle every kernel is tested against
    perturb, sample_times       counter-based noise: x0 -> x_t, diffusion times
    estimate_nll                NLL estimators (I-MDCE / I-MDSE, time-free)
    models, data, train         the reference training script (``python -m fastbound.train``)
"""

from . import reference, schedules
from ._ops import cpu_isa
from .estimators import NLLEstimate, estimate_nll
from .losses import dce_loss, dse_loss
from .noise import perturb, sample_num_masked, sample_times

__all__ = [
    "dse_loss", "dce_loss", "schedules", "reference", "cpu_isa",
    "perturb", "sample_times", "sample_num_masked", "estimate_nll", "NLLEstimate",
]
__version__ = "0.1.0"
