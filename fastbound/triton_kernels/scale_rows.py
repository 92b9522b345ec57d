"""``scale_rows_`` as a Triton kernel (the twin of `csrc/cpu/scale_rows.cpp`; contract:
`csrc/common/scale_rows.h`).

The backward of a fused loss multiplies row i of the saved (N, V) gradient by the upstream
factor f_i, in place, computed in the accumulation dtype and rounded once. Rows the loss wrote
as zeros (x0 = ``ignore_index``; x_t != ``mask_id`` when ``mask_id >= 0``) and rows with
f_i = 1 are left alone: their V entries are neither read nor written, so the pass costs only
the contributing rows (the masked fraction of the absorbing DSE and of the DCE). One program
per row, walking it in chunks of ``BLOCK`` columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common


@triton.jit
def _scale_rows_kernel(grad_ptr, grad_stride, factor_ptr, factor_stride, x_t_ptr, x0_ptr, n_cols, mask_id,
                       ignore_index, HAS_X_T: tl.constexpr, HAS_X0: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * stride may exceed 2^31
    n_cols = tl.cast(n_cols, tl.int64)  # int64 loop counter and columns: no wrap for V near 2^31
    f = tl.load(factor_ptr + row * factor_stride)
    zero_row = f != f  # False: a row that holds zeros by construction is
    if HAS_X0:
        zero_row = zero_row | (tl.load(x0_ptr + row) == ignore_index)
    if HAS_X_T:
        zero_row = zero_row | ((mask_id >= 0) & (tl.load(x_t_ptr + row) != mask_id))
    # skipped only for a finite factor: 0 * inf and 0 * NaN are NaN, as autograd gives.
    skip = (f == 1.0) | (zero_row & (tl.abs(f) < float("inf")))
    if not skip:
        grad_row = grad_ptr + row * grad_stride
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            g = tl.load(grad_row + cols, mask=cols < n_cols, other=0.0).to(f.dtype)
            tl.store(grad_row + cols, (g * f).to(grad_row.dtype.element_ty), mask=cols < n_cols)


@_common.register_op("scale_rows_", mutates_args={"grad"})
def scale_rows__triton(grad: torch.Tensor, factor: torch.Tensor, x_t: torch.Tensor | None, x0: torch.Tensor | None,
                       mask_id: int, ignore_index: int) -> None:
    """grad[i] *= factor[i] in place, except rows that are zero by construction or have factor 1."""
    if grad.dim() != 2:
        raise ValueError(f"grad must be (N, V), got shape {tuple(grad.shape)}")
    n, n_cols = grad.shape
    _common.check_loss_inputs(grad, {}, {name: t for name, t in (("x_t", x_t), ("x0", x0)) if t is not None},
                              score_name="grad", inplace=True)
    acc = _common.accumulation_dtype(grad)
    if factor.dim() != 1 or factor.shape[0] != n or factor.dtype != acc:
        raise ValueError(f"factor must be a ({n},) tensor of dtype {acc}")
    if n == 0 or n_cols == 0:
        return
    block = _common.block_size(n_cols)
    _common.launch(
        _scale_rows_kernel, (n,), grad.device,
        grad, grad.stride(0), factor, factor.stride(0), x_t if x_t is not None else factor,
        x0 if x0 is not None else factor, n_cols, mask_id, ignore_index,
        HAS_X_T=x_t is not None, HAS_X0=x0 is not None, BLOCK=block, num_warps=_common.num_warps(block),
    )  # fmt: skip
