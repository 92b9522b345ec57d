"""Triton kernels for the fused losses, registered as ``torch.ops.fastbound.*_triton``.

Importing this package defines the ops (with the C++ ops' schemas, see
`csrc/ops.cpp`) and their autograd; `fastbound.losses` imports it when
``backend="triton"``. On CPU tensors the kernels run only in Triton's
interpreter (``TRITON_INTERPRET=1`` set before triton is imported).

Ops: ``dse_forward_triton``, ``dse_forward_inplace_triton`` (`.dse`) and
``dce_forward_triton``, ``dce_forward_inplace_triton`` (`.dce`).
"""

from . import dce, dse  # noqa: F401  (registers the ops)
