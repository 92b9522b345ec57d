"""fastbound.continuous.schedules: VP log-SNR schedules and the truncated-logistic proposal."""

import math

import pytest
import torch
from scipy import stats

from fastbound.continuous.schedules import CosineLogSNR, LinearLogSNR, LogisticProposal, alpha, sigma


@pytest.mark.parametrize("schedule", [LinearLogSNR(), LinearLogSNR(-3.0, 7.0), CosineLogSNR(), CosineLogSNR(-8.0, 11.0),
                                      CosineLogSNR(-80.0, 20.0), CosineLogSNR(-700.0, 700.0)])
def test_schedule_endpoints_derivative_inverse(schedule):
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    lam = schedule.logsnr(t)
    assert lam[0].item() == pytest.approx(schedule.logsnr_max, abs=1e-9)
    assert lam[-1].item() == pytest.approx(schedule.logsnr_min, abs=1e-9)
    assert bool((lam.diff() < 0).all())
    torch.testing.assert_close(schedule.time(lam), t, atol=1e-10, rtol=0)
    h = 1e-6
    tt = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    numeric = (schedule.logsnr(tt + h) - schedule.logsnr(tt - h)) / (2 * h)
    torch.testing.assert_close(schedule.dlogsnr_dt(tt), numeric, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(schedule.alpha(t) ** 2 + schedule.sigma(t) ** 2, torch.ones_like(t))


def test_vdm_range_and_cosine_shape():
    # VDM: gamma = -logsnr in [-13.3, 5].
    s = LinearLogSNR()
    assert (s.logsnr_min, s.logsnr_max) == (-5.0, 13.3)
    # Untruncated cosine: logsnr(t) = -2 log tan(pi t / 2); a wide truncation is close to it mid-range.
    c = CosineLogSNR(-40.0, 40.0)
    t = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    torch.testing.assert_close(c.logsnr(t), -2 * torch.log(torch.tan(math.pi * t / 2)), atol=1e-7, rtol=0)


def test_alpha_sigma_exact_in_tails():
    lam = torch.tensor([-40.0, 0.0, 40.0], dtype=torch.float64)
    torch.testing.assert_close(alpha(lam) ** 2, torch.sigmoid(lam))
    assert sigma(lam)[2].item() == pytest.approx(math.exp(-20), rel=1e-12)  # not sqrt(1 - alpha^2) = 0


@pytest.mark.parametrize("loc,scale,lo,hi", [(0.0, 2.0, -10.0, 12.0), (3.0, 0.7, -2.0, 9.0), (-20.0, 1.0, 0.0, 5.0)])
def test_proposal_density_cdf_icdf(loc, scale, lo, hi):
    p = LogisticProposal(lo, hi, loc, scale)
    lam = torch.linspace(lo, hi, 200001, dtype=torch.float64)
    assert torch.trapezoid(p.density(lam), lam).item() == pytest.approx(1.0, rel=1e-6)
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(p.cdf(p.icdf(u)), u, atol=1e-9, rtol=0)
    assert p.density(torch.tensor([lo - 1.0, hi + 1.0])).sum().item() == 0.0
    # ITD's untruncated weight 1/p: s tanh(c/2) / (sigmoid(y) sigmoid(-y)) at the symmetric window c = 4.
    itd = LogisticProposal(loc - 4 * scale, loc + 4 * scale, loc, scale)
    y = torch.tensor([0.3, -1.7], dtype=torch.float64)
    expected = scale * math.tanh(2.0) / (torch.sigmoid(y) * torch.sigmoid(-y))
    torch.testing.assert_close(1 / itd.density(loc + scale * y), expected)


def test_proposal_sampler_reproducible_and_ks():
    p = LogisticProposal(-6.0, 9.0, 1.0, 1.5)
    a = p.sample(4000, seed=3)
    torch.testing.assert_close(a, p.sample(4000, seed=3), rtol=0, atol=0)
    torch.testing.assert_close(a[1000:], p.sample(3000, seed=3, offset=1000), rtol=0, atol=0)
    assert not torch.equal(a, p.sample(4000, seed=4))
    assert float(a.min()) >= -6.0 and float(a.max()) <= 9.0
    result = stats.kstest(a.numpy(), lambda v: p.cdf(torch.as_tensor(v, dtype=torch.float64)).numpy())
    assert result.pvalue > 1e-3


def test_proposal_quadrature_integrates():
    # int (sigmoid(l + 1) - sigmoid(l)) dl over [a, b] = [softplus(l + 1) - softplus(l)]_a^b.
    p = LogisticProposal(-15.0, 18.0, 0.5, 2.0)
    lam, w = p.quadrature(32)
    f = torch.sigmoid(lam + 1) - torch.sigmoid(lam)
    sp = torch.nn.functional.softplus
    b, a = torch.tensor(18.0, dtype=torch.float64), torch.tensor(-15.0, dtype=torch.float64)
    exact = (sp(b + 1) - sp(b)) - (sp(a + 1) - sp(a))
    assert float((w * f).sum()) == pytest.approx(float(exact), rel=1e-8)
    assert bool((lam.diff() > 0).all()) and bool((w > 0).all())


def test_from_data_itd_rule():
    g = torch.Generator().manual_seed(0)
    v = torch.tensor([0.01, 0.1, 1.0, 4.0], dtype=torch.float64)
    x = torch.randn(200000, 4, generator=g, dtype=torch.float64) * v.sqrt()
    p = LogisticProposal.from_data(x, -10.0, 10.0, warm_std=0.1)
    log_v = (v + 0.01).log()
    assert p.loc == pytest.approx(-float(log_v.mean()), abs=0.02)
    assert p.scale == pytest.approx(math.sqrt(1 + 3 / math.pi * float(log_v.var())), rel=0.01)


def test_bad_arguments():
    with pytest.raises(ValueError, match="logsnr_min"):
        LinearLogSNR(5.0, 5.0)
    with pytest.raises(ValueError, match="logsnr_min"):
        LogisticProposal(3.0, -3.0)
    with pytest.raises(ValueError, match="scale"):
        LogisticProposal(-3.0, 3.0, scale=0.0)
    with pytest.raises(ValueError, match="logsnr_max"):
        CosineLogSNR(-3.0, math.inf)
    with pytest.raises(ValueError, match="loc"):
        LogisticProposal(-3.0, 3.0, loc=math.nan)


def test_cosine_range_limit():
    """Beyond ±COSINE_LOGSNR_LIMIT e^{-|λ|/2} leaves float64's normal range: refused, not inf."""
    from fastbound.continuous.schedules import COSINE_LOGSNR_LIMIT

    CosineLogSNR(-COSINE_LOGSNR_LIMIT, COSINE_LOGSNR_LIMIT)
    with pytest.raises(ValueError, match="logsnr_max must be within"):
        CosineLogSNR(-10.0, 2000.0)


@pytest.mark.parametrize("proposal", [LogisticProposal(-10.0, 15.0, scale=0.01), LogisticProposal(2000.0, 2001.0),
                                      LogisticProposal(-2001.0, -2000.0, loc=5.0, scale=0.5)])
def test_proposal_far_tails_do_not_overflow(proposal):
    """Windows thousands of scales from loc: the normaliser and the CDF window in float math
    without overflow (they raised OverflowError)."""
    lam = proposal.sample(4000, seed=0)
    assert bool(((lam >= proposal.logsnr_min) & (lam <= proposal.logsnr_max)).all())
    assert stats.kstest(lam.numpy(), lambda q: proposal.cdf(torch.as_tensor(q)).numpy()).pvalue > 1e-3
    grid = torch.linspace(proposal.logsnr_min, proposal.logsnr_max, 20001, dtype=torch.float64)
    assert torch.trapezoid(proposal.density(grid), grid).item() == pytest.approx(1.0, rel=1e-3)
    u = torch.linspace(0.01, 0.99, 9, dtype=torch.float64)
    torch.testing.assert_close(proposal.cdf(proposal.icdf(u)), u, rtol=1e-6, atol=1e-9)
