"""The estimators' ``head=`` mode: a denoiser returning hidden states plus its output layer.

The estimate with ``head=(weight, bias)`` must be the estimate on the materialised scores
``hidden @ weight.T + bias``, seed for seed, for every method, loss and graph, for
`estimate_nll` and `log_likelihood_ratio`; with an exact head it is the exact likelihood;
bad ``head`` arguments get an error naming them.
"""

import math

import pytest
import torch

from fastbound import estimate_nll, log_likelihood_ratio
from fastbound.testing import MarkovChain

V, H, L = 5, 8, 7
CHAIN = MarkovChain.random(V, seed=0)

# (method, loss, graph, keyword arguments, rows of the output layer)
CASES = [
    ("time_free", "dce", "absorb", {}, V + 1),  # a mask column, left out of the softmax
    ("time_free", "dce", "absorb", {}, V),
    ("time_free", "dse", "absorb", {}, V + 1),
    ("mc", "dce", "absorb", {}, V + 1),
    ("mc", "dse", "uniform", {}, V),
    ("quadrature", "dse", "uniform", dict(n_samples=3, n_steps=4), V),
    ("time_free_exact", "dse", "absorb", {}, V + 1),
]


class HiddenModel:
    """A denoiser body: (x_t, sigma) -> (B, L, H) hidden states that depend on the tokens, position and sigma."""

    def __init__(self, dtype, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.embed = torch.randn(V + 1, H, generator=gen, dtype=torch.float64).to(dtype)
        self.pos = torch.randn(L, H, generator=gen, dtype=torch.float64).to(dtype)
        self.time = torch.randn(H, generator=gen, dtype=torch.float64).to(dtype)
        self.calls = 0

    def __call__(self, x_t, sigma):
        self.calls += 1
        h = self.embed[x_t] + self.pos[: x_t.shape[1]] + torch.log(sigma).to(self.time.dtype)[:, None, None] * self.time
        return torch.tanh(h)


def head_for(rows, dtype, bias=True, seed=1):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, H, generator=gen, dtype=torch.float64).to(dtype)
    return weight, (torch.randn(rows, generator=gen, dtype=torch.float64).to(dtype) if bias else None)


def materialised(body, weight, bias):
    return lambda x_t, sigma: body(x_t, sigma) @ weight.T + (0 if bias is None else bias)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("method,loss,graph,kw,rows", CASES)
def test_head_equals_materialised_scores(method, loss, graph, kw, rows, dtype, tol):
    x0 = CHAIN.sample(6, L, seed=2)
    body, (weight, bias) = HiddenModel(dtype), head_for(rows, dtype)
    options = dict(method=method, loss=loss, graph=graph, vocab_size=V, seed=3, batch_size=5,
                   **({} if method == "time_free_exact" else dict(n_samples=kw.pop("n_samples", 8))), **kw)
    fused = estimate_nll(body, x0, head=(weight, bias), **options)
    dense = estimate_nll(materialised(body, weight, bias), x0, **options)
    assert float(fused.nll.abs().min()) > 0  # a real integrand, not zeros on both sides
    torch.testing.assert_close(fused.nll, dense.nll, rtol=tol, atol=tol)
    torch.testing.assert_close(fused.stderr, dense.stderr, rtol=tol * 100, atol=tol * 100)
    if fused.integrand is not None:
        torch.testing.assert_close(fused.integrand, dense.integrand, rtol=tol, atol=tol)


