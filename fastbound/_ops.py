"""Loads the compiled operators and gives them what `torch.compile` and autograd need.

The C++ library (`fastbound._C`, schemas in `csrc/ops.cpp`) registers the
kernels per device. Here we add, per op, a fake (meta) implementation for
tracing and the autograd formula of the raw ops, and `FusedLoss`, the autograd
function of the public losses (gradients to the scores, sigma and the row
scale; forward-mode AD; ``inplace=True``). The public losses' common eager CPU call
(gradients to the scores only) skips `FusedLoss`: it is the one op ``fused_loss``, whose
backward (csrc/cpu/fused_loss_autograd.cpp) is `chain_rows` in C++.

Every fused loss op has the same contract: it returns the per-row loss (N,)
and the gradient of that loss with respect to the scores, already multiplied by
the row scale (weight, and 1/count for ``reduction="mean"``). The backward
multiplies it by the incoming per-row gradient ("upstream") — see
`chain_rows` for how that multiply is kept off the memory bus:

* the backward that owns the saved buffer (see `may_hand_out`) rescales it in place
  with the row kernel ``scale_rows_`` (`csrc/common/scale_rows.h`) and returns it. The
  kernel leaves alone the rows whose factor is exactly 1 and, for the public losses,
  the rows the loss wrote as zeros (unmasked positions of the absorbing graph and of
  the DCE, ``ignore_index`` rows): ``loss.backward()`` after ``reduction="sum"|"mean"``
  reads N factors and no gradient entry, on every device and without a host-device
  synchronisation; any other upstream (``/ B``, a GradScaler's scale, gradient
  accumulation, a per-position factor) costs one read and one write of the
  contributing rows only, pages already mapped.
* a backward that may not own it (``retain_graph=True``, tracing) returns
  ``grad * upstream`` (a new tensor; the saved buffer itself for a unit upstream).

The losses are differentiable once: the gradient is a constant of the
forward, so a double backward (``create_graph=True``) raises instead of
silently returning a wrong second derivative. The saved buffer is rescaled in
place only by a backward that frees the graph; with ``retain_graph=True`` the
rescaled gradient is a new tensor, and a unit-upstream gradient (the saved
buffer itself) must not be modified in place before the next backward
(PyTorch's saved-tensor version check raises otherwise).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.autograd import forward_ad

from . import _C  # noqa: F401  (loads the TORCH_LIBRARY registrations)
from . import _backend
from ._validate import as_int, tracing


_ONCE = (
    "fastbound's fused losses are differentiable once: double backward (create_graph=True) "
    "is not supported; use fastbound.reference for higher derivatives"
)


def batched(t: torch.Tensor) -> bool:
    """Whether ``t`` is a vmap wrapper (``is_grads_batched=True`` uses the legacy one; vmap of a
    ``torch.func.vjp``): no values to read, and a product with it has a batch dimension the saved
    buffer has not."""
    return torch._C._functorch.is_legacy_batchedtensor(t) or torch._C._functorch.is_functorch_wrapped_tensor(t)


def vmapped(t: torch.Tensor | None) -> bool:
    """Whether ``t`` carries a batch dimension: ``is_grads_batched``'s legacy wrapper, or a vmap
    wrapper at some torch.func level (under grad levels' wrappers too). Unlike `batched`, a
    torch.func.grad wrapper alone is not."""
    if t is not None and torch._C._functorch.is_legacy_batchedtensor(t):
        return True
    while t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t):
        if torch._C._functorch.is_batchedtensor(t):
            return True
        t = torch._C._functorch.get_unwrapped(t)
    return False


def refuse_vmap(name: str, t: torch.Tensor, instead: str) -> None:
    """A ValueError naming ``name`` when a torch.func.vmap batches it (`vmapped`, so also under
    grad levels, as in vmap(grad(f))): its checks read it on the host and the ops have no batching
    rule for it, so torch would name neither the argument nor a way out. ``instead``: what to do."""
    if torch._C._are_functorch_transforms_active() and vmapped(t):
        raise ValueError(f"torch.func.vmap over {name} is not supported: {instead} (in_dims=None for {name}), "
                         "or loop over the calls")


def savable(*tensors: torch.Tensor | None) -> tuple:
    """The tensors as save_for_backward takes them: a copy of each inference tensor (made under
    torch.inference_mode, it cannot be saved, nor change in place afterwards, so nothing is lost).
    Eager calls only: tracing sees no inference tensors and cannot ask."""
    return tuple(t.clone() if t is not None and t.is_inference() else t for t in tensors)


def base_requires_grad(*inputs) -> bool:
    """Whether an input, unwrapped from every torch.func level, requires grad in plain autograd."""
    for t in inputs:
        if not isinstance(t, torch.Tensor):
            continue
        while torch._C._functorch.is_functorch_wrapped_tensor(t):
            t = torch._C._functorch.get_unwrapped(t)
        if t.requires_grad:
            return True
    return False


_ONCE_BASE = (
    "fastbound's fused losses are differentiable once: under torch.func their gradient cannot follow "
    "inputs that also require grad in plain autograd; detach them (as torch.func's per-sample-gradient "
    "recipe does) or use fastbound.reference"
)


def check_once(ctx, saved: torch.Tensor | None) -> None:
    """Raises where what this backward returns may be differentiated again, which the saved
    gradient (a constant of the forward) cannot follow: ``create_graph=True`` in plain autograd
    (the legacy vmap of ``is_grads_batched`` included); under torch.func, whose backwards always
    build a graph, a differentiating transform (grad, vjp, jvp) outside the level of the forward
    (``saved``'s), or a forward whose inputs also require grad in plain autograd
    (``ctx.base_requires_grad``) under grad mode. A ``vjp_fn`` called after ``torch.func.vjp``
    returned (``saved`` a wrapper of an exited level) is torch.func's too, with or without an
    active transform.
    """
    if not torch.is_grad_enabled():
        return
    wrapped = saved is not None and torch._C._functorch.is_functorch_wrapped_tensor(saved)
    if not wrapped and not torch._C._are_functorch_transforms_active():
        raise RuntimeError(_ONCE)
    check_outer_levels(saved)
    if getattr(ctx, "base_requires_grad", False):
        level, levels = _levels(saved)
        if level < 0 or any(i.prev_grad_mode() for i in levels if i.level() == level):
            raise RuntimeError(_ONCE_BASE)


def check_outer_levels(saved: torch.Tensor | None) -> None:
    """Raises under a differentiating torch.func transform (grad, jvp) outside the forward's level
    (``saved``'s): the tangent rule's saved gradient is a constant of the forward, so a second
    derivative through it (``jacfwd(jacfwd)``) would come out as zeros."""
    if not torch._C._are_functorch_transforms_active():
        return
    level, levels = _levels(saved)
    if any(level < 0 or i.level() < level for i in levels):
        raise RuntimeError(_ONCE)


def _levels(saved: torch.Tensor | None) -> tuple[int, list]:
    """(``saved``'s torch.func level, the live differentiating levels: grad and jvp). The level is
    negative for a plain tensor or a wrapper whose level has exited (a vjp_fn called after vjp
    returned, as jacrev does): then every live level is outside it."""
    level = -1 if saved is None else torch._C._functorch.maybe_get_level(saved)
    return level, [i for i in retrieve_all_functorch_interpreters() if i.key() in (TransformType.Grad, TransformType.Jvp)]


def _unit(factor: torch.Tensor) -> bool:
    """Whether ``factor`` is known to be all ones without a host-device synchronisation."""
    if factor.device.type != "cpu" or tracing(factor) or batched(factor):
        return False
    if factor.numel() and factor.stride(0) == 0:  # a broadcast scalar: one element to read
        return factor[0].item() == 1
    return bool((factor == 1).all())


def may_hand_out(ctx) -> bool:
    """Whether this backward may give the saved gradient buffer itself away (or mutate it).

    Only once, and only by a backward that frees the graph: the later backwards of a retained
    graph would otherwise return the same memory again, and AccumulateGrad adopts a returned
    buffer as ``.grad`` and adds into it in place, changing a gradient the user already holds.
    """
    first = not getattr(ctx, "handed_out", False)
    ctx.handed_out = True
    return first and not torch._C._autograd._get_current_graph_task_keep_graph()


def chain_rows(ctx, grad: torch.Tensor, factor: torch.Tensor, zero_rows: tuple | None = None,
               scale_op=None) -> torch.Tensor:
    """d out / d score = grad * factor[:, None] for the saved gradient buffer ``grad``.

    When `may_hand_out`: ``grad`` rescaled in place by ``scale_op`` (default: the
    ``scale_rows_`` of ``grad``'s device, `_scale_rows_op`), which skips the rows whose factor
    is 1 and the rows ``zero_rows`` = (x_t, x0, mask_id, ignore_index) marks as zero by
    construction (see `csrc/common/scale_rows.h`; None: only the unit rows). Otherwise
    (``retain_graph=True``: gradcheck, jacobians, several backwards; tracing; a batched
    upstream) a new tensor, so the saved buffer stays intact and is never shared.
    """
    traced = tracing(grad, factor)
    if not traced:
        check_once(ctx, grad)
    traced = traced or batched(factor)
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    if not traced and may_hand_out(ctx):
        x_t, x0, mask_id, ignore_index = zero_rows if zero_rows is not None else (None, None, -1, 0)
        factor = factor if factor.dtype == acc else factor.to(acc)
        (scale_op or _scale_rows_op(grad))(grad, factor, x_t, x0, mask_id, ignore_index)
        return grad
    return grad.clone() if _unit(factor) else grad * factor.to(acc)[:, None]


def _scale_rows_op(grad: torch.Tensor):
    """The ``scale_rows_`` op for ``grad``'s device: the C++ kernels (CPU, and CUDA when built; one
    op for both devices), else the Triton kernel."""
    return _backend.kernel("cpu" if grad.device.type == "cpu" or _backend.CUDA_KERNELS else "triton", "scale_rows_")


@torch.library.register_fake("fastbound::scale_rows_")
def _scale_rows_fake(grad, factor, x_t, x0, mask_id, ignore_index):
    return None


@torch.library.register_fake("fastbound::check_loss_ids")
def _check_loss_ids_fake(x_t, x0, sigma, n_cols, loss, graph, mask_id, ignore_index):
    return None  # no data to check (the losses call it in eager mode only)


@torch.library.register_fake("fastbound::fused_loss")
def _fused_loss_fake(score, sigma, sigma_value, x_t, x0, weight, weight_value, loss, graph, mask_id, ignore_index,
                     reduction):
    acc = torch.float64 if score.dtype == torch.float64 else torch.float32
    return score.new_empty(x_t.shape if reduction == 0 else (), dtype=acc)


# ----------------------------------------------------------------------------- raw ops


def _loss_fake(score: torch.Tensor, row_scale: torch.Tensor, need_grad: bool):
    loss = row_scale.new_empty(score.shape[0])
    grad = score.new_empty(score.shape) if need_grad else score.new_empty(0)
    return loss, grad


def _backward(ctx, grad_loss, _grad_of_grad):
    if not ctx.need_grad:
        raise RuntimeError("the fused loss op ran with need_grad=False: it saved no gradient to backpropagate")
    (grad,) = ctx.saved_tensors
    score_grad = None if grad_loss is None else chain_rows(ctx, grad, grad_loss)
    return (score_grad,) + (None,) * (ctx.n_inputs - 1)


def register_fused_loss(op_name: str) -> None:
    """Registers the autograd formula (scores only) of a raw fused loss op whose first input is the scores."""

    def setup_context(ctx, inputs, output):
        # Detached: the saved buffer must not require grad itself.
        ctx.save_for_backward(output[1].detach())
        # The op returned the buffer to its caller: the backward must not rescale it in place
        # or hand it out as the gradient (`may_hand_out`), it is the caller's.
        ctx.handed_out = True
        ctx.n_inputs = len(inputs)
        ctx.need_grad = inputs[-1]
        # The second output (the gradient buffer) never receives a gradient:
        # do not let autograd fill an (N, V) tensor of zeros for it.
        ctx.set_materialize_grads(False)

    torch.library.register_autograd(op_name, _backward, setup_context=setup_context)


@torch.library.register_fake("fastbound::dse_forward")
def _dse_forward_fake(score, sigma, x_t, x0, row_scale, graph, mask_id, ignore_index, need_grad):
    return _loss_fake(score, row_scale, need_grad)


@torch.library.register_fake("fastbound::dse_forward_inplace")
def _dse_forward_inplace_fake(score, sigma, x_t, x0, row_scale, graph, mask_id, ignore_index):
    return row_scale.new_empty(score.shape[0])


@torch.library.register_fake("fastbound::dce_forward")
def _dce_forward_fake(logits, x_t, x0, row_scale, mask_id, ignore_index, need_grad):
    return _loss_fake(logits, row_scale, need_grad)


@torch.library.register_fake("fastbound::dce_forward_inplace")
def _dce_forward_inplace_fake(logits, x_t, x0, row_scale, mask_id, ignore_index):
    return row_scale.new_empty(logits.shape[0])


register_fused_loss("fastbound::dse_forward")
register_fused_loss("fastbound::dce_forward")


# ----------------------------------------------------------------------------- public losses


def forward_mode() -> bool:
    """Whether a forward-mode AD level is open (``torch.func.jvp``, ``forward_ad.dual_level``); cheap."""
    return forward_ad._current_level >= 0


def below_autograd(eager: bool):
    """In eager mode, a context that calls ops below the Autograd key: the raw ops' Python
    autograd wrapper (registered above) costs more than a small kernel, and `FusedLoss` (or a
    call without gradients) needs none of it. While tracing (``eager`` false), a no-op context."""
    return torch._C._AutoDispatchBelowAutograd() if eager else contextlib.nullcontext()


def has_tangent(t: torch.Tensor) -> bool:
    """Whether ``t`` carries a forward-mode tangent (call only when `forward_mode` is on)."""
    return not tracing(t) and forward_ad.unpack_dual(t).tangent is not None


def _fused_forward(score, sigma, row_scale, kernel, need_grad, inplace, need_sigma, need_scale):
    terms = kernel.sigma_terms(score) if need_sigma else None
    live = None
    used = row_scale
    if need_scale:
        live = (row_scale != 0).to(row_scale.dtype)
        used = torch.where(row_scale == 0, torch.ones_like(row_scale), row_scale)
    with below_autograd(kernel.eager):
        if inplace and need_grad:
            loss = kernel.run_inplace(score, sigma, used)
            grad = score
        else:
            loss, grad = kernel.run(score, sigma, used, need_grad)
    unscaled = loss / used if need_scale else None
    if live is not None:
        loss = loss * live
    dsigma = kernel.dloss_dsigma(terms, sigma) if need_sigma else None
    return loss, grad, unscaled, dsigma, live


def _fused_setup(ctx, inputs, output):
    score, sigma, row_scale, kernel, need_grad, inplace, need_sigma, need_scale = inputs
    _, grad, unscaled, dsigma, live = output
    if inplace and need_grad:
        ctx.mark_dirty(score)
    ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))
    ctx.set_materialize_grads(False)
    ctx.need_grad, ctx.kernel = need_grad, kernel
    if torch._C._are_functorch_transforms_active():
        ctx.base_requires_grad = base_requires_grad(score, sigma, row_scale)
    # The ids decide which gradient rows the backward may skip: saved, so that changing them
    # in place before the backward raises instead of skipping the wrong rows.
    ids = kernel.zero_ids
    if kernel.eager:  # tracing sees no inference tensors (and cannot ask)
        ids = savable(*ids)
    # fp16's range is narrow: a gradient written with the row scale alone may be subnormal or zero
    # where the upstream factor (a GradScaler's 2^16) would have kept its bits, so a backward
    # with another factor computes it again from the scores (`_recompute`) instead of rescaling.
    again = (score, sigma) if need_grad and not inplace and score.dtype == torch.float16 else (None, None)
    ctx.save_for_backward(grad if need_grad else None, row_scale, unscaled, dsigma, live, *ids, *again)
    ctx.save_for_forward(grad if need_grad else None, row_scale, unscaled, dsigma, live)


def _fused_backward(ctx, upstream, *_):
    if upstream is None:
        return (None,) * 8
    grad, row_scale, unscaled, dsigma, live, x_t, x0, score, sigma = ctx.saved_tensors
    if not tracing(upstream):
        check_once(ctx, row_scale)  # dsigma and unscaled are constants of the forward too
    d_score = d_sigma = d_scale = None
    if ctx.needs_input_grad[0]:
        if not ctx.need_grad:
            raise RuntimeError("the fused loss ran without its gradient (the scores did not require grad)")
        factor = upstream if live is None else upstream * live
        if score is not None and not vmapped(factor) and not _unit(factor):
            d_score = _recompute(ctx.kernel, score, sigma, row_scale, live, factor)
        else:
            d_score = chain_rows(ctx, grad, factor, (x_t, x0, *ctx.kernel.zero_ints), ctx.kernel.scale)
    if ctx.needs_input_grad[1]:
        d_sigma = upstream * row_scale * dsigma
    if ctx.needs_input_grad[2]:
        d_scale = upstream * unscaled
    return d_score, d_sigma, d_scale, None, None, None, None, None


def _recompute(kernel, score, sigma, row_scale, live, factor):
    """d out / d score = factor[:, None] * grad by the kernel itself, with the factor in the row
    scale: computed in the accumulation type and rounded once, as the oracle's (fp16 scores)."""
    used = row_scale if live is None else torch.where(row_scale == 0, torch.ones_like(row_scale), row_scale)
    with torch.no_grad(), below_autograd(kernel.eager):  # a constant of this backward (`check_once`)
        return kernel.run(score, sigma, used * factor.to(row_scale.dtype), True)[1]


class FusedLoss(torch.autograd.Function):
    """Autograd of the public losses: per-row loss of (N, V) scores, differentiable in the
    scores, in ``sigma`` (N,) and in ``row_scale`` (N,).

    ``kernel`` (a `fastbound.losses` kernel) runs the op: ``kernel.run(score, sigma, row_scale,
    need_grad)`` -> (loss, grad) and ``kernel.run_inplace(score, sigma, row_scale)`` -> loss, which
    overwrites the scores with their gradient (as in Liger-Kernel's cross entropy; the scores
    are marked dirty, so autograd raises if anything saved them). ``kernel.sigma_terms(score)``
    gathers, before the scores are overwritten, what ``kernel.dloss_dsigma(terms, sigma)`` needs
    for d loss / d sigma per row (a few gathered scores, no (N, V) write).

    Gradients (per row i, upstream u_i, unscaled loss l_i, row scale c_i):
    d/ds = u_i * grad_i (see `chain_rows`), d/dsigma = u_i c_i dl_i/dsigma, d/dc = u_i l_i.
    For d/dc the kernel runs with c_i = 1 where c_i = 0 (so l_i = loss_i / c_i everywhere);
    those rows' loss and gradient are multiplied by the factor 0 instead.
    """

    @staticmethod
    def forward(ctx, *inputs):
        # The old style (ctx in forward): a Function with setup_context binds its arguments
        # with `inspect` on every call, which costs as much as a small kernel.
        output = _fused_forward(*inputs)
        _fused_setup(ctx, inputs, output)
        return output

    backward = staticmethod(_fused_backward)


class FusedLossWithTangents(torch.autograd.Function):
    """`FusedLoss` with forward-mode AD (``torch.func.jvp``, ``forward_ad``): the output tangent
    is sum_y grad_iy t_iy + c_i dl_i/dsigma t_sigma_i + l_i t_c_i. Separate because Dynamo
    cannot trace a Function that defines ``jvp``; eager calls with tangents use it (functorch
    needs the ``setup_context`` style).
    """

    forward = staticmethod(_fused_forward)
    setup_context = staticmethod(_fused_setup)
    backward = staticmethod(_fused_backward)

    @staticmethod
    def vmap(info, in_dims, score, sigma, row_scale, kernel, need_grad, inplace, need_sigma, need_scale):
        """``torch.func.vmap`` (per-example losses and gradients, ``vmap(grad(...))``): one kernel
        call per batch entry of the scores, sigma or row scale; the ids stay those of the call."""
        if inplace:
            raise RuntimeError("fastbound's losses with inplace=True cannot run under torch.func.vmap; use inplace=False")
        for name in ("x_t", "x0"):
            if vmapped(getattr(kernel, name, None)):
                raise ValueError(f"fastbound's losses vmap over the scores only, "
                                 f"not over {name}: keep {name} outside the vmapped function (in_dims=None)")

        def entry(t, dim, b):
            return t if t is None or dim is None else t.select(dim, b)

        # Entries still batched at an outer vmap level go through this rule again.
        outer = any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in (score, sigma, row_scale))
        forward = FusedLossWithTangents.apply if outer else _fused_forward
        outs = [forward(entry(score, in_dims[0], b), entry(sigma, in_dims[1], b), entry(row_scale, in_dims[2], b),
                        kernel, need_grad, False, need_sigma, need_scale) for b in range(info.batch_size)]
        stacked = tuple(None if parts[0] is None else torch.stack(parts) for parts in zip(*outs))
        return stacked, tuple(None if t is None else 0 for t in stacked)

    @staticmethod
    def jvp(ctx, t_score, t_sigma, t_scale, *_):
        grad, row_scale, unscaled, dsigma, live = ctx.saved_tensors
        check_outer_levels(row_scale)
        out = None
        if t_score is not None:
            if grad is None:
                raise RuntimeError("the fused loss ran without its gradient: no tangent for the scores")
            acc = row_scale.dtype
            out = torch.linalg.vecdot(grad.to(acc), t_score.to(acc))
            out = out if live is None else out * live
        if t_sigma is not None:
            term = row_scale * dsigma * t_sigma
            out = term if out is None else out + term
        if t_scale is not None:
            term = unscaled * t_scale
            out = term if out is None else out + term
        return out, None, None, None, None


def function(tangents: bool):
    """`FusedLossWithTangents` with forward-mode tangents or under a torch.func transform (which
    needs the ``setup_context`` style), else `FusedLoss`."""
    if tangents or torch._C._are_functorch_transforms_active():
        return FusedLossWithTangents
    return FusedLoss


def cpu_isa() -> str:
    """The x86-64 level the CPU kernels run at here: 'avx512', 'avx2' or 'baseline'."""
    return _C.cpu_isa()


class BufferCache(NamedTuple):
    max_bytes: int
    """Most bytes of freed output buffers kept for reuse."""
    held_bytes: int
    """Bytes of freed buffers kept now."""


def cpu_buffer_cache(max_bytes: int | None = None) -> BufferCache:
    """The pool that keeps the CPU kernels' freed large outputs for the next call: the losses'
    (N, V) gradients and `fastbound.continuous.perturb`'s z, eps and x_warm.

    A fresh buffer's pages are faulted in and zeroed by the OS on first write, which at LM
    sizes costs as much as the kernel (4x512x32769 DSE forward+backward on a 2-core Xeon:
    31.6 -> 20.3 ms fp32, 30.3 -> 15.4 ms bf16 with reused memory); buffers of 1 MiB and up
    therefore return to this pool when their tensor dies, and a call of the same size takes
    one back. ``max_bytes`` (default 2 GiB, or ``FASTBOUND_CPU_BUFFER_CACHE`` in bytes at
    start-up) bounds what it keeps, the most recently freed first; ``0`` frees every kept
    buffer and keeps none. Without ``max_bytes`` it only reports. The reused tensors' storage
    cannot be resized (``resize_`` raises).
    """
    if max_bytes is None:
        return BufferCache(*_C.cpu_buffer_cache())
    return BufferCache(*_C.cpu_buffer_cache(as_int("max_bytes", max_bytes, minimum=0)))
