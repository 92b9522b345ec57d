r"""Triton kernel of the likelihood integration step (`fastbound.integrate_step`).

One program reduces a chunk of rows of one sequence: each row's loss is the
per-row code of the loss kernels (`.dce.dce_row`, `.dse.dse_row`, without the
gradient), so the step and the losses evaluate the same formulas; the program
writes the chunk's float64 sum. A few torch operations then form
:math:`S_b = w_b \sum` per sequence, and :math:`(S_b, S_b^2)` is added to the
accumulator deterministically, as the C++ kernels do: sequences that share an
accumulator row are added serially in sequence order by one program
(`_add_to_slots_kernel`), never with float64 atomics (``index_add_`` on a GPU adds
in whatever order the atomics land). Registered as ``fastbound::integrate_step_triton``
with the schema of ``fastbound::integrate_step``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _names
from .._names import LOSS_CODES
from . import _common, dce, dse

LOSS_DCE = tl.constexpr(LOSS_CODES["dce"])

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
            loss = dse.dse_row(row_ptr, row_ptr, n_cols, x_t, x0, k0, k1, one, mask_id, ignore_index, UNIFORM, False,
                               BLOCK)
        total += loss.to(tl.float64)
    tl.store(partial_ptr + pid + tl.arange(0, 1), total)


@triton.jit
def _add_to_slots_kernel(rows_ptr, slot_ptr, run_end_ptr, acc_ptr, n_slots):
    """Program j: if sorted position j starts a run of one slot, adds the run's rows serially.

    ``rows`` (B, 2) holds :math:`(S_b, S_b^2)` and ``slot`` the slots, both stably sorted by
    slot; ``run_end[j]`` is one past the last position with ``slot[j]``. So each slot is
    written by one program, its sequences are added in sequence order, and the squares
    come in rounded (no fused multiply-add). Slots outside [0, n_slots) are skipped.
    """
    j = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + j)
    starts_run = (j == 0) | (tl.load(slot_ptr + tl.maximum(j - 1, 0)) != slot)
    if starts_run & (slot >= 0) & (slot < n_slots):
        total = tl.load(acc_ptr + 2 * slot)
        total_sq = tl.load(acc_ptr + 2 * slot + 1)
        for k in range(j, tl.load(run_end_ptr + j)):
            total += tl.load(rows_ptr + 2 * k)
            total_sq += tl.load(rows_ptr + 2 * k + 1)
        tl.store(acc_ptr + 2 * slot, total)
        tl.store(acc_ptr + 2 * slot + 1, total_sq)


def _add_to_slots(acc: torch.Tensor, value: torch.Tensor, index: torch.Tensor | None) -> None:
    """acc[index[b]] += (value_b, value_b^2), deterministically (see the module docstring)."""
    rows = torch.stack([value, value * value], -1)
    if index is None:  # one accumulator row per sequence: nothing is shared
        acc += rows
        return
    slot, order = torch.sort(index, stable=True)
    run_end = torch.searchsorted(slot, slot, right=True)
    _common.launch(_add_to_slots_kernel, (slot.shape[0],), acc.device, rows[order].contiguous(), slot, run_end, acc,
                   acc.shape[0])


@_common.register_op("integrate_step", mutates_args={"acc"})
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
            dse.check_mask_id(graph, mask_id, n_cols)
            consts = dse.row_constants(sigma_acc, graph, n_cols)
        block = _common.block_size(n_cols)
        _common.launch(
            _integrate_chunks_kernel, (n_seq * n_chunks,), out.device,
            out, out.stride(0), out.stride(1), x_t, x0, *consts, partial,
            length, n_cols, rows_per_chunk, n_chunks, mask_id, ignore_index,
            LOSS=loss, UNIFORM=graph == _names.GRAPH_CODES["uniform"], BLOCK=block, num_warps=_common.num_warps(block),
        )  # fmt: skip
        sums = partial.view(n_seq, n_chunks).sum(1)
    else:
        sums = torch.zeros(n_seq, dtype=torch.float64, device=out.device)
    _add_to_slots(acc, sums * weight, index)
