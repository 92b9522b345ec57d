"""fastbound: fused kernels for likelihood-exact discrete diffusion.

Public API:
    dse_loss, dce_loss          fused score-entropy (SEDD) and cross-entropy (MDLM) losses
    schedules                   noise schedules (LogLinear, Geometric, Cosine)
    perturb, sample_times,      fused noise sampling x0 -> x_t and time / mask-count samplers,
    sample_num_masked           reproducible on every backend (counter-based Philox4x32-10)
    reference                   the pure-PyTorch oracle every kernel is tested against
"""

from . import noise, reference, schedules
from ._ops import cpu_isa
from .losses import dce_loss, dse_loss
from .noise import NoiseStream, Perturbed, perturb, philox_words, sample_num_masked, sample_times

__all__ = [
    "dse_loss",
    "dce_loss",
    "perturb",
    "Perturbed",
    "sample_times",
    "sample_num_masked",
    "philox_words",
    "NoiseStream",
    "noise",
    "schedules",
    "reference",
    "cpu_isa",
]
__version__ = "0.1.0"
