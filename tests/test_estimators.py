"""Likelihood estimators on sources whose likelihood is exact.

With the exact denoiser of a product source or a first-order Markov chain
(`fastbound.testing.MarkovChain`), every estimator must return -log p(x0): the
batch total within 3 standard errors and within 1% at the default sample counts
(64 draws per sequence; the batch is large enough for 1% to be several standard
errors). Sequences have independent draws, so the batch's standard error is the
root sum of squares of the per-sequence ones.
"""

import math

import pytest
import torch

from conftest import TRITON_DEVICE
from fastbound.estimators import NLLEstimate, estimate_nll, log_likelihood_ratio
from fastbound.estimators.api import uniform_terminal
from fastbound.estimators.options import Options
from fastbound.schedules import LogLinear
from fastbound.testing import MarkovChain

V = 4
CHAIN = MarkovChain.random(V, seed=0)
PRODUCT = MarkovChain.product(torch.tensor([0.5, 0.25, 0.15, 0.1]))

# (method, loss, graph, extra keyword arguments): every estimator fastbound has.
ESTIMATORS = [
    ("time_free", "dce", "absorb", {}),
    ("time_free", "dse", "absorb", {}),
    ("mc", "dce", "absorb", {}),
    ("mc", "dse", "uniform", {}),
    ("quadrature", "dce", "absorb", dict(n_samples=4)),  # 16 nodes x 4 = 64 draws
    ("quadrature", "dse", "uniform", dict(n_samples=4)),
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The exact denoisers make many tiny ops; on a busy machine OpenMP threads spin-wait on each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def denoiser_for(source, loss, graph, dtype=torch.float32):
    return source.dce_denoiser(dtype=dtype) if loss == "dce" else source.dse_denoiser(graph=graph, dtype=dtype)


def check_total(est: NLLEstimate, exact: torch.Tensor, rel: float = 0.01, label: str = ""):
    err = float(est.nll.sum() - exact.sum())
    se = float(est.stderr.pow(2).sum().sqrt())
    print(f"{label}: total {float(est.nll.sum()):.3f} vs exact {float(exact.sum()):.3f}, "
          f"error {err / float(exact.sum()):+.4%}, {err / se:+.2f} stderr")
    assert abs(err) <= 3 * se, f"{label}: {err / se:.2f} standard errors off"
    assert abs(err) <= rel * float(exact.sum()), f"{label}: relative error {err / float(exact.sum()):.4f}"


@pytest.mark.parametrize("method,loss,graph,kw", ESTIMATORS)
def test_product_source(method, loss, graph, kw):
    x0 = PRODUCT.sample(1024, 8, seed=1)
    exact = -torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64))[x0].sum(1)
    torch.testing.assert_close(PRODUCT.nll(x0), exact)
    den = denoiser_for(PRODUCT, loss, graph)
    est = estimate_nll(den, x0, method=method, loss=loss, graph=graph, vocab_size=V, batch_size=4096, **kw)
    check_total(est, exact, label=f"product {method} {loss} {graph}")
    # The standard error shrinks like 1/sqrt(n_samples) (or faster: the draws are stratified).
    sizes = dict(n_steps=4, n_samples=8) if method == "quadrature" else dict(n_samples=64)
    runs = [estimate_nll(den, x0, method=method, loss=loss, graph=graph, vocab_size=V, batch_size=8192,
                         **{**sizes, "n_samples": sizes["n_samples"] // div}) for div in (4, 1)]
    ratio = float(runs[0].stderr.pow(2).sum().sqrt() / runs[1].stderr.pow(2).sum().sqrt())
    print(f"stderr ratio for 4x the samples: {ratio:.2f} (1/sqrt: 2)")
    assert 1.6 < ratio < 3.2


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
@pytest.mark.parametrize("method,loss,graph,kw", ESTIMATORS)
def test_markov_chain(method, loss, graph, kw, conditional):
    x0 = CHAIN.sample(1536, 12, seed=2)
    maskable = torch.arange(12) >= 4 if conditional else None  # a 4-token prompt, 8 scored tokens
    exact = CHAIN.nll(x0, maskable)
    est = estimate_nll(denoiser_for(CHAIN, loss, graph), x0, method=method, loss=loss, graph=graph,
                       maskable=maskable, vocab_size=V, batch_size=8192, **kw)
    assert torch.equal(est.n_tokens, torch.full((1536,), 8 if conditional else 12))
    check_total(est, exact, label=f"markov {method} {loss} {graph} conditional={conditional}")
    # The per-sequence standard errors are calibrated. On the uniform graph a draw at small
    # t rarely changes a token but then weighs ~ log(1/t)/t: the standard error is right on
    # average (root mean square) while the z-scores have heavier tails.
    z = (est.nll - exact) / est.stderr
    assert 0.7 < float(z.std()) < (1.35 if graph == "absorb" else 1.6)


@pytest.mark.parametrize("loss", ["dce", "dse"])
@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
def test_exact_enumeration_is_exact(loss, conditional):
    x0 = CHAIN.sample(6, 7, seed=3)
    maskable = torch.tensor([False, True, True, False, True, True, True]) if conditional else None
    den = denoiser_for(CHAIN, loss, "absorb", dtype=torch.float64)
    est = estimate_nll(den, x0, method="time_free_exact", loss=loss, maskable=maskable, vocab_size=V)
    torch.testing.assert_close(est.nll, CHAIN.nll(x0, maskable), rtol=1e-9, atol=1e-9)
    assert torch.equal(est.stderr, torch.zeros(6, dtype=torch.float64))


@pytest.mark.parametrize("method,loss,graph,kw", [e for e in ESTIMATORS if e[1] == "dce"] + [ESTIMATORS[3]])
def test_coupled_ratio(method, loss, graph, kw):
    gen = torch.Generator().manual_seed(4)
    x_a = CHAIN.sample(256, 12, seed=4)
    x_b = x_a.clone()
    for b in range(x_b.shape[0]):  # change 1 or 2 tokens of every pair
        for i in torch.randperm(12, generator=gen)[: 1 + b % 2]:
            x_b[b, i] = (x_b[b, i] + torch.randint(1, V, (1,), generator=gen)) % V
    exact = CHAIN.nll(x_b) - CHAIN.nll(x_a)
    den = denoiser_for(CHAIN, loss, graph)
    stderr = {}
    for coupled in (True, False):
        est = log_likelihood_ratio(den, x_a, x_b, coupled=coupled, method=method, loss=loss, graph=graph,
                                   vocab_size=V, batch_size=8192, **kw)
        err, se = float((est.value - exact).sum()), float(est.stderr.pow(2).sum().sqrt())
        print(f"{method} coupled={coupled}: error {err:+.3f}, {err / se:+.2f} stderr")
        assert abs(err) <= 3 * se
        stderr[coupled] = est.stderr
    factor = float(stderr[False].pow(2).mean().sqrt() / stderr[True].pow(2).mean().sqrt())
    print(f"{method} {loss} {graph}: coupled standard error {factor:.1f}x smaller than independent")
    assert factor > 1.5


def random_model(n_cols: int, length: int, seed: int):
    """A non-exact model whose probabilities sum to 1: its DCE logits and the matching DSE scores."""
    table = torch.randn(length + 1, length, n_cols, generator=torch.Generator().manual_seed(seed))

    def dce(x_t, sigma):
        return table[(x_t == n_cols).sum(1)].log_softmax(-1)

    def dse(x_t, sigma):  # e^s = p / (e^sigma - 1): sums to r = 1 / (e^sigma - 1)
        score = dce(x_t, sigma) - torch.log(torch.expm1(sigma.double())).float()[:, None, None]
        return torch.cat([score, torch.zeros_like(score[..., :1])], -1)

    return dce, dse


@pytest.mark.parametrize("method", ["time_free", "mc", "quadrature", "time_free_exact"])
def test_dse_equals_dce_for_normalised_models(method):
    dce, dse = random_model(V, 9, seed=5)
    x0 = torch.randint(0, V, (12, 9), generator=torch.Generator().manual_seed(6))
    kw = dict(method=method, vocab_size=V, n_samples=16, n_steps=4 if method == "quadrature" else None)
    a, b = estimate_nll(dce, x0, loss="dce", **kw), estimate_nll(dse, x0, loss="dse", **kw)
    torch.testing.assert_close(a.nll, b.nll, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.stderr, b.stderr, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["time_free", "mc", "quadrature"])
def test_reproducible_across_batch_sizes(method):
    x0 = CHAIN.sample(5, 10, seed=7)
    den = CHAIN.dce_denoiser()
    kw = dict(method=method, vocab_size=V, n_samples=6, n_steps=3 if method == "quadrature" else None)
    first = estimate_nll(den, x0, batch_size=7, **kw)
    for other in (estimate_nll(den, x0, batch_size=7, **kw), estimate_nll(den, x0, batch_size=1000, **kw)):
        assert torch.equal(first.nll, other.nll) and torch.equal(first.stderr, other.stderr)
    assert not torch.equal(first.nll, estimate_nll(den, x0, batch_size=7, seed=1, **kw).nll)
    ratio = log_likelihood_ratio(den, x0, x0.flip(0), batch_size=7, **kw)
    assert torch.equal(ratio.value, log_likelihood_ratio(den, x0, x0.flip(0), batch_size=1000, **kw).value)


def test_chunks_memory_and_outputs():
    calls = []

    def den(x_t, sigma):
        calls.append((x_t.shape[0], torch.is_inference_mode_enabled(), sigma.dtype))
        return CHAIN.dce_denoiser()(x_t, sigma)

    x0 = CHAIN.sample(3, 10, seed=8)
    for n in (8, 64):
        calls.clear()
        est = estimate_nll(den, x0, method="mc", vocab_size=V, n_samples=n, batch_size=16)
        assert max(c[0] for c in calls) == 16 and all(c[1] for c in calls) and calls[0][2] == torch.float32
        assert len(calls) == math.ceil(3 * n / 16)
    assert est.times.shape == est.integrand.shape == (3, 64)
    assert bool(((est.times > 0) & (est.times < 1)).all())
    torch.testing.assert_close(est.bits_per_token, est.nll / (10 * math.log(2)))
    assert not est.nll.is_inference()  # usable outside inference mode
    bpt, se = est.overall_bits_per_token()
    assert math.isclose(bpt, float(est.nll.sum()) / (30 * math.log(2)))
    tf = estimate_nll(den, x0, vocab_size=V, n_samples=8)
    assert tf.times.shape == (3, 8) and bool(((tf.times > 0) & (tf.times <= 1)).all())
    quad = estimate_nll(den, x0, method="quadrature", vocab_size=V, n_samples=2, n_steps=5)
    assert quad.times.shape == quad.integrand.shape == (3, 5)
    assert estimate_nll(den, x0, method="time_free_exact", vocab_size=V).times is None


def test_empty_batch():
    est = estimate_nll(CHAIN.dce_denoiser(), torch.zeros(0, 5, dtype=torch.int64), vocab_size=V)
    assert est.nll.shape == est.stderr.shape == (0,)
    ratio = log_likelihood_ratio(CHAIN.dce_denoiser(), torch.zeros(0, 5, dtype=torch.int64),
                                 torch.zeros(0, 5, dtype=torch.int64), vocab_size=V)
    assert ratio.value.shape == (0,)


def test_uniform_terminal_term():
    # A schedule that stops at sigma_max: the KL of the per-token forward marginal to the uniform prior.
    schedule = LogLinear(eps=0.2)
    options = Options(method="mc", loss="dse", graph="uniform", schedule=schedule, n_samples=8, vocab_size=V)
    keep = 0.2  # e^{-sigma(1)}
    q = torch.full((V,), (1 - keep) / V, dtype=torch.float64)
    q[0] += keep
    kl = float((q * (q * V).log()).sum())
    torch.testing.assert_close(uniform_terminal(options, torch.tensor([3, 5])), torch.tensor([3 * kl, 5 * kl],
                                                                                              dtype=torch.float64))
    # The estimate is then SEDD's bound for the model started from the uniform prior at
    # sigma_max: slightly above -log p(x0) (the prior is not the data's marginal there), and
    # far above it without the terminal term.
    x0 = CHAIN.sample(1024, 8, seed=9)
    exact = CHAIN.nll(x0)
    est = estimate_nll(CHAIN.dse_denoiser(graph="uniform"), x0, method="quadrature", loss="dse", graph="uniform",
                       schedule=schedule, vocab_size=V, n_samples=4, batch_size=8192)
    check_total(est, exact, rel=0.015, label="uniform, truncated schedule + terminal term")
    se = float(est.stderr.pow(2).sum().sqrt())
    terminal = 8 * 1024 * kl
    assert float(est.nll.sum()) - terminal < float(exact.sum()) - 5 * se


def test_bad_input():
    x0 = CHAIN.sample(2, 5, seed=10)
    den = CHAIN.dce_denoiser()
    cases = [
        (dict(n_samples=0), ValueError, "n_samples must be >= 1"),
        (dict(n_samples=2.5), TypeError, "n_samples must be an int"),
        (dict(maskable=torch.tensor([[True] * 5, [False] * 5])), ValueError, "maskable has no maskable position in sequence 1"),
        (dict(maskable=torch.ones(5)), TypeError, "maskable must be a bool"),
        (dict(x0=torch.full((2, 5), V)), ValueError, "x0 contains the mask id 4"),
        (dict(x0=torch.full((2, 5), V + 3)), ValueError, "x0 contains id 7"),
        (dict(x0=torch.zeros(5, dtype=torch.int64)), ValueError, "x0 must have shape"),
        (dict(x0=torch.zeros(2, 5)), TypeError, "x0 must hold integer"),
        (dict(vocab_size=None), ValueError, "vocab_size"),
        (dict(mask_id=2), ValueError, "mask_id 2 is a real token"),
        (dict(method="exact"), ValueError, "method must be one of"),
        (dict(loss="dce", graph="uniform"), ValueError, "loss='dce' is the absorbing"),
        (dict(loss="dse", graph="uniform"), ValueError, "method='time_free' counts masked tokens"),
        (dict(n_steps=4), ValueError, "n_steps is the number of quadrature nodes"),
        (dict(denoiser=lambda x, s: torch.zeros(x.shape[0], x.shape[1] + 1, V)), ValueError, "denoiser output must have shape"),
        (dict(denoiser=lambda x, s: torch.zeros(x.shape[0], x.shape[1], V - 1)), ValueError, "denoiser output must have shape"),
        (dict(denoiser=lambda x, s: torch.full((x.shape[0], x.shape[1], V), math.nan)), ValueError, "contains NaN"),
        (dict(denoiser=lambda x, s: x), TypeError, "must return a float tensor"),
        (dict(denoiser="model"), TypeError, "denoiser must be callable"),
        (dict(loss="dse", denoiser=den), ValueError, "denoiser output must have shape"),  # needs V+1 columns
        (dict(schedule="loglinear", method="mc"), TypeError, "schedule must be"),
        (dict(seed=-1), ValueError, "seed must be >= 0"),
        (dict(method="time_free_exact", x0=torch.zeros(1, 21, dtype=torch.int64)), ValueError, "enumerates"),
    ]
    for change, error, match in cases:
        kwargs = dict(denoiser=den, x0=x0, vocab_size=V) | change
        with pytest.raises(error, match=match):
            estimate_nll(kwargs.pop("denoiser"), kwargs.pop("x0"), **kwargs)
    with pytest.raises(ValueError, match="x_a and x_b must have the same shape"):
        log_likelihood_ratio(den, x0, x0[:, :4], vocab_size=V)
    with pytest.raises(TypeError, match="coupled must be a bool"):
        log_likelihood_ratio(den, x0, x0, coupled="yes", vocab_size=V)


@pytest.mark.triton
@pytest.mark.parametrize("method,loss,graph", [("time_free", "dce", "absorb"), ("mc", "dse", "uniform")])
def test_triton_backend_gives_the_same_estimate(method, loss, graph):
    x0 = CHAIN.sample(2, 4, seed=11)
    den = denoiser_for(CHAIN, loss, graph)
    kw = dict(method=method, loss=loss, graph=graph, vocab_size=V, n_samples=3)
    cpu = estimate_nll(den, x0, backend="cpu", **kw)
    tri = estimate_nll(den, x0.to(TRITON_DEVICE), backend="triton", **kw)
    torch.testing.assert_close(tri.nll.cpu(), cpu.nll, rtol=1e-5, atol=1e-5)  # same Philox draws


def test_n_samples_beyond_memory_is_refused_at_once():
    x0 = CHAIN.sample(2, 5, seed=12)
    for call in (lambda: estimate_nll(CHAIN.dce_denoiser(), x0, vocab_size=V, n_samples=10**12, batch_size=8),
                 lambda: log_likelihood_ratio(CHAIN.dce_denoiser(), x0, x0, vocab_size=V, n_samples=10**12)):
        with pytest.raises(ValueError, match=r"n_samples=1000000000000 is too large for 2 sequences"):
            call()
    # Quadrature keeps one sum per node: flat in n_samples, so the same n_samples is not refused
    # for memory (it starts; a denoiser that stops it proves the first chunk ran).
    class Stop(Exception):
        pass

    def stop(x_t, sigma):
        raise Stop

    with pytest.raises(Stop):
        estimate_nll(stop, x0, method="quadrature", vocab_size=V, n_samples=10**12, n_steps=2, batch_size=8)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_narrow_id_dtypes_give_the_int64_estimate(dtype):
    x0 = CHAIN.sample(3, 6, seed=13)
    den = CHAIN.dce_denoiser()
    want = estimate_nll(den, x0, vocab_size=V, n_samples=4)
    got = estimate_nll(den, x0.to(dtype), vocab_size=V, n_samples=4)
    assert torch.equal(got.nll, want.nll)
    ratio = log_likelihood_ratio(den, x0.to(dtype), x0.flip(0).to(dtype), vocab_size=V, n_samples=4)
    assert torch.equal(ratio.value, log_likelihood_ratio(den, x0, x0.flip(0), vocab_size=V, n_samples=4).value)


def test_uint8_bounds_do_not_wrap():
    """vocab_size = 256 with uint8 ids: every byte is a real token, the mask (256) cannot occur."""
    x0 = torch.tensor([[0, 87, 255, 3]], dtype=torch.uint8)

    def uniform_logits(x_t, sigma):
        return torch.zeros(*x_t.shape, 256)

    est = estimate_nll(uniform_logits, x0, method="time_free_exact", vocab_size=256)
    torch.testing.assert_close(est.nll, torch.tensor([4 * math.log(256)], dtype=torch.float64))
    with pytest.raises(ValueError, match="x0 contains id 87 outside \\[0, 50\\)"):
        estimate_nll(uniform_logits, x0, vocab_size=50, mask_id=300)


@pytest.mark.triton
def test_stratified_uniforms_cpu_equal_triton():
    from fastbound.estimators.methods import stratified

    cpu = stratified(7, 5, 3, 1 << 60, torch.device("cpu"), None)
    tri = stratified(7, 5, 3, 1 << 60, torch.device(TRITON_DEVICE), "triton")
    assert torch.equal(cpu, tri.cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("method, loss, graph, kw", ESTIMATORS + [("time_free_exact", "dce", "absorb", {})])
def test_internal_step_equals_the_public_step(method, loss, graph, kw, dtype):
    """The loop's pre-checked step (`loop._checked_step`) gives the public `integrate_step`'s sums bit for bit,
    on non-contiguous outputs of every dtype and odd sizes."""
    from fastbound.estimators import api
    from fastbound.integrate import integrate_step

    g = torch.Generator().manual_seed(3)
    length = 5 if method == "time_free_exact" else 13
    width = V + 1 if graph == "absorb" else V
    out = torch.randn(3, length, width + 3, generator=g).clamp(-3, 3).to(dtype)[..., :width]
    x0 = torch.randint(0, V, (3, length), generator=g)
    options = Options(method=method, loss=loss, graph=graph, vocab_size=V, seed=2, **({"n_samples": 3} | kw))
    public = lambda *a, **k: integrate_step(*a, **k)  # noqa: E731  (not the step itself: the loop keeps it)
    internal = api.nll(lambda x_t, sigma: out, x0, None, options)
    checked = api.nll(lambda x_t, sigma: out, x0, None, options, step=public)
    for name in ("nll", "stderr"):
        assert torch.equal(getattr(internal, name), getattr(checked, name)), name
