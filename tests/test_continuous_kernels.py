"""The continuous kernels (perturb, denoising_loss, integrate_step) against the oracle.

Every backend (C++ CPU; Triton, in the interpreter on CPU; CUDA and Triton on a GPU)
is checked on values and gradients, every dtype, odd d, one sample, an empty
batch and non-contiguous input; the noise laws by moments and Kolmogorov–Smirnov
tests; the words and the exactly-computed noise bit for bit across backends; bad
input by its error message.
"""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch

from conftest import TRITON_DEVICE
from fastbound import reference as discrete_reference
from fastbound._validate import SignatureTable
from fastbound.continuous import denoising_loss, integrate_step, perturb
from fastbound.continuous import reference as R

LAWS = [None, "gaussian", "laplace", "logistic", "uniform"]
REDUCTIONS = ["none", "sum", "mean"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
BACKENDS = [("cpu", "cpu"), pytest.param(TRITON_DEVICE, "triton", marks=pytest.mark.triton, id="triton")]
if torch.cuda.is_available():
    BACKENDS.append(pytest.param("cuda", "cuda", marks=pytest.mark.cuda, id="cuda"))

# Floats built with log / sqrt / sin / cos agree to a few ulp of max(1, |value|) (continuous.h);
# a 16-bit output may then round one unit of its last place the other way.
ATOL = {torch.float32: 4e-6, torch.float64: 1e-14, torch.bfloat16: 2**-7 * 4, torch.float16: 2**-10 * 4}


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    tol = ATOL[dtype] * scale
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol)


def sample(b: int, d: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype).to(device)


def lam(b: int, device: str) -> torch.Tensor:
    return torch.linspace(-6.0, 6.0, b, dtype=torch.float64).to(device)


# -----------------------------------------------------------------------------
# The oracle's generator
# -----------------------------------------------------------------------------


def test_oracle_words_are_the_discrete_generator_under_the_salted_key():
    for seed, offset in [(0, 0), (12345, 2**40 + 7), (2**64 - 1, 2**64 - 3)]:
        expected = discrete_reference.noise_words(9, seed ^ R.KEY_SALT, offset)
        assert torch.equal(R.words(9, seed, offset), expected)


def test_continuous_key_differs_from_the_discrete_key_of_the_same_seed():
    ours = R.words(64, 7, 0)
    theirs = discrete_reference.noise_words(64, 7, 0)
    assert not torch.equal(ours[:, 0], theirs[:, 0])


def test_uniforms_are_exact_and_open():
    w = torch.tensor([0, 2**32 - 1, 511, 512], dtype=torch.int64)
    u = R.open_uniform(w, torch.float32)
    assert u.tolist() == [2.0**-24, 1 - 2.0**-24, 2.0**-24, 3 * 2.0**-24]
    assert torch.equal(R.open_uniform(w, torch.float32).double(), R.open_uniform(w, torch.float64))
    assert R.half_open_uniform(w, torch.float32).tolist() == [0.0, 1 - 2.0**-24, 1 * 2.0**-24, 2 * 2.0**-24]


