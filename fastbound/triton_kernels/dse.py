r"""Denoising score entropy (SEDD's loss) as a Triton kernel: loss and gradient in one read.

One program per row streams the scores once in ``BLOCK``-wide chunks; each
chunk's gradient is written right after it is read, so the gradient costs no
second pass (the fused-loss design of Liger-Kernel's cross entropy, applied
here to score entropy). Formulas (Lou, Meng & Ermon 2024, SEDD, ``graph_lib.py``;
the C++ version is `csrc/include/fastbound/elementwise.h`):

Absorbing graph, mask column :math:`m` (``mask_id``, any column; V-1 by default in
`fastbound.dse_loss`), :math:`r = 1/(e^\sigma - 1)`, at rows with :math:`x_t = m`:

.. math:: \ell = \sum_{y \ne m} e^{s_y} - r\,s_{x_0} + r(\log r - 1), \qquad
          \partial\ell/\partial s_y = e^{s_y} - r[y = x_0] \ (y \ne m), \ 0 \text{ at } m;

columns after :math:`m` are ordinary columns (CONTRACTS.md section 1).

Uniform graph, N = V states, :math:`a = e^\sigma - 1`, :math:`\rho = a/(a+N)`,
:math:`c = \rho` if :math:`x_t = x_0` else 1, sums over :math:`y \ne x_t`:

.. math:: \ell = \tfrac1N \textstyle\sum e^{s_y} - \text{neg} + \text{const}, \qquad
          \partial\ell/\partial s_y = [y \ne x_t]\,(e^{s_y} - c)/N - [x_t \ne x_0][y = x_0]/a,

with neg and const as in `fastbound.reference.dse_uniform`. Loss and gradient
are multiplied by the row scale. Rows whose :math:`x_0` is ``ignore_index``
(and, for the absorbing graph, rows that are not masked) get loss 0 and a zero
gradient row. As in the CUDA kernels (`csrc/cuda/loss_row_kernels.cuh`), an id out of range
(:math:`x_t \notin [0, V)`, or at a contributing row :math:`x_0 \notin [0, V)` or
:math:`x_0 = m` for the absorbing graph, :math:`x_0 \notin [0, V)` for the uniform one) gives that row a NaN loss and a
NaN gradient row, and is never used as an address; so does a contributing row whose
sigma is not positive and finite (`row_constants` makes its constants NaN). The Python
checks that refuse such values do not run under ``torch.compile``, nor with
`fastbound.value_checks` ``"off"``.

The per-row constants (:math:`r`, or :math:`1/a` and :math:`\log\rho`; the kernel forms
:math:`\rho = 1/(1 + N/a)`) are computed in torch before the launch (a few (N,) ops,
`row_constants`): Triton has no expm1 / log1p that also runs in its CPU interpreter,
and ``exp(sigma) - 1`` loses the digits of small sigma and overflows for large sigma.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from .. import _names
from . import _common


def log_expm1(sigma: torch.Tensor) -> torch.Tensor:
    r""":math:`\log(e^\sigma - 1)`, finite for every finite :math:`\sigma > 0` (`log_expm1` of elementwise.h).

    ``log(expm1(sigma))`` keeps the digits of small sigma; above 20 it is
    :math:`\sigma + \log(1 - e^{-\sigma})`, which does not overflow where :math:`e^\sigma` does.
    """
    return torch.where(sigma < 20, torch.expm1(sigma).log(), sigma + torch.log1p(-torch.exp(-sigma)))


def row_constants(sigma: torch.Tensor, graph: int, n_states: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The two per-row constants `dse_row` takes, from sigma (N,) in the accumulation dtype.

    Both come from :math:`\log a = \log(e^\sigma - 1)` as in `AbsorbRow` / `UniformRow` of
    `csrc/include/fastbound/elementwise.h`, so they are finite for any sigma (a huge
    sigma gives :math:`r = 1/a \to 0`, not :math:`0 \cdot \infty`). Absorbing graph:
    :math:`r = e^{-\log a}` and :math:`r(\log r - 1) = -r(\log a + 1)`; uniform graph:
    :math:`1/a = e^{-\log a}` and :math:`\log\rho = -\log(1 + N/a)`. A sigma that is not
    positive and finite gives NaN constants, which `dse_row` turns into a NaN row (a zero or
    infinite sigma would otherwise give an infinite or a finite, wrong, loss).
    """
    sigma = torch.where((sigma > 0) & (sigma < math.inf), sigma, math.nan)
    log_a = log_expm1(sigma)
    inv_a = torch.exp(-log_a)
    if graph == _names.GRAPH_CODES["absorb"]:
        return inv_a, -inv_a * (log_a + 1)
    return inv_a, -torch.log1p(n_states * inv_a)


