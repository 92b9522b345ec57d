r"""Fused linear + loss: DSE (SEDD) and DCE (MDLM) straight from hidden states and the output layer.

``fused_linear_dse_loss(hidden, weight, bias, ...)`` equals
``dse_loss(hidden @ weight.T + bias, ...)`` (and likewise for DCE) without forming the
(N, V) scores: one chunk of contributing rows at a time (`fastbound.fused_linear.head`),
matmul, the fused row kernel writing the chunk's score gradient ``g`` over its scores, then

.. math:: \nabla_{h_\text{rows}} = g W, \quad \nabla_W \mathrel{+}= g^\top h_\text{rows},
          \quad \nabla_b \mathrel{+}= \textstyle\sum_\text{rows} g,

the weight and bias gradients accumulated in fp32 (fp64 for fp64) across chunks, and the
GEMMs in `fastbound.fused_linear.head.gemm_dtype` (fp32 for bf16/fp16 on AVX2 CPUs). Rows that
do not contribute (unmasked positions of the absorbing graph, ``ignore_index``) are never
multiplied and get exactly zero gradient. The same design as Liger-Kernel's fused linear
cross-entropy (chunks over tokens, gradients in the forward), plus the masked-diffusion
property that only masked rows take part.

Where the gradient is computed:

* ``reduction="sum"|"mean"``: in the forward (when grad is enabled and an input requires
  it). The backward of the scalar loss only multiplies ``grad_hidden`` (N, H),
  ``grad_weight`` (V, H) and ``grad_bias`` (V,) by the incoming scalar, and returns them
  as they are when it is 1 (eager mode). Per-position factors go in ``loss_weight=``.
  For fp16 inputs a backward whose scalar is not 1 reruns the pass with it, as below: the
  fp16 gradients written with the row scale alone may have underflowed where the scalar (a
  GradScaler's 2^16) would have kept them.
* ``reduction="none"``: the forward computes the per-row losses only and holds no gradient
  buffer; the backward reruns the chunked pass with the per-row upstream gradient folded
  into the row scale (one more score matmul per chunk than the reduced path), so any
  per-row upstream, not only ``.sum()``, is exact.

Both run as one custom op (``fastbound::fused_linear_loss``) with a fake implementation
and an autograd formula, so models that call these losses compile with ``fullgraph=True``
(the chunk loop itself runs eagerly inside the op). Differentiable once, like
`fastbound.dse_loss`.
"""

from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _names, _ops
from .. import _validate as v
from ..losses import REDUCTIONS, check_dce_ids, check_dse_ids, dce_mask_id, dse_mask_id
from .head import (
    HeadSpec,
    check_chunk_size,
    check_head,
    check_score_param,
    chunk_scores,
    contributing_rows,
    gemm_dtype,
    row_losses,
)


def _outputs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], row_scale: Tensor, reduce: bool,
             wants: tuple[bool, bool, bool], make) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_hidden, grad_weight, grad_bias) buffers; gradients only for a reduced loss."""
    acc = row_scale.dtype
    gh, gw, gb = (want and reduce for want in wants)
    return (
        make(() if reduce else (hidden.shape[0],), acc),
        make(hidden.shape, hidden.dtype) if gh else hidden.new_empty(0),
        make(weight.shape, acc) if gw else weight.new_empty(0),
        make(weight.shape[:1], acc) if gb and bias is not None else weight.new_empty(0),
    )


def _add_mm(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out += a @ b with ``out`` in fp32/fp64.

    Where the GEMMs stay in bf16/fp16 (`gemm_dtype`: GPUs, CPUs with AVX512-BF16/AMX) the GEMM
    accumulates in fp32 internally and rounds its (V, H) product once per chunk; the chunks are
    then summed in fp32 (torch has no bf16 GEMM into an fp32 output).
    """
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out.add_(torch.mm(a, b))


