"""The CPU losses' pool of reused gradient buffers (csrc/cpu/buffer_pool.h, `fastbound.cpu_buffer_cache`).

A reused buffer holds the previous call's gradient: every kernel must overwrite all of it (masked
and unmasked rows, ignored positions, the mask column), so each test here first fills the pool
with a buffer of NaNs of the right size and then checks the next gradient against the oracle.
"""

import os
import subprocess
import sys

import pytest
import torch

import fastbound
from fastbound import reference

V = 32771  # 64 rows of it are 8 MiB in fp32 (4 MiB bf16): above the pool's 1 MiB minimum
ROWS = 64


@pytest.fixture(autouse=True)
def fresh_pool():
    before = fastbound.cpu_buffer_cache().max_bytes
    fastbound.cpu_buffer_cache(0)
    fastbound.cpu_buffer_cache(1 << 30)
    yield
    fastbound.cpu_buffer_cache(0)
    fastbound.cpu_buffer_cache(before)


def poison(shape, dtype):
    """Leaves a NaN-filled buffer of `shape` in the pool (through a loss's gradient)."""
    rows, v = shape
    score = torch.zeros(rows, v, dtype=dtype, requires_grad=True)
    x_t = torch.full((rows,), v - 1)
    sigma = torch.ones(rows)
    fastbound.dse_loss(score, sigma, x_t, torch.zeros(rows, dtype=torch.long), graph="absorb",
                       reduction="sum").backward()
    score.grad.fill_(float("nan"))
    held = fastbound.cpu_buffer_cache().held_bytes
    score.grad = None
    assert fastbound.cpu_buffer_cache().held_bytes > held


def inputs(dtype, generator, mask_rate=0.5):
    score = torch.randn(ROWS, V, generator=generator).to(dtype)
    x0 = torch.randint(0, V - 1, (ROWS,), generator=generator)
    masked = torch.rand(ROWS, generator=generator) < mask_rate
    x_t = torch.where(masked, torch.full_like(x0, V - 1), x0)
    sigma = torch.rand(ROWS, generator=generator) + 0.1
    return score, sigma, x_t, x0


def grad_of(fn, score, *args, **kwargs):
    leaf = score.detach().requires_grad_()
    fn(leaf, *args, **kwargs).sum().backward()
    return leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", ["dse_absorb", "dse_uniform", "dce"])
def test_a_reused_buffer_is_overwritten_whole(loss, dtype):
    generator = torch.Generator().manual_seed(1)
    score, sigma, x_t, x0 = inputs(dtype, generator)
    if loss == "dce":
        x0 = x0.clone()
        x0[::7] = -100  # ignored positions: zero gradient rows
        args, kwargs, fb, ref = (x_t, x0), {"mask_id": V - 1}, fastbound.dce_loss, reference.dce_loss
    else:
        graph = loss.split("_")[1]
        args, kwargs, fb, ref = (sigma, x_t, x0), {"graph": graph}, fastbound.dse_loss, reference.dse_loss
    poison((ROWS, V), dtype)
    got = grad_of(fb, score, *args, **kwargs)
    assert fastbound.cpu_buffer_cache().held_bytes == 0, "the call did not take the pooled buffer"
    want = grad_of(ref, score.double(), *args, **kwargs)
    assert not got.isnan().any()
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got.double(), want, **tol)


def test_buffers_are_reused_and_bounded():
    generator = torch.Generator().manual_seed(2)
    score, sigma, x_t, x0 = inputs(torch.float32, generator)
    first = grad_of(fastbound.dse_loss, score, sigma, x_t, x0, graph="absorb")
    pointer = first.data_ptr()
    del first
    held = fastbound.cpu_buffer_cache().held_bytes
    assert held >= ROWS * V * 4
    assert grad_of(fastbound.dse_loss, score, sigma, x_t, x0, graph="absorb").data_ptr() == pointer
    assert fastbound.cpu_buffer_cache(held - 1).held_bytes == 0  # one buffer does not fit: kept none
    grad = grad_of(fastbound.dse_loss, score, sigma, x_t, x0, graph="absorb")
    del grad
    assert fastbound.cpu_buffer_cache().held_bytes == 0
    assert fastbound.cpu_buffer_cache(0) == (0, 0)


def test_accumulating_into_a_pooled_gradient():
    generator = torch.Generator().manual_seed(3)
    score, sigma, x_t, x0 = inputs(torch.float32, generator)
    leaf = score.detach().requires_grad_()
    for _ in range(2):
        fastbound.dse_loss(leaf, sigma, x_t, x0, graph="absorb", reduction="sum").backward()
    want = 2 * grad_of(reference.dse_loss, score, sigma, x_t, x0, graph="absorb")
    torch.testing.assert_close(leaf.grad, want, atol=1e-5, rtol=1e-5)


