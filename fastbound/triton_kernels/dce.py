r"""Denoising cross-entropy (MDLM's loss, the I-MDCE integrand) as a Triton kernel.

At rows where :math:`x_t` is the mask (Sahoo et al. 2024, MDLM, SUBS
parameterisation; Jeon et al. 2025, infodis):

.. math:: \ell = \log\textstyle\sum_{y \ne \text{mask}} e^{z_y} - z_{x_0}, \qquad
          \partial\ell/\partial z_y = \mathrm{softmax}(z)_y - [y = x_0], \ 0 \text{ in the mask column},

times the row scale; the mask column is left out of the softmax when
``mask_id < V``. Other rows, and rows whose :math:`x_0` is ``ignore_index``, get
loss 0 and a zero gradient row. As in the CUDA kernel (`csrc/cuda/loss_row_kernels.cuh`), a masked
row whose :math:`x_0` is outside :math:`[0, V)` or is the mask id gets a NaN loss and a
NaN gradient row, and the id is never used as an address: the Python checks that
refuse such ids do not run under ``torch.compile``.

The loss is formed as :math:`(m - z_{x_0}) + \log\sum_y e^{z_y - m}` with :math:`m`
the row maximum, and the softmax as :math:`e^{(z_y - m) - \log\sum}`, so large logits
(an offset of :math:`10^4`) lose no digits to the cancellation of :math:`m`.

One program per row: a first pass keeps a running maximum and a rescaled sum of
exponentials (the online softmax of Milakov & Gimelshein 2018, as in
Liger-Kernel's cross entropy), reading the row once; when the gradient is
wanted a second pass writes it. The C++ version is `csrc/cpu/loss_row_kernels.h`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from . import _common


@triton.jit
def dce_row(logits_row, grad_row, n_cols, x_t, x0, scale, mask_id, ignore_index, WRITE_GRAD: tl.constexpr,
            BLOCK: tl.constexpr):
    """The cross-entropy of one row times ``scale``, and its gradient into ``grad_row`` when WRITE_GRAD.

    A bad x0 (see the module docstring) gives a NaN loss and gradient row. Used by the
    loss kernel and by the integration step (`.integrate`, without the gradient).
    """
    n_cols = tl.cast(n_cols, tl.int64)  # int64 loop counter and columns: no wrap for V near 2^31
    skip = (x0 == ignore_index) | (x_t != mask_id)
    bad = ((x0 < 0) | (x0 >= n_cols) | (x0 == mask_id)) & ~skip
    loss = tl.zeros_like(scale)
    if bad | skip:
        loss = tl.where(bad, float("nan"), loss)
        if WRITE_GRAD:
            _common.fill_row(grad_row, n_cols, loss, BLOCK)
    else:
        # Pass 1: log-sum-exp over the real tokens, and z[x0] from the chunk that holds it.
        running_max = tl.zeros_like(scale) - float("inf")
        sum_exp = tl.zeros_like(scale)
        z_x0 = tl.zeros([BLOCK], scale.dtype)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            real = (cols < n_cols) & (cols != mask_id)
            z = tl.load(logits_row + cols, mask=cols < n_cols, other=0.0).to(scale.dtype)
            z = tl.where(real, z, -float("inf"))
            z_x0 += tl.where(cols == x0, z, 0.0)
            new_max = tl.maximum(running_max, tl.max(z))
            shift = tl.where(new_max == -float("inf"), 0.0, new_max)  # an all -inf chunk adds 0
            sum_exp = sum_exp * tl.exp(running_max - shift) + tl.sum(tl.exp(z - shift))
            running_max = new_max
        # (m - z[x0]) + log sum: the two large terms cancel first, so a logit offset
        # of 1e4 costs no digits (m + log sum would round log sum to ulp(m)).
        log_sum = tl.log(sum_exp)
        loss = scale * ((running_max - tl.sum(z_x0)) + log_sum)
        # Pass 2: the gradient. Pass 1 ended in block reductions, so in place every read
        # of the row is done before this pass overwrites it.
        if WRITE_GRAD:
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                real = (cols < n_cols) & (cols != mask_id)
                z = tl.load(logits_row + cols, mask=cols < n_cols, other=0.0).to(scale.dtype)
                p = tl.where(real, tl.exp((z - running_max) - log_sum), 0.0)
                g = scale * tl.where(cols == x0, p - 1.0, p)
                tl.store(grad_row + cols, g.to(grad_row.dtype.element_ty), mask=cols < n_cols)
    return loss


@triton.jit
def _dce_kernel(logits_ptr, logits_stride, grad_ptr, grad_stride, x_t_ptr, x0_ptr, scale_ptr, loss_ptr,
                n_cols, mask_id, ignore_index, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * stride may exceed 2^31
    loss = dce_row(logits_ptr + row * logits_stride, grad_ptr + row * grad_stride, n_cols, tl.load(x_t_ptr + row),
                   tl.load(x0_ptr + row), tl.load(scale_ptr + row), mask_id, ignore_index, WRITE_GRAD, BLOCK)
    tl.store(loss_ptr + row, loss)


def _dce_rows(logits, grad, x_t, x0, row_scale, mask_id: int, ignore_index: int, write_grad: bool) -> torch.Tensor:
    """Runs the kernel over all rows; ``grad`` may be ``logits`` itself (in place). Returns the loss."""
    if mask_id < 0:
        raise ValueError(f"mask_id must be non-negative, got {mask_id}")
    _common.check_loss_inputs(logits, {"row_scale": row_scale}, {"x_t": x_t, "x0": x0},
                              score_name="logits", inplace=write_grad and grad is logits)
    return _common.launch_rows(_dce_kernel, logits, grad, (x_t, x0), row_scale, (mask_id, ignore_index), write_grad)


@_common.register_op("dce_forward", fused_loss=True)
def dce_forward_triton(
    logits: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, row_scale: torch.Tensor, mask_id: int,
    ignore_index: int, need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row DCE loss (N,) and, when ``need_grad``, its gradient (N, V) scaled by ``row_scale``."""
    grad = logits.new_empty(logits.shape) if need_grad else logits.new_empty(0)
    loss = _dce_rows(logits, grad if need_grad else logits, x_t, x0, row_scale, mask_id, ignore_index, need_grad)
    return loss, grad


@_common.register_op("dce_forward_inplace", mutates_args={"logits"})
def dce_forward_inplace_triton(
    logits: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, row_scale: torch.Tensor, mask_id: int,
    ignore_index: int,
) -> torch.Tensor:
    """Per-row DCE loss (N,); overwrites ``logits`` with the scaled gradient."""
    return _dce_rows(logits, logits, x_t, x0, row_scale, mask_id, ignore_index, True)