# -----------------------------------------------------------------------------
# perturb
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("device, backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("law", LAWS)
def test_perturb_matches_oracle(device, backend, dtype, law):
    b, d = 3, 37  # d is not a multiple of any block
    x = sample(b, d, dtype, device)
    std = 0.3 if law else 0.0
    got = perturb(x, lam(b, device), warm=law, warm_std=std, seed=5, offset=2**33 + 1, return_warm=True,
                  backend=backend)
    want = R.perturb(x, lam(b, device), warm=law, warm_std=std, seed=5, offset=2**33 + 1)
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == x.shape
        close(g, w, dtype, scale=2.0)


@pytest.mark.parametrize("device, backend", BACKENDS)
def test_perturb_exact_parts_are_bit_identical(device, backend):
    """No transcendental touches x_warm for the uniform law (u = (2p - 1) sqrt 3) or z at α=1 without warm
    noise... so these are equal bit for bit to the oracle: the words agree exactly."""
    x = torch.zeros(4, 50, device=device)
    got = perturb(x, 0.0, warm="uniform", warm_std=1.0, seed=9, offset=3, return_warm=True, backend=backend)
    want = R.perturb(x, 0.0, warm="uniform", warm_std=1.0, seed=9, offset=3)
    assert torch.equal(got.x_warm, want[2])
    cpu = perturb(x.cpu(), 0.0, warm="uniform", warm_std=1.0, seed=9, offset=3, return_warm=True, backend="cpu")
    assert torch.equal(got.x_warm.cpu(), cpu.x_warm)
    # the Laplace sign comes from the same word
    lap = perturb(x, 0.0, warm="laplace", warm_std=1.0, seed=9, offset=3, return_warm=True, backend=backend)
    assert torch.equal(torch.sign(lap.x_warm), torch.sign(got.x_warm))


@pytest.mark.parametrize("device, backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_perturb_16_bit_outputs_round_as_torch_does(device, backend, dtype):
    """x̃ = x + 1.0·u of the uniform law takes no transcendental and the same float32 sum in the kernel
    and the oracle, so the 16-bit x̃ differ only if the kernel's rounding does: every finite 16-bit x
    (all exponents, subnormals, both zeros) against the oracle's `.to(dtype)`, bit for bit. The CPU
    kernel's vector lanes take 64 (or 32) values at a time and the tail one at a time (n = 64k + 37)."""
    bits = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype)
    x = x[torch.isfinite(x.float())]
    x = torch.cat([x, x[:(37 - x.numel()) % 64]]).reshape(1, -1).to(device)
    got = perturb(x, 0.0, warm="uniform", warm_std=1.0, seed=3, offset=11, return_warm=True, backend=backend)
    want = R.perturb(x, 0.0, warm="uniform", warm_std=1.0, seed=3, offset=11)
    assert torch.equal(got.x_warm.view(torch.int16), want[2].view(torch.int16))
    plain = perturb(x, 0.0, return_warm=True, backend=backend)  # no warm start: x̃ is x, stored back unchanged
    same = plain.x_warm.view(torch.int16) == x.view(torch.int16)
    if backend == "triton" and device == "cpu":
        # Triton's interpreter converts bfloat16 below float32's normal range (2^-126) wrongly on load
        # (9.2e-41 reads as 0, 0x007F0000 as 0x007E0000), a GPU by a shift: those are left out there.
        same |= x.float().abs() < 2.0**-126
    assert bool(same.all())


@pytest.mark.parametrize("offset", [2**32 - 13, 2**64 - 21, 2**33 - 3])
@pytest.mark.parametrize("n", [1, 7, 37, 1030])
def test_cpu_words_carry_and_wrap_bit_identically(offset, n):
    """The CPU kernel draws its words in vector groups of counters (csrc/cpu/continuous_words.h:
    8 on AVX2, 16 on AVX-512): groups where the counter's low word carries into the high word,
    the 2^64 wrap, and a count that is not a multiple of the group give the oracle's words (read through the exact
    uniform-law x_warm, and eps regenerated by the loss kernel)."""
    x = torch.zeros(1, n)
    got = perturb(x, 0.0, warm="uniform", warm_std=1.0, seed=2**63 + 5, offset=offset, return_warm=True,
                  backend="cpu")
    want = R.perturb(x, 0.0, warm="uniform", warm_std=1.0, seed=2**63 + 5, offset=offset)
    assert torch.equal(got.x_warm, want[2])
    close(got.eps, want[1], torch.float32)
    regen = denoising_loss(x, seed=2**63 + 5, offset=offset, reduction="none", backend="cpu")
    assert torch.equal(regen, denoising_loss(x, got.eps, reduction="none", backend="cpu"))


@pytest.mark.parametrize("base", [2**32, 2**64])
@pytest.mark.parametrize("law", ["gaussian", "uniform"])
def test_cpu_words_carry_at_every_lane_of_a_block(base, law):
    """On AVX-512 the CPU kernel draws blocks of two 16-counter groups, then one group, then a
    group whose stores are masked to the tail (csrc/cpu/continuous_words.h); on AVX2, 8-counter
    groups. The counter's low word wraps (and at 2^64 the high word too) at each position of a
    32-counter block, of the lone group and of the tail, with and without w2 (the uniform law
    reads it, the Gaussian one does not): the words equal the oracle's (x_warm is exact for the
    uniform law; eps and the Gaussian x_warm within their few ulp, where a wrong word would give
    another value altogether)."""
    n = 32 + 16 + 13
    x = torch.zeros(1, n)
    for k in range(1, n + 1):
        offset = (base - k) % 2**64
        got = perturb(x, 0.0, warm=law, warm_std=1.0, seed=17, offset=offset, return_warm=True, backend="cpu")
        want = R.perturb(x, 0.0, warm=law, warm_std=1.0, seed=17, offset=offset)
        if law == "uniform":
            assert torch.equal(got.x_warm, want[2]), k
        close(got.eps, want[1], torch.float32)
        close(got.x_warm, want[2], torch.float32)


@pytest.mark.parametrize("device, backend", BACKENDS)
@pytest.mark.parametrize("law", ["gaussian", "laplace", "logistic"])
def test_perturb_float32_math_is_within_a_few_ulp_of_float64(device, backend, law):
    """The float32 noise against the same formulas in float64 (the uniforms are exact in both).

    Box–Muller: r = sqrt(-2 ln u1) scales the rounding of θ = 2π u2 (half an ulp of θ) and of
    sin / cos, so the bound is 16 half-ulps of max(1, r); the log-only laws: 8 half-ulps of max(1, |u|).
    """
    x = torch.zeros(4, 4000, device=device)
    got = perturb(x, 0.0, warm=law, warm_std=1.0, seed=21, return_warm=True, backend=backend)
    exact = perturb(x.double(), 0.0, warm=law, warm_std=1.0, seed=21, return_warm=True, backend=backend)
    half_ulp = 2.0**-24
    if law == "gaussian":
        r = torch.hypot(exact.eps, exact.x_warm).clamp_min(1)
        for a, b in ((got.eps, exact.eps), (got.x_warm, exact.x_warm)):
            assert bool(((a.double() - b).abs() <= 16 * half_ulp * r).all())
    else:
        a, b = got.x_warm.double(), exact.x_warm
        assert bool(((a - b).abs() <= 8 * half_ulp * b.abs().clamp_min(1)).all())


@pytest.mark.parametrize("device, backend", BACKENDS)
def test_perturb_odd_shapes(device, backend):
    for shape in [(1, 1), (1, 3, 5, 7), (0, 4), (2, 0), (5,)]:
        x = torch.randn(shape, device=device)
        got = perturb(x, 1.0, warm="logistic", warm_std=0.1, seed=1, return_warm=True, backend=backend)
        want = R.perturb(x, 1.0, warm="logistic", warm_std=0.1, seed=1)
        for g, w in zip(got, want):
            assert g.shape == x.shape
            close(g, w, torch.float32, scale=2.0)


@pytest.mark.parametrize("device, backend", BACKENDS)
def test_perturb_non_contiguous_input(device, backend):
    x = torch.randn(6, 5, device=device).t()  # (5, 6), column-major
    got = perturb(x, lam(5, device), warm="gaussian", warm_std=0.2, seed=4, backend=backend)
    want = perturb(x.contiguous(), lam(5, device), warm="gaussian", warm_std=0.2, seed=4, backend=backend)
    assert torch.equal(got.z, want.z) and torch.equal(got.eps, want.eps)


@pytest.mark.parametrize("device, backend", BACKENDS)
def test_perturb_counters_follow_offset_plus_flat_index(device, backend):
    """Element i uses counter offset + i: row 1 of a call at offset 0 is row 0 of a call at offset d."""
    x = torch.zeros(2, 33, device=device)
    both = perturb(x, 0.0, warm="laplace", warm_std=1.0, seed=3, return_warm=True, backend=backend)
    second = perturb(x[:1], 0.0, warm="laplace", warm_std=1.0, seed=3, offset=33, return_warm=True, backend=backend)
    assert torch.equal(both.eps[1], second.eps[0]) and torch.equal(both.x_warm[1], second.x_warm[0])
    again = perturb(x, 0.0, warm="laplace", warm_std=1.0, seed=3, return_warm=True, backend=backend)
    assert torch.equal(both.z, again.z)
    other = perturb(x, 0.0, warm="laplace", warm_std=1.0, seed=4, return_warm=True, backend=backend)
    assert not torch.equal(both.eps, other.eps)


@pytest.mark.parametrize("device, backend", BACKENDS)
@pytest.mark.parametrize("law", LAWS)
def test_perturb_element_does_not_depend_on_its_position(device, backend, law):
    """An element's noise is a function of its counter alone, bit for bit, wherever it falls: in a
    vector of the CPU kernel's lanes (64 or 32 wide), in the scalar tail of a row, in either at another
    lane (the call's offset shifts which). The regenerating loss sees the same eps."""
    x = torch.full((1, 200), 0.25, device=device)
    full = perturb(x, 0.5, warm=law, warm_std=0.3 if law else 0.0, seed=6, offset=40, return_warm=True,
                   backend=backend)
    for start, n in [(0, 1), (7, 1), (31, 2), (32, 64), (45, 100), (137, 63), (199, 1), (3, 197)]:
        part = perturb(x[:, :n], 0.5, warm=law, warm_std=0.3 if law else 0.0, seed=6, offset=40 + start,
                       return_warm=True, backend=backend)
        for whole, piece in zip(full, part):
            assert torch.equal(whole[:, start:start + n], piece), (start, n)
        regen = denoising_loss(x[:, :n], seed=6, offset=40 + start, reduction="none", backend=backend)
        assert torch.equal(regen, denoising_loss(x[:, :n], full.eps[:, start:start + n], reduction="none",
                                                 backend=backend))


@pytest.mark.parametrize("device, backend", BACKENDS)
def test_perturb_gradient_matches_oracle(device, backend):
    x = sample(3, 11, torch.float32, device).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    got = perturb(x, lam(3, device), warm="gaussian", warm_std=0.5, seed=2, return_warm=True, backend=backend)
    want = R.perturb(x_ref, lam(3, device), warm="gaussian", warm_std=0.5, seed=2)
    up_z, up_w = torch.randn_like(x), torch.randn_like(x)
    ((got.z * up_z).sum() + (got.x_warm * up_w).sum()).backward()
    ((want[0] * up_z).sum() + (want[2] * up_w).sum()).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_perturb_gradcheck_float64():
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)

    def f(x):
        out = perturb(x, torch.tensor([-1.0, 2.0], dtype=torch.float64), warm="uniform", warm_std=0.1, seed=1,
                      return_warm=True)
        return out.z, out.x_warm

    assert torch.autograd.gradcheck(f, (x,))


