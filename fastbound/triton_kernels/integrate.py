r"""Triton kernel of the likelihood integration step (`fastbound.integrate_step`).

One program reduces a chunk of rows of one sequence: per row, one pass over the
V scores in blocks (an online log-sum-exp for the DCE; the sums of
:math:`e^{s}` and :math:`s` for the DSE) and the row's loss; the program writes
the chunk's float64 sum. A few torch operations then form
:math:`S_b = w_b \sum` per sequence and add :math:`(S_b, S_b^2)` to the
accumulator. Per-sequence constants of the score entropy (:math:`r = 1/(e^\sigma-1)`
for the absorbing graph, :math:`a = e^\sigma - 1` and :math:`\rho = a/(a+N)` for the
uniform one) are computed in torch, as in `fastbound/elementwise.h`.
Registered as ``fastbound::integrate_step_triton`` with the schema of
``fastbound::integrate_step``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOSS_DSE, LOSS_DCE = 0, 1
GRAPH_ABSORB, GRAPH_UNIFORM = 0, 1
ROWS_TARGET = 1 << 15  # scores per program, as the C++ kernels (`integrate_rows_per_chunk`)


@triton.jit
def _row_dce(row_ptr, n_cols, x0, mask_id, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """-log softmax(s)_{x0}, the mask column (when < n_cols) left out of the softmax."""
    m = tl.full([BLOCK], float("-inf"), ACC)
    s = tl.zeros([BLOCK], ACC)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = (cols < n_cols) & (cols != mask_id)
        x = tl.load(row_ptr + cols, mask=valid, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, x)
        shift = tl.where(m_new != float("-inf"), m_new, 0.0)  # no (-inf) - (-inf)
        s = s * tl.exp(m - shift) + tl.exp(x - shift)
        m = m_new
    m_row = tl.max(m, 0)
    shift_row = tl.where(m_row != float("-inf"), m_row, 0.0)
    lse = shift_row + tl.log(tl.sum(s * tl.exp(m - shift_row), 0))
    return lse - tl.load(row_ptr + x0).to(ACC)


@triton.jit
def _row_sums(row_ptr, n_cols, skip, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """(sum e^{s_y}, sum s_y) over the columns y < n_cols, y != skip."""
    se = tl.zeros([BLOCK], ACC)
    ss = tl.zeros([BLOCK], ACC)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = (cols < n_cols) & (cols != skip)
        x = tl.load(row_ptr + cols, mask=valid, other=0.0).to(ACC)
        se += tl.where(valid, tl.exp(x), 0.0)
        ss += x
    return tl.sum(se, 0), tl.sum(ss, 0)


@triton.jit
def _integrate_chunks_kernel(
    out_ptr, stride_b, stride_l, x_t_ptr, x0_ptr, c0_ptr, c1_ptr, c2_ptr, c3_ptr, partial_ptr,
    length, n_cols, rows_per_chunk, n_chunks, mask_id, ignore_index,
    LOSS: tl.constexpr, GRAPH: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // n_chunks
    lo = (pid % n_chunks) * rows_per_chunk
    hi = tl.minimum(lo + rows_per_chunk, length)
    # Per-sequence constants: absorbing DSE (r, r(log r - 1)); uniform DSE (1/a, rho,
    # const if x_t == x0, const otherwise).
    c0 = tl.load(c0_ptr + b).to(ACC)
    c1 = tl.load(c1_ptr + b).to(ACC)
    c2 = tl.load(c2_ptr + b).to(ACC)
    c3 = tl.load(c3_ptr + b).to(ACC)
    total = tl.zeros([1], tl.float64)
    for i in range(lo, hi):
        pos = b.to(tl.int64) * length + i
        xt = tl.load(x_t_ptr + pos)
        x0 = tl.load(x0_ptr + pos)
        row_ptr = out_ptr + (b.to(tl.int64) * stride_b + i * stride_l)
        if LOSS == 1:
            if (x0 != ignore_index) & (xt == mask_id):
                total += _row_dce(row_ptr, n_cols, x0, mask_id, BLOCK, ACC).to(tl.float64)
        elif GRAPH == 0:
            if (x0 != ignore_index) & (xt == n_cols - 1):
                sum_exp, _ = _row_sums(row_ptr, n_cols - 1, -1, BLOCK, ACC)
                s_x0 = tl.load(row_ptr + x0).to(ACC)
                total += (sum_exp - c0 * s_x0 + c1).to(tl.float64)
        else:
            if x0 != ignore_index:
                sum_exp, sum_s = _row_sums(row_ptr, n_cols, xt, BLOCK, ACC)
                s_x0 = tl.load(row_ptr + x0).to(ACC)
                inv_n = 1.0 / n_cols
                neg_base = sum_s * inv_n
                neg = tl.where(xt == x0, c1 * neg_base, s_x0 * c0 + neg_base)
                konst = tl.where(xt == x0, c2, c3)
                total += (sum_exp * inv_n - neg + konst).to(tl.float64)
    tl.store(partial_ptr + pid + tl.arange(0, 1), total)


def _dse_constants(sigma: torch.Tensor, graph: int, n_cols: int) -> list[torch.Tensor]:
    """The per-sequence constants of `fastbound/elementwise.h` (AbsorbRow, UniformRow), float64."""
    a = torch.expm1(sigma)
    if graph == GRAPH_ABSORB:
        r = 1.0 / a
        return [r, r * (r.log() - 1), r, r]
    n = float(n_cols)
    rho = a / (a + n)
    same = (n - 1) / n * rho * (rho.log() - 1)
    other = ((-rho.log() - 1) / rho - (n - 2)) / n
    return [1.0 / a, rho, same, other]


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
        consts = _dse_constants(sigma, graph, n_cols) if loss == LOSS_DSE else [sigma] * 4
        acc_dtype = tl.float64 if out.dtype == torch.float64 else tl.float32
        block = min(1024, triton.next_power_of_2(max(n_cols, 16)))
        torch.library.wrap_triton(_integrate_chunks_kernel)[(n_seq * n_chunks,)](
            out, out.stride(0), out.stride(1), x_t, x0, *consts, partial,
            length, n_cols, rows_per_chunk, n_chunks, mask_id, ignore_index,
            LOSS=loss, GRAPH=graph, BLOCK=block, ACC=acc_dtype,
        )
        sums = partial.view(n_seq, n_chunks).sum(1)
    else:
        sums = torch.zeros(n_seq, dtype=torch.float64, device=out.device)
    value = sums * weight
    rows = torch.arange(n_seq, device=out.device) if index is None else index
    acc.index_add_(0, rows, torch.stack([value, value * value], -1))
