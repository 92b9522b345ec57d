"""What the Triton kernels share: op registration, guarded launches, block sizes, a row-fill helper
and the loss ops' contract checks.

Every ``fastbound::*_triton`` op is registered by `register_op` and launches its
kernels through `launch`, which runs them on the inputs' device: Triton launches
on the *current* CUDA device, so scores on ``cuda:1`` while ``cuda:0`` is current
would otherwise run on the wrong GPU (or fault).

Every loss kernel (and the integration step) handles a row of V scores in one
program that walks the row in chunks of ``BLOCK`` columns, so a row of any
length needs no more registers than one chunk. Every function that walks a row
first casts V to int64, so the chunk counter and the column indices are int64:
in int32 ``start + tl.arange(...)`` and the loop counter would wrap for V near 2^31.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .. import _ops

MAX_BLOCK = 4096
"""Largest chunk of a row one program holds at once (16 KiB of fp32 scores)."""

MIN_BLOCK = 32
"""One warp's width: smaller chunks would give two threads the same column."""


def register_op(name: str, mutates_args=(), *, fused_loss: bool = False) -> Callable:
    """Decorator: registers the function as the op ``fastbound::<name>_triton``.

    ``name`` is the C++ op whose schema it repeats (`csrc/ops.cpp`); ``fused_loss``
    also registers the fused-loss autograd (`fastbound._ops.register_fused_loss`).
    """
    qualname = f"fastbound::{name}_triton"

    def register(fn: Callable) -> Callable:
        op = triton_op(qualname, mutates_args=mutates_args)(fn)
        if fused_loss:
            _ops.register_fused_loss(qualname)
        return op

    return register


def device_guard(device: torch.device):
    """Makes ``device`` the current CUDA device (a no-op for CPU tensors, run by the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch(kernel, grid: tuple, device: torch.device, *args, **meta) -> None:
    """Launches the Triton ``kernel`` on ``grid`` on ``device`` (the device of the op's tensors)."""
    with device_guard(device):
        wrap_triton(kernel)[grid](*args, **meta)


def block_size(n_cols: int) -> int:
    """The chunk width for rows of ``n_cols`` columns: a power of two in [`MIN_BLOCK`, `MAX_BLOCK`]."""
    return min(MAX_BLOCK, max(MIN_BLOCK, triton.next_power_of_2(int(n_cols))))


def num_warps(block: int) -> int:
    """Warps per program: about 256 columns per warp, and never more threads than columns.

    With more threads than columns Triton gives several warps a copy of the same
    column; in the in-place ops one copy could then be read after another warp
    has overwritten it with the gradient.
    """
    return max(1, min(16, block // 256))


@triton.jit
def fill_row(row_ptr, n_cols, value, BLOCK: tl.constexpr):
    """Writes the scalar ``value`` over one row's ``n_cols`` gradient entries."""
    n_cols = tl.cast(n_cols, tl.int64)  # int64 loop counter and columns: no wrap for V near 2^31
    chunk = (tl.zeros([BLOCK], value.dtype) + value).to(row_ptr.dtype.element_ty)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        tl.store(row_ptr + cols, chunk, mask=cols < n_cols)


def accumulation_dtype(score: torch.Tensor) -> torch.dtype:
    """float64 for float64 scores, else float32 (the dtype of the per-row tensors and the loss)."""
    return torch.float64 if score.dtype == torch.float64 else torch.float32


def check_loss_inputs(score: torch.Tensor, per_row: dict[str, torch.Tensor], ids: dict[str, torch.Tensor], *,
                      score_name: str, inplace: bool) -> None:
    """Checks the flattened op inputs, as the C++ ops do (`csrc/cpu/loss_rows.h`).

    ``score`` is (N, V) with unit column stride (any row stride) and, when the op
    writes the gradient over it (``inplace``), rows that do not share memory; the
    per-row float tensors are contiguous (N,) of the accumulation dtype and the
    ids are contiguous (N,) int64. The public functions in `fastbound.losses`
    always pass such tensors; these checks guard direct calls of the ops.
    """
    if score.dim() != 2:
        raise ValueError(f"{score_name} must be (N, V), got shape {tuple(score.shape)}")
    n, n_cols = score.shape
    if n_cols > 1 and score.stride(1) != 1:
        raise ValueError(f"{score_name} must have unit stride in its last dimension")
    # With unit column stride, rows overlap exactly when they start less than V apart
    # (an expanded tensor has row stride 0). In place, a program would then read
    # scores another program has already overwritten (cf. at::assert_no_internal_overlap).
    if inplace and n > 1 and n_cols > 0 and score.stride(0) < n_cols:
        raise ValueError(
            f"{score_name} has rows that overlap in memory (row stride {score.stride(0)} < {n_cols} columns, e.g. "
            "an expanded tensor); the in-place op would write the gradient over them: pass rows that do not share memory"
        )
    acc = accumulation_dtype(score)
    for name, t in per_row.items():
        if t.dim() != 1 or t.shape[0] != n or not t.is_contiguous() or t.dtype != acc:
            raise ValueError(f"{name} must be a contiguous ({n},) tensor of dtype {acc}")
    for name, t in ids.items():
        if t.dim() != 1 or t.shape[0] != n or not t.is_contiguous() or t.dtype != torch.int64:
            raise ValueError(f"{name} must be a contiguous ({n},) int64 tensor")


def launch_rows(kernel, score: torch.Tensor, grad: torch.Tensor, row_inputs: tuple, row_scale: torch.Tensor,
                scalars: tuple, write_grad: bool, **constexprs) -> torch.Tensor:
    """Runs a loss kernel with one program per row of ``score`` (N, V); returns the (N,) loss.

    The kernel takes ``(score, score row stride, grad, grad row stride, *row_inputs,
    row_scale, loss, V, *scalars)`` and the constexprs ``WRITE_GRAD``, ``BLOCK`` and
    ``constexprs``. ``grad`` may be ``score`` itself (in place); it is not written
    unless ``write_grad``.
    """
    n, n_cols = score.shape
    loss = row_scale.new_empty(n)
    if n == 0:
        return loss
    block = block_size(n_cols)
    launch(
        kernel, (n,), score.device,
        score, score.stride(0), grad, grad.stride(0) if write_grad else 0, *row_inputs, row_scale, loss, n_cols,
        *scalars, WRITE_GRAD=write_grad, BLOCK=block, num_warps=num_warps(block), **constexprs,
    )  # fmt: skip
    return loss