def test_perturb_forward_mode_and_torch_func_match_oracle():
    """jvp / jacfwd / forward_ad tangents and torch.func's reverse transforms: dz/dx = α, dx̃/dx = 1
    (the op's registered autograd is invisible to them; they once gave zero tangents)."""
    x = torch.randn(2, 3, 2, dtype=torch.float64)
    lam_ = torch.tensor([-1.0, 2.5], dtype=torch.float64)

    def ours(x):
        out = perturb(x, lam_, warm="laplace", warm_std=0.2, seed=3, return_warm=True)
        return out.z, out.x_warm

    def oracle(x):
        z, _, x_warm = R.perturb(x, lam_, warm="laplace", warm_std=0.2, seed=3)
        return z, x_warm

    t = torch.randn_like(x)
    torch.testing.assert_close(torch.func.jvp(ours, (x,), (t,)), torch.func.jvp(oracle, (x,), (t,)))
    torch.testing.assert_close(torch.func.jacfwd(ours)(x), torch.func.jacfwd(oracle)(x))
    torch.testing.assert_close(torch.func.jacrev(ours)(x), torch.func.jacrev(oracle)(x))
    with torch.autograd.forward_ad.dual_level():
        z, x_warm = ours(torch.autograd.forward_ad.make_dual(x, t))
        alpha = torch.sigmoid(lam_).sqrt()[:, None, None]
        torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(z).tangent, alpha * t)
        torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(x_warm).tangent, t)


