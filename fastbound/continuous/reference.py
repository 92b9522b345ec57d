r"""The continuous oracle: plain PyTorch versions of the `fastbound.continuous` kernels.

Imports only torch, math and the discrete oracle (`fastbound.reference`, itself torch
only, for the shared Philox rounds), so it checks the kernels independently of them.
Everything is computed in float32 (float64 for float64 inputs) with dense
tensors and autograd, term by term from the formulas below.

Noise (the contract of ``csrc/include/fastbound/continuous.h``). Element i (flat,
row-major index over x) of a call with (seed, offset) reads the four words of
Philox4x32-10 (Salmon et al., SC 2011) at counter ``(lo, hi, 0, 0)`` of
``(offset + i) mod 2^64`` under key ``(lo, hi)`` of ``seed XOR KEY_SALT``: the
discrete sampler's generator and counter rule (``philox.h``) with a different
key, so for the same seed the two never share words. From the words:

* u1 = (2 (w0 >> 9) + 1) 2^-24 in (0, 1) and p = the same of w2 (open uniforms),
  u2 = (w1 >> 8) 2^-24 in [0, 1); all exact in float32.
* Box–Muller (Box & Muller 1958): r = sqrt(-2 ln u1), θ = 2π u2 (θ rounded once),
  ε = r cos θ, and the Gaussian warm-up noise r sin θ (independent of ε).
* Laplace(0, 1/√2) by inverse CDF: t = p - 1/2, u = -sign(t) ln(1 - 2|t|) / √2.
* logistic(0, √3/π): u = (√3/π)(ln p - ln(1 - p)).
* uniform on [-√3, √3]: u = √3 (2p - 1).

Every law has mean 0 and variance 1. The integer and uniform steps are exact, so
the words and u1, u2, p are bit-identical on every backend; the transformed floats
differ only by the last-bit differences of each backend's log / sqrt / sin / cos
(and of contracting a*b + c into one FMA), a few ulp.
"""

from __future__ import annotations

import math

import torch

from ..reference import philox4x32

KEY_SALT = 0x6662636F6E74696E
"""The continuous noise key is seed XOR this (ASCII "fbcontin"), so it differs from the discrete key of the same seed."""
WARM_CODES = {None: 0, "gaussian": 1, "laplace": 2, "logistic": 3, "uniform": 4}
"""Warm-up laws to the codes of the kernels."""

_LOW32 = 0xFFFFFFFF


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def words(n: int, seed: int, offset: int = 0, device=None) -> torch.Tensor:
    """The int64 (n, 4) Philox words of elements 0 .. n-1 of a continuous call (values in [0, 2^32))."""
    key = (seed ^ KEY_SALT) & (2**64 - 1)
    start = offset - 2**64 if offset >= 2**63 else offset  # the int64 bit pattern; the sum wraps mod 2^64
    index = torch.arange(n, dtype=torch.int64, device=device) + start
    zeros = torch.zeros_like(index)
    return philox4x32(torch.stack([index & _LOW32, (index >> 32) & _LOW32, zeros, zeros], dim=1), key)


