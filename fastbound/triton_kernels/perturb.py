r"""Fused noise sampling x0 -> x_t and the raw Philox generator as Triton kernels.

Ops (same schemas as the C++ ops in `csrc/ops.cpp`):
``torch.ops.fastbound.perturb_triton`` and ``torch.ops.fastbound.philox4x32_triton``.

The random numbers follow the contract of `csrc/include/fastbound/philox.h`
bit for bit: element ``i`` of a call reads the words of
``tl.randint4x(seed, offset + i)``, which is Philox4x32-10 with counter
``(lo, hi, 0, 0)`` of ``offset + i`` and key ``(lo, hi)`` of ``seed`` (Salmon et
al. 2011). ``seed`` and ``offset`` arrive as the int64 bit patterns of uint64s.

* Bernoulli mode: selected iff ``(w0 >> 8) < threshold`` (per row or per
  element; ``threshold = ceil(p * 2^24)``), one program per ``BLOCK`` elements.
* Exact-k mode: in each row the ``k`` maskable elements with the smallest
  ``(w0, column)`` pairs. One program per row finds the k-th smallest ``w0`` by
  a 32-step bitwise search (each step counts the keys below a candidate; the
  words are recomputed, never stored), then breaks ties at that value by
  column with a running cumulative sum. No sort.

A selected element becomes ``mask_id`` (absorbing graph) or the token
``floor(w1 * V / 2^32)`` (uniform graph), in x0's id dtype (int64 down to
uint8 / int8: `fastbound.noise.perturb` refuses a mask id or vocabulary the dtype
cannot hold).

``seed`` and ``offset`` are typed int64 and not specialised
(``do_not_specialize``): by default Triton types an int argument i32 or i64 by its
value and specialises on 1 and on divisibility by 16, so a training loop whose
offset grows would recompile the kernel at 2^31 and on every such value.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _names
from . import _common

RANDOM_ARGS = ("seed", "offset")
"""The Philox key and counter base: typed int64, never specialised (see the module docstring)."""

ELEMENTS_PER_PROGRAM = 1024
"""Bernoulli mode: elements one program handles."""

MAX_ROW_BLOCK = 1024
"""Exact-k mode: the widest chunk of a row one program holds at once."""


@triton.jit
def _replace(x, selected, w1, vocab_size, mask_id, UNIFORM: tl.constexpr):
    """x_t for one block: the replacement where selected, x elsewhere."""
    if UNIFORM:
        replacement = tl.math.umulhi(w1, tl.full(w1.shape, vocab_size, tl.uint32)).to(x.dtype)
    else:
        replacement = tl.full(x.shape, mask_id, x.dtype)
    return tl.where(selected, replacement, x)


@triton.jit(do_not_specialize=RANDOM_ARGS)
def _bernoulli_kernel(x0_ptr, x_t_ptr, mask_ptr, threshold_ptr, threshold_row_stride, threshold_col_stride,
                      maskable_ptr, n, n_cols, vocab_size, mask_id, seed: tl.int64, offset: tl.int64,
                      HAS_MASKABLE: tl.constexpr, UNIFORM: tl.constexpr, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = index < n
    row = index // n_cols
    col = index - row * n_cols
    x = tl.load(x0_ptr + index, mask=valid, other=0)
    threshold = tl.load(threshold_ptr + row * threshold_row_stride + col * threshold_col_stride, mask=valid, other=0)
    w0, w1, _, _ = tl.randint4x(seed, offset + index)
    selected = (w0 >> 8) < threshold.to(tl.uint32)
    if HAS_MASKABLE:
        selected = selected & (tl.load(maskable_ptr + index, mask=valid, other=0) != 0)
    tl.store(x_t_ptr + index, _replace(x, selected, w1, vocab_size, mask_id, UNIFORM), mask=valid)
    tl.store(mask_ptr + index, selected, mask=valid)


@triton.jit
def _row_words(seed, offset, row_start, cols, maskable_ptr, n_cols, HAS_MASKABLE: tl.constexpr):
    """Selection words (as int64) of one chunk of a row and whether each column takes part."""
    takes_part = cols < n_cols
    if HAS_MASKABLE:
        takes_part = takes_part & (tl.load(maskable_ptr + row_start + cols, mask=takes_part, other=0) != 0)
    w0, w1, _, _ = tl.randint4x(seed, offset + row_start + cols)
    return w0.to(tl.int64), w1, takes_part


@triton.jit(do_not_specialize=RANDOM_ARGS)
def _exact_k_kernel(x0_ptr, x_t_ptr, mask_ptr, num_masked_ptr, maskable_ptr, n_cols, vocab_size, mask_id,
                    seed: tl.int64, offset: tl.int64, HAS_MASKABLE: tl.constexpr, UNIFORM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n_cols = tl.cast(n_cols, tl.int64)  # int64 loop counter and columns: no wrap for V near 2^31
    row_start = row * n_cols
    k = tl.load(num_masked_ptr + row)
    # The k-th smallest selection word: the largest v with #{w0 < v} < k, built bit by bit.
    # `below` tracks #{w0 < kth}.
    kth = tl.zeros((), tl.int64)
    below = tl.zeros((), tl.int64)
    for step in range(32):
        candidate = kth + (tl.full((), 1, tl.int64) << (31 - step))
        count = tl.zeros((), tl.int64)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            w0, _, takes_part = _row_words(seed, offset, row_start, cols, maskable_ptr, n_cols, HAS_MASKABLE)
            count += tl.sum((takes_part & (w0 < candidate)).to(tl.int64))
        take = count < k
        kth = tl.where(take, candidate, kth)
        below = tl.where(take, count, below)
    # Select every word below kth, and the first (k - below) columns whose word equals kth.
    ties_left = k - below
    ties_seen = tl.zeros((), tl.int64)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < n_cols
        w0, w1, takes_part = _row_words(seed, offset, row_start, cols, maskable_ptr, n_cols, HAS_MASKABLE)
        tie = takes_part & (w0 == kth)
        tie_rank = ties_seen + tl.cumsum(tie.to(tl.int64), 0) - tie.to(tl.int64)
        selected = (takes_part & (w0 < kth)) | (tie & (tie_rank < ties_left))
        ties_seen += tl.sum(tie.to(tl.int64))
        x = tl.load(x0_ptr + row_start + cols, mask=in_row, other=0)
        tl.store(x_t_ptr + row_start + cols, _replace(x, selected, w1, vocab_size, mask_id, UNIFORM), mask=in_row)
        tl.store(mask_ptr + row_start + cols, selected, mask=in_row)


def _check_inputs(x0, threshold, num_masked, maskable) -> None:
    """The C++ op's contract checks (`csrc/cpu/perturb.cpp`); `fastbound.noise` always satisfies them."""
    if x0.dim() != 2 or not x0.is_contiguous():
        raise ValueError("x0 must be contiguous (B, L)")
    rows, cols = x0.shape
    if (threshold is None) == (num_masked is None):
        raise ValueError("pass exactly one of threshold and num_masked")
    if threshold is not None:
        ok = threshold.dim() == 2 and threshold.dtype == torch.int32 and threshold.shape[0] in (1, rows)
        ok = ok and threshold.shape[1] in (1, cols) and (threshold.shape[1] == 1 or threshold.stride(1) == 1)
        if not ok:
            raise ValueError("threshold must be int32 of shape (B or 1, L or 1) with unit column stride")
    if num_masked is not None and (num_masked.shape != (rows,) or num_masked.dtype != torch.int64):
        raise ValueError("num_masked must be int64 (B,)")
    if maskable is not None and (maskable.shape != x0.shape or maskable.dtype != torch.bool
                                 or not maskable.is_contiguous()):
        raise ValueError("maskable must be contiguous bool of x0's shape")


