"""Batched backwards (``torch.autograd.grad(..., is_grads_batched=True)``, vmap of a vjp): the
backwards take the out-of-place path (no host read of the upstream, no rescale of the saved
buffer, no factor prediction) and equal one ordinary backward per grad_output."""

import pytest
import torch

import fastbound as fb
from fastbound import reference as ref
from fastbound.continuous import denoising_loss

N, V, B = 6, 9, 3
KINDS = ("absorb", "uniform", "dce")
REDUCTIONS = ("none", "sum", "mean")


def case(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    score = torch.randn(N, V, generator=g, dtype=torch.float64)
    x0 = torch.randint(0, V - 1, (N,), generator=g)
    x_t = torch.where(torch.rand(N, generator=g) < 0.5, V - 1, x0)  # the mask anywhere
    if kind == "uniform":
        x_t = torch.randint(0, V, (N,), generator=g)
    sigma = torch.rand(N, generator=g, dtype=torch.float64) + 0.1
    return score, sigma, x_t, x0


def call(lib, kind, score, sigma, x_t, x0, **kw):
    if kind == "dce":
        return lib.dce_loss(score, x_t, x0, **kw)
    return lib.dse_loss(score, sigma, x_t, x0, graph=kind, **kw)


def per_output(loss_of, score, outputs):
    """The gradient for each grad_output by a separate backward of a fresh call."""
    rows = []
    for u in outputs:
        s = score.detach().requires_grad_()
        rows.append(torch.autograd.grad(loss_of(s), s, u)[0])
    return torch.stack(rows)


@pytest.mark.parametrize("weight", [None, "tensor"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_grads_batched_equals_separate_backwards(kind, reduction, weight):
    score, sigma, x_t, x0 = case(kind)
    w = torch.rand(N, dtype=torch.float64) if weight else None
    loss_of = lambda s, lib=fb: call(lib, kind, s, sigma, x_t, x0, weight=w, reduction=reduction)
    for _ in range(3):  # the first call validates the signature, the later ones take the C++ fast path
        s = score.clone().requires_grad_()
        loss = loss_of(s)
        outputs = torch.randn(B, *loss.shape, dtype=torch.float64)
        (batched,) = torch.autograd.grad(loss, s, outputs, is_grads_batched=True)
        torch.testing.assert_close(batched, per_output(loss_of, score, outputs))
        torch.testing.assert_close(batched, per_output(lambda t: loss_of(t, ref), score, outputs))


@pytest.mark.parametrize("kind", KINDS)
def test_batched_backward_leaves_buffer_and_prediction_alone(kind):
    score, sigma, x_t, x0 = case(kind)
    loss_of = lambda s: call(fb, kind, s, sigma, x_t, x0, reduction="sum")
    expect = per_output(loss_of, score, torch.tensor([0.25]))[0]
    for _ in range(3):  # an upstream of 2^-2 twice in a row: predicted and folded into the forward
        s = score.clone().requires_grad_()
        (loss_of(s) * 0.25).backward()
    s = score.clone().requires_grad_()
    loss = loss_of(s)
    outputs = torch.tensor([0.25, 1.0, -3.0], dtype=torch.float64)
    (batched,) = torch.autograd.grad(loss, s, outputs, is_grads_batched=True, retain_graph=True)
    torch.testing.assert_close(batched[0], expect)
    (again,) = torch.autograd.grad(loss, s, torch.tensor(0.25, dtype=torch.float64))  # the saved buffer intact
    torch.testing.assert_close(again, expect)
    s = score.clone().requires_grad_()
    (loss_of(s) * 0.25).backward()  # the prediction still holds
    torch.testing.assert_close(s.grad, expect)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_vmap_of_vjp(kind, reduction):
    score, sigma, x_t, x0 = case(kind)
    loss_of = lambda s: call(fb, kind, s, sigma, x_t, x0, reduction=reduction)
    _, vjp_fn = torch.func.vjp(loss_of, score)
    outputs = torch.randn(B, *loss_of(score).shape, dtype=torch.float64)
    (batched,) = torch.func.vmap(vjp_fn)(outputs)
    torch.testing.assert_close(batched, per_output(loss_of, score, outputs))


@pytest.mark.parametrize("weight", [None, "tensor"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_denoising_loss_grads_batched(reduction, weight):
    g = torch.Generator().manual_seed(1)
    eps_hat, eps = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    w = torch.rand(4, generator=g) if weight else None
    loss_of = lambda e: denoising_loss(e, eps, weight=w, reduction=reduction)
    for _ in range(3):  # the later calls take the C++ op
        e = eps_hat.clone().requires_grad_()
        loss = loss_of(e)
        outputs = torch.randn(B, *loss.shape)
        (batched,) = torch.autograd.grad(loss, e, outputs, is_grads_batched=True)
        torch.testing.assert_close(batched, per_output(loss_of, eps_hat, outputs))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_linear_grads_batched(reduction):
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(N, 4, generator=g), torch.randn(V, 4, generator=g)
    _, sigma, x_t, x0 = case("absorb")
    loss_of = lambda h: fb.fused_linear.fused_linear_dse_loss(h, weight, None, sigma.float(), x_t, x0,
                                                              reduction=reduction)
    h = hidden.clone().requires_grad_()
    loss = loss_of(h)
    outputs = torch.randn(B, *loss.shape)
    (batched,) = torch.autograd.grad(loss, h, outputs, is_grads_batched=True)
    torch.testing.assert_close(batched, per_output(loss_of, hidden, outputs))
