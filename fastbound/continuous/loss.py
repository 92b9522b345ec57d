r"""The fused ε-prediction (denoising) loss of Gaussian diffusion.

Per sample b (DDPM, Ho et al. 2020; VDM, Kingma et al. 2021, in ε form):

.. math:: \ell_b = \tfrac12\, w_b\, \lVert \varepsilon_b - \hat\varepsilon_b \rVert^2,

one read of ε̂ (and ε) that writes d ℓ / d ε̂ = w_b (ε̂_b − ε_b) (times 1/B for the
mean) in the same pass, so the backward is free for the usual ``loss.backward()``
(see `fastbound._ops`; an eager CPU call whose signature an earlier call checked is the one
C++ op ``continuous_loss``, whose backward is C++ too). With ``eps=None`` the kernel regenerates ε from
(seed, offset) exactly as `fastbound.continuous.perturb` drew it, so ε is never
stored or read. The oracle is `fastbound.continuous.reference.denoising_loss`.
"""

from __future__ import annotations

from typing import Literal

import torch

from .. import _backend
from .. import _ops as _discrete_ops
from .. import _validate as v
from . import _args, _ops

REDUCTIONS = ("none", "sum", "mean")


def denoising_loss(
    eps_hat: torch.Tensor,
    eps: torch.Tensor | None = None,
    *,
    weight: float | torch.Tensor | None = None,
    reduction: Literal["none", "sum", "mean"] = "mean",
    seed: int | None = None,
    offset: int = 0,
    backend: str | None = None,
) -> torch.Tensor:
    r"""½ w_b ‖ε_b − ε̂_b‖² per sample, reduced; differentiable in ``eps_hat`` and ``weight``.

    Args:
        eps_hat: the model's noise prediction (B, ...), float32, bfloat16, float16 or float64.
        eps: the noise (same shape), or None to regenerate it from ``(seed, offset)`` as
            `perturb` drew it for an x of eps_hat's shape, rounded to eps_hat's dtype (exactly
            the ``eps`` perturb returns when x has that dtype).
        weight: w_b, a float or (B,) (default 1). A weight that requires grad (VDM's learned
            schedule weighs the loss by -dλ/dt) gets d loss_b / d w_b = ½ ‖ε_b − ε̂_b‖² per sample,
            from the forward's own sums, no extra pass over the rows: loss_b / w_b (a zero
            weight's row runs with weight 1), so exact to the compute type's rounding where
            w_b and loss_b are normal numbers of it.
        reduction: ``"none"`` (B,), ``"sum"`` or ``"mean"`` (over B).
        seed, offset: only with ``eps=None``.
        backend: ``None``/``"auto"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    The loss is float32 (float64 for float64 eps_hat); the gradient has eps_hat's dtype, the
    weight's gradient the weight's.
    """
    # Only a plain str reduction keys the cache (anything else takes the checks every call).
    key = _args.signature("denoising_loss", eps_hat, eps, seed, offset, backend, reduction) \
        if type(reduction) is str else None
    kernel_backend = _args.checked_backend(key)
    if kernel_backend is not None:  # an eager CPU call like one already checked: the value checks only
        if kernel_backend == "cpu" and eps_hat.dtype != torch.float16 and not _discrete_ops.forward_mode():
            return _cpu_loss(eps_hat, eps, weight, reduction, seed, offset)
        flat, eps_rows, seed_bits, offset_bits = _args.checked_pair(eps_hat, eps, seed, offset)
        eager = True
    else:
        if reduction not in REDUCTIONS:
            v.check_choice("reduction", reduction, REDUCTIONS)
        flat, eps_rows, seed_bits, offset_bits = _args.eps_pair(eps_hat, eps, seed, offset, "denoising_loss")
        kernel_backend = _backend.select(flat.device, backend)
        eager = v.eager(flat)
        _args.remember(key, kernel_backend)
    loss = _ops.denoising_loss(kernel_backend, flat, eps_rows, _scale(weight, flat, reduction, eager), seed_bits,
                               offset_bits, eager)
    if reduction == "none":
        return loss
    if reduction == "mean" and flat.shape[0] == 0:
        return loss.mean()  # NaN, as torch's mean of nothing (and the oracle's)
    return loss.sum()  # for "mean" the 1/B is in the scale


def _cpu_loss(eps_hat: torch.Tensor, eps: torch.Tensor | None, weight: float | torch.Tensor | None, reduction: str,
              seed: int | None, offset: int) -> torch.Tensor:
    """`denoising_loss` of a checked eager CPU call through the one C++ op (`_ops.cpu_loss`)."""
    seed_bits, offset_bits = _args.checked_seed_offset(eps, seed, offset)
    return _ops.cpu_loss(eps_hat, eps, _scale(weight, eps_hat, reduction, True), seed_bits, offset_bits,
                         REDUCTIONS.index(reduction))


def _scale(weight: float | torch.Tensor | None, eps_hat: torch.Tensor, reduction: str, eager: bool) -> torch.Tensor:
    """The kernels' row scale: w_b (default 1), times 1/B for the mean, in the compute type."""
    n = eps_hat.shape[0]
    acc = torch.float64 if eps_hat.dtype == torch.float64 else torch.float32
    return _args.per_sample("weight", weight, n, acc, eps_hat.device, default=1.0,
                            factor=1.0 / n if reduction == "mean" and n else 1.0, eager=eager, differentiable=True)
