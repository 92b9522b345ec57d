"""Kernel calls of `fastbound.continuous`: backend choice, fake implementations and autograd.

The ops (schemas in ``csrc/ops.cpp``; C++ CPU and CUDA kernels, and Triton
kernels registered as ``<name>_triton`` in ``fastbound/triton_kernels/continuous_*.py``):

* ``continuous_perturb`` -> (z, eps, x_warm). Differentiable in x: dz/dx = α_b,
  dx̃/dx = 1 (ε does not depend on x); in α and σ: d z_b·/dα_b = x̃_b·, dz_b·/dσ_b = ε_b·
  (x̃ written and saved then); the noise is a constant.
* ``continuous_denoising_loss`` -> (loss (B,), d loss / d ε̂ (B, d)), the fused-loss
  contract of `fastbound._ops` (gradient written in the forward, free backward for a
  broadcast-1 upstream).
* ``continuous_loss``: the loss and its reduction in one op with a C++ backward, the
  common eager CPU call of `denoising_loss` (csrc/cpu/continuous_loss_autograd.cpp).
* ``continuous_integrate_step`` mutates acc; no autograd. ``continuous_integrate``: its common
  eager CPU call with the value checks and the version bump in C++.
"""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the TORCH_LIBRARY registrations)
from .. import _ops as _discrete_ops
from .._backend import kernel
from .._validate import tracing
from .reference import WARM_CODES

WARM_NONE = WARM_CODES[None]

OPS = ("continuous_perturb", "continuous_denoising_loss", "continuous_integrate_step")
"""The ops with kernels on every backend (``continuous_loss`` is CPU only)."""


@torch.library.register_fake("fastbound::continuous_perturb")
def _perturb_fake(x, alpha, sigma, warm, warm_std, seed, offset, return_warm):
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.shape if return_warm else (0,))


@torch.library.register_fake("fastbound::continuous_denoising_loss")
def _loss_fake(eps_hat, eps, scale, seed, offset, need_grad):
    return scale.new_empty(eps_hat.shape[0]), eps_hat.new_empty(eps_hat.shape if need_grad else (0,))


@torch.library.register_fake("fastbound::continuous_loss")
def _loss_rows_fake(eps_hat, eps, scale, seed, offset, reduction):
    return scale.new_empty(eps_hat.shape[:1] if reduction == 0 else ())


@torch.library.register_fake("fastbound::continuous_integrate")
def _cpu_integrate_fake(eps_hat, eps, acc, weight, weight_value, baseline, baseline_value, seed, offset):
    return None


@torch.library.register_fake("fastbound::continuous_integrate_step")
def _integrate_fake(eps_hat, eps, acc, weight, baseline, index, seed, offset):
    return None


def _perturb_setup(ctx, inputs, output):
    x, alpha, sigma, law = inputs[:4]
    _, eps, x_warm = output
    ctx.mark_non_differentiable(eps)  # ε depends on no input
    if not x.requires_grad:
        ctx.mark_non_differentiable(x_warm)  # x̃ depends on x alone
    # dz/dα = x̃ (x itself without a warm-up law) and dz/dσ = ε per element.
    schedule = alpha.requires_grad or sigma.requires_grad
    if schedule and law != WARM_NONE and x_warm.shape != x.shape:
        raise RuntimeError("continuous_perturb differentiates alpha and sigma only with return_warm=True or without "
                           "a warm-up law: dz/dalpha is x_warm")
    tilde = (x if law == WARM_NONE else x_warm) if schedule else None
    ctx.save_for_backward(alpha, tilde, eps if schedule else None)
    ctx.return_warm = inputs[-1]
    ctx.set_materialize_grads(False)


def _perturb_backward(ctx, grad_z, grad_eps, grad_warm):
    # In α's (the compute) dtype, rounded once to x's, as the oracle's autograd does: α rounded
    # to a 16-bit dtype first would be off by its rounding, and 0 below float16's range.
    alpha, x_warm, eps = ctx.saved_tensors
    grad_warm = grad_warm if ctx.return_warm else None
    grad_x = grad_alpha = grad_sigma = None
    if ctx.needs_input_grad[0] and (grad_z is not None or grad_warm is not None):
        like = grad_z if grad_z is not None else grad_warm
        grad_x = 0 if grad_z is None else grad_z.to(alpha.dtype) * alpha[:, None]
        if grad_warm is not None:
            grad_x = grad_x + grad_warm.to(alpha.dtype)
        grad_x = grad_x.to(like.dtype)
    if grad_z is not None and ctx.needs_input_grad[1]:
        grad_alpha = (grad_z.to(alpha.dtype) * x_warm.to(alpha.dtype)).sum(1)
    if grad_z is not None and ctx.needs_input_grad[2]:
        grad_sigma = (grad_z.to(alpha.dtype) * eps.to(alpha.dtype)).sum(1)
    return (grad_x, grad_alpha, grad_sigma) + (None,) * 5


def register_autograd(suffix: str = "") -> None:
    """Autograd of the perturb and loss ops (``suffix="_triton"`` for the Triton ops)."""
    torch.library.register_autograd(f"fastbound::continuous_perturb{suffix}", _perturb_backward,
                                    setup_context=_perturb_setup)
    _discrete_ops.register_fused_loss(f"fastbound::continuous_denoising_loss{suffix}")


