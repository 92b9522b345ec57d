r"""The continuous denoising loss and integration step as Triton kernels.

Ops (schemas of ``continuous_denoising_loss`` and ``continuous_integrate_step`` in
`csrc/ops.cpp`): ``torch.ops.fastbound.continuous_denoising_loss_triton`` and
``continuous_integrate_step_triton``. One program per sample walks its d elements
in blocks, summing (ε − ε̂)² in the compute type (float32; float64 for float64
input; always float64 for the integration step) and, for the loss, writing the gradient scale_b (ε̂ − ε) in the same pass.
With ε absent it is regenerated from its Philox counters (`.continuous_noise`).
The integration step writes each sample's float64 sum, and one program then adds
S_b = w_b (sum_b − c_b) and S_b² to ``acc[index_b]`` serially in sample order, so the
accumulator does not depend on scheduling (no atomics).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..continuous import _ops
from ._common import launch, register_op
from .continuous_noise import check_per_row, check_rows, compute_dtype, regenerated_eps, round_to, salted_seed

MAX_BLOCK = 2048


@triton.jit
def _row_kernel(eps_hat_ptr, eps_ptr, scale_ptr, grad_ptr, out_ptr, cols, seed, offset,
                HAS_EPS: tl.constexpr, WRITE_GRAD: tl.constexpr, DT: tl.constexpr, BLOCK: tl.constexpr):
    """out[b] = sum (ε − ε̂)² of sample b, summed in out's dtype; grad = scale_b (ε̂ − ε) when WRITE_GRAD."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.cast(cols, tl.int64)
    start = row * cols
    SUM: tl.constexpr = out_ptr.dtype.element_ty
    total = tl.zeros([BLOCK], SUM)
    if WRITE_GRAD:
        scale = tl.load(scale_ptr + row)
    for lo in range(0, cols, BLOCK):
        col = lo + tl.arange(0, BLOCK)
        valid = col < cols
        eh = tl.load(eps_hat_ptr + start + col, mask=valid, other=0).to(DT)
        if HAS_EPS:
            e = tl.load(eps_ptr + start + col, mask=valid, other=0).to(DT)
        else:
            e = regenerated_eps(seed, offset, start + col, eps_hat_ptr.dtype.element_ty, DT)
        diff = tl.where(valid, e.to(SUM) - eh.to(SUM), 0.0)
        total += diff * diff
        if WRITE_GRAD:
            tl.store(grad_ptr + start + col, round_to(-scale * diff, grad_ptr.dtype.element_ty), mask=valid)
    tl.store(out_ptr + row, tl.sum(total, 0))


def _row_sums(eps_hat, eps, scale, grad, out, seed, offset, write_grad):
    rows, cols = eps_hat.shape
    if rows == 0:
        return
    block = min(MAX_BLOCK, max(32, triton.next_power_of_2(max(cols, 1))))
    dt = tl.float64 if compute_dtype(eps_hat) == torch.float64 else tl.float32
    launch(
        _row_kernel, (rows,), eps_hat.device, eps_hat, eps if eps is not None else eps_hat, scale, grad, out, cols, salted_seed(seed), offset,
        HAS_EPS=eps is not None, WRITE_GRAD=write_grad, DT=dt, BLOCK=block, num_warps=max(1, min(8, block // 256)),
    )  # fmt: skip


def _check_eps(eps_hat: torch.Tensor, eps: Optional[torch.Tensor]) -> None:
    check_rows("eps_hat", eps_hat)
    if eps is not None and (eps.shape != eps_hat.shape or eps.dtype != eps_hat.dtype or not eps.is_contiguous()
                            or eps.device != eps_hat.device):
        raise ValueError("eps must be contiguous with eps_hat's shape, dtype and device")


@register_op("continuous_denoising_loss")
def continuous_denoising_loss_triton(eps_hat: torch.Tensor, eps: Optional[torch.Tensor], scale: torch.Tensor,
                                     seed: int, offset: int, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(0.5 scale_b ‖ε_b − ε̂_b‖² (B,), scale_b (ε̂ − ε) or empty); see `fastbound.continuous.denoising_loss`."""
    _check_eps(eps_hat, eps)
    check_per_row("scale", eps_hat, scale, compute_dtype(eps_hat))
    grad = torch.empty_like(eps_hat) if need_grad else eps_hat.new_empty(0)
    sums = scale.new_empty(eps_hat.shape[0])
    _row_sums(eps_hat, eps, scale, grad if need_grad else eps_hat, sums, seed, offset, need_grad)
    return 0.5 * scale * sums, grad


@triton.jit
def _scatter_kernel(sums_ptr, weight_ptr, baseline_ptr, index_ptr, acc_ptr, n, n_slots,
                    HAS_BASELINE: tl.constexpr, HAS_INDEX: tl.constexpr):
    """acc[index_b] += (S_b, S_b²), S_b = w_b (sum_b − c_b), for b = 0 .. n-1 in order.

    A slot outside [0, n_slots) is skipped, never written (`fastbound.continuous` reports it)."""
    for b in range(n):
        value = tl.load(sums_ptr + b)
        if HAS_BASELINE:
            value -= tl.load(baseline_ptr + b)
        value *= tl.load(weight_ptr + b)
        slot = b
        if HAS_INDEX:
            slot = tl.load(index_ptr + b)
        ok = (slot >= 0) & (slot < n_slots)
        tl.store(acc_ptr + 2 * slot, tl.load(acc_ptr + 2 * slot, mask=ok) + value, mask=ok)
        tl.store(acc_ptr + 2 * slot + 1, tl.load(acc_ptr + 2 * slot + 1, mask=ok) + value * value, mask=ok)


@register_op("continuous_integrate_step", mutates_args={"acc"})
def continuous_integrate_step_triton(eps_hat: torch.Tensor, eps: Optional[torch.Tensor], acc: torch.Tensor,
                                     weight: torch.Tensor, baseline: Optional[torch.Tensor],
                                     index: Optional[torch.Tensor], seed: int, offset: int) -> None:
    """acc[index_b] += (S_b, S_b²); see `fastbound.continuous.integrate_step`."""
    _check_eps(eps_hat, eps)
    rows = eps_hat.shape[0]
    if acc.dim() != 2 or acc.shape[1] != 2 or acc.dtype != torch.float64 or not acc.is_contiguous():
        raise ValueError("acc must be a contiguous (n_slots, 2) float64 tensor")
    check_per_row("weight", eps_hat, weight, torch.float64)
    if baseline is not None:
        check_per_row("baseline", eps_hat, baseline, torch.float64)
    if index is not None:
        check_per_row("index", eps_hat, index, torch.int64)
    elif acc.shape[0] != rows:
        raise ValueError("without index, acc needs one row per sample")
    if rows == 0:
        return
    sums = torch.empty(rows, dtype=torch.float64, device=eps_hat.device)
    _row_sums(eps_hat, eps, sums, eps_hat, sums, seed, offset, False)
    launch(
        _scatter_kernel, (1,), eps_hat.device, sums, weight, baseline if baseline is not None else weight, index if index is not None else sums, acc, rows,
        acc.shape[0],
        HAS_BASELINE=baseline is not None, HAS_INDEX=index is not None,
    )  # fmt: skip


_ops.register_autograd("_triton")