@_common.register_op("perturb")
def perturb_triton(
    x0: torch.Tensor, threshold: Optional[torch.Tensor], num_masked: Optional[torch.Tensor],
    maskable: Optional[torch.Tensor], vocab_size: int, mask_id: int, graph: int, seed: int, offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, mask) for x0 (B, L); see the module docstring and `fastbound.noise.perturb`."""
    _check_inputs(x0, threshold, num_masked, maskable)
    x_t = torch.empty_like(x0)
    mask = torch.empty(x0.shape, dtype=torch.bool, device=x0.device)
    rows, cols = x0.shape
    if x0.numel() == 0:
        return x_t, mask
    has_maskable = maskable is not None
    maskable_arg = maskable if has_maskable else mask  # never read when HAS_MASKABLE is False
    uniform = graph == _names.GRAPH_CODES["uniform"]
    if threshold is not None:
        row_stride = 0 if threshold.shape[0] == 1 else threshold.stride(0)
        col_stride = 0 if threshold.shape[1] == 1 else 1
        n = x0.numel()
        _common.launch(
            _bernoulli_kernel, (triton.cdiv(n, ELEMENTS_PER_PROGRAM),), x0.device,
            x0, x_t, mask, threshold, row_stride, col_stride, maskable_arg, n, cols, vocab_size, mask_id, seed,
            offset, HAS_MASKABLE=has_maskable, UNIFORM=uniform, BLOCK=ELEMENTS_PER_PROGRAM,
        )  # fmt: skip
    else:
        block = min(MAX_ROW_BLOCK, max(32, triton.next_power_of_2(cols)))
        _common.launch(
            _exact_k_kernel, (rows,), x0.device,
            x0, x_t, mask, num_masked.contiguous(), maskable_arg, cols, vocab_size, mask_id, seed, offset,
            HAS_MASKABLE=has_maskable, UNIFORM=uniform, BLOCK=block,
        )  # fmt: skip
    return x_t, mask


@triton.jit(do_not_specialize=("seed",))
def _philox_kernel(counter_ptr, out_ptr, n, seed: tl.int64, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = index < n
    c0 = tl.load(counter_ptr + 4 * index, mask=valid, other=0).to(tl.uint32)
    c1 = tl.load(counter_ptr + 4 * index + 1, mask=valid, other=0).to(tl.uint32)
    c2 = tl.load(counter_ptr + 4 * index + 2, mask=valid, other=0).to(tl.uint32)
    c3 = tl.load(counter_ptr + 4 * index + 3, mask=valid, other=0).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3)
    tl.store(out_ptr + 4 * index, w0.to(tl.int64), mask=valid)
    tl.store(out_ptr + 4 * index + 1, w1.to(tl.int64), mask=valid)
    tl.store(out_ptr + 4 * index + 2, w2.to(tl.int64), mask=valid)
    tl.store(out_ptr + 4 * index + 3, w3.to(tl.int64), mask=valid)


@_common.register_op("philox4x32")
def philox4x32_triton(counter: torch.Tensor, seed: int) -> torch.Tensor:
    """Philox4x32-10 words (N, 4) of the counters (N, 4) (low 32 bits of each entry), key = seed."""
    if counter.dim() != 2 or counter.shape[1] != 4 or counter.dtype != torch.int64:
        raise ValueError("counter must be int64 (N, 4)")
    counter = counter.contiguous()
    out = torch.empty_like(counter)
    n = counter.shape[0]
    if n:
        block = 256
        _common.launch(_philox_kernel, (triton.cdiv(n, block),), counter.device, counter, out, n, seed, BLOCK=block)
    return out
