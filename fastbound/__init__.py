"""fastbound: fused kernels for likelihood-exact discrete diffusion.

Public API:
    dse_loss, dce_loss          fused score-entropy (SEDD) and cross-entropy (MDLM) losses
    schedules                   noise schedules (LogLinear, Geometric, Cosine)
    reference                   the pure-PyTorch oracle every kernel is tested against
"""

from . import reference, schedules
from ._ops import cpu_isa
from .losses import dce_loss, dse_loss

__all__ = ["dse_loss", "dce_loss", "schedules", "reference", "cpu_isa"]
__version__ = "0.1.0"