def test_head_without_bias_and_conditional():
    x0 = CHAIN.sample(4, L, seed=4)
    maskable = torch.arange(L) >= 2
    body, (weight, _) = HiddenModel(torch.float64), head_for(V + 1, torch.float64, bias=False)
    options = dict(vocab_size=V, n_samples=8, maskable=maskable, seed=5)
    for head in ((weight,), (weight, None)):
        fused = estimate_nll(body, x0, head=head, **options)
        dense = estimate_nll(materialised(body, weight, None), x0, **options)
        torch.testing.assert_close(fused.nll, dense.nll, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("coupled", [True, False])
@pytest.mark.parametrize("loss,graph,method,rows", [("dce", "absorb", "time_free", V + 1),
                                                    ("dse", "uniform", "mc", V)])
def test_ratio_with_head(loss, graph, method, rows, coupled):
    x_a = CHAIN.sample(5, L, seed=6)
    x_b = (x_a + (torch.arange(L) == 3)) % V
    body, (weight, bias) = HiddenModel(torch.float64), head_for(rows, torch.float64)
    options = dict(coupled=coupled, method=method, loss=loss, graph=graph, vocab_size=V, n_samples=8, seed=7)
    fused = log_likelihood_ratio(body, x_a, x_b, head=(weight, bias), **options)
    dense = log_likelihood_ratio(materialised(body, weight, bias), x_a, x_b, **options)
    assert float(fused.value.abs().max()) > 0
    torch.testing.assert_close(fused.value, dense.value, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fused.stderr, dense.stderr, rtol=1e-8, atol=1e-10)


def test_exact_head_gives_the_exact_likelihood():
    """A product source's exact DCE denoiser is a linear head: constant hidden state 1, weight log p."""
    p = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    source = MarkovChain.product(p)
    x0 = source.sample(3, L, seed=8)
    body = lambda x_t, sigma: torch.ones(*x_t.shape, 1, dtype=torch.float64)  # noqa: E731
    est = estimate_nll(body, x0, method="time_free_exact", vocab_size=V, head=(p.log()[:, None], None))
    torch.testing.assert_close(est.nll, source.nll(x0), rtol=1e-10, atol=1e-10)
    assert math.isclose(float(est.nll.sum()), float(-p.log()[x0].sum()), rel_tol=1e-10)


def test_bad_head_arguments():
    x0 = CHAIN.sample(2, L, seed=9)
    body, (weight, bias) = HiddenModel(torch.float32), head_for(V + 1, torch.float32)
    run = lambda head, **kw: estimate_nll(body, x0, vocab_size=V, n_samples=2, head=head, **kw)  # noqa: E731
    with pytest.raises(TypeError, match="head must be a tuple"):
        run(weight)
    with pytest.raises(TypeError, match="head must be a tuple"):
        run((weight, bias, bias))
    with pytest.raises(TypeError, match="head weight"):
        run((weight.numpy(), bias))
    with pytest.raises(TypeError, match="head weight"):
        run((weight.long(), bias))
    with pytest.raises(ValueError, match=r"head weight must have shape \(V, H\)"):
        run((weight[0], bias))
    with pytest.raises(ValueError, match=r"head weight must have V = >= 5 rows"):
        run((weight[:V - 1], bias[:V - 1]))
    with pytest.raises(ValueError, match=r"head weight must have V = 6 rows"):  # the DSE's mask column is last
        run((weight[:V], bias[:V]), loss="dse")
    with pytest.raises(ValueError, match=r"head weight must have V = 5 rows"):
        run((weight, bias), loss="dse", graph="uniform", method="mc")
    with pytest.raises(ValueError, match=r"head bias must have shape \(V,\)"):
        run((weight, bias[:V]))
    with pytest.raises(TypeError, match="head bias has dtype"):
        run((weight, bias.double()))
    with pytest.raises(ValueError, match="head weight is on meta"):
        run((weight.to("meta"), None))
    with pytest.raises(ValueError, match="head= runs the fused integration step"):
        from fastbound.estimators import api, options
        api.nll(body, x0, None, options.Options(vocab_size=V), step=lambda *a, **k: None, head=(weight, bias))
    # The denoiser must return hidden states of width H, in the head's dtype.
    with pytest.raises(ValueError, match=rf"denoiser output must have shape \(2, {L}, {H}\)"):
        estimate_nll(materialised(body, weight, bias), x0, vocab_size=V, n_samples=2, head=(weight, bias))
    with pytest.raises(TypeError, match="weight has dtype"):
        run((weight.double(), bias.double()))
    assert body.calls == 2  # the head is checked before the denoiser runs
