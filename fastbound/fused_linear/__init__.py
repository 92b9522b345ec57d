"""Fused output layer + loss: DSE, DCE and the likelihood integration step from hidden states.

At language-model scale the (tokens × vocab) scores of the output layer dominate memory.
These functions take the hidden states and the output layer (``weight`` (V, H),
``bias`` (V,)) instead of the scores and compute in chunks of contributing rows, so only one
chunk of scores exists at a time and rows that do not contribute (unmasked positions of
masked diffusion) cost nothing:

    fused_linear_dse_loss   ``dse_loss(hidden @ weight.T + bias, ...)`` (SEDD's score entropy)
    fused_linear_dce_loss   ``dce_loss(hidden @ weight.T + bias, ...)`` (MDLM's cross-entropy)
    head_integrate_step     ``integrate_step(hidden @ weight.T + bias, ...)`` (NLL estimators)
    chunk_rows              the automatic chunk size

Modules: `head` (row selection, chunk rule, one chunk's scores and row losses),
`loss` (the losses' custom op and autograd), `integrate` (the integration step).
"""

from .head import chunk_rows
from .integrate import head_integrate_step
from .loss import fused_linear_dce_loss, fused_linear_dse_loss

__all__ = ["fused_linear_dse_loss", "fused_linear_dce_loss", "head_integrate_step", "chunk_rows"]