@torch.library.custom_op("fastbound::fused_linear_loss", mutates_args=())
def fused_linear_loss(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], sigma: Tensor, x_t: Tensor, x0: Tensor,
    row_scale: Tensor, loss: str, graph: int, mask_id: int, ignore_index: int, sedd: bool, chunk: int,
    backend: str, reduce: bool, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The chunked fused pass on (N, H) hidden rows; returns (loss, grad_hidden, grad_weight, grad_bias).

    ``loss`` is the per-row loss (N,) times ``row_scale``, or its sum when ``reduce``. The
    gradients of that loss are computed only when ``reduce`` and their flag is set (empty
    tensors otherwise). sigma / row_scale are (N,) in the accumulation dtype; ids (N,) int64.
    """
    spec = HeadSpec(loss, graph, mask_id, ignore_index, sedd, chunk, backend)
    wants = (grad_hidden, grad_weight, grad_bias)
    total, gh, gw, gb = _outputs(hidden, weight, bias, row_scale, reduce, wants,
                                 lambda shape, dtype: hidden.new_zeros(shape, dtype=dtype))
    need_grad = reduce and any(wants)
    gemm = gemm_dtype(hidden.dtype, hidden.device)
    weight_g, bias_g = weight.to(gemm), None if bias is None else bias.to(gemm)
    rows = contributing_rows(spec, x_t, x0)
    for start in range(0, rows.numel(), chunk):
        r = rows[start:start + chunk]
        sig = sigma[r] if loss == "dse" else sigma
        xt = x_t[r]
        h, s = chunk_scores(spec, hidden, weight_g, bias_g, r, sig, xt)
        part = row_losses(spec, s, sig, xt, x0[r], row_scale[r], need_grad)
        if reduce:
            total += part.sum()
        else:
            total.index_copy_(0, r, part)
        if gh.numel():  # s now holds the chunk's score gradient
            gh.index_copy_(0, r, torch.mm(s, weight_g).to(gh.dtype))
        if gw.numel():
            _add_mm(gw, s.t(), h)
        if gb.numel():
            gb += s.sum(0, dtype=gb.dtype)
        del h, s  # one chunk of scores at a time: free it before the next is allocated
    return total, gh, gw.to(weight.dtype), gb.to(weight.dtype)


@fused_linear_loss.register_fake
def _fused_linear_loss_fake(hidden, weight, bias, sigma, x_t, x0, row_scale, loss, graph, mask_id,
                            ignore_index, sedd, chunk, backend, reduce, grad_hidden, grad_weight, grad_bias):
    total, gh, gw, gb = _outputs(hidden, weight, bias, row_scale, reduce, (grad_hidden, grad_weight, grad_bias),
                                 lambda shape, dtype: hidden.new_empty(shape, dtype=dtype))
    return total, gh, gw.to(weight.dtype), gb.to(weight.dtype)


@fused_linear_loss.register_vmap
def _fused_linear_loss_vmap(info, in_dims, *args):
    """One fused pass per batch entry: torch.func's per-example losses or gradients (a vmap over
    ``hidden``), and vmap over the backward of ``reduction="none"`` (a batched row scale)."""
    outs = [fused_linear_loss(*(a if d is None else a.select(d, b) for a, d in zip(args, in_dims)))
            for b in range(info.batch_size)]
    return tuple(torch.stack(o) for o in zip(*outs)), (0, 0, 0, 0)


N_SPEC_ARGS = 7  # loss, graph, mask_id, ignore_index, sedd, chunk, backend


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, sigma, x_t, x0, row_scale = inputs[:7]
    ctx.spec_args = inputs[7:7 + N_SPEC_ARGS]
    ctx.reduce, *ctx.wants = inputs[7 + N_SPEC_ARGS:]
    ctx.has_bias = bias is not None
    ctx.n_inputs = len(inputs)
    functorch = torch._C._are_functorch_transforms_active()
    if functorch:
        ctx.base_requires_grad = _ops.base_requires_grad(hidden, weight, bias)
    # Under torch.func the loss is saved too: its level is the forward's (`fastbound._ops.check_once`).
    # Not otherwise, so that `loss /= k` before the backward stays allowed.
    level = output[0] if functorch else None
    # fp16 gradients written with the row scale alone may have lost bits to fp16's narrow range
    # that the upstream factor (a GradScaler's) would have kept: the inputs are kept to run the
    # pass again with that factor (as for reduction="none").
    if not torch.compiler.is_compiling():
        x_t, x0 = _ops.savable(x_t, x0)
    passed = (hidden, weight, bias, sigma, x_t, x0, row_scale)
    ctx.rerun = not ctx.reduce or (any(ctx.wants) and hidden.dtype == torch.float16)
    if not ctx.reduce:
        ctx.save_for_backward(level, *passed)
    else:
        ctx.save_for_backward(level, *output[1:], *(passed if ctx.rerun else ()))
    # The gradient outputs are constants of the forward: no gradient, no zero buffers for them.
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _scaled(grad: Tensor, upstream: Tensor, own: bool) -> Tensor:
    """grad times the scalar upstream gradient: grad itself when that is known to be 1 without a
    device read and this backward owns the buffer (`fastbound._ops.may_hand_out`), else a new tensor."""
    if _ops._unit(upstream.reshape(1)):
        return grad if own else grad.clone()
    return grad * upstream


def _backward(ctx, grad_loss, *_grad_of_grads):
    none = (None,) * ctx.n_inputs
    if grad_loss is None:
        return none
    loss, *saved = ctx.saved_tensors
    if not v.tracing(grad_loss):
        _ops.check_once(ctx, loss)
    rerun = not ctx.reduce or (ctx.rerun and not _ops.vmapped(grad_loss) and not _ops._unit(grad_loss.reshape(1)))
    if not rerun:
        own = not v.tracing(grad_loss) and not _ops.batched(grad_loss) and _ops.may_hand_out(ctx)
        grads = [_scaled(g, grad_loss, own) if want else None for g, want in zip(saved, ctx.wants)]
    else:
        hidden, weight, bias, sigma, x_t, x0, row_scale = saved[-7:]
        with torch.no_grad():  # the pass's gradients are this backward's constants (`check_once`)
            _, *grads = fused_linear_loss(hidden, weight, bias, sigma, x_t, x0, row_scale * grad_loss,
                                          *ctx.spec_args, True, *ctx.wants)
        grads = [g if want else None for g, want in zip(grads, ctx.wants)]
    if not ctx.has_bias:
        grads[2] = None
    return tuple(grads) + none[3:]


fused_linear_loss.register_autograd(_backward, setup_context=_setup_context)


class _FusedLinearLossFunc(torch.autograd.Function):
    """The op's autograd for calls under a torch.func transform: torch.func needs an
    autograd.Function (a custom op's registered autograd is not one it can transform);
    ``generate_vmap_rule`` vmaps its forward and backward through `_fused_linear_loss_vmap`."""

    generate_vmap_rule = True
    forward = staticmethod(lambda *inputs: fused_linear_loss(*inputs))
    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


def _run(spec: HeadSpec, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], sigma: Tensor, x_t: Tensor,
         x0: Tensor, row_scale: Tensor, reduction: str, lead: torch.Size) -> Tensor:
    grad = torch.is_grad_enabled()
    wants = [grad and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    op = _FusedLinearLossFunc.apply if torch._C._are_functorch_transforms_active() else fused_linear_loss
    out = op(hidden, weight, bias, sigma, x_t, x0, row_scale, *spec.as_args(), reduction != "none", *wants)[0]
    return out.view(lead) if reduction == "none" else out


def _prepare(hidden, weight, bias, x_t, x0, loss_weight, reduction, ignore_index, chunk_size, backend):
    """Shared checks; returns (hidden (N, H), V, leading shape, ids (N,) int64, row scale, chunk, backend)."""
    flat, n_cols, n_hidden = check_head(hidden, weight, bias)
    lead = hidden.shape[:-1]
    x_t = v.check_ids("x_t", x_t, lead)
    x0 = v.check_ids("x0", x0, lead)
    v.check_choice("reduction", reduction, REDUCTIONS)
    for name, t in (("x_t", x_t), ("x0", x0)):
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}; move it to {hidden.device}")
    chunk = check_chunk_size(chunk_size, n_hidden, n_cols, hidden)
    kernel_backend = _backend.select(hidden.device, backend)
    n = flat.shape[0]
    ids = (x_t.reshape(n).long().contiguous(), x0.reshape(n).long().contiguous())
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    row_scale = v.as_rows("loss_weight", loss_weight, lead, acc, hidden.device, default=1.0)
    if reduction == "mean":
        row_scale = row_scale / (ids[1] != ignore_index).sum().clamp_min(1).to(acc)
    return flat, n_cols, lead, ids, row_scale, chunk, kernel_backend


def fused_linear_dse_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    sigma: float | Tensor,
    x_t: Tensor,
    x0: Tensor,
    *,
    graph: str = "absorb",
    mask_id: int | None = None,
    loss_weight: float | Tensor | None = None,
    reduction: str = "none",
    ignore_index: int = -100,
    score_param: str = "raw",
    chunk_size: int | None = None,
    backend: str | None = None,
) -> Tensor:
    r"""``dse_loss(hidden @ weight.T + bias, sigma, x_t, x0, ...)`` without the (N, V) scores.

    Args:
        hidden: (..., H) hidden states (fp32, bf16, fp16 or fp64; any strides).
        weight: (V, H) output layer, ``hidden``'s dtype and device (``nn.Linear.weight``).
        bias: (V,) or None.
        sigma, x_t, x0, graph, reduction, ignore_index: as in `fastbound.dse_loss`
            (``x_t``/``x0`` have ``hidden.shape[:-1]``).
        mask_id: the absorbing graph's mask column, any column of the head; default V - 1.
            Ignored for ``graph="uniform"``.
        loss_weight: per-position factor (``dse_loss``'s ``weight=``, e.g. SEDD's dsigma).
        score_param: ``"raw"`` (the scores are :math:`hW^\top + b`) or ``"sedd"``: SEDD's
            absorbing parametrisation applied in the fused pass,
            :math:`s = hW^\top + b - \log(e^\sigma - 1) - \log(V - 1)` with the column of
            :math:`x_t` set to 0 (``scale_by_sigma`` in SEDD's ``model/transformer.py``).
        chunk_size: rows per chunk (default `fastbound.fused_linear.chunk_rows`).
        backend: the row kernels' backend, as in `fastbound.dse_loss`.

    Returns float32 (float64 for float64 inputs) with ``x_t``'s shape for
    ``reduction="none"``, else a scalar; gradients flow to ``hidden``, ``weight`` and ``bias``.
    """
    v.check_choice("graph", graph, _names.GRAPH_CODES)
    sedd = check_score_param(score_param, "dse", graph)
    ignore_index = v.check_int64("ignore_index", ignore_index)
    flat, n_cols, lead, (xt, x0f), row_scale, chunk, kernel_backend = _prepare(
        hidden, weight, bias, x_t, x0, loss_weight, reduction, ignore_index, chunk_size, backend
    )
    mask = dse_mask_id(mask_id, graph, n_cols, "weight")
    checks = v.ValueChecks()
    check_dse_ids(checks, graph, xt, x0f, n_cols, ignore_index, "weight", mask_id=mask if mask >= 0 else None)
    sigma_rows = v.as_rows("sigma", sigma, lead, row_scale.dtype, flat.device)
    checks.positive_finite("sigma", sigma_rows)
    checks.run()
    spec = HeadSpec("dse", _names.GRAPH_CODES[graph], mask, ignore_index, sedd, chunk, kernel_backend)
    return _run(spec, flat, weight, bias, sigma_rows, xt, x0f, row_scale, reduction, lead)


def fused_linear_dce_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    x_t: Tensor,
    x0: Tensor,
    *,
    mask_id: int | None = None,
    loss_weight: float | Tensor | None = None,
    reduction: str = "none",
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> Tensor:
    r"""``dce_loss(hidden @ weight.T + bias, x_t, x0, ...)`` without the (N, V) logits.

    :math:`-\log\mathrm{softmax}(hW^\top + b)_{x_0}` at positions where ``x_t == mask_id``
    (the mask column, default V - 1, left out of the softmax; ``mask_id >= V``: the head
    has real tokens only), times ``loss_weight``. Other arguments as in
    `fused_linear_dse_loss` and `fastbound.dce_loss`.
    """
    ignore_index = v.check_int64("ignore_index", ignore_index)
    flat, n_cols, lead, (xt, x0f), row_scale, chunk, kernel_backend = _prepare(
        hidden, weight, bias, x_t, x0, loss_weight, reduction, ignore_index, chunk_size, backend
    )
    mask = dce_mask_id(mask_id, n_cols, "weight")
    checks = v.ValueChecks()
    check_dce_ids(checks, xt, x0f, n_cols, mask, ignore_index)
    checks.run()
    spec = HeadSpec("dce", _names.GRAPH_CODES["absorb"], mask, ignore_index, False, chunk, kernel_backend)
    return _run(spec, flat, weight, bias, row_scale.new_empty(0), xt, x0f, row_scale, reduction, lead)