def test_profiler_sees_the_pooled_gradient():
    generator = torch.Generator().manual_seed(4)
    score, sigma, x_t, x0 = inputs(torch.float32, generator)
    grad_of(fastbound.dse_loss, score, sigma, x_t, x0, graph="absorb")  # leaves a buffer in the pool
    leaf = score.detach().requires_grad_()
    with torch.profiler.profile(profile_memory=True) as prof:
        fastbound.dse_loss(leaf, sigma, x_t, x0, graph="absorb", reduction="sum").backward()
    assert max(e.cpu_memory_usage for e in prof.events()) >= score.nbytes


def test_small_gradients_bypass_the_pool():
    score = torch.randn(4, 9, requires_grad=True)
    fastbound.dce_loss(score, torch.full((4,), 8), torch.zeros(4, dtype=torch.long), mask_id=8).sum().backward()
    score.grad = None
    assert fastbound.cpu_buffer_cache().held_bytes == 0


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("1", TypeError)])
def test_bad_max_bytes(bad, error):
    with pytest.raises(error, match="max_bytes"):
        fastbound.cpu_buffer_cache(bad)


def test_environment_sets_the_bound_and_exit_with_live_tensors_is_clean():
    code = ("import fastbound, torch; print(fastbound.cpu_buffer_cache().max_bytes);"
            "s = torch.zeros(64, 32771, requires_grad=True);"
            "fastbound.dce_loss(s, torch.full((64,), 1), torch.zeros(64, dtype=torch.long), mask_id=1).sum().backward();"
            "keep = s.grad")
    env = dict(os.environ, FASTBOUND_CPU_BUFFER_CACHE="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "12345"


def test_perturb_writes_its_reused_outputs_whole():
    from fastbound import continuous

    x = torch.randn(128, 3 * 32 * 32, generator=torch.Generator().manual_seed(5))  # 1.5 MiB: pooled
    lam = torch.linspace(-5, 5, x.shape[0])
    fastbound.cpu_buffer_cache(0)
    want = continuous.perturb(x, lam, warm="uniform", warm_std=0.1, seed=3, return_warm=True)
    fastbound.cpu_buffer_cache(1 << 30)
    for _ in range(3):  # buffers of the same size, then NaN-filled, back into the pool
        junk = continuous.perturb(x, lam, warm="gaussian", warm_std=0.2, seed=9, return_warm=True)
        for t in (junk.z, junk.eps, junk.x_warm):
            t.fill_(float("nan"))
        del junk, t
    assert fastbound.cpu_buffer_cache().held_bytes >= 3 * x.nbytes
    got = continuous.perturb(x, lam, warm="uniform", warm_std=0.1, seed=3, return_warm=True)
    assert fastbound.cpu_buffer_cache().held_bytes < 3 * x.nbytes, "perturb did not take the pooled buffers"
    for name in ("z", "eps", "x_warm"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_denoising_loss_writes_its_reused_gradient_whole(dtype):
    from fastbound import continuous
    from fastbound.continuous import reference as creference

    generator = torch.Generator().manual_seed(6)
    eps_hat = torch.randn(128, 3 * 32 * 32 * 2, generator=generator).to(dtype)  # >= 1 MiB: pooled
    eps = torch.randn(eps_hat.shape, generator=generator).to(dtype)
    weight = torch.rand(128, generator=generator)
    for _ in range(2):
        junk = eps_hat.detach().requires_grad_()
        continuous.denoising_loss(junk, eps, reduction="sum").backward()
        junk.grad.fill_(float("nan"))
        del junk
    leaf = eps_hat.detach().requires_grad_()
    continuous.denoising_loss(leaf, eps, weight=weight, reduction="sum").backward()
    oracle = eps_hat.double().requires_grad_()
    creference.denoising_loss(oracle, eps.double(), weight=weight.double(), reduction="sum").backward()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(leaf.grad.double(), oracle.grad, **tol)


def test_a_new_size_releases_the_free_buffers_of_old_sizes():
    generator = torch.Generator().manual_seed(7)
    score, sigma, x_t, x0 = inputs(torch.float32, generator)
    grad_of(fastbound.dse_loss, score, sigma, x_t, x0, graph="absorb")
    assert fastbound.cpu_buffer_cache().held_bytes >= score.nbytes
    half = slice(0, ROWS // 2)
    grad = grad_of(fastbound.dse_loss, score[half], sigma[half], x_t[half], x0[half], graph="absorb")
    assert fastbound.cpu_buffer_cache().held_bytes == 0, "a buffer of the old size is still held"
    del grad
    assert 0 < fastbound.cpu_buffer_cache().held_bytes < score.nbytes
