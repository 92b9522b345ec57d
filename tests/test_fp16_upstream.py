"""fp16 gradients under an upstream factor (a GradScaler's 2^16, a weight after ``reduction="none"``).

The losses write their gradient in the forward with the row scale (1/N for the mean); in fp16
most of those values are subnormal or zero at real sizes, and rescaling them by the upstream
afterwards cannot bring the bits back. The backward therefore computes the gradient again with
the factor in (`fastbound._ops._recompute`, the fused head's rerun): each value is rounded to
fp16 once, as the oracle's. Measure: the share of gradient values that differ from the fp16
rounding of the float64 gradient (before the fix: 0.5–97%).
"""

import pytest
import torch

import fastbound as fb
from fastbound import reference as ref
from fastbound.continuous import denoising_loss
from fastbound.continuous import reference as cref
from fastbound.fused_linear import fused_linear_dce_loss, fused_linear_dse_loss

from helpers import KINDS, make_case

N, V = 2048, 1000
MAX_OFF = 1e-3  # share of values off the ideal fp16 rounding


def off_ideal(grad: torch.Tensor, exact: torch.Tensor) -> float:
    return (grad.double() != exact.half().double()).double().mean().item()


def loss_of(lib, kind, sigma, x_t, x0, reduction):
    if kind == "dce":
        return lambda s: lib.dce_loss(s, x_t, x0, reduction=reduction)
    return lambda s: lib.dse_loss(s, sigma, x_t, x0, graph=kind, reduction=reduction)


def grad_of(f, x, upstream):
    x = x.clone().requires_grad_()
    out = f(x)
    out.backward(upstream(out))
    return x.grad


UPSTREAMS = {
    "scaler": lambda out: torch.full_like(out, 2.0**16),  # (loss * 65536.).backward()
    "per_position": lambda out: torch.rand(out.shape, generator=torch.Generator().manual_seed(5)) * 2.0**16 / N,
}


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize("kind", KINDS)
def test_losses(kind, upstream):
    score, sigma, x_t, x0 = make_case(kind, (N,), V, torch.float16, mask_frac=0.5)
    sigma = sigma.reshape(N)
    reduction = "mean" if upstream == "scaler" else "none"
    exact = grad_of(loss_of(ref, kind, sigma, x_t, x0, reduction), score.double(), UPSTREAMS[upstream])
    for _ in range(3):  # the later calls of a signature: fp16 stays off the C++ fast path
        got = grad_of(loss_of(fb, kind, sigma, x_t, x0, reduction), score, UPSTREAMS[upstream])
        assert got.dtype == torch.float16
        assert off_ideal(got, exact) <= MAX_OFF


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_denoising_loss(upstream):
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(N, 3, generator=g).half()
    eps_hat = (eps.float() + 1e-3 * torch.randn(N, 3, generator=g)).half()
    reduction = "mean" if upstream == "scaler" else "none"
    exact = grad_of(lambda e: cref.denoising_loss(e, eps.double(), reduction=reduction), eps_hat.double(),
                    UPSTREAMS[upstream])
    for _ in range(3):
        got = grad_of(lambda e: denoising_loss(e, eps, reduction=reduction), eps_hat, UPSTREAMS[upstream])
        assert off_ideal(got, exact) <= MAX_OFF


def head_case(kind):
    """fp16 hidden states and head, ids and sigma, and the fused mean loss of (hidden, weight)."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(512, 64, generator=g).half()
    weight = (torch.randn(300, 64, generator=g) / 8).half()
    _, sigma, x_t, x0 = make_case(kind, (512,), 300, torch.float16, mask_frac=0.5)
    sigma = sigma.reshape(512)

    def fused(h, w):
        if kind == "dce":
            return fused_linear_dce_loss(h, w, None, x_t, x0, reduction="mean")
        return fused_linear_dse_loss(h, w, None, sigma, x_t, x0, graph=kind, reduction="mean")

    return hidden, weight, sigma, x_t, x0, fused


@pytest.mark.parametrize("kind", KINDS)
def test_fused_head(kind):
    hidden, weight, sigma, x_t, x0, fused = head_case(kind)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (fused(h, w) * 2.0**16).backward()
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    (loss_of(ref, kind, sigma, x_t, x0, "mean")(hd @ wd.T) * 2.0**16).backward()
    # the GEMMs' fp32 sums move a few values across an fp16 rounding boundary (before the fix: 6-7%)
    assert off_ideal(h.grad, hd.grad) <= 5 * MAX_OFF
    assert off_ideal(w.grad, wd.grad) <= 5 * MAX_OFF


def test_scores_changed_before_the_backward_raise():
    """The fp16 backward reads the scores again: changing them in place in between raises."""
    score, sigma, x_t, x0 = make_case("dce", (8,), 11, torch.float16)
    s = score.clone().requires_grad_()
    t = s * 1
    loss = fb.dce_loss(t, x_t, x0, reduction="sum")
    t.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss * 2.0).backward()


@pytest.mark.parametrize("kind", KINDS)
def test_torch_func_grad_recomputes_too(kind):
    """torch.func.grad wraps the upstream: it must not be taken for a batched one (which keeps
    the rescale)."""
    score, sigma, x_t, x0 = make_case(kind, (N,), V, torch.float16, mask_frac=0.5)
    sigma = sigma.reshape(N)
    exact = grad_of(loss_of(ref, kind, sigma, x_t, x0, "mean"), score.double(), UPSTREAMS["scaler"])
    got = torch.func.grad(lambda s: loss_of(fb, kind, sigma, x_t, x0, "mean")(s) * 2.0**16)(score)
    assert off_ideal(got, exact) <= MAX_OFF


@pytest.mark.parametrize("kind", KINDS)
def test_fused_head_under_torch_func_grad_reruns_too(kind):
    hidden, weight, sigma, x_t, x0, fused = head_case(kind)
    hd = hidden.double().requires_grad_()
    (loss_of(ref, kind, sigma, x_t, x0, "mean")(hd @ weight.double().T) * 2.0**16).backward()
    got = torch.func.grad(lambda h: fused(h, weight) * 2.0**16)(hidden)
    assert off_ideal(got, hd.grad) <= 5 * MAX_OFF
