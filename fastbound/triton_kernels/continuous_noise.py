r"""Fused continuous noising as a Triton kernel, and the noise helpers the loss kernels share.

Op: ``torch.ops.fastbound.continuous_perturb_triton`` (the schema of
``continuous_perturb`` in `csrc/ops.cpp`). The noise follows the contract of
`csrc/include/fastbound/continuous.h`: element ``i`` reads
``tl.randint4x(seed ^ KEY_SALT, offset + i)`` (Philox4x32-10, counter ``(lo, hi,
0, 0)`` of ``offset + i``, key ``(lo, hi)`` of the salted seed), then

* u1 = (2 (w0 >> 9) + 1) 2^-24, u2 = (w1 >> 8) 2^-24, p = open uniform of w2;
* ε = sqrt(-2 ln u1) cos(2π u2); Gaussian warm noise sqrt(-2 ln u1) sin(2π u2);
* Laplace / logistic / uniform warm noise by the inverse CDF of p, unit variance.

The words and uniforms are bit-identical to the C++ kernels'; log, sqrt, sin and cos
are Triton's (numpy's under ``TRITON_INTERPRET=1``), so the floats agree to a few ulp.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..continuous.reference import KEY_SALT, WARM_CODES
from ._common import launch, register_op

ELEMENTS_PER_PROGRAM = 1024

WARM_GAUSSIAN = tl.constexpr(WARM_CODES["gaussian"])
WARM_LAPLACE = tl.constexpr(WARM_CODES["laplace"])
WARM_LOGISTIC = tl.constexpr(WARM_CODES["logistic"])
TWO_PI = tl.constexpr(2 * math.pi)
INV_SQRT2 = tl.constexpr(1 / math.sqrt(2))
SQRT3_OVER_PI = tl.constexpr(math.sqrt(3) / math.pi)
SQRT3 = tl.constexpr(math.sqrt(3))


def salted_seed(seed: int) -> int:
    """The int64 bit pattern of (seed XOR KEY_SALT), seed given as an int64 bit pattern."""
    key = (seed % 2**64) ^ KEY_SALT
    return key - 2**64 if key >= 2**63 else key


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@triton.jit
def round_to(x, OUT: tl.constexpr):
    """x rounded to nearest even in OUT. bfloat16 is rounded in integers (as csrc/cpu/convert.h does):
    Triton's interpreter truncates a float32 -> bfloat16 cast, a GPU rounds; this is the same on both."""
    if OUT == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
        rounded = tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)
        return rounded.to(tl.bfloat16, bitcast=True)
    else:
        return x.to(OUT)


@triton.jit
def open_uniform(w, DT: tl.constexpr):
    """(2 (w >> 9) + 1) 2^-24 in (0, 1), exact."""
    return ((w >> 9) * 2 + 1).to(DT) * 5.9604644775390625e-08


@triton.jit
def box_muller(w0, w1, DT: tl.constexpr):
    """(r, θ) of words w0, w1: r = sqrt(-2 ln u1), θ = 2π u2 rounded once to DT."""
    r2 = -2.0 * tl.log(open_uniform(w0, DT))
    if DT == tl.float32:
        r = tl.sqrt_rn(r2)  # IEEE sqrt, as the C++ kernels (tl.sqrt may be approximate on a GPU)
    else:
        r = tl.sqrt(r2)
    theta = (w1 >> 8).to(DT) * 5.9604644775390625e-08 * tl.full((), TWO_PI, DT)
    return r, theta


@triton.jit
def regenerated_eps(seed, offset, index, OUT: tl.constexpr, DT: tl.constexpr):
    """ε of flat elements ``index``, rounded to OUT (as perturb returns it), in DT."""
    w0, w1, _, _ = tl.randint4x(seed, offset + index)
    r, theta = box_muller(w0, w1, DT)
    return round_to(r * tl.cos(theta), OUT).to(DT)


@triton.jit
def _warm_noise(w0, w1, w2, r, theta, LAW: tl.constexpr, DT: tl.constexpr):
    if LAW == WARM_GAUSSIAN:
        u = r * tl.sin(theta)
    else:
        p = open_uniform(w2, DT)
        if LAW == WARM_LAPLACE:
            t = p - 0.5
            magnitude = tl.log(1.0 - 2.0 * tl.abs(t)) * -tl.full((), INV_SQRT2, DT)
            u = tl.where(t < 0, -magnitude, magnitude)
        elif LAW == WARM_LOGISTIC:
            u = (tl.log(p) - tl.log(1.0 - p)) * tl.full((), SQRT3_OVER_PI, DT)
        else:
            u = (2.0 * p - 1.0) * tl.full((), SQRT3, DT)
    return u


@triton.jit
def _perturb_kernel(x_ptr, alpha_ptr, sigma_ptr, warm_std_ptr, z_ptr, eps_ptr, x_warm_ptr, n, cols, seed, offset,
                    LAW: tl.constexpr, RETURN_WARM: tl.constexpr, DT: tl.constexpr, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = index < n
    row = index // cols
    x = tl.load(x_ptr + index, mask=valid, other=0).to(DT)
    alpha = tl.load(alpha_ptr + row, mask=valid, other=0)
    sigma = tl.load(sigma_ptr + row, mask=valid, other=0)
    w0, w1, w2, _ = tl.randint4x(seed, offset + index)
    r, theta = box_muller(w0, w1, DT)
    eps = r * tl.cos(theta)
    if LAW != 0:
        x = x + tl.load(warm_std_ptr) * _warm_noise(w0, w1, w2, r, theta, LAW, DT)
    out = z_ptr.dtype.element_ty
    tl.store(z_ptr + index, round_to(alpha * x + sigma * eps, out), mask=valid)
    tl.store(eps_ptr + index, round_to(eps, out), mask=valid)
    if RETURN_WARM:
        tl.store(x_warm_ptr + index, round_to(x, out), mask=valid)


def check_rows(name: str, t: torch.Tensor) -> None:
    """The C++ ops' contract (`continuous_checks.h`); `fastbound.continuous` always satisfies it."""
    if t.dim() != 2 or not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (B, d)")


def check_per_row(name: str, rows: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.shape != (rows.shape[0],) or not t.is_contiguous() or t.dtype != dtype or t.device != rows.device:
        raise ValueError(f"{name} must be a contiguous ({rows.shape[0]},) {dtype} tensor on {rows.device}")


@register_op("continuous_perturb")
def continuous_perturb_triton(x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, warm: int, warm_std: float,
                              seed: int, offset: int, return_warm: bool
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, ε, x̃) for x (B, d); see the module docstring and `fastbound.continuous.perturb`."""
    check_rows("x", x)
    dt = compute_dtype(x)
    check_per_row("alpha", x, alpha, dt)
    check_per_row("sigma", x, sigma, dt)
    if warm not in WARM_CODES.values():
        raise ValueError(f"unknown warm law code {warm}")
    z, eps = torch.empty_like(x), torch.empty_like(x)
    x_warm = torch.empty_like(x) if return_warm else x.new_empty(0)
    n = x.numel()
    if n:
        std = torch.full((1,), warm_std, dtype=dt, device=x.device)
        launch(
            _perturb_kernel, (triton.cdiv(n, ELEMENTS_PER_PROGRAM),), x.device, x, alpha, sigma, std, z, eps, x_warm if return_warm else z, n, x.shape[1], salted_seed(seed), offset,
            LAW=warm, RETURN_WARM=return_warm, DT=tl.float64 if dt == torch.float64 else tl.float32,
            BLOCK=ELEMENTS_PER_PROGRAM,
        )  # fmt: skip
    return z, eps, x_warm

