"""Triton kernels, registered as ``torch.ops.fastbound.<op>_triton`` (`_common.register_op`).

Importing this package defines every Triton op (each with the schema of the C++
op of the same name, see `csrc/ops.cpp`) and the losses' autograd; the public
functions import it when ``backend="triton"``. On CPU tensors the kernels run
only in Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported).

Ops: ``dse_forward_triton``, ``dse_forward_inplace_triton`` (`.dse`),
``dce_forward_triton``, ``dce_forward_inplace_triton`` (`.dce`),
``integrate_step_triton`` (`.integrate`), ``perturb_triton`` and
``philox4x32_triton`` (`.perturb`); ``scale_rows__triton`` (`.scale_rows`); ``continuous_perturb_triton`` (`.continuous_noise`),
``continuous_denoising_loss_triton`` and ``continuous_integrate_step_triton`` (`.continuous_loss`).
"""

from . import continuous_loss, continuous_noise, dce, dse, integrate, perturb, scale_rows  # noqa: F401  (registers the ops)