def open_uniform(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(2 (w >> 9) + 1) 2^-24: an odd multiple of 2^-24 in (0, 1), symmetric about 1/2."""
    return ((w >> 9) * 2 + 1).to(dtype) * 2.0**-24


def half_open_uniform(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(w >> 8) 2^-24 in [0, 1): philox.h's uniform-float rule."""
    return (w >> 8).to(dtype) * 2.0**-24


def _const(value: float, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype, device=device)


def gaussian_pair(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Box–Muller (r cos θ, r sin θ) of words w0, w1 (columns 0 and 1 of ``w``)."""
    r = torch.sqrt(-2.0 * torch.log(open_uniform(w[:, 0], dtype)))
    theta = half_open_uniform(w[:, 1], dtype) * _const(2 * math.pi, dtype, w.device)
    return r * torch.cos(theta), r * torch.sin(theta)


def warm_noise(w: torch.Tensor, law: str, dtype: torch.dtype) -> torch.Tensor:
    """The unit-variance warm-up noise u of each element's words, for one law."""
    if law == "gaussian":
        return gaussian_pair(w, dtype)[1]
    p = open_uniform(w[:, 2], dtype)
    if law == "laplace":
        t = p - 0.5
        magnitude = torch.log(1.0 - 2.0 * t.abs()) * _const(-1 / math.sqrt(2), dtype, w.device)
        return torch.where(t < 0, -magnitude, magnitude)
    if law == "logistic":
        return (torch.log(p) - torch.log(1.0 - p)) * _const(math.sqrt(3) / math.pi, dtype, w.device)
    if law == "uniform":
        return (2.0 * p - 1.0) * _const(math.sqrt(3), dtype, w.device)
    raise ValueError(f"unknown warm-up law {law!r}")


def alpha_sigma(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VP coefficients α = sqrt(sigmoid(λ)), σ = sqrt(sigmoid(-λ)), in float64."""
    lam = logsnr.double()
    return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()


def perturb(x: torch.Tensor, logsnr, *, warm: str | None = None, warm_std: float = 0.0, seed: int = 0,
            offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""(z, ε, x̃) with x̃ = x + σ0 u and z = α x̃ + σ ε (the variance-preserving channel).

    α² = sigmoid(λ), σ² = sigmoid(-λ) per sample (``logsnr`` a float or (B,)); u of law
    ``warm`` (none: x̃ = x); ε ~ N(0, I). Outputs in x's dtype; differentiable in x.
    """
    return perturb_with_words(x, words(x.numel(), seed, offset, x.device), logsnr, warm=warm, warm_std=warm_std)


def perturb_with_words(x: torch.Tensor, w: torch.Tensor, logsnr, *, warm: str | None = None,
                       warm_std: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`perturb` from the (x.numel(), 4) Philox words ``w`` of its elements (see `words`)."""
    acc = _acc_dtype(x.dtype)
    b = x.shape[0]
    eps = gaussian_pair(w, acc)[0].reshape(x.shape)
    xa = x.to(acc)
    if warm is not None:
        u = warm_noise(w, warm, acc).reshape(x.shape)
        xa = xa + _const(warm_std, acc, x.device) * u
    alpha, sigma = alpha_sigma(torch.as_tensor(logsnr, dtype=torch.float64, device=x.device).expand(b))  # a float λ exact
    view = (b,) + (1,) * (x.dim() - 1)
    z = alpha.to(acc).view(view) * xa + sigma.to(acc).view(view) * eps
    return z.to(x.dtype), eps.to(x.dtype), xa.to(x.dtype)


def regenerate_eps(like: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """The ε `perturb` draws for an x of ``like``'s shape and dtype with (seed, offset)."""
    w = words(like.numel(), seed, offset, like.device)
    return gaussian_pair(w, _acc_dtype(like.dtype))[0].reshape(like.shape).to(like.dtype)


def squared_error(eps_hat: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    r"""Per sample :math:`\|\varepsilon_b - \hat\varepsilon_b\|^2` over the trailing dims (accumulation dtype)."""
    acc = _acc_dtype(eps_hat.dtype)
    diff = eps.to(acc) - eps_hat.to(acc)
    return diff.square().reshape(eps_hat.shape[0], math.prod(eps_hat.shape[1:])).sum(1)


def denoising_loss(eps_hat: torch.Tensor, eps: torch.Tensor | None = None, *, weight=None,
                   reduction: str = "mean", seed: int | None = None, offset: int = 0) -> torch.Tensor:
    r"""½ w_b ‖ε_b − ε̂_b‖² per sample (the ε-prediction loss of DDPM/VDM), then reduced.

    ``reduction``: "none" (B,), "sum", "mean" (over B). ``eps=None`` regenerates ε from (seed, offset).
    """
    if eps is None:
        eps = regenerate_eps(eps_hat, seed, offset)
    loss = 0.5 * squared_error(eps_hat, eps)
    if weight is not None:
        loss = loss * torch.as_tensor(weight, dtype=loss.dtype, device=loss.device)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


def integrate_step(eps_hat: torch.Tensor, eps: torch.Tensor | None, acc: torch.Tensor, *, weight, baseline=None,
                   index=None, seed: int | None = None, offset: int = 0) -> torch.Tensor:
    r"""acc[index_b] += (S_b, S_b²), S_b = w_b (‖ε_b − ε̂_b‖² − baseline_b), all in float64."""
    if eps is None:
        eps = regenerate_eps(eps_hat, seed, offset)
    b = eps_hat.shape[0]
    err = (eps.double() - eps_hat.double()).square().reshape(b, math.prod(eps_hat.shape[1:])).sum(1)
    if baseline is not None:
        err = err - torch.as_tensor(baseline, dtype=torch.float64, device=err.device)
    s = torch.as_tensor(weight, dtype=torch.float64, device=err.device) * err
    rows = torch.arange(b, device=acc.device) if index is None else index
    return acc.index_put_((rows,), torch.stack([s, s * s], 1), accumulate=True)  # samples may share a slot
