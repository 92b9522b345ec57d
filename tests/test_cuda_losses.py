"""The CUDA C++ loss kernels (csrc/cuda/losses.cu) against the oracle and the CPU kernels.

Needs a CUDA device and a fastbound built against a CUDA torch (skipped otherwise).
Every test compares values and gradients with `fastbound.reference` evaluated in
float64, and with the C++ CPU kernels on the same data. Row lengths cover both
kernel shapes (a warp per row up to V = 1024, a block per row above) and sizes
that are not multiples of the 16-byte vector width.
"""

from __future__ import annotations

import pytest
import torch

import fastbound as fb
from fastbound import _backend, reference

DEVICE = "cuda"
BACKEND = "cuda"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        torch.cuda.is_available() and not _backend.has_cuda_kernels(),
        reason="fastbound was built without CUDA kernels (rebuild against a CUDA torch)",
    ),
]

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Warp-per-row sizes (<= 1024) and block-per-row sizes, odd and even.
VOCABS = [2, 7, 33, 1000, 1025, 5003, 50257]
IGNORE = -100

# (rtol, atol) for the gradient, whose entries are rounded to the score dtype.
GRAD_TOL = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (1e-4, 1e-6),
    torch.bfloat16: (2e-2, 2e-3),
    torch.float16: (4e-3, 1e-4),
}
LOSS_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1e-4, torch.float16: 1e-4}


def _case(shape, vocab, dtype, *, graph="absorb", mask_id=None, seed=0):
    """Scores, sigma, ids and weights for `shape` positions: masked, unmasked and ignored ones."""
    g = torch.Generator().manual_seed(seed)
    score = (torch.randn(*shape, vocab, generator=g) * 2).to(dtype)
    sigma = torch.rand(shape, generator=g, dtype=torch.float64) * 3 + 0.05
    weight = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
    if graph == "uniform":
        x0 = torch.randint(0, vocab, shape, generator=g)
        x_t = torch.where(torch.rand(shape, generator=g) < 0.3, x0, torch.randint(0, vocab, shape, generator=g))
    else:
        mask = vocab - 1 if mask_id is None else mask_id
        n_tokens = vocab - 1 if graph == "absorb" or mask < vocab else vocab
        x0 = torch.randint(0, n_tokens, shape, generator=g)
        if graph == "dce" and mask < vocab:
            x0 = torch.where(x0 >= mask, x0 + 1, x0)  # real tokens skip the mask column
        x_t = torch.where(torch.rand(shape, generator=g) < 0.6, torch.full(shape, mask), x0)
    x0 = torch.where(torch.rand(shape, generator=g) < 0.15, torch.full(shape, IGNORE), x0)
    return score, sigma, x_t, x0, weight


def _on(device, *tensors):
    return [t.to(device) for t in tensors]


def _grad_of(fn, score):
    """(loss per position, d sum(loss) / d score) of fn(score) with a leaf copy of score."""
    leaf = score.detach().clone().requires_grad_(True)
    out = fn(leaf)
    out.sum().backward()
    return out.detach(), leaf.grad


def _check(got, want, dtype, what):
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=rtol, atol=atol, msg=what)


def _check_loss(got, want, dtype, what):
    rtol = LOSS_RTOL[dtype]
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=rtol, atol=rtol, msg=what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_dse_matches_reference_and_cpu(graph, vocab, dtype):
    score, sigma, x_t, x0, weight = _case((3, 5), vocab, dtype, graph=graph, seed=vocab)
    s, sg, xt, x0d, w = _on(DEVICE, score, sigma, x_t, x0, weight)

    def kernel(backend, sig, ids_t, ids_0, wt):
        return lambda t: fb.dse_loss(t, sig, ids_t, ids_0, graph=graph, weight=wt, ignore_index=IGNORE, backend=backend)

    loss, grad = _grad_of(kernel(BACKEND, sg, xt, x0d, w), s)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype and grad.shape == score.shape

    ref_loss, ref_grad = _grad_of(
        lambda t: reference.dse_loss(t, sg, xt, x0d, graph=graph, weight=w, ignore_index=IGNORE), s.double()
    )
    _check_loss(loss, ref_loss, dtype, "loss vs reference")
    _check(grad, ref_grad, dtype, "grad vs reference")

    cpu_loss, cpu_grad = _grad_of(kernel("cpu", sigma, x_t, x0, weight), score)
    _check_loss(loss, cpu_loss, dtype, "loss vs CPU kernel")
    _check(grad, cpu_grad, dtype, "grad vs CPU kernel")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("mask_at", ["last", "first", "outside"])
