"""Kernel calls of `fastbound.continuous` (pure-PyTorch stand-ins until the kernels land)."""

from __future__ import annotations

import torch

from . import reference as R

_LAWS = {code: law for law, code in R.WARM_CODES.items()}


def _u64(bits: int) -> int:
    return bits % 2**64


def perturb(backend, x, alpha, sigma, law, warm_std, seed, offset, return_warm):
    acc = alpha.dtype
    w = R.words(x.numel(), _u64(seed), _u64(offset), x.device)
    eps = R.gaussian_pair(w, acc)[0].reshape(x.shape)
    xa = x.to(acc)
    if law:
        xa = xa + torch.tensor(warm_std, dtype=acc) * R.warm_noise(w, _LAWS[law], acc).reshape(x.shape)
    z = alpha[:, None] * xa + sigma[:, None] * eps
    return z.to(x.dtype), eps.to(x.dtype), xa.to(x.dtype)


def denoising_loss(backend, eps_hat, eps, scale, seed, offset):
    if eps is None:
        eps = R.regenerate_eps(eps_hat, _u64(seed), _u64(offset))
    return 0.5 * scale * R.squared_error(eps_hat, eps)


def integrate_step(backend, eps_hat, eps, acc, weight, baseline, index, seed, offset):
    if eps is None:
        eps = R.regenerate_eps(eps_hat, _u64(seed), _u64(offset))
    R.integrate_step(eps_hat, eps, acc, weight=weight, baseline=baseline, index=index)