@triton.jit
def _absorb_row(score_row, grad_row, n_cols, x0, mask_id, r, konst, scale, WRITE_GRAD: tl.constexpr,
                BLOCK: tl.constexpr):
    """Loss of one masked row (absorbing graph); writes its gradient when WRITE_GRAD."""
    n_cols = tl.cast(n_cols, tl.int64)  # int64 loop counter and columns: no wrap for V near 2^31
    sum_exp = tl.zeros([BLOCK], r.dtype)
    s_x0 = tl.zeros([BLOCK], r.dtype)  # s[x0] is taken from the chunk that holds it
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < n_cols
        s = tl.load(score_row + cols, mask=in_row, other=0.0).to(r.dtype)
        e = tl.where(in_row & (cols != mask_id), tl.exp(s), 0.0)  # the mask column has no exp term
        at_x0 = cols == x0
        sum_exp += e
        s_x0 += tl.where(at_x0, s, 0.0)
        if WRITE_GRAD:
            g = scale * tl.where(at_x0, e - r, e)
            tl.store(grad_row + cols, g.to(grad_row.dtype.element_ty), mask=in_row)
    return scale * (tl.sum(sum_exp) - r * tl.sum(s_x0) + konst)


@triton.jit
def _uniform_row(score_row, grad_row, n_cols, x_t, x0, inv_a, log_rho, scale, WRITE_GRAD: tl.constexpr,
                 BLOCK: tl.constexpr):
    """Loss of one row (uniform graph); writes its gradient when WRITE_GRAD."""
    n_cols = tl.cast(n_cols, tl.int64)  # int64 loop counter and columns: no wrap for V near 2^31
    n = tl.zeros_like(inv_a) + n_cols
    inv_n = 1.0 / n
    rho = 1.0 / (1.0 + n * inv_a)
    same = x_t == x0
    c = tl.where(same, rho, 1.0)
    konst = tl.where(same, (n - 1.0) * inv_n * rho * (log_rho - 1.0), ((-log_rho - 1.0) / rho - (n - 2.0)) * inv_n)
    sum_exp = tl.zeros([BLOCK], inv_a.dtype)
    sum_s = tl.zeros([BLOCK], inv_a.dtype)
    s_x0 = tl.zeros([BLOCK], inv_a.dtype)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < n_cols
        s = tl.load(score_row + cols, mask=in_row, other=0.0).to(inv_a.dtype)
        other = in_row & (cols != x_t)
        at_x0 = cols == x0
        e = tl.where(other, tl.exp(s), 0.0)
        sum_exp += e
        sum_s += tl.where(other, s, 0.0)
        s_x0 += tl.where(at_x0, s, 0.0)
        if WRITE_GRAD:
            # When x_t == x0 the x0 column is the x_t column, whose gradient is 0.
            g = tl.where(other, (e - c) * inv_n - tl.where(at_x0, inv_a, 0.0), 0.0)
            tl.store(grad_row + cols, (scale * g).to(grad_row.dtype.element_ty), mask=in_row)
    neg_base = tl.sum(sum_s) * inv_n
    neg = tl.where(same, rho * neg_base, tl.sum(s_x0) * inv_a + neg_base)
    return scale * (tl.sum(sum_exp) * inv_n - neg + konst)


