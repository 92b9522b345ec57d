r"""Triton kernel of the likelihood integration step (`fastbound.integrate_step`).

One program reduces a chunk of rows of one sequence: each row's loss is the
per-row code of the loss kernels (`.dce.dce_row`, `.dse.dse_row`, without the
gradient), so the step and the losses evaluate the same formulas; the program
writes the chunk's float64 sum. A few torch operations then form
:math:`S_b = w_b \sum` per sequence and add :math:`(S_b, S_b^2)` to the
accumulator. Registered as ``fastbound::integrate_step_triton`` with the schema
of ``fastbound::integrate_step``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _ops
from . import _common, dce, dse

LOSS_DCE = tl.constexpr(1)
"""The DCE's loss code (`fastbound.integrate.LOSS_CODES`); 0 is the DSE."""

ROWS_TARGET = 1 << 15  # scores per program, as the C++ kernels (`integrate_rows_per_chunk`)


@triton.jit
def _integrate_chunks_kernel(
    out_ptr, stride_b, stride_l, x_t_ptr, x0_ptr, k0_ptr, k1_ptr, partial_ptr,
    length, n_cols, rows_per_chunk, n_chunks, mask_id, ignore_index,
    LOSS: tl.constexpr, UNIFORM: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)  # so are b, the row counter i and i * stride_l
    b = pid // n_chunks
    lo = (pid % n_chunks) * rows_per_chunk
    hi = tl.minimum(lo + rows_per_chunk, length)
    k0 = tl.load(k0_ptr + b)  # the sequence's `dse.row_constants` (unused by the DCE)
    k1 = tl.load(k1_ptr + b)
    one = tl.zeros_like(k0) + 1.0  # the row scale: the weight is applied per sequence
    total = tl.zeros([1], tl.float64)
    for i in range(lo, hi):
        pos = b * length + i
        x_t = tl.load(x_t_ptr + pos)
        x0 = tl.load(x0_ptr + pos)
        row_ptr = out_ptr + (b * stride_b + i * stride_l)
        if LOSS == LOSS_DCE:
            loss = dce.dce_row(row_ptr, row_ptr, n_cols, x_t, x0, one, mask_id, ignore_index, False, BLOCK)
        else:
            loss = dse.dse_row(row_ptr, row_ptr, n_cols, x_t, x0, k0, k1, one, ignore_index, UNIFORM, False, BLOCK)
        total += loss.to(tl.float64)
    tl.store(partial_ptr + pid + tl.arange(0, 1), total)


@torch.library.triton_op("fastbound::integrate_step_triton", mutates_args={"acc"})
def integrate_step_triton(
    out: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, weight: torch.Tensor,
    acc: torch.Tensor, index: torch.Tensor | None, loss: int, graph: int, mask_id: int, ignore_index: int,
) -> None:
    n_seq, length, n_cols = out.shape
    if n_seq == 0:
        return
    if length > 0:
        rows_per_chunk = max(1, min(length, -(-ROWS_TARGET // max(n_cols, 1))))
        n_chunks = -(-length // rows_per_chunk)
        partial = torch.empty(n_seq * n_chunks, dtype=torch.float64, device=out.device)
        sigma_acc = sigma.to(_common.accumulation_dtype(out))
        if loss == LOSS_DCE.value:
            consts = (sigma_acc, sigma_acc)
        else:
            consts = dse.row_constants(sigma_acc, graph, n_cols)
        block = _common.block_size(n_cols)
        torch.library.wrap_triton(_integrate_chunks_kernel)[(n_seq * n_chunks,)](
            out, out.stride(0), out.stride(1), x_t, x0, *consts, partial,
            length, n_cols, rows_per_chunk, n_chunks, mask_id, ignore_index,
            LOSS=loss, UNIFORM=graph == _ops.GRAPH_CODES["uniform"], BLOCK=block, num_warps=_common.num_warps(block),
        )  # fmt: skip
        sums = partial.view(n_seq, n_chunks).sum(1)
    else:
        sums = torch.zeros(n_seq, dtype=torch.float64, device=out.device)
    value = sums * weight
    rows = torch.arange(n_seq, device=out.device) if index is None else index
    acc.index_add_(0, rows, torch.stack([value, value * value], -1))