def test_dce_matches_reference_and_cpu(mask_at, vocab, dtype):
    mask_id = {"last": vocab - 1, "first": 0, "outside": vocab}[mask_at]
    score, _, x_t, x0, weight = _case((3, 5), vocab, dtype, graph="dce", mask_id=mask_id, seed=vocab + 1)
    s, xt, x0d, w = _on(DEVICE, score, x_t, x0, weight)

    def kernel(backend, ids_t, ids_0, wt):
        return lambda t: fb.dce_loss(t, ids_t, ids_0, mask_id=mask_id, weight=wt, ignore_index=IGNORE, backend=backend)

    loss, grad = _grad_of(kernel(BACKEND, xt, x0d, w), s)
    ref_loss, ref_grad = _grad_of(
        lambda t: reference.dce_loss(t, xt, x0d, mask_id=mask_id, weight=w, ignore_index=IGNORE), s.double()
    )
    _check_loss(loss, ref_loss, dtype, "loss vs reference")
    _check(grad, ref_grad, dtype, "grad vs reference")

    cpu_loss, cpu_grad = _grad_of(kernel("cpu", x_t, x0, weight), score)
    _check_loss(loss, cpu_loss, dtype, "loss vs CPU kernel")
    _check(grad, cpu_grad, dtype, "grad vs CPU kernel")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [9, 1000, 5003])
