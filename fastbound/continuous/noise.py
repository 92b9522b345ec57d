r"""Fused noising for continuous data: warm-up noise and the Gaussian channel in one pass.

The forward process of warm-start diffusion (Shen, Gan & Ling, "Information
Theoretic Learning for Diffusion Models with Warm Start", NeurIPS 2025): the
data is first perturbed by isotropic warm-up noise of any law, x̃ = x + σ0 u,
then sent through the variance-preserving Gaussian channel in log-SNR λ
(Kingma et al., VDM 2021; Kong et al., "Information-Theoretic Diffusion" 2023):

.. math:: z_\lambda = \alpha_\lambda \tilde x + \sigma_\lambda \varepsilon, \quad
          \alpha^2 = \mathrm{sigmoid}(\lambda),\ \sigma^2 = \mathrm{sigmoid}(-\lambda),\
          \varepsilon \sim N(0, I).

Every random number is a pure function of (seed, offset) and the element's
index (Philox4x32-10, the discrete sampler's generator under a disjoint key);
the rules are written in ``csrc/include/fastbound/continuous.h`` and in the
oracle, `fastbound.continuous.reference`. A call consumes ``x.numel()``
counters: draw again with ``offset + x.numel()`` (or a `fastbound.noise.NoiseStream`).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from .. import _backend
from . import _args, _ops
from ._args import WARM_LAWS  # noqa: F401  (re-exported by fastbound.continuous)
from .reference import WARM_CODES
from .schedules import alpha, sigma



class ContinuousPerturbed(NamedTuple):
    """The result of `perturb`."""

    z: torch.Tensor
    """The noisy sample α x̃ + σ ε, x's shape and dtype."""
    eps: torch.Tensor
    """The Gaussian noise ε (the ε-prediction target), x's shape and dtype."""
    x_warm: torch.Tensor | None
    """x̃ = x + σ0 u when ``return_warm=True``, else None."""


def _alpha_sigma(logsnr, n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (α, σ) of the log-SNR in float64, rounded once to the kernels' compute dtype
    (differentiable in a logsnr that requires grad)."""
    lam = _args.per_sample("logsnr", logsnr, n, torch.float64, device, differentiable=True)
    return alpha(lam).to(dtype), sigma(lam).to(dtype)


def perturb(
    x: torch.Tensor,
    logsnr: float | torch.Tensor,
    *,
    warm: Literal["gaussian", "laplace", "logistic", "uniform"] | None = None,
    warm_std: float = 0.0,
    seed: int = 0,
    offset: int = 0,
    return_warm: bool = False,
    backend: str | None = None,
) -> ContinuousPerturbed:
    r"""Draws the warm-up noise and ε and returns z = α (x + σ0 u) + σ ε and ε, in one fused pass.

    Args:
        x: clean data (B, ...), float32, bfloat16, float16 or float64, finite. Any strides.
        logsnr: λ per sample, a float or (B,) (finite). A logsnr that requires grad (VDM's learned
            schedule) gets dz/dλ = α' x̃ + σ' ε, α' = α σ²/2, σ' = −σ α²/2, summed per sample from
            the x̃ and ε the kernel writes (then kept for the backward; x itself without a warm-up
            law). For 16-bit x the kernel then runs on float32 rows, so the gradient sums the
            float32 x̃ and ε, and the outputs are rounded from them (the same bits).
        warm: the law of the unit-variance warm-up noise u (``None``: no warm start).
        warm_std: σ0 ≥ 0, the warm-up noise's standard deviation (must be 0 when ``warm`` is None).
        seed, offset: the noise's (seed, counter offset), uint64s; element i uses counter offset + i.
        return_warm: also return x̃ = x + σ0 u.
        backend: ``None``/``"auto"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns ``ContinuousPerturbed(z, eps, x_warm)`` in x's dtype, computed in float32
    (float64 for float64 x). z and x̃ are differentiable in x (dz/dx = α, dx̃/dx = 1), z in logsnr.
    """
    x = _args.batch_tensor("x", x)
    _args.check_warm(warm, warm_std)
    if not isinstance(return_warm, bool):
        raise TypeError(f"return_warm must be a bool, got {type(return_warm).__name__}")
    seed_bits, offset_bits = _args.seed_offset(seed, offset)
    kernel_backend = _backend.select(x.device, backend)
    _args.check_finite("x", x)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    alpha, sigma = _alpha_sigma(logsnr, x.shape[0], x.device, acc)
    # A differentiated λ sums x̃ and ε: for 16-bit x from the kernel's float32 values, not their
    # 16-bit roundings (and no x̃ beyond float16's range). The outputs are the same bits: the
    # kernel rounds its float32 results to nearest even, as `.to` does.
    widen = alpha.requires_grad and x.dtype in (torch.bfloat16, torch.float16)
    rows = _args.rows(x)
    z, eps, x_warm = _ops.perturb(kernel_backend, rows.float() if widen else rows, alpha, sigma, WARM_CODES[warm],
                                  float(warm_std), seed_bits, offset_bits, return_warm)
    if widen:
        z, eps, x_warm = z.to(x.dtype), eps.to(x.dtype), x_warm.to(x.dtype)
    return ContinuousPerturbed(z.view(x.shape), eps.view(x.shape), x_warm.view(x.shape) if return_warm else None)
