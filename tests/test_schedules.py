"""Noise schedules: the rate is the derivative of the total noise, and the weights follow from them."""

import math

import pytest
import torch

from fastbound import schedules

ALL = [schedules.LogLinear(), schedules.LogLinear(eps=0.1), schedules.Geometric(1e-3, 20.0), schedules.Cosine(1e-3)]


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: type(s).__name__)
def test_rate_is_derivative_of_total(schedule):
    t = torch.linspace(0.01, 0.99, 37, dtype=torch.float64).requires_grad_()
    sigma, dsigma = schedule(t)
    (auto,) = torch.autograd.grad(sigma.sum(), t)
    torch.testing.assert_close(dsigma, auto, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: type(s).__name__)
def test_weights_and_mask_probability(schedule):
    t = torch.linspace(0.05, 0.95, 11, dtype=torch.float64)
    sigma, dsigma = schedule(t)
    torch.testing.assert_close(schedule.mask_prob(t), 1 - torch.exp(-sigma))
    torch.testing.assert_close(schedule.dce_weight(t), dsigma / (torch.exp(sigma) - 1))
    torch.testing.assert_close(schedule.dse_weight(t), dsigma)
    assert bool((torch.diff(sigma) > 0).all())


def test_loglinear_dce_weight_is_one_over_t():
    """MDLM: with mask probability (1-eps) t the DCE weight is exactly 1/t."""
    t = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    s = schedules.LogLinear(eps=1e-3)
    torch.testing.assert_close(s.dce_weight(t), 1 / t)
    torch.testing.assert_close(s.mask_prob(t), (1 - 1e-3) * t)


def test_cosine_survival_probability():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    s = schedules.Cosine(eps=1e-3)
    expected = 1e-3 + (1 - 1e-3) * torch.cos(t * math.pi / 2)
    torch.testing.assert_close(torch.exp(-s.total(t)), expected)


def test_geometric_rejects_bad_range():
    with pytest.raises(ValueError, match="sigma_min"):
        schedules.Geometric(5.0, 1.0)