@pytest.mark.parametrize("loss_name", ["absorb", "uniform", "dce"])
def test_inplace_matches_functional(loss_name, vocab, dtype):
    score, sigma, x_t, x0, weight = _case((4, 3), vocab, dtype, graph=loss_name, seed=7)
    s, sg, xt, x0d, w = _on(DEVICE, score, sigma, x_t, x0, weight)

    def run(inplace):
        def fn(t):
            if loss_name == "dce":
                return fb.dce_loss(t, xt, x0d, weight=w, reduction="sum", inplace=inplace, backend=BACKEND)
            return fb.dse_loss(t, sg, xt, x0d, graph=loss_name, weight=w, reduction="sum", inplace=inplace,
                               backend=BACKEND)

        return fn

    loss, grad = _grad_of(run(False), s)
    # In place: the leaf's data is overwritten with the gradient, so pass a non-leaf copy.
    leaf = s.detach().clone().requires_grad_(True)
    loss_ip = run(True)(leaf * 1)
    loss_ip.backward()
    torch.testing.assert_close(loss_ip, loss, rtol=0, atol=0)
    torch.testing.assert_close(leaf.grad, grad, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab", [33, 5003])
def test_inplace_overwrites_scores_with_gradient(vocab, dtype):
    score, sigma, x_t, x0, _ = _case((6,), vocab, dtype, seed=3)
    s, sg, xt, x0d = _on(DEVICE, score, sigma, x_t, x0)
    flat = s.clone()
    row_scale = torch.ones(6, device=DEVICE, dtype=torch.float32)
    sigma32 = sg.float()
    loss_ip = torch.ops.fastbound.dse_forward_inplace(flat, sigma32, xt, x0d, row_scale, 0, vocab - 1, IGNORE)
    loss, grad = torch.ops.fastbound.dse_forward(s, sigma32, xt, x0d, row_scale, 0, vocab - 1, IGNORE, True)
    torch.testing.assert_close(loss_ip, loss, rtol=0, atol=0)
    torch.testing.assert_close(flat, grad, rtol=0, atol=0)


@pytest.mark.parametrize("vocab", [7, 1025])
@pytest.mark.parametrize("loss_name", ["absorb", "uniform", "dce"])
def test_strided_and_misaligned_rows(loss_name, vocab):
    """Rows with a stride > V that start off the 16-byte grid take the scalar path; same results."""
    score, sigma, x_t, x0, _ = _case((5,), vocab, torch.float32, graph=loss_name, seed=11)
    s, sg, xt, x0d = _on(DEVICE, score, sigma, x_t, x0)
    big = torch.randn(5, vocab + 3, device=DEVICE)
    big[:, 1 : vocab + 1] = s
    big.requires_grad_(True)
    view = big[:, 1 : vocab + 1]
    assert view.stride() == (vocab + 3, 1) and view.data_ptr() % 16 != 0

    def fn(t):
        if loss_name == "dce":
            return fb.dce_loss(t, xt, x0d, backend=BACKEND)
        return fb.dse_loss(t, sg, xt, x0d, graph=loss_name, backend=BACKEND)

    loss, grad = _grad_of(fn, s)
    loss_view = fn(view)
    loss_view.sum().backward()
    torch.testing.assert_close(loss_view.detach(), loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(big.grad[:, 1 : vocab + 1], grad, rtol=1e-6, atol=1e-7)
    assert (big.grad[:, 0] == 0).all() and (big.grad[:, vocab + 1 :] == 0).all()


@pytest.mark.parametrize("loss_name", ["absorb", "uniform", "dce"])
def test_empty_batch(loss_name):
    score = torch.randn(0, 4, 11, device=DEVICE, requires_grad=True)
    ids = torch.zeros(0, 4, dtype=torch.long, device=DEVICE)
    if loss_name == "dce":
        loss = fb.dce_loss(score, ids, ids, backend=BACKEND)
    else:
        loss = fb.dse_loss(score, 1.0, ids, ids, graph=loss_name, backend=BACKEND)
    assert loss.shape == (0, 4)
    loss.sum().backward()
    assert score.grad.shape == score.shape


def test_single_token():
    score = torch.randn(1, 50257, device=DEVICE, dtype=torch.bfloat16)
    x_t = torch.tensor([50256], device=DEVICE)
    x0 = torch.tensor([123], device=DEVICE)
    loss, grad = _grad_of(lambda t: fb.dce_loss(t, x_t, x0, backend=BACKEND), score)
    ref_loss, ref_grad = _grad_of(lambda t: reference.dce_loss(t, x_t, x0), score.double())
    _check_loss(loss, ref_loss, torch.bfloat16, "loss")
    _check(grad, ref_grad, torch.bfloat16, "grad")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reductions(reduction):
    score, sigma, x_t, x0, weight = _case((4, 6), 300, torch.float32, seed=5)
    s, sg, xt, x0d, w = _on(DEVICE, score, sigma, x_t, x0, weight)
    got, grad = _grad_of(
        lambda t: fb.dse_loss(t, sg, xt, x0d, weight=w, reduction=reduction, ignore_index=IGNORE, backend=BACKEND), s
    )
    want, ref_grad = _grad_of(
        lambda t: reference.dse_loss(t, sg, xt, x0d, weight=w, reduction=reduction, ignore_index=IGNORE), s.double()
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_dse_gradcheck_float64(graph):
    score, sigma, x_t, x0, weight = _case((2, 3), 9, torch.float64, graph=graph, seed=2)
    s, sg, xt, x0d, w = _on(DEVICE, score, sigma, x_t, x0, weight)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: fb.dse_loss(t, sg, xt, x0d, graph=graph, weight=w, ignore_index=IGNORE, backend=BACKEND), (s,)
    )


def test_dce_gradcheck_float64():
    score, _, x_t, x0, weight = _case((2, 3), 9, torch.float64, graph="dce", seed=4)
    s, xt, x0d, w = _on(DEVICE, score, x_t, x0, weight)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: fb.dce_loss(t, xt, x0d, weight=w, ignore_index=IGNORE, backend=BACKEND), (s,)
    )


@pytest.mark.parametrize("vocab", [9, 2000])
def test_raw_op_out_of_range_ids_give_nan_rows(vocab):
    """The kernels never read out of bounds: a bad id (which the Python layer would
    reject in eager mode) gives that row a NaN loss and gradient; other rows are exact."""
    n = 4
    score = torch.randn(n, vocab, device=DEVICE)
    row_scale = torch.ones(n, device=DEVICE)
    sigma = torch.ones(n, device=DEVICE)
    x_t = torch.full((n,), vocab - 1, device=DEVICE)
    x0 = torch.tensor([0, vocab + 5, -3, 1], device=DEVICE)
    for loss, grad in (
        torch.ops.fastbound.dse_forward(score, sigma, x_t, x0, row_scale, 0, vocab - 1, IGNORE, True),
        torch.ops.fastbound.dse_forward(score, sigma, x_t, x0, row_scale, 1, -1, IGNORE, True),
        torch.ops.fastbound.dce_forward(score, x_t, x0, row_scale, vocab - 1, IGNORE, True),
    ):
        assert torch.isnan(loss[1:3]).all() and torch.isnan(grad[1:3]).all()
        assert torch.isfinite(loss[[0, 3]]).all() and torch.isfinite(grad[[0, 3]]).all()
    bad_x_t = torch.tensor([0, vocab, -1, vocab - 1], device=DEVICE)
    good_x0 = x0.clamp(0, vocab - 2)
    loss, grad = torch.ops.fastbound.dse_forward(score, sigma, bad_x_t, good_x0, row_scale, 0, vocab - 1, IGNORE, True)
    assert torch.isnan(loss[1:3]).all() and torch.isnan(grad[1:3]).all()
    assert loss[0] == 0 and (grad[0] == 0).all()


def test_bad_ids_raise_in_eager_mode():
    score = torch.randn(3, 10, device=DEVICE)
    x_t = torch.full((3,), 9, device=DEVICE)
    with pytest.raises(ValueError, match="x0"):
        fb.dse_loss(score, 1.0, x_t, torch.tensor([0, 9, 1], device=DEVICE), backend=BACKEND)
    with pytest.raises(ValueError, match="x_t"):
        fb.dce_loss(score, torch.tensor([0, 12, 9], device=DEVICE), torch.zeros(3, dtype=torch.long, device=DEVICE),
                    backend=BACKEND)