@triton.jit
def dse_row(score_row, grad_row, n_cols, x_t, x0, k0, k1, scale, mask_id, ignore_index, UNIFORM: tl.constexpr,
            WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """The score entropy of one row times ``scale``, and its gradient into ``grad_row`` when WRITE_GRAD.

    ``k0, k1`` are the row's `row_constants`; ``mask_id`` is the absorbing graph's mask
    column (unused by the uniform graph). An id out of range (see the module
    docstring), or NaN constants (a bad sigma) at a contributing row, give a NaN loss
    and gradient row. Used by the loss kernel and by the
    integration step (`.integrate`, without the gradient).
    """
    if UNIFORM:
        skip = x0 == ignore_index
        x0_bad = (x0 < 0) | (x0 >= n_cols)
    else:
        skip = (x0 == ignore_index) | (x_t != mask_id)
        x0_bad = (x0 < 0) | (x0 >= n_cols) | (x0 == mask_id)
    bad = (x_t < 0) | (x_t >= n_cols) | ((x0_bad | (k0 != k0)) & ~skip)
    loss = tl.zeros_like(scale)
    if bad | skip:
        loss = tl.where(bad, float("nan"), loss)
        if WRITE_GRAD:
            _common.fill_row(grad_row, n_cols, loss, BLOCK)
    elif UNIFORM:
        loss = _uniform_row(score_row, grad_row, n_cols, x_t, x0, k0, k1, scale, WRITE_GRAD, BLOCK)
    else:
        loss = _absorb_row(score_row, grad_row, n_cols, x0, mask_id, k0, k1, scale, WRITE_GRAD, BLOCK)
    return loss


@triton.jit
def _dse_kernel(score_ptr, score_stride, grad_ptr, grad_stride, k0_ptr, k1_ptr, x_t_ptr, x0_ptr, scale_ptr,
                loss_ptr, n_cols, mask_id, ignore_index, UNIFORM: tl.constexpr, WRITE_GRAD: tl.constexpr,
                BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * stride may exceed 2^31
    loss = dse_row(score_ptr + row * score_stride, grad_ptr + row * grad_stride, n_cols, tl.load(x_t_ptr + row),
                   tl.load(x0_ptr + row), tl.load(k0_ptr + row), tl.load(k1_ptr + row), tl.load(scale_ptr + row),
                   mask_id, ignore_index, UNIFORM, WRITE_GRAD, BLOCK)
    tl.store(loss_ptr + row, loss)


def check_mask_id(graph: int, mask_id: int, n_cols: int) -> int:
    """The absorbing graph's mask column must be a column, [0, V); the uniform graph ignores it (pass -1)."""
    if graph not in _names.GRAPH_CODES.values():
        raise ValueError(f"graph must be one of the codes {_names.GRAPH_CODES}, got {graph}")
    if graph == _names.GRAPH_CODES["absorb"] and not 0 <= mask_id < n_cols:
        raise ValueError(f"mask_id must be a column of the scores, in [0, {n_cols}), got {mask_id}")
    return mask_id


def _dse_rows(score, grad, sigma, x_t, x0, row_scale, graph: int, mask_id: int | None, ignore_index: int,
              write_grad: bool) -> torch.Tensor:
    """Runs the kernel over all rows; ``grad`` may be ``score`` itself (in place). Returns the loss.

    ``mask_id`` None is the last column (the schema of a C++ build without ``mask_id``).
    """
    _common.check_loss_inputs(score, {"sigma": sigma, "row_scale": row_scale}, {"x_t": x_t, "x0": x0},
                              score_name="score", inplace=write_grad and grad is score)
    mask_id = check_mask_id(graph, score.shape[1] - 1 if mask_id is None else mask_id, score.shape[1])
    row_inputs = (*row_constants(sigma, graph, score.shape[1]), x_t, x0)
    return _common.launch_rows(_dse_kernel, score, grad, row_inputs, row_scale, (mask_id, ignore_index), write_grad,
                               UNIFORM=graph == _names.GRAPH_CODES["uniform"])


def _forward(score, sigma, x_t, x0, row_scale, graph, mask_id, ignore_index, need_grad):
    """The functional op: per-row loss and, when ``need_grad``, the gradient in a new buffer."""
    grad = score.new_empty(score.shape) if need_grad else score.new_empty(0)
    loss = _dse_rows(score, grad if need_grad else score, sigma, x_t, x0, row_scale, graph, mask_id, ignore_index,
                     need_grad)
    return loss, grad


@_common.register_op("dse_forward", fused_loss=True)
def dse_forward_triton(
    score: torch.Tensor, sigma: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, row_scale: torch.Tensor,
    graph: int, mask_id: int, ignore_index: int, need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row DSE loss (N,) and, when ``need_grad``, its gradient (N, V) scaled by ``row_scale``."""
    return _forward(score, sigma, x_t, x0, row_scale, graph, mask_id, ignore_index, need_grad)


@_common.register_op("dse_forward_inplace", mutates_args={"score"})
def dse_forward_inplace_triton(
    score: torch.Tensor, sigma: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, row_scale: torch.Tensor,
    graph: int, mask_id: int, ignore_index: int,
) -> torch.Tensor:
    """Per-row DSE loss (N,); overwrites ``score`` with the scaled gradient."""
    return _dse_rows(score, score, sigma, x_t, x0, row_scale, graph, mask_id, ignore_index, True)
