"""fastbound.continuous.nll_bound against exact answers (fastbound.testing.continuous)."""

import math

import pytest
import torch

from fastbound.continuous import LogisticProposal, from_8bit, nll_bound, uniform_dequantisation_std
from fastbound.testing.continuous import GaussianMixture, GaussianSource, GridMixture1D

SOURCE = GaussianSource([0.5, -1.0, 0.0, 2.0], [0.5, 2.0, 1.0, 0.05])


def _batch_z(est, target: torch.Tensor) -> float:
    """z-score of the batch total of the estimate against a target total."""
    return float((est.nll - target).sum() / est.stderr.pow(2).sum().sqrt())


@pytest.mark.parametrize("method", ["importance", "quadrature"])
@pytest.mark.parametrize("warm,warm_std", [("gaussian", 0.1), (None, 0.0)])
def test_gaussian_exact_denoiser_matches_exact_nll(method, warm, warm_std):
    x = SOURCE.sample(48, seed=0)
    n = dict(n_samples=64) if method == "importance" else dict(n_samples=8, n_steps=24)
    est = nll_bound(SOURCE.eps_denoiser(warm_std), x, warm=warm, warm_std=warm_std, logsnr_min=-16.0,
                    logsnr_max=22.0, method=method, seed=1, batch_size=1024, **n)
    exact = SOURCE.expected_nll(x, warm_std)
    assert abs(_batch_z(est, exact)) < 3
    # On this wide range the truncation gap of the exact expectation is negligible.
    gap = SOURCE.expected_bound(x, warm_std, -16.0, 22.0) - exact
    assert float(gap.abs().max()) < 1e-5
    torch.testing.assert_close(est.bits_per_dim, est.nll / (4 * math.log(2)))
    assert est.dims == 4 and est.method == method and est.data == "continuous"
    torch.testing.assert_close(est.nll, est.prior + est.reference + est.integral + est.decoder)


@pytest.mark.parametrize("warm", ["gaussian", "laplace", "uniform"])
def test_unbiased_for_the_finite_range_bound(warm):
    # The linear denoiser's finite-range bound has a closed-form expectation for any unit-variance u.
    x = SOURCE.sample(40, seed=2)
    est = nll_bound(SOURCE.eps_denoiser(0.2), x, warm=warm, warm_std=0.2, logsnr_min=-3.0, logsnr_max=4.0,
                    n_samples=64, seed=5, batch_size=1024)
    assert abs(_batch_z(est, SOURCE.expected_bound(x, 0.2, -3.0, 4.0))) < 3


def test_truncation_gap_shrinks_and_is_covered_by_the_reported_terms():
    x = SOURCE.sample(400, seed=3)
    exact = SOURCE.expected_nll(x, 0.1).mean()
    gaps = []
    for lo, hi in [(-2.0, 3.0), (-4.0, 6.0), (-7.0, 10.0), (-12.0, 16.0)]:
        bound = SOURCE.expected_bound(x, 0.1, lo, hi).mean()
        gaps.append(float(bound - exact))
        est = nll_bound(SOURCE.eps_denoiser(0.1), x, warm="gaussian", warm_std=0.1, logsnr_min=lo, logsnr_max=hi,
                        n_samples=1, batch_size=4096)
        # Expected slack at the optimum: 0 <= low end <= prior, 0 <= high end <= tail_bound.
        assert 0 < gaps[-1] <= float(est.prior.mean()) + est.tail_bound
    assert all(g > 0 for g in gaps[:-1])
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[0] > 100 * abs(gaps[-1])


def test_estimator_sees_the_truncation_gap():
    # On a narrow range the estimate follows the finite-range bound, not the exact NLL.
    x = SOURCE.sample(32, seed=4)
    kw = dict(warm="gaussian", warm_std=0.1, logsnr_min=-1.0, logsnr_max=2.0, n_samples=8, method="quadrature",
              n_steps=16, seed=3)
    est = nll_bound(SOURCE.eps_denoiser(0.1), x, **kw)
    bound = SOURCE.expected_bound(x, 0.1, -1.0, 2.0)
    exact = SOURCE.expected_nll(x, 0.1)
    assert abs(_batch_z(est, bound)) < 3
    assert _batch_z(est, exact) > 10


@pytest.mark.parametrize("law", ["laplace", "logistic", "uniform"])
def test_grid_mixture_optimal_denoiser(law):
    src = GridMixture1D([0.3, 0.7], [-1.5, 1.0], [0.4, 0.6], law, 0.3)
    x = src.sample(32, seed=1)
    kw = dict(warm=law, warm_std=0.3, logsnr_min=-9.0, logsnr_max=9.0, n_samples=48, seed=2, batch_size=2048)
    den = src.eps_denoiser()
    est = nll_bound(den, x, **kw)
    exact = src.expected_nll(x)
    # Expected slack at the optimum: <= prior (low end) + (1/2) log(1 + J e^{-lmax}) (high end, Van Trees).
    slack = float(est.prior.sum()) + 32 * 0.5 * math.log1p(src.fisher_information() * math.exp(-9.0))
    total, se = float((est.nll - exact).sum()), float(est.stderr.pow(2).sum().sqrt())
    assert -3 * se < total < slack + 3 * se
    assert slack < 0.05 and se / 32 < 0.1  # the test resolves 0.1 nats per sample
    worse = nll_bound(lambda z, lam: den(z, lam) + 0.5 * torch.tanh(z), x, **kw)
    diff = worse.nll - est.nll  # same seed: the same draws, so most of the noise cancels
    assert float(diff.mean()) > 3 * float(diff.std() / math.sqrt(diff.numel()))


