"""fastbound.continuous: fused noise, loss and integration kernels for continuous data (issue 12).

Minimal package file written by cont-kernels so the kernels import; cont-bound owns it from here.
"""

from .integrate import integrate_step
from .loss import denoising_loss
from .noise import WARM_LAWS, ContinuousPerturbed, perturb

__all__ = ["perturb", "ContinuousPerturbed", "WARM_LAWS", "denoising_loss", "integrate_step"]