@pytest.mark.parametrize("device, backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("law", [None, "gaussian", "logistic"])
def test_perturb_gradient_to_logsnr_matches_oracle(device, backend, dtype, law):
    """A learned schedule (VDM) differentiates z in λ: dz/dλ = α' x̃ + σ' ε summed per sample, with x
    and λ both requiring grad and with λ alone; 16-bit x too (the kernel's float32 x̃ and ε, so the
    float32 oracle's gradient to float32 accuracy), and the same output bits as without the gradient."""
    std = 0.4 if law else 0.0
    x = sample(3, 37, dtype, device).requires_grad_()
    lam_ = torch.tensor([-4.0, 0.3, 6.0], dtype=torch.float64, device=device, requires_grad=True)
    up = torch.randn(3, 37, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype).to(device)
    for with_x in (True, False):
        wrt, x_in = ((x, lam_), x) if with_x else ((lam_,), x.detach())
        got = perturb(x_in, lam_, warm=law, warm_std=std, seed=3, offset=7, return_warm=True, backend=backend)
        plain = perturb(x.detach(), lam_.detach(), warm=law, warm_std=std, seed=3, offset=7, return_warm=True,
                        backend=backend)
        for a, b in zip(got, plain):
            assert torch.equal(a.detach().double(), b.double())
        want = R.perturb(x_in, lam_, warm=law, warm_std=std, seed=3, offset=7)[0]
        grads = torch.autograd.grad((got.z * up).sum(), wrt)
        expected = torch.autograd.grad((want * up).sum(), wrt)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(grads[-1], expected[-1], rtol=tol, atol=tol)
        if with_x:  # α g rounded once to x's dtype
            assert torch.equal(grads[0], expected[0])


def test_perturb_gradcheck_in_logsnr_float64():
    """Reverse, forward-mode and torch.func derivatives in λ (and x) against finite differences."""
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    lam_ = torch.tensor([-3.0, 0.5, 4.0], dtype=torch.float64, requires_grad=True)

    def f(x, lam_):
        out = perturb(x, lam_, warm="laplace", warm_std=0.2, seed=4, offset=9, return_warm=True)
        return out.z, out.x_warm

    assert torch.autograd.gradcheck(f, (x, lam_), check_forward_ad=True, check_batched_grad=True)
    assert torch.autograd.gradcheck(lambda lam_: f(x.detach(), lam_)[0], (lam_,))
    want = torch.autograd.grad(R.perturb(x, lam_, warm="laplace", warm_std=0.2, seed=4, offset=9)[0].sum(), lam_)[0]
    torch.testing.assert_close(torch.func.grad(lambda lam_: f(x.detach(), lam_)[0].sum())(lam_.detach()), want)


def test_raw_perturb_op_differentiates_the_schedule_only_with_x_warm():
    """dz/dα is x̃: the raw op (no Python layer) with a warm-up law must return it to differentiate α, and
    says so instead of failing in the backward; without a law x̃ is x, saved as it is."""
    x, alpha, sigma = torch.randn(2, 5), torch.tensor([0.6, 0.8], requires_grad=True), torch.tensor([0.8, 0.6])
    op = torch.ops.fastbound.continuous_perturb
    with pytest.raises(RuntimeError, match="only with return_warm=True"):
        op(x, alpha, sigma, R.WARM_CODES["laplace"], 0.1, 1, 0, False)
    z, eps, _ = op(x, alpha, sigma, R.WARM_CODES[None], 0.0, 1, 0, False)
    (grad,) = torch.autograd.grad(z.sum(), alpha)
    torch.testing.assert_close(grad, x.sum(1))


def test_perturb_eps_does_not_require_grad():
    """ε does not depend on x: it must not require grad when x does (the README's
    ``denoising_loss(model(n.z), n.eps)`` with a trainable x)."""
    x = torch.randn(4, 6, requires_grad=True)
    out = perturb(x, 1.0, seed=0)
    assert out.z.requires_grad and not out.eps.requires_grad
    denoising_loss(out.z * 2, out.eps).backward()
    assert x.grad is not None


def test_perturb_without_warm_keeps_x():
    x = torch.randn(3, 8)
    out = perturb(x, 2.0, seed=1, return_warm=True)
    assert torch.equal(out.x_warm, x)
    assert perturb(x, 2.0, seed=1).x_warm is None


# -----------------------------------------------------------------------------
# Noise laws
# -----------------------------------------------------------------------------

N_LAW = 30000
CDFS = {
    "gaussian": scipy.stats.norm().cdf,
    "laplace": scipy.stats.laplace(scale=1 / math.sqrt(2)).cdf,
    "logistic": scipy.stats.logistic(scale=math.sqrt(3) / math.pi).cdf,
    "uniform": scipy.stats.uniform(loc=-math.sqrt(3), scale=2 * math.sqrt(3)).cdf,
}


@pytest.mark.parametrize("law", list(CDFS))
def test_noise_laws_by_moments_and_ks(law):
    x = torch.zeros(3, N_LAW // 3, dtype=torch.float64)
    out = perturb(x, 0.0, warm=law, warm_std=1.0, seed=11, return_warm=True)
    u, eps = out.x_warm.flatten(), out.eps.flatten()
    se = 1 / math.sqrt(N_LAW)
    assert abs(float(u.mean())) < 4 * se
    assert abs(float(u.var()) - 1) < 4 * math.sqrt(float((u**4).mean()) - 1) * se
    assert abs(float(torch.corrcoef(torch.stack([u, eps]))[0, 1])) < 4 * se  # u and eps independent
    assert scipy.stats.kstest(u.numpy(), CDFS[law]).pvalue > 1e-3
    assert scipy.stats.kstest(eps.numpy(), CDFS["gaussian"]).pvalue > 1e-3


def test_ks_detects_the_wrong_law():
    """The KS check can fail: the Laplace draws are not logistic."""
    out = perturb(torch.zeros(1, N_LAW, dtype=torch.float64), 0.0, warm="laplace", warm_std=1.0, seed=11,
                  return_warm=True)
    assert scipy.stats.kstest(out.x_warm.flatten().numpy(), CDFS["logistic"]).pvalue < 1e-3


def test_z_has_the_channel_moments():
    """z = α x̃ + σ ε: mean α x̃, variance σ² per sample."""
    x = torch.full((2, 20000), 0.7, dtype=torch.float64)
    logsnr = torch.tensor([-1.0, 3.0], dtype=torch.float64)
    z = perturb(x, logsnr, seed=3).z
    alpha, sigma = torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()
    se = sigma / math.sqrt(20000)
    assert ((z.mean(1) - 0.7 * alpha).abs() < 4 * se).all()
    assert ((z.var(1) / sigma**2 - 1).abs() < 4 * math.sqrt(2 / 20000)).all()


# -----------------------------------------------------------------------------
# denoising_loss
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("device, backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_denoising_loss_matches_oracle(device, backend, dtype, reduction):
    b, d = 3, 45
    eps = sample(b, d, dtype, device, seed=1)
    eps_hat = sample(b, d, dtype, device, seed=2).requires_grad_()
    ref_hat = eps_hat.detach().clone().requires_grad_()
    weight = torch.tensor([0.5, 2.0, 1.5], device=device)
    loss = denoising_loss(eps_hat, eps, weight=weight, reduction=reduction, backend=backend)
    ref = R.denoising_loss(ref_hat, eps, weight=weight, reduction=reduction)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == acc
    torch.testing.assert_close(loss, ref, rtol=1e-5 if acc == torch.float32 else 1e-12, atol=1e-5)
    up = torch.randn(loss.shape, dtype=acc, device=device)
    (loss * up).sum().backward()
    (ref * up).sum().backward()
    assert eps_hat.grad.dtype == dtype
    close(eps_hat.grad, ref_hat.grad, dtype, scale=4.0)


@pytest.mark.parametrize("device, backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_denoising_loss_regenerates_eps_as_perturb_drew_it(device, backend, dtype):
    x = sample(2, 29, dtype, device)
    noised = perturb(x, lam(2, device), seed=8, offset=100, backend=backend)
    eps_hat = sample(2, 29, dtype, device, seed=3)
    given = denoising_loss(eps_hat, noised.eps, reduction="none", backend=backend)
    regenerated = denoising_loss(eps_hat, seed=8, offset=100, reduction="none", backend=backend)
    torch.testing.assert_close(regenerated, given, rtol=1e-6, atol=0)
    oracle = R.denoising_loss(eps_hat, seed=8, offset=100, reduction="none")
    torch.testing.assert_close(regenerated, oracle, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device, backend", BACKENDS)
def test_denoising_loss_odd_shapes_and_strides(device, backend):
    for shape in [(1, 1), (1, 3, 7), (0, 5), (4, 0), (2, 2049)]:
        eps_hat = torch.randn(shape, device=device, requires_grad=True)
        loss = denoising_loss(eps_hat, seed=1, reduction="sum", backend=backend)
        ref_hat = eps_hat.detach().clone().requires_grad_()
        ref = R.denoising_loss(ref_hat, seed=1, reduction="sum")
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        loss.backward()
        ref.backward()
        torch.testing.assert_close(eps_hat.grad, ref_hat.grad)
    base = torch.randn(7, 4, device=device)
    eps_hat, eps = base.t(), torch.randn(7, 4, device=device).t()  # non-contiguous
    torch.testing.assert_close(denoising_loss(eps_hat, eps, reduction="none", backend=backend),
                               R.denoising_loss(eps_hat, eps, reduction="none"))


def test_denoising_loss_of_empty_batch():
    empty = torch.zeros(0, 3)
    assert math.isnan(float(denoising_loss(empty, empty)))  # a mean of nothing, as torch's and the oracle's
    assert math.isnan(float(R.denoising_loss(empty, empty)))
    assert float(denoising_loss(empty, empty, reduction="sum")) == 0.0
    assert denoising_loss(empty, empty, reduction="none").shape == (0,)


def test_denoising_loss_gradcheck_float64():
    eps = torch.randn(3, 6, dtype=torch.float64)
    eps_hat = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.0, 0.5, 3.0], dtype=torch.float64)
    for reduction in ["none", "mean"]:
        assert torch.autograd.gradcheck(lambda e: denoising_loss(e, eps, weight=w, reduction=reduction), (eps_hat,))
    assert torch.autograd.gradcheck(lambda e: denoising_loss(e, seed=3, offset=9), (eps_hat,))


@pytest.mark.parametrize("regenerate", [False, True])
def test_denoising_loss_gradcheck_in_weight_float64(regenerate):
    """d loss_b / d w_b = ½ ‖ε_b − ε̂_b‖² (a learned schedule's loss weight), with ε̂ and w both
    requiring grad and with w alone, a zero weight included; reverse and forward mode."""
    eps = None if regenerate else torch.randn(3, 6, dtype=torch.float64)
    kwargs = dict(seed=3, offset=9) if regenerate else {}
    eps_hat = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64, requires_grad=True)
    for reduction in REDUCTIONS:
        def f(e, w):
            return denoising_loss(e, eps, weight=w, reduction=reduction, **kwargs)

        assert torch.autograd.gradcheck(f, (eps_hat, w), check_forward_ad=True)
        assert torch.autograd.gradcheck(lambda w: f(eps_hat.detach(), w), (w,))


@pytest.mark.parametrize("device, backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_denoising_loss_gradient_to_weight_matches_oracle(device, backend, dtype):
    """The first call takes the Python `FusedLoss`; on the CPU the next (a checked signature) the C++
    op's autograd function: both give the oracle's gradients, a zero weight's included."""
    eps_hat, eps = sample(4, 37, dtype, device, seed=2), sample(4, 37, dtype, device, seed=3)
    ref_hat = eps_hat.clone().requires_grad_()
    ref_w = torch.tensor([0.5, 2.0, 0.0, 1.5], device=device, requires_grad=True)
    (R.denoising_loss(ref_hat, eps, weight=ref_w) * 3.0).backward()
    for call in range(2):
        leaf, w = eps_hat.clone().requires_grad_(), ref_w.detach().clone().requires_grad_()
        loss = denoising_loss(leaf, eps, weight=w, backend=backend)
        if call and backend == "cpu":
            assert type(loss.grad_fn).__name__ == "CppFunction"
        (loss * 3.0).backward()
        torch.testing.assert_close(w.grad, ref_w.grad)
        close(leaf.grad, ref_hat.grad, dtype)


def test_denoising_loss_gradient_to_weight_under_compile():
    eps_hat, eps = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5)
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    loss = torch.compile(lambda a, w: denoising_loss(a, eps, weight=w), fullgraph=True)(eps_hat, w)
    got = torch.autograd.grad(loss, (eps_hat, w))
    want = torch.autograd.grad(R.denoising_loss(eps_hat, eps, weight=w), (eps_hat, w))
    torch.testing.assert_close(got, want)


def test_denoising_loss_backward_hands_out_the_forward_buffer():
    """A broadcast-1 upstream (loss.backward() after a sum) takes the gradient written in the forward."""
    eps_hat = torch.randn(4, 9, requires_grad=True)
    denoising_loss(eps_hat, seed=0).backward()
    ref_hat = eps_hat.detach().clone().requires_grad_()
    R.denoising_loss(ref_hat, seed=0).backward()
    torch.testing.assert_close(eps_hat.grad, ref_hat.grad)


def test_denoising_loss_is_differentiable_once():
    eps_hat = torch.randn(2, 3, requires_grad=True)
    loss = denoising_loss(eps_hat, seed=0)
    (grad,) = torch.autograd.grad(loss, eps_hat, create_graph=False)
    assert grad.shape == eps_hat.shape
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(denoising_loss(eps_hat, seed=0), eps_hat, create_graph=True)


def test_denoising_loss_no_grad_writes_no_gradient():
    eps_hat = torch.randn(2, 3, requires_grad=True)
    with torch.no_grad():
        loss = denoising_loss(eps_hat, seed=0)
    assert not loss.requires_grad


def test_denoising_loss_traces_under_compile():
    """The loss's autograd (`fastbound._ops.FusedLoss`) traces in one graph and gives eager's values."""
    eps_hat, eps, weight = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5), torch.tensor([1.0, 2.0, 3.0])
    compiled = torch.compile(lambda a, b: denoising_loss(a, b, weight=weight), fullgraph=True)
    loss = compiled(eps_hat, eps)
    (grad,) = torch.autograd.grad(loss, eps_hat)
    want = R.denoising_loss(eps_hat, eps, weight=weight)
    (want_grad,) = torch.autograd.grad(want, eps_hat)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(grad, want_grad)


def test_a_new_seed_or_offset_does_not_recompile():
    """seed and offset are SymInt in the ops' schemas: perturb and the regenerating loss under a new
    offset each step compile twice (the first call specialises), not once per step."""
    from torch._dynamo.testing import CompileCounter

    x, lam, counter = torch.randn(3, 5), torch.tensor([-2.0, 0.0, 3.0]), CompileCounter()
    eps_hat = torch.randn(3, 5, requires_grad=True)

    def step(x, lam, eps_hat, offset):
        out = perturb(x, lam, warm="laplace", warm_std=0.1, seed=offset + 1, offset=offset)
        return out.z, out.eps, denoising_loss(eps_hat, seed=offset + 1, offset=offset, reduction="sum")

    compiled = torch.compile(step, fullgraph=True, backend=counter)
    for offset in range(0, 150, 15):
        got, want = compiled(x, lam, eps_hat, offset), step(x, lam, eps_hat, offset)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(torch.autograd.grad(got[2], eps_hat), torch.autograd.grad(want[2], eps_hat))
    assert counter.frame_count == 2


@pytest.mark.parametrize("regenerate", [False, True])
def test_integrate_step_compiles_fullgraph(regenerate):
    eps_hat, eps = torch.randn(4, 6), torch.randn(4, 6)
    index, weight = torch.tensor([0, 1, 1, 0]), torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=torch.float64)
    kwargs = dict(seed=3, offset=40) if regenerate else {}

    def step(eps_hat, eps, acc):
        integrate_step(eps_hat, None if regenerate else eps, acc, weight=weight, baseline=2.0, index=index, **kwargs)
        return acc

    got = torch.compile(step, fullgraph=True)(eps_hat, eps, torch.zeros(2, 2, dtype=torch.float64))
    torch.testing.assert_close(got, step(eps_hat, eps, torch.zeros(2, 2, dtype=torch.float64)))


