"""The reference run's diagnostic (fastbound.train.continuous_estimate.denoiser_gap) and its denoiser."""

import math

import pytest
import torch

from fastbound.continuous import LogisticProposal
from fastbound.testing.continuous import GaussianSource
from fastbound.train.continuous import Denoiser
from fastbound.train.continuous_estimate import denoiser_gap

LO, HI, S0 = -10.0, 16.0, 0.05


def test_denoiser_gap_is_zero_for_itself_and_exact_for_a_constant_offset():
    source = GaussianSource([0.3, -1.0], [0.5, 2.0])
    x = source.sample(200, seed=2)
    exact = source.eps_denoiser(S0)
    offset = torch.tensor([0.1, -0.2], dtype=torch.float64)
    kw = dict(warm="gaussian", warm_std=S0, proposal=LogisticProposal(LO, HI), n_samples=8, seed=5)
    assert denoiser_gap(exact, exact, x, **kw) == (0.0, 0.0)
    gap, se = denoiser_gap(lambda z, lam: exact(z, lam) + offset, exact, x, **kw)
    expected = 0.5 * float(offset.pow(2).sum()) * (HI - LO) / (2 * math.log(2))
    assert abs(gap - expected) < 3 * se + 1e-12 * expected, (gap, se, expected)


def test_denoiser_gap_of_a_linear_offset_matches_the_closed_form_and_any_batch_size():
    # ε̂ = ε̂_ref + c z: ½∫E‖c z‖²dλ with E‖z‖² = α²E‖x̃‖² + dσ² = α²(‖x‖² + dσ0² - d) + d.
    source = GaussianSource([0.3, -1.0, 0.5], [0.5, 2.0, 1.0])
    x = source.sample(100, seed=2)
    exact, c, lo, hi = source.eps_denoiser(S0), 0.01, -3.0, 5.0
    kw = dict(warm="laplace", warm_std=S0, proposal=LogisticProposal(lo, hi, loc=1.0, scale=1.5), n_samples=16, seed=1)
    gap, se = denoiser_gap(lambda z, lam: exact(z, lam) + c * z, exact, x, **kw)
    sq = x.pow(2).sum(1).mean() + 3 * S0**2 - 3
    sp = lambda t: math.log1p(math.exp(t))  # noqa: E731  (∫sigmoid = softplus)
    expected = 0.5 * c**2 * (float(sq) * (sp(hi) - sp(lo)) + 3 * (hi - lo)) / (3 * math.log(2))
    assert abs(gap - expected) < 3 * se, (gap, se, expected)
    assert denoiser_gap(lambda z, lam: exact(z, lam) + c * z, exact, x, batch_size=37, **kw) == \
        pytest.approx((gap, se), rel=1e-10)


def test_too_few_draws_and_non_finite_outputs_are_refused():
    source = GaussianSource([0.0], [1.0])
    kw = dict(warm="gaussian", warm_std=S0, proposal=LogisticProposal(LO, HI))
    x = source.sample(4, seed=0)
    with pytest.raises(ValueError, match="n_samples"):
        denoiser_gap(source.eps_denoiser(S0), source.eps_denoiser(S0), x, n_samples=1, **kw)
    with pytest.raises(ValueError, match="non-finite"):
        denoiser_gap(lambda z, lam: z * math.nan, source.eps_denoiser(S0), x, n_samples=2, **kw)


def test_the_denoiser_correction_vanishes_at_both_ends():
    torch.manual_seed(0)
    model = Denoiser(torch.zeros(3), torch.ones(3), width=16, depth=1, length=S0)
    torch.nn.init.normal_(model.net[-1].weight)  # a non-zero correction
    torch.nn.init.normal_(model.net[-1].bias)
    z = torch.randn(5, 3)
    base = Denoiser(torch.zeros(3), torch.ones(3), width=16, depth=1, length=S0)  # the last layer is zero
    for lam, tol in ((-40.0, 1e-7), (40.0, 1e-6)):
        logsnr = torch.full((5,), lam)
        assert (model(z, logsnr) - base(z, logsnr)).abs().max() < tol
    assert (model(z, torch.zeros(5)) - base(z, torch.zeros(5))).abs().max() > 1e-2
