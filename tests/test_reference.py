"""The oracle's own rules (`fastbound.reference` losses), and where the kernels differ from it on purpose.

The oracle must stay finite where the kernels are (any finite σ > 0, in float32 and
float64), read ids of every integer dtype the kernels accept, and agree with the
kernels on them. Where the two differ on purpose (README, "Where the kernels and the
oracle differ on purpose") the kernel's rule is tested here.
"""

import math

import pytest
import torch

import fastbound as fb
from fastbound import reference as ref

NAN, INF = float("nan"), float("inf")
DSE_GRAPHS = ["absorb", "uniform"]


def _case(graph, n_cols=9, dtype=torch.float32, seed=0):
    """Scores (6, V) and ids: masked rows 0-3 (absorbing) or x_t == x0 in rows 0-2 (uniform)."""
    g = torch.Generator().manual_seed(seed)
    score = torch.randn(6, n_cols, generator=g, dtype=torch.float64).to(dtype)
    x0 = torch.randint(0, n_cols - 1, (6,), generator=g)
    if graph == "uniform":
        x_t = torch.cat([x0[:3], (x0[3:] + 1) % n_cols])
    else:
        x_t = torch.tensor([n_cols - 1] * 4 + [x0[4].item(), x0[5].item()])
    return score, x_t, x0


def _loss(graph, impl, score, sigma, x_t, x0, **kw):
    if graph == "dce":
        return impl.dce_loss(score, x_t, x0, **kw)
    return impl.dse_loss(score, sigma, x_t, x0, graph=graph, **kw)


def _loss_and_grad(graph, impl, score, sigma, x_t, x0, **kw):
    s = score.detach().clone().requires_grad_()
    out = _loss(graph, impl, s, sigma, x_t, x0, **kw)
    (g,) = torch.autograd.grad(out.sum(), s)
    return out.detach(), g


# ----------------------------------------------------------------------------- large sigma