def test_grid_mixture_density_is_normalised():
    src = GridMixture1D([1.0], [0.0], [1.0], "uniform", 0.5)
    assert float(src.q.sum() * src.step) == pytest.approx(1.0, abs=1e-6)
    # Gaussian data + uniform warm-up: var 1 + 0.25, so h = E -log q is close to the Gaussian entropy.
    x = src.sample(4000, seed=0)
    assert float(src.expected_nll(x).mean()) < 0.5 * math.log(2 * math.pi * math.e * 1.25) + 0.05


def test_mixture_exact_denoiser_matches_entropy():
    mix = GaussianMixture.ring()
    x = mix.sample(64, seed=7)
    est = nll_bound(mix.eps_denoiser(0.1), x, warm="gaussian", warm_std=0.1, logsnr_min=-12.0, logsnr_max=16.0,
                    n_samples=48, seed=1, batch_size=4096)
    g = torch.Generator().manual_seed(0)
    exact = torch.stack([mix.nll(x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64), 0.1)
                         for _ in range(400)]).mean(0)
    assert abs(_batch_z(est, exact)) < 3.5  # the Monte-Carlo "exact" has its own small error


def test_trained_mlp_bound_above_true_nll_and_improves():
    from fastbound.train.continuous import Denoiser, train_denoiser

    mix = GaussianMixture([1.0, 1.0], [[-1.0, 0.0], [1.0, 0.5]], [0.35, 0.35])
    warm_std, lo, hi = 0.1, -9.0, 12.0
    train_x = mix.sample(4096, seed=0).float()
    test_x = mix.sample(128, seed=1)
    proposal = LogisticProposal.from_data(train_x, lo, hi, warm_std)
    torch.manual_seed(0)
    flat = train_x.double()
    model = Denoiser(flat.mean(0), flat.var(0) + warm_std**2, width=64, depth=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    h = float(mix.nll(test_x + warm_std * torch.randn(test_x.shape, generator=torch.Generator().manual_seed(2),
                                                       dtype=torch.float64), warm_std).mean())
    kw = dict(warm="gaussian", warm_std=warm_std, logsnr_min=lo, logsnr_max=hi, n_samples=16, seed=3,
              proposal=proposal, batch_size=4096)
    means, done = [], 0
    for target in (0, 100, 300):
        train_denoiser(model, opt, train_x, steps=target - done, total=300, batch_size=256, lr=1e-2, warm="gaussian",
                       warm_std=warm_std, proposal=proposal, seed=0, start=done)
        done = target
        est = nll_bound(model, test_x, **kw)
        mean, se = float(est.nll.mean()), float(est.stderr.pow(2).sum().sqrt()) / test_x.shape[0]
        means.append((mean, se))
    exact = nll_bound(mix.eps_denoiser(warm_std), test_x, **kw)
    ex_mean, ex_se = float(exact.nll.mean()), float(exact.stderr.pow(2).sum().sqrt()) / test_x.shape[0]
    assert abs(ex_mean - h) < 3 * ex_se + 0.1  # h: one warm draw per sample
    assert means[0][0] > means[1][0] > means[2][0]
    for mean, se in means:
        # Same draws as the exact denoiser's estimate: above it, and it sits at the true NLL.
        assert mean > ex_mean - 3 * math.hypot(se, ex_se)
    assert means[2][0] - ex_mean < 0.4 * (means[0][0] - ex_mean)


def test_batch_size_and_seed():
    x = SOURCE.sample(5, seed=0)
    kw = dict(warm="logistic", warm_std=0.1, n_samples=7)
    den = SOURCE.eps_denoiser(0.1)
    a = nll_bound(den, x, **kw)
    b = nll_bound(den, x, batch_size=3, **kw)
    torch.testing.assert_close(a.nll, b.nll, rtol=0, atol=1e-12)
    assert not torch.equal(a.nll, nll_bound(den, x, seed=1, **kw).nll)
    q = nll_bound(den, x, method="quadrature", n_steps=5, n_samples=2, warm="gaussian", warm_std=0.1)
    assert q.logsnr.shape == (5,) and q.integrand.shape == (5, 5)


def test_float32_and_bfloat16_inputs():
    x = SOURCE.sample(16, seed=0)
    den = SOURCE.eps_denoiser(0.1)
    ref = nll_bound(den, x, warm="gaussian", warm_std=0.1, n_samples=32)
    for dtype in (torch.float32, torch.bfloat16):
        est = nll_bound(den, x.to(dtype), warm="gaussian", warm_std=0.1, n_samples=32)
        assert est.nll.dtype == torch.float64
        se = float(est.stderr.pow(2).sum().sqrt())
        assert abs(float((est.nll - ref.nll).sum())) < 3 * se + 0.05 * 16


def test_empty_batch():
    est = nll_bound(SOURCE.eps_denoiser(), torch.zeros(0, 4, dtype=torch.float64))
    assert est.nll.shape == (0,) and est.stderr.shape == (0,)


def test_8bit():
    x8 = torch.tensor([[0, 255, 128, 7], [1, 2, 3, 4]], dtype=torch.uint8)
    y = from_8bit(x8, torch.float64)
    assert float(y.min()) == pytest.approx(-1 + 1 / 256) and float(y.max()) == pytest.approx(1 - 1 / 256)
    den = SOURCE.eps_denoiser(uniform_dequantisation_std())
    kw = dict(warm="uniform", warm_std=uniform_dequantisation_std(), n_samples=4)
    est = nll_bound(den, x8, data="8bit", **kw)
    cont = nll_bound(den, y, **kw)
    assert est.discrete_exact and not cont.discrete_exact
    assert est.discretisation == pytest.approx(4 * math.log(128))
    torch.testing.assert_close(est.nll, cont.nll + 4 * math.log(128))
    assert not nll_bound(den, x8, data="8bit", warm="gaussian", warm_std=uniform_dequantisation_std(),
                         n_samples=2).discrete_exact
    # Float tensors of integer values are accepted too.
    torch.testing.assert_close(nll_bound(den, x8.double(), data="8bit", **kw).nll, est.nll)


def _bad_shape(z, lam):
    return z[:, :2]


@pytest.mark.parametrize("kwargs,x,denoiser,error,match", [
    (dict(), torch.tensor([[0.0, math.nan, 0.0, 0.0]]), None, ValueError, "x must be finite"),
    (dict(logsnr_min=3.0, logsnr_max=3.0), None, None, ValueError, "logsnr_min"),
    (dict(logsnr_min=math.nan), None, None, ValueError, "logsnr_min"),
    (dict(warm="gaussian", warm_std=-0.1), None, None, ValueError, "warm_std"),
    (dict(warm="cauchy", warm_std=0.1), None, None, ValueError, "warm"),
    (dict(warm_std=0.1), None, None, ValueError, "warm_std"),
    (dict(), None, _bad_shape, ValueError, "shape"),
    (dict(), None, lambda z, lam: z * math.nan, ValueError, "non-finite"),
    (dict(), None, lambda z, lam: z.masked_fill(z > 0, math.inf), ValueError, "non-finite"),
    (dict(), None, lambda z, lam: z.long(), TypeError, "float tensor"),
    (dict(), None, lambda z, lam: z.half(), TypeError, "z's dtype"),
    (dict(data="8bit"), torch.tensor([[0, 256, 3, 4]]), None, ValueError, r"\[0, 255\]"),
    (dict(data="8bit"), torch.tensor([[0.0, 1.5, 3.0, 4.0]]), None, ValueError, r"\[0, 255\]"),
    (dict(data="8bit"), torch.tensor([[-1, 0, 3, 4]]), None, ValueError, r"\[0, 255\]"),
    (dict(data="16bit"), None, None, ValueError, "data"),
    (dict(method="mc"), None, None, ValueError, "method"),
    (dict(n_samples=0), None, None, ValueError, "n_samples"),
    (dict(n_steps=4), None, None, ValueError, "n_steps"),
    (dict(batch_size=0), None, None, ValueError, "batch_size"),
    (dict(proposal=LogisticProposal(-1.0, 1.0)), None, None, ValueError, "proposal"),
    (dict(), torch.tensor([[1, 2, 3, 4]]), None, TypeError, "x must have dtype"),
])
def test_bad_input(kwargs, x, denoiser, error, match):
    x = SOURCE.sample(2, seed=0) if x is None else x
    with pytest.raises(error, match=match):
        nll_bound(denoiser or SOURCE.eps_denoiser(), x, **{"n_samples": 2, **kwargs})


def test_denoiser_not_callable():
    with pytest.raises(TypeError, match="denoiser"):
        nll_bound(3, SOURCE.sample(2, seed=0))


def test_rows_per_call_bounded_by_batch_size():
    # Memory is flat in n_samples: the denoiser never sees more than batch_size rows.
    seen = []
    den = SOURCE.eps_denoiser()

    def recording(z, lam):
        seen.append(z.shape[0])
        assert lam.shape == (z.shape[0],) and lam.dtype == torch.float64
        return den(z, lam)

    x = SOURCE.sample(3, seed=0)
    nll_bound(recording, x, n_samples=50, batch_size=8)
    assert max(seen) == 8 and sum(seen) == 150
    seen.clear()
    nll_bound(recording, x, n_samples=5, method="quadrature", n_steps=6, batch_size=7)
    assert max(seen) == 7 and sum(seen) == 90