register_autograd()


def perturb(backend, x, alpha, sigma, law, warm_std, seed, offset, return_warm):
    """(z, ε, x̃) of (B, d) rows; x̃ is empty unless ``return_warm`` or, with a warm-up law, α or σ
    requires grad (x̃ is then dz/dα; without a law it is x).
    Forward-mode AD and torch.func (whose transforms cannot see the op's registered autograd)
    get the linear part in torch ops around the op on the detached inputs:
    z = z₀ + α (x − x₀) + (α − α₀) x̃₀ + (σ − σ₀) ε, x̃ = x̃₀ + (x − x₀), each difference zero in value."""
    op = kernel(backend, "continuous_perturb")
    if not (_discrete_ops.forward_mode() or torch._C._are_functorch_transforms_active()):
        schedule = (alpha.requires_grad or sigma.requires_grad) and law != WARM_NONE
        return op(x, alpha, sigma, law, warm_std, seed, offset, return_warm or schedule)
    z, eps, x_warm = op(x.detach(), alpha.detach(), sigma.detach(), law, warm_std, seed, offset, True)
    acc = alpha.dtype
    dx = x - x.detach()
    dz = (alpha[:, None] * dx.to(acc) + (alpha - alpha.detach())[:, None] * x_warm.to(acc)
          + (sigma - sigma.detach())[:, None] * eps.to(acc))
    z = z + dz.to(z.dtype)  # the tangent rounded once, as in backward
    return z, eps, x_warm + dx if return_warm else x_warm[:0]


class _LossKernel:
    """The continuous loss as a `fastbound._ops.FusedLoss` kernel (no sigma, no in-place form)."""

    __slots__ = ("op", "eps", "seed", "offset", "eager", "scale")
    # Every row of the gradient may be nonzero: the backward's rescale skips none.
    zero_ids, zero_ints = (None, None), (-1, 0)

    def __init__(self, backend, eps, seed, offset, eager):
        self.op = kernel(backend, "continuous_denoising_loss")
        self.eps, self.seed, self.offset = eps, seed, offset
        self.eager = eager  # may call the op below the Autograd key
        self.scale = kernel(backend, "scale_rows_")

    def run(self, eps_hat, sigma, scale, need_grad):
        return self.op(eps_hat, self.eps, scale, self.seed, self.offset, need_grad)


def denoising_loss(backend, eps_hat, eps, scale, seed, offset, eager):
    """Per-sample losses; differentiable in eps_hat and the row scale through `FusedLoss`, the discrete losses'
    old-style Function (the raw op's torch.library autograd binds its arguments on every call,
    which costs about as much as the kernel at image sizes). ``eager``: not tracing."""
    if eps is not None and torch._C._are_functorch_transforms_active():
        # torch.func: the formula in torch ops, which every transform can follow (eps vmapped at
        # any level, second derivatives); the kernel's accumulation type, ε̂'s gradient dtype.
        acc = scale.dtype
        return 0.5 * scale * (eps_hat.to(acc) - eps.to(acc)).square().sum(1)
    loss_kernel = _LossKernel(backend, eps, seed, offset, eager)
    tangent = _discrete_ops.forward_mode() and (_discrete_ops.has_tangent(eps_hat) or _discrete_ops.has_tangent(scale))
    functorch = torch._C._are_functorch_transforms_active()
    need_grad = (torch.is_grad_enabled() and eps_hat.requires_grad) or tangent or functorch
    need_scale = (torch.is_grad_enabled() and scale.requires_grad) or tangent or functorch
    if not (need_grad or need_scale):
        with _discrete_ops.below_autograd(eager):
            return loss_kernel.run(eps_hat, None, scale, False)[0]
    function = _discrete_ops.function(tangent)
    return function.apply(eps_hat, None, scale, loss_kernel, need_grad, False, False, need_scale)[0]


def cpu_loss(eps_hat, eps, scale, seed, offset, reduction: int):
    """The loss of (B, ...) ``eps_hat`` in the one C++ op ``continuous_loss``
    (csrc/cpu/continuous_loss_autograd.cpp: the kernel, the reduction and a C++ backward), for
    checked eager CPU calls without forward-mode AD; ``reduction``: the index in ``REDUCTIONS``."""
    return kernel("cpu", "continuous_loss")(eps_hat, eps, scale, seed, offset, reduction)


def cpu_integrate(eps_hat, eps, acc, weight, weight_value, baseline, baseline_value, seed, offset):
    """The integration step of (B, ...) ``eps_hat`` in the one C++ op ``continuous_integrate``
    (csrc/cpu/continuous_loss_autograd.cpp: the weight and baseline value checks, the kernel and
    acc's version bump), for checked eager CPU calls without index."""
    kernel("cpu", "continuous_integrate")(eps_hat, eps, acc, weight, weight_value, baseline, baseline_value, seed,
                                          offset)


def integrate_step(backend, eps_hat, eps, acc, weight, baseline, index, seed, offset):
    kernel(backend, "continuous_integrate_step")(eps_hat, eps, acc, weight, baseline, index, seed, offset)