@pytest.mark.parametrize("graph", DSE_GRAPHS)
@pytest.mark.parametrize("sigma", [88.0, 89.0, 100.0, 500.0])
def test_float32_oracle_is_finite_where_expm1_overflows(graph, sigma):
    """e^σ overflows float32 above 88.7: r = 1/(e^σ - 1) must go to 0, not 0 · log 0 = NaN."""
    score, x_t, x0 = _case(graph)
    out32, g32 = _loss_and_grad(graph, ref, score, sigma, x_t, x0)
    out64, g64 = _loss_and_grad(graph, ref, score.double(), sigma, x_t, x0)
    assert torch.isfinite(out32).all() and torch.isfinite(g32).all()
    torch.testing.assert_close(out32.double(), out64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g32.double(), g64, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out32, fb.dse_loss(score, sigma, x_t, x0, graph=graph), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("graph", DSE_GRAPHS)
@pytest.mark.parametrize("sigma", [710.0, 1e4, 1e300])
def test_float64_oracle_is_finite_where_expm1_overflows(graph, sigma):
    """Above 709 (float64) the loss is its σ → ∞ limit: the loss at σ = 700 (r = e^-700 ≈ 1e-304)."""
    score, x_t, x0 = _case(graph, dtype=torch.float64)
    out, g = _loss_and_grad(graph, ref, score, sigma, x_t, x0)
    limit, g_limit = _loss_and_grad(graph, ref, score, 700.0, x_t, x0)
    torch.testing.assert_close(out, limit, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(g, g_limit, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(out, fb.dse_loss(score, sigma, x_t, x0, graph=graph), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sigma", [1e-8, 1e-3, 0.3, math.log(2), 5.0, 60.0])
def test_constants_from_log_expm1_match_the_papers_form(sigma):
    """The log(e^σ - 1) form equals SEDD's r = 1/expm1(σ), r (log r - 1) (and ρ = a/(a+N)) where both are finite."""
    score, x_t, x0 = _case("absorb", dtype=torch.float64)
    sig = torch.tensor(sigma, dtype=torch.float64)
    r = 1 / torch.expm1(sig)
    masked = x_t == 8
    direct = score[:, :-1].exp().sum(-1) - r * score.gather(-1, x0[:, None])[:, 0] + r * (r.log() - 1)
    torch.testing.assert_close(ref.dse_absorb(score, sigma, x_t, x0), torch.where(masked, direct, 0 * direct),
                               rtol=1e-13, atol=1e-13)

    score, x_t, x0 = _case("uniform", dtype=torch.float64)
    n, a = score.shape[-1], torch.expm1(sig)
    rho = a / (a + n)
    same = x_t == x0
    s_xt, s_x0 = score.gather(-1, x_t[:, None])[:, 0], score.gather(-1, x0[:, None])[:, 0]
    neg_base = score.mean(-1) - s_xt / n
    neg = torch.where(same, rho * neg_base, s_x0 / a + neg_base)
    const = torch.where(same, (n - 1) / n * rho * (rho.log() - 1), ((-rho.log() - 1) / rho - (n - 2)) / n)
    pos = score.exp().mean(-1) - s_xt.exp() / n
    torch.testing.assert_close(ref.dse_uniform(score, sigma, x_t, x0), pos - neg + const, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- id dtypes


@pytest.mark.parametrize("graph", DSE_GRAPHS + ["dce"])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8, torch.int32])
def test_oracle_reads_every_id_dtype_the_kernels_accept(graph, dtype):
    score, x_t, x0 = _case(graph, n_cols=200 if dtype == torch.uint8 else 100)
    if dtype == torch.uint8:
        x0[1] = 156  # the uint8 image of -100: a real token, not ignore_index, for kernel and oracle alike
    elif dtype != torch.int32:
        x0[1] = -100
    expected = _loss(graph, ref, score, 0.8, x_t, x0, reduction="none")
    for kw in [{"reduction": "none"}, {"reduction": "mean"}]:
        small = _loss(graph, ref, score, 0.8, x_t.to(dtype), x0.to(dtype), **kw)
        kernel = _loss(graph, fb, score, 0.8, x_t.to(dtype), x0.to(dtype), **kw)
        torch.testing.assert_close(small, kernel, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_loss(graph, ref, score, 0.8, x_t.to(dtype), x0.to(dtype)), expected)
    assert (expected[1] == 0) == (dtype in (torch.int8, torch.int16))  # ignored only where -100 fits the dtype


# ----------------------------------------------------------------------------- kernel rules where they differ


@pytest.mark.parametrize("graph", DSE_GRAPHS + ["dce"])
@pytest.mark.parametrize("bad", [NAN, INF])
def test_kernel_never_reads_the_weight_of_a_position_that_does_not_contribute(graph, bad):
    """Unmasked (absorbing / DCE) and ignored positions give loss 0 and gradient 0 whatever their weight;
    the oracle multiplies their 0 by the weight (0 · NaN = NaN)."""
    score, x_t, x0 = _case(graph)
    x0[2] = -100
    weight = torch.rand(6) + 0.5
    contributes = (x0 != -100) & ((x_t == score.shape[-1] - 1) | (graph == "uniform"))
    bad_weight = torch.where(contributes, weight, bad)
    out, g = _loss_and_grad(graph, fb, score, 0.7, x_t, x0, weight=bad_weight)
    expected, g_expected = _loss_and_grad(graph, ref, score.double(), 0.7, x_t, x0,
                                          weight=torch.where(contributes, weight, 0.0).double())
    assert torch.equal(out[~contributes], torch.zeros(int((~contributes).sum())))
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g.double(), g_expected, rtol=1e-6, atol=1e-7)
    for reduction in ["sum", "mean"]:
        total = _loss(graph, fb, score, 0.7, x_t, x0, weight=bad_weight, reduction=reduction)
        assert torch.isfinite(total)


@pytest.mark.parametrize("graph", DSE_GRAPHS + ["dce"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_kernel_gradient_is_zero_on_rows_that_do_not_contribute(graph, bad):
    """NaN / ±inf scores on an unmasked (absorbing, DCE) or ignored row: loss 0, gradient exactly 0 there
    (the oracle's autograd gives 0 · NaN = NaN); the other rows are untouched."""
    score, x_t, x0 = _case(graph)
    x0[0] = -100  # ignored (every graph); rows 4, 5 are unmasked for absorb / dce
    idle = torch.zeros(6, dtype=torch.bool)
    idle[0] = True
    if graph != "uniform":
        idle[4:] = True
    poisoned = score.clone()
    poisoned[idle] = bad
    out, g = _loss_and_grad(graph, fb, poisoned, 0.7, x_t, x0)
    expected, g_expected = _loss_and_grad(graph, ref, score.double(), 0.7, x_t, x0)
    assert torch.equal(out[idle], torch.zeros(int(idle.sum())))
    assert torch.equal(g[idle], torch.zeros_like(g[idle]))
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g.double(), g_expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_uniform_kernel_does_not_read_the_score_of_x_t(bad):
    """Uniform graph: s_{x_t} cancels from the loss (e^{s_{x_t}}/N - e^{s_{x_t}}/N, s_{x_t}/N - s_{x_t}/N), so the
    kernel sums over y != x_t and writes gradient 0 in column x_t; the oracle (SEDD's mean-minus-term) gives NaN."""
    score, x_t, x0 = _case("uniform")
    rows = torch.arange(6)
    poisoned = score.clone()
    poisoned[rows, x_t] = bad
    out, g = _loss_and_grad("uniform", fb, poisoned, 0.7, x_t, x0)
    cleaned = score.double().clone()
    cleaned[rows, x_t] = 0.0
    expected, g_expected = _loss_and_grad("uniform", ref, cleaned, 0.7, x_t, x0)
    assert torch.equal(g[rows, x_t], torch.zeros(6))
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g.double(), g_expected, rtol=1e-6, atol=1e-7)


def test_uniform_kernel_gives_the_limit_on_an_all_minus_inf_row():
    """All scores -inf (every ratio 0): the score entropy is +inf (its -ρ Σ s_y / N term), and the gradient is
    finite, (0 - c)/N off x_t, minus 1/a at x0 when x_t != x0; the oracle's mean(s) - s_{x_t}/N is -inf + inf = NaN."""
    score, x_t, x0 = _case("uniform")
    score[[0, 4]] = -INF  # x_t == x0 in row 0, x_t != x0 in row 4
    out, g = _loss_and_grad("uniform", fb, score, 0.7, x_t, x0)
    expected, g_expected = _loss_and_grad("uniform", ref, score.double(), 0.7, x_t, x0)
    assert torch.isinf(out[[0, 4]]).all() and (out[[0, 4]] > 0).all()
    torch.testing.assert_close(out[[1, 2, 3, 5]].double(), expected[[1, 2, 3, 5]], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g.double(), g_expected, rtol=1e-6, atol=1e-7)
    n, a = score.shape[-1], math.expm1(0.7)
    rho = a / (a + n)
    row0 = torch.full((n,), -rho / n, dtype=torch.float64)
    row0[x_t[0]] = 0
    torch.testing.assert_close(g[0].double(), row0, rtol=1e-6, atol=1e-7)