# -----------------------------------------------------------------------------
# integrate_step
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("device, backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("regenerate", [False, True])
def test_integrate_step_matches_oracle(device, backend, dtype, regenerate):
    b, d = 5, 53
    eps_hat = sample(b, d, dtype, device, seed=4)
    eps = None if regenerate else sample(b, d, dtype, device, seed=5)
    index = torch.tensor([2, 0, 2, 1, 2], device=device)
    weight = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.25], dtype=torch.float64, device=device)
    baseline = torch.tensor([40.0, 50.0, 60.0, 30.0, 55.0], dtype=torch.float64, device=device)
    kwargs = dict(seed=6, offset=7) if regenerate else {}
    acc = torch.ones(3, 2, dtype=torch.float64, device=device)
    want = acc.clone()
    version = acc._version
    integrate_step(eps_hat, eps, acc, weight=weight, baseline=baseline, index=index, backend=backend, **kwargs)
    assert acc._version > version
    R.integrate_step(eps_hat, eps, want, weight=weight, baseline=baseline, index=index, **kwargs)
    rtol = 1e-5 if regenerate and dtype != torch.float64 else 1e-12  # regenerated eps: a few ulp apart
    torch.testing.assert_close(acc, want, rtol=rtol, atol=rtol * 100)


@pytest.mark.parametrize("device, backend", BACKENDS)
def test_integrate_step_is_deterministic_and_shapes(device, backend):
    eps_hat = torch.randn(6, 3, 64, 64, device=device)  # several chunks per sample
    results, threads = [], torch.get_num_threads()
    try:
        for n_threads in (1, 2, 2):
            torch.set_num_threads(n_threads)
            acc = torch.zeros(2, 2, dtype=torch.float64, device=device)
            integrate_step(eps_hat, None, acc, weight=1.0, index=torch.arange(6, device=device) % 2, seed=1,
                           backend=backend)
            results.append(acc)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    acc = torch.zeros(0, 2, dtype=torch.float64, device=device)
    integrate_step(torch.zeros(0, 4, device=device), None, acc, weight=1.0, seed=0, backend=backend)
    acc = torch.zeros(1, 2, dtype=torch.float64, device=device)
    integrate_step(torch.zeros(1, 4, device=device), torch.ones(1, 4, device=device), acc, weight=2.0,
                   baseline=1.0, backend=backend)
    assert acc.tolist() == [[6.0, 36.0]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_and_integrate_step_over_vector_steps_tails_and_chunks(dtype):
    """d = 2 chunks of 4096 + 43: the CPU kernels' full vector steps, their scalar tail and the
    chunk sums, against the oracle; the float64 sums of the integration step to 1e-12."""
    b, d = 3, 2 * 4096 + 43
    eps_hat, eps = sample(b, d, dtype, "cpu", seed=11), sample(b, d, dtype, "cpu", seed=12)
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    baseline = R.integrate_step(eps_hat, eps, torch.zeros(b, 2, dtype=torch.float64), weight=1.0)[:, 0] * 0.9
    acc, want = torch.zeros(b, 2, dtype=torch.float64), torch.zeros(b, 2, dtype=torch.float64)
    integrate_step(eps_hat, eps, acc, weight=weight, baseline=baseline)
    R.integrate_step(eps_hat, eps, want, weight=weight, baseline=baseline)
    torch.testing.assert_close(acc, want, rtol=1e-12, atol=0)
    leaf, ref_leaf = eps_hat.clone().requires_grad_(), eps_hat.clone().requires_grad_()
    loss = denoising_loss(leaf, eps, weight=weight.float(), reduction="none")
    ref = R.denoising_loss(ref_leaf, eps, weight=weight.float(), reduction="none")
    torch.testing.assert_close(loss, ref, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=0)
    loss.sum().backward()
    ref.sum().backward()
    close(leaf.grad, ref_leaf.grad, dtype)


def test_denoising_loss_does_not_depend_on_the_thread_count():
    eps_hat, eps = torch.randn(6, 3, 64, 64), torch.randn(6, 3, 64, 64)
    results, threads = [], torch.get_num_threads()
    try:
        for n_threads in (1, 2, 2):
            torch.set_num_threads(n_threads)
            leaf = eps_hat.clone().requires_grad_()
            loss = denoising_loss(leaf, eps, reduction="none")
            loss.sum().backward()
            results.append((loss, leaf.grad))
    finally:
        torch.set_num_threads(threads)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


def test_integrate_step_non_contiguous():
    eps_hat = torch.randn(5, 4).t()
    eps = torch.randn(5, 4).t()
    acc, want = torch.zeros(4, 2, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64)
    integrate_step(eps_hat, eps, acc, weight=1.0)
    R.integrate_step(eps_hat, eps, want, weight=1.0)
    torch.testing.assert_close(acc, want, rtol=1e-12, atol=1e-12)


def test_per_sample_finite_check_reads_a_sum_and_falls_back_when_it_overflows():
    """The finiteness check of a (B,) tensor is one sum; a sum that overflows (finite values) is not
    an error, a NaN or infinity anywhere is."""
    acc = torch.zeros(2, 2, dtype=torch.float64)
    integrate_step(X, X, acc, weight=torch.full((2,), 1e308, dtype=torch.float64))  # the sum is inf
    assert acc.tolist() == [[0.0, 0.0], [0.0, 0.0]]
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="weight must be finite everywhere"):
            integrate_step(X, X, acc, weight=torch.tensor([1.0, bad], dtype=torch.float64))
        with pytest.raises(ValueError, match="baseline must be finite everywhere"):
            integrate_step(X, X, acc, weight=1.0, baseline=torch.tensor([bad, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="index contains id -1"):
        integrate_step(X, X, acc, weight=1.0, index=torch.tensor([0, -1]))
    assert acc.tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_float_weights_are_cached_constants_that_nothing_writes():
    eps_hat, eps = torch.randn(3, 5), torch.randn(3, 5)
    for weight, reduction in ((2.0, "none"), (2.0, "mean"), (None, "mean"), (-0.0, "sum")):
        for _ in range(2):
            leaf, ref_leaf = eps_hat.clone().requires_grad_(), eps_hat.clone().requires_grad_()
            loss = denoising_loss(leaf, eps, weight=weight, reduction=reduction)
            ref = R.denoising_loss(ref_leaf, eps, weight=weight, reduction=reduction)
            torch.testing.assert_close(loss, ref)
            (loss * 3).sum().backward()
            (ref * 3).sum().backward()
            torch.testing.assert_close(leaf.grad, ref_leaf.grad)
    assert str(denoising_loss(eps_hat, eps, weight=-0.0, reduction="none")[0].item()) == "-0.0"


# -----------------------------------------------------------------------------
# Op registrations (schemas, fake implementations, autograd under AOT)
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("device, backend", BACKENDS)
def test_opcheck(device, backend):
    if backend == "triton" and device == "cpu":
        pytest.skip("Triton's interpreter cannot run under opcheck's fake and meta tensors")
    suffix = "_triton" if backend == "triton" else ""
    if backend == "triton":
        from fastbound.triton_kernels import continuous_loss  # noqa: F401  (registers the ops)
    ops = torch.ops.fastbound
    x = torch.randn(3, 5, device=device, requires_grad=True)
    per_row = torch.rand(3, device=device)
    torch.library.opcheck(getattr(ops, "continuous_perturb" + suffix).default,
                          (x, per_row, per_row, 2, 0.5, 7, 11, True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    for eps in (torch.randn(3, 5, device=device), None):
        torch.library.opcheck(getattr(ops, "continuous_denoising_loss" + suffix).default,
                              (x, eps, per_row, 7, 11, True),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    acc = torch.zeros(2, 2, dtype=torch.float64, device=device)
    weight = torch.ones(3, dtype=torch.float64, device=device)
    index = torch.tensor([0, 1, 1], device=device)
    torch.library.opcheck(getattr(ops, "continuous_integrate_step" + suffix).default,
                          (x.detach(), None, acc, weight, weight, index, 7, 11),
                          test_utils=("test_schema", "test_faketensor"))


# -----------------------------------------------------------------------------
# Bad input
# -----------------------------------------------------------------------------

X = torch.randn(2, 3)


@pytest.mark.parametrize("device, backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_perturb_finds_a_non_finite_x_anywhere(device, backend, dtype, bad):
    """The CPU kernel checks x as it reads it (no separate pass); the other backends check before.
    The bad value in a vector group of the first tile, in a later tile and in a row's scalar tail;
    the dtype's largest finite values pass, with and without warm-up noise."""
    x = torch.full((3, 1100), torch.finfo(dtype).max, dtype=dtype)
    x[1, ::2] = -torch.finfo(dtype).max
    for warm in (None, "laplace"):
        perturb(x.to(device), 0.0, warm=warm, warm_std=0.5 if warm else 0.0, backend=backend)
    for row, col in ((0, 3), (1, 700), (2, 1099)):
        y = x.clone()
        y[row, col] = bad
        with pytest.raises(ValueError, match="x must be finite everywhere"):
            perturb(y.to(device), 0.0, backend=backend)


@pytest.mark.parametrize("call, error, match", [
    (lambda: perturb(torch.tensor([[1.0, math.nan]]), 0.0), ValueError, "x must be finite"),
    (lambda: perturb(torch.ones(2, 3, dtype=torch.int64), 0.0), TypeError, "x must have dtype"),
    (lambda: perturb(torch.tensor(1.0), 0.0), ValueError, "x must have shape"),
    (lambda: perturb(X, 0.0, warm="cauchy", warm_std=1.0), ValueError, "warm must be one of"),
    (lambda: perturb(X, 0.0, warm="gaussian", warm_std=-0.1), ValueError, "warm_std must be finite and >= 0"),
    (lambda: perturb(X, 0.0, warm="gaussian", warm_std=math.inf), ValueError, "warm_std"),
    (lambda: perturb(X, 0.0, warm_std=0.5), ValueError, "needs a warm-up law"),
    (lambda: perturb(X, torch.zeros(3)), ValueError, "logsnr must have one value per sample"),
    (lambda: perturb(X, torch.zeros(2, 1)), ValueError, "logsnr must be a float or"),
    (lambda: perturb(X, math.nan), ValueError, "logsnr must be finite"),
    (lambda: perturb(X, 0.0, seed=-1), ValueError, "seed must lie in"),
    (lambda: perturb(X, 0.0, offset=2**64), ValueError, "offset must lie in"),
    (lambda: perturb(X, 0.0, seed=1.5), TypeError, "seed must be an int"),
    (lambda: perturb(X, 0.0, backend="cuda"), ValueError, "backend='cuda'"),
    (lambda: denoising_loss(X), ValueError, "needs eps, or seed"),
    (lambda: denoising_loss(X, torch.zeros(3, 2)), ValueError, "eps has shape"),
    (lambda: denoising_loss(X, X.double()), TypeError, "eps has dtype"),
    (lambda: denoising_loss(X, X, seed=1), ValueError, "not both"),
    (lambda: denoising_loss(X, X, offset=3), ValueError, "offset applies only"),
    (lambda: denoising_loss(X, X, reduction="avg"), ValueError, "reduction must be one of"),
    (lambda: denoising_loss(X, X, weight=torch.ones(3)), ValueError, "weight must have one value per sample"),
    (lambda: denoising_loss(X, X.clone().requires_grad_()), ValueError, "eps.detach"),
    (lambda: integrate_step(X, X, torch.zeros(2, 2), weight=1.0), TypeError, "acc must have dtype"),
    (lambda: integrate_step(X, X, torch.zeros(2, 3, dtype=torch.float64), weight=1.0), ValueError, "acc must be"),
    (lambda: integrate_step(X, X, torch.zeros(3, 2, dtype=torch.float64), weight=1.0), ValueError, "one row per"),
    (lambda: integrate_step(X, X, torch.zeros(1, 2, dtype=torch.float64), weight=1.0, index=torch.tensor([0, 1])),
     ValueError, "index contains id 1"),
    (lambda: integrate_step(X, X, torch.zeros(2, 2, dtype=torch.float64), weight=None), ValueError, "weight"),
    (lambda: integrate_step(X, X, torch.zeros(2, 2, dtype=torch.float64), weight=1.0, baseline=math.nan),
     ValueError, "baseline must be finite"),
])  # fmt: skip
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_integrate_step_refuses_an_inference_acc_outside_inference_mode():
    """As PyTorch's own in-place ops: the op runs below autograd, so the rule is checked by hand."""
    eps_hat, eps = torch.randn(3, 5), torch.randn(3, 5)
    with torch.inference_mode():
        acc = torch.zeros(3, 2, dtype=torch.float64)
        integrate_step(eps_hat, eps, acc, weight=1.0)  # inside: allowed
    before = acc.clone()
    with pytest.raises(RuntimeError, match="inference tensor"):
        integrate_step(eps_hat, eps, acc, weight=1.0)
    assert torch.equal(acc, before)


# -----------------------------------------------------------------------------
# The checked-signature path (`_args.signature`): a call like one already checked skips the
# shape, dtype, device and backend checks, never the value checks
# -----------------------------------------------------------------------------


def count_full_checks(monkeypatch) -> list:
    """Counts calls through the full argument checks (`_args.eps_pair`), from no signature checked."""
    from fastbound.continuous import _args

    monkeypatch.setattr(_args, "_CHECKED", SignatureTable())
    calls, eps_pair = [], _args.eps_pair
    monkeypatch.setattr(_args, "eps_pair", lambda *a: calls.append(1) or eps_pair(*a))
    return calls


def full_path(monkeypatch) -> None:
    from fastbound.continuous import _args

    monkeypatch.setattr(_args, "checked_backend", lambda key: None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("regenerate", [False, True])
def test_checked_signature_equals_the_full_path(monkeypatch, dtype, regenerate):
    eps_hat = sample(4, 3 * 37, dtype, "cpu", seed=20).reshape(4, 3, 37)
    eps = None if regenerate else sample(4, 3 * 37, dtype, "cpu", seed=21).reshape(4, 3, 37)
    kwargs = dict(seed=5, offset=9) if regenerate else {}
    weight = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)

    def run():
        leaf = eps_hat.clone().requires_grad_()
        loss = denoising_loss(leaf, eps, weight=weight.float() if dtype != torch.float64 else weight,
                              reduction="mean", **kwargs)
        (loss * 3).backward()
        acc = torch.ones(4, 2, dtype=torch.float64)
        version = acc._version
        integrate_step(eps_hat, eps, acc, weight=weight, baseline=torch.full((4,), 7.0, dtype=torch.float64),
                       **kwargs)
        assert acc._version > version
        acc_float = torch.zeros(4, 2, dtype=torch.float64)
        integrate_step(eps_hat, eps, acc_float, weight=0.5, baseline=3.0, **kwargs)
        return loss.detach(), leaf.grad, acc, acc_float

    calls = count_full_checks(monkeypatch)
    first = run()
    assert len(calls) == 2  # the loss and the integration step (the weight is not in its signature)
    checked = run()
    assert len(calls) == 2
    full_path(monkeypatch)
    full = run()
    assert len(calls) == 5
    for got, want, ref in zip(checked, full, first):
        assert torch.equal(got, want) and torch.equal(got, ref)


def test_checked_signature_keeps_the_value_checks_and_autograd_rules(monkeypatch):
    eps_hat, eps = torch.randn(2, 3), torch.randn(2, 3)
    acc = torch.zeros(2, 2, dtype=torch.float64)
    calls = count_full_checks(monkeypatch)
    for _ in range(2):
        integrate_step(eps_hat, eps, acc, weight=torch.ones(2, dtype=torch.float64),
                       baseline=torch.zeros(2, dtype=torch.float64))
        integrate_step(eps_hat, eps, acc, weight=1.0, baseline=0.0)
        denoising_loss(eps_hat, None, seed=1)
    n_full = len(calls)
    before = acc.clone()
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="weight must be finite everywhere"):
            integrate_step(eps_hat, eps, acc, weight=torch.tensor([1.0, bad], dtype=torch.float64),
                           baseline=torch.zeros(2, dtype=torch.float64))
        with pytest.raises(ValueError, match="baseline must be finite everywhere"):
            integrate_step(eps_hat, eps, acc, weight=torch.ones(2, dtype=torch.float64),
                           baseline=torch.tensor([0.0, bad], dtype=torch.float64))
        with pytest.raises(ValueError, match="weight must be finite"):
            integrate_step(eps_hat, eps, acc, weight=bad, baseline=0.0)
    with pytest.raises(ValueError, match="seed must lie in"):
        denoising_loss(eps_hat, None, seed=-1)
    assert len(calls) == n_full  # all on the checked path
    assert torch.equal(acc, before)
    # A product that overflows (finite values) is no error: each tensor is then checked alone.
    big = torch.full((2,), 1e200, dtype=torch.float64)
    integrate_step(eps_hat, eps, acc, weight=big, baseline=big)
    with pytest.raises(ValueError, match="one row per"):  # another signature: checked again
        integrate_step(eps_hat, eps, torch.zeros(3, 2, dtype=torch.float64), weight=1.0)
    with torch.inference_mode():
        inference_acc = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="inference tensor"):
        integrate_step(eps_hat, eps, inference_acc, weight=1.0, baseline=0.0)
    # The loss: retain_graph (a new tensor each backward), inference mode, differentiable once.
    leaf = eps_hat.clone().requires_grad_()
    for _ in range(2):
        loss = denoising_loss(leaf, eps, reduction="sum")
    loss.backward(retain_graph=True)
    first = leaf.grad.clone()
    loss.backward()
    torch.testing.assert_close(leaf.grad, 2 * first)
    torch.testing.assert_close(first, eps_hat - eps)
    with torch.inference_mode():
        torch.testing.assert_close(denoising_loss(leaf, eps, reduction="sum"), loss.detach())
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(denoising_loss(leaf, eps, reduction="sum"), leaf, create_graph=True)
    assert len(calls) == n_full + 2  # the 3-row acc and the loss's first call with eps


def count_cpu_loss(monkeypatch) -> list:
    """Counts the loss calls through the one C++ op ``continuous_loss`` (`_ops.cpu_loss`), from no
    signature checked."""
    from fastbound.continuous import _args, _ops

    monkeypatch.setattr(_args, "_CHECKED", SignatureTable())

    calls, cpu_loss = [], _ops.cpu_loss
    monkeypatch.setattr(_ops, "cpu_loss", lambda *a: calls.append(1) or cpu_loss(*a))
    return calls


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_cpu_loss_op_backward_forms(monkeypatch, reduction):
    """The C++ backward: a unit upstream hands out the forward's buffer (the leaf's grad is that
    memory), any other upstream rescales it per row, a retained graph gets a new tensor each time;
    all as the full path and the oracle."""
    calls = count_full_checks(monkeypatch)
    cpu_calls = count_cpu_loss(monkeypatch)
    eps_hat, eps = torch.randn(5, 2, 7), torch.randn(5, 2, 7)
    weight = torch.tensor([1.0, 2.0, 0.5, 0.0, 3.0])
    upstreams = [torch.ones(5), torch.arange(5.0) - 1] if reduction == "none" else [torch.tensor(1.0),
                                                                                     torch.tensor(-2.5)]
    denoising_loss(eps_hat, eps, weight=weight, reduction=reduction)  # checks the signature
    for upstream in upstreams:
        leaf, ref_leaf = eps_hat.clone().requires_grad_(), eps_hat.clone().requires_grad_()
        loss = denoising_loss(leaf, eps, weight=weight, reduction=reduction)
        ref = R.denoising_loss(ref_leaf, eps, weight=weight, reduction=reduction)
        torch.testing.assert_close(loss, ref)
        loss.backward(upstream, retain_graph=True)
        ref.backward(upstream)
        torch.testing.assert_close(leaf.grad, ref_leaf.grad)
        retained = leaf.grad.clone()
        leaf.grad = None
        loss.backward(upstream)
        torch.testing.assert_close(leaf.grad, retained)
        leaf.grad = None
        loss = denoising_loss(leaf, eps, weight=weight, reduction=reduction)
        loss.backward(upstream)
        torch.testing.assert_close(leaf.grad, retained)
    assert len(calls) == 1 and len(cpu_calls) == 4
    leaf = eps_hat.clone().requires_grad_()
    with torch.no_grad():
        assert not denoising_loss(leaf, eps, weight=weight, reduction=reduction).requires_grad
    with torch.inference_mode():
        torch.testing.assert_close(denoising_loss(leaf, eps, weight=weight, reduction=reduction),
                                   R.denoising_loss(eps_hat, eps, weight=weight, reduction=reduction))
    assert len(cpu_calls) == 6


def test_cpu_loss_op_flattens_any_strides_and_means_no_sample_as_nan(monkeypatch):
    cpu_calls = count_cpu_loss(monkeypatch)
    eps_hat = torch.randn(3, 4, 5).transpose(1, 2)  # not contiguous: flattened to a copy
    for _ in range(2):
        leaf = eps_hat.detach().requires_grad_()
        loss = denoising_loss(leaf, seed=3, offset=1)
        grad_fn = loss.grad_fn
        loss.backward()
    assert len(cpu_calls) == 1 and "ContinuousLoss" in grad_fn.name()
    ref_leaf = eps_hat.detach().clone().requires_grad_()
    R.denoising_loss(ref_leaf, seed=3, offset=1).backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad)
    assert leaf.grad.shape == eps_hat.shape
    empty = torch.zeros(0, 3)
    for _ in range(2):
        assert denoising_loss(empty, empty).isnan()
        assert denoising_loss(empty, empty, reduction="sum").item() == 0
    assert len(cpu_calls) == 3


def test_cpu_loss_opcheck():
    per_row = torch.rand(3)
    for eps in (torch.randn(3, 2, 5), None):
        for reduction in (0, 1, 2):
            torch.library.opcheck(torch.ops.fastbound.continuous_loss.default,
                                  (torch.randn(3, 2, 5, requires_grad=True), eps, per_row, 7, 11, reduction),
                                  test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_cpu_integrate_op_forms(monkeypatch):
    """``continuous_integrate`` (the checked CPU call): float and (B,) float64 weight and baseline,
    no baseline, regenerated eps, an eps_hat that requires grad, inference mode; as the full path.
    Other forms (a float32 or (1,) weight) take the Python path."""
    from fastbound.continuous import _ops

    calls = count_full_checks(monkeypatch)
    cpu_calls, cpu_integrate = [], _ops.cpu_integrate
    monkeypatch.setattr(_ops, "cpu_integrate", lambda *a: cpu_calls.append(1) or cpu_integrate(*a))
    eps_hat, eps = torch.randn(3, 2, 5).transpose(1, 2), torch.randn(3, 5, 2)
    weight, baseline = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64), torch.tensor([3.0, -1.0, 0.0],
                                                                                        dtype=torch.float64)
    forms = [dict(weight=weight, baseline=baseline), dict(weight=2.0), dict(weight=1, baseline=-0.5),
             dict(weight=weight.float()), dict(weight=weight[:1].clone(), baseline=baseline)]
    for e, seed in ((eps, None), (None, 4)):
        for form in forms:
            want = torch.ones(3, 2, dtype=torch.float64)
            R.integrate_step(eps_hat, e, want, seed=seed, **form)
            for _ in range(2):
                acc = torch.ones(3, 2, dtype=torch.float64)
                version = acc._version
                integrate_step(eps_hat.requires_grad_(), e, acc, seed=seed, **form)
                assert acc._version > version
                torch.testing.assert_close(acc, want, rtol=1e-5 if seed else 1e-12, atol=1e-9)
                eps_hat = eps_hat.detach()
    assert len(calls) == 2 and len(cpu_calls) == 2 * (2 * 3 - 1)  # the first call of each eps checks
    with torch.inference_mode():
        acc = torch.ones(3, 2, dtype=torch.float64)
        integrate_step(eps_hat, eps, acc, weight=2.0)
    assert len(cpu_calls) == 2 * 5 + 1
    torch.library.opcheck(torch.ops.fastbound.continuous_integrate.default,
                          (eps_hat, eps, torch.zeros(3, 2, dtype=torch.float64), weight, 0.0, None, 1.5, 7, 11),
                          test_utils=("test_schema", "test_faketensor"))


def test_finite_rows_read_once_and_fall_back_when_the_product_overflows():
    from fastbound.continuous import _args

    big = torch.full((3,), 1e200, dtype=torch.float64)
    _args.check_finite_rows({"weight": big, "baseline": big}, True)  # the dot is inf: each checked alone
    for bad in (math.nan, math.inf, -math.inf):
        for zero in (0.0, 1.0):  # inf times 0 is NaN, times 1 inf: the dot is never finite
            t = torch.tensor([1.0, bad, 2.0], dtype=torch.float64)
            other = torch.tensor([1.0, zero, 2.0], dtype=torch.float64)
            with pytest.raises(ValueError, match="baseline must be finite everywhere"):
                _args.check_finite_rows({"weight": other, "baseline": t}, True)
            with pytest.raises(ValueError, match="weight must be finite everywhere"):
                _args.check_finite_rows({"weight": t, "baseline": other}, True)


def test_a_non_str_reduction_is_checked_on_every_call():
    # Only a plain str keys the checked-call cache: a numpy str that passed must not let None through.
    np = pytest.importorskip("numpy")
    eps_hat, eps = torch.randn(4, 6), torch.randn(4, 6)
    denoising_loss(eps_hat, eps, reduction=np.str_("mean"))
    with pytest.raises(ValueError, match="reduction"):
        denoising_loss(eps_hat, eps, reduction=None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("return_warm", [False, True])
def test_perturb_16_bit_gradient_to_x_rounds_once(dtype, return_warm):
    """dz/dx = α and dx̃/dx = 1: the backward forms grad_z·α (+ grad_x̃) in α's float32 and rounds it
    once to x's dtype, bit for bit as the oracle's autograd does, and so does forward-mode AD. α
    rounded to the 16-bit dtype first was off by one unit in a quarter of the elements, and at
    λ = -30 (α ≈ 3e-7, subnormal in float16) the float16 gradient was 2.6% low."""
    lam = torch.tensor([-30.0, -12.0, 0.3, 5.0])
    x = torch.randn(4, 37).to(dtype).requires_grad_()
    grads = (torch.randn(4, 37) * 8).to(dtype), torch.randn(4, 37).to(dtype)
    got = perturb(x, lam, warm="gaussian", warm_std=0.1, seed=1, return_warm=return_warm)
    want = R.perturb(x, lam, warm="gaussian", warm_std=0.1, seed=1)
    outs = [(got.z, want[0])] + ([(got.x_warm, want[2])] if return_warm else [])
    got_grad = torch.autograd.grad(sum((o * g).sum() for (o, _), g in zip(outs, grads)), x)[0]
    want_grad = torch.autograd.grad(sum((w * g).sum() for (_, w), g in zip(outs, grads)), x)[0]
    assert torch.equal(got_grad, want_grad)
    with torch.autograd.forward_ad.dual_level():
        tangent = grads[0]
        z = perturb(torch.autograd.forward_ad.make_dual(x.detach(), tangent), lam, warm="gaussian", warm_std=0.1,
                    seed=1).z
        jvp = torch.autograd.forward_ad.unpack_dual(z).tangent
    assert torch.equal(jvp, (tangent.float() * R.alpha_sigma(lam)[0][:, None].float()).to(dtype))
