"""Loads the compiled operators and gives them what `torch.compile` needs.

The C++ library (`fastbound._C`, schemas in `csrc/ops.cpp`) registers the
kernels per device. Here we add, per op, a fake (meta) implementation for
tracing and the autograd formula, so models that call our losses compile with
`fullgraph=True`.

Every fused loss op has the same contract: it returns the per-row loss (N,)
and the gradient of that loss with respect to the scores, already multiplied by
the row scale (weight, and 1/count for ``reduction="mean"``). The backward is
then one multiplication by the incoming per-row gradient, skipped in eager mode
when that gradient is a broadcast 1 (the usual ``loss.backward()`` after a sum,
which is what ``reduction="sum"|"mean"`` and ``weight=`` give): the saved
buffer itself becomes the gradient, with no copy.

The losses are differentiable once: the gradient is a constant of the
forward, so a double backward (``create_graph=True``) raises instead of
silently returning a wrong second derivative. Because the saved buffer is
handed out as the gradient, a graph kept with ``retain_graph=True`` can be
backpropagated again only while that gradient is not modified in place
(PyTorch's saved-tensor version check raises otherwise).
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the TORCH_LIBRARY registrations)
from ._names import GRAPH_CODES  # noqa: F401  (defined in _names; looked up here by the Triton kernels)
from ._validate import tracing


def scale_rows(grad: torch.Tensor, row_grad: torch.Tensor) -> torch.Tensor:
    """Chain rule for a fused loss: d out / d score = grad * row_grad[:, None].

    A row gradient that is a broadcast 1 (stride 0) returns ``grad`` itself in eager mode.
    """
    if torch.is_grad_enabled() and not tracing(row_grad):
        raise RuntimeError(
            "fastbound's fused losses are differentiable once: double backward (create_graph=True) "
            "is not supported; use fastbound.reference for higher derivatives"
        )
    unit = row_grad.numel() > 0 and row_grad.stride(0) == 0 and not tracing(row_grad) and bool(row_grad[0] == 1)
    return grad if unit else grad * row_grad.to(grad.dtype)[:, None]


def _loss_fake(score: torch.Tensor, row_scale: torch.Tensor, need_grad: bool):
    loss = row_scale.new_empty(score.shape[0])
    grad = score.new_empty(score.shape) if need_grad else score.new_empty(0)
    return loss, grad


def _backward(ctx, grad_loss, _grad_of_grad):
    if not ctx.need_grad:
        raise RuntimeError("the fused loss op ran with need_grad=False: it saved no gradient to backpropagate")
    (grad,) = ctx.saved_tensors
    score_grad = None if grad_loss is None else scale_rows(grad, grad_loss)
    return (score_grad,) + (None,) * (ctx.n_inputs - 1)


def register_fused_loss(op_name: str) -> None:
    """Registers the autograd formula of a fused loss op whose first input is the scores."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1])
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


class InplaceFusedLoss(torch.autograd.Function):
    """Autograd for the ``inplace=True`` ops, which overwrite the scores with the gradient.

    ``run(scores)`` calls a ``*_forward_inplace`` op on the (N, V) scores and
    returns the per-row loss. The overwritten buffer is the saved gradient, as
    in Liger-Kernel's cross entropy.
    """

    @staticmethod
    def forward(ctx, score: torch.Tensor, run) -> torch.Tensor:
        buffer = score.detach()
        loss = run(buffer)
        ctx.save_for_backward(buffer)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (buffer,) = ctx.saved_tensors
        return scale_rows(buffer, grad_loss), None


def cpu_isa() -> str:
    """The x86-64 level the CPU kernels run at here: 'avx512', 'avx2' or 'baseline'."""
    return _C.cpu_isa()
