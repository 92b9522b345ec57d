"""The reference run's estimators (fastbound.train.continuous_estimate) against exact answers."""

import math

import pytest
import torch

from fastbound.continuous import LogisticProposal, nll_bound
from fastbound.testing.continuous import GaussianMixture, GaussianSource
from fastbound.train.continuous import Denoiser
from fastbound.train.continuous_estimate import antithetic_bound, denoiser_gap, fit_proposal

LO, HI, S0 = -10.0, 16.0, 0.05
RANGE = dict(warm="gaussian", warm_std=S0, logsnr_min=LO, logsnr_max=HI)


def _mixture():
    return GaussianMixture([1.0, 1.0, 1.0], [[-1.5, 0.0], [1.5, 0.5], [0.0, 1.8]], [0.4, 0.4, 0.4])


@pytest.mark.parametrize("warm", ["gaussian", "laplace", "uniform"])
def test_antithetic_bound_matches_the_gaussian_closed_form(warm):
    source = GaussianSource([0.3, -1.0, 0.5], [0.5, 2.0, 0.1])
    x = source.sample(400, seed=2)
    kw = dict(RANGE, warm=warm)
    est = antithetic_bound(source.eps_denoiser(S0), x, proposal=LogisticProposal(LO, HI), n_samples=16, seed=3, **kw)
    exact = source.expected_bound(x, S0, LO, HI)  # any unit-variance warm law (the denoiser is then not optimal)
    total = float(est.nll.sum() - exact.sum())
    se = float(est.stderr.pow(2).sum().sqrt())
    assert est.method == "antithetic" and abs(total) < 3 * se, (total, se)
    # the closed-form terms are nll_bound's
    plain = nll_bound(source.eps_denoiser(S0), x, n_samples=2, **kw)
    assert torch.equal(est.prior, plain.prior) and est.decoder == plain.decoder and est.reference == plain.reference


def test_antithetic_pairs_lower_the_standard_error():
    source = _mixture()
    x = source.sample(300, seed=1)
    proposal = LogisticProposal.from_data(source.sample(2000, seed=0), LO, HI, S0)
    kw = dict(RANGE, proposal=proposal, n_samples=16, seed=1)
    plain = nll_bound(source.eps_denoiser(S0), x, **kw).overall_bits_per_dim()
    anti = antithetic_bound(source.eps_denoiser(S0), x, **kw).overall_bits_per_dim()
    assert anti[1] < 0.75 * plain[1]
    assert abs(anti[0] - plain[0]) < 3 * math.hypot(anti[1], plain[1])


def test_fitted_proposal_beats_the_data_driven_one_on_the_mixture():
    source = _mixture()
    train, x = source.sample(2000, seed=0), source.sample(300, seed=1)
    fitted = fit_proposal(source.eps_denoiser(S0), train, seed=4, n_pilot=256, **RANGE)
    assert (fitted.logsnr_min, fitted.logsnr_max) == (LO, HI) and 1 <= fitted.scale <= 4
    kw = dict(RANGE, n_samples=16, seed=1)
    se_fit = antithetic_bound(source.eps_denoiser(S0), x, proposal=fitted, **kw).overall_bits_per_dim()[1]
    se_data = antithetic_bound(source.eps_denoiser(S0), x, proposal=LogisticProposal.from_data(train, LO, HI, S0),
                               **kw).overall_bits_per_dim()[1]
    assert se_fit < se_data


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


def test_too_few_draws_are_refused():
    source = GaussianSource([0.0], [1.0])
    with pytest.raises(ValueError, match="n_samples"):
        antithetic_bound(source.eps_denoiser(S0), source.sample(4, seed=0), proposal=LogisticProposal(LO, HI),
                         n_samples=1, **RANGE)


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
