"""A torch-only stand-in for `fastbound.perturb` / `fastbound.sample_times`, used by the
estimator tests only while the noise sampler (branch `noise`) is not merged.

Same signatures and the same counter contract: element i of a call reads counter
offset + i under key seed, so results do not depend on how the rows are chunked.
The hash is splitmix64, not Philox: the stand-in is not bit-compatible with the
real sampler, only statistically equivalent.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

_MASK64 = (1 << 64) - 1


class Perturbed(NamedTuple):
    x_t: torch.Tensor
    mask: torch.Tensor


def _to_signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    return (x >> s) & ((1 << (64 - s)) - 1)


def _words(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """splitmix64(seed-mixed counter), as int64 bit patterns."""
    x = counters + _to_signed(seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019)
    x = (x ^ _shr(x, 30)) * _to_signed(0xBF58476D1CE4E5B9)
    x = (x ^ _shr(x, 27)) * _to_signed(0x94D049BB133111EB)
    return x ^ _shr(x, 31)


def _uniforms(seed: int, offset: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    counters = torch.arange(n, dtype=torch.int64, device=device) + _to_signed(offset)
    w = _words(seed, counters)
    u = _shr(w, 40).double() * 2.0**-24  # 24 high bits
    r = (w & 0xFFFFFF).double() * 2.0**-24  # 24 low bits, for the uniform replacement
    return u, r


def perturb(x0, *, sigma=None, mask_ratio=None, num_masked=None, graph="absorb", vocab_size, mask_id=None,
            maskable=None, seed, offset=0, backend=None):
    rows, cols = x0.shape
    u, r = _uniforms(seed, offset, rows * cols, x0.device)
    u, r = u.view(rows, cols), r.view(rows, cols)
    allowed = torch.ones_like(x0, dtype=torch.bool) if maskable is None else torch.broadcast_to(maskable, x0.shape)
    if num_masked is not None:
        keys = torch.where(allowed, u, 2.0)
        rank = keys.argsort(1).argsort(1)
        k = torch.as_tensor(num_masked, device=x0.device).reshape(-1, 1)
        mask = rank < k
    else:
        if sigma is not None:
            s = torch.as_tensor(sigma, dtype=torch.float64, device=x0.device)
            p = -torch.expm1(-(s.reshape(-1, 1) if s.dim() == 1 else s))
        else:
            p = torch.as_tensor(mask_ratio, dtype=torch.float64, device=x0.device)
            p = p.reshape(-1, 1) if p.dim() == 1 else p
        mask = (u < p) & allowed
    if graph == "absorb":
        fill = torch.full_like(x0, vocab_size if mask_id is None else mask_id)
    else:
        fill = (r * vocab_size).long().clamp_max(vocab_size - 1).to(x0.dtype)
    return Perturbed(torch.where(mask, fill, x0), mask)


def sample_times(n, *, method="iid", eps=1e-3, seed, offset=0, device=None):
    u, _ = _uniforms(seed, offset, n, device)
    if method == "antithetic":
        s = torch.remainder(u[:1] + torch.arange(n, dtype=torch.float64, device=device) / n, 1.0)
    elif method == "stratified":
        s = (u + torch.arange(n, dtype=torch.float64, device=device)) / n
    else:
        s = u
    return ((1 - eps) * s + eps).float()


def install() -> None:
    """Makes `fastbound.perturb` / `fastbound.sample_times` available if the real ones are not."""
    import fastbound

    if not hasattr(fastbound, "perturb"):
        fastbound.perturb = perturb
        fastbound.sample_times = sample_times
