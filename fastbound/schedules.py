r"""Noise schedules: total noise :math:`\sigma(t)` and its rate :math:`\sigma'(t)` for t in [0, 1].

A token survives to time t with probability :math:`e^{-\sigma(t)}` (absorbing: it is
masked with probability :math:`1 - e^{-\sigma(t)}`). The DCE weight that turns the masked
cross-entropy into the NLL bound (MDLM; the I-MDCE relation of Jeon et al. 2025) is
:math:`\sigma'(t) / (e^{\sigma(t)} - 1)`; the DSE weight (SEDD) is :math:`\sigma'(t)`.
"""

from __future__ import annotations

import math

import torch


class Schedule:
    """Base class: subclasses define `total` (σ) and `rate` (dσ/dt)."""

    def total(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rate(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (σ(t), σ'(t))."""
        return self.total(t), self.rate(t)

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        r""":math:`1 - e^{-\sigma(t)}`, the probability that a token is corrupted by time t."""
        return -torch.expm1(-self.total(t))

    def dce_weight(self, t: torch.Tensor) -> torch.Tensor:
        r""":math:`\sigma'(t) / (e^{\sigma(t)} - 1)`: weight of the masked cross-entropy (MDLM)."""
        return self.rate(t) / torch.expm1(self.total(t))

    def dse_weight(self, t: torch.Tensor) -> torch.Tensor:
        r""":math:`\sigma'(t)`: weight of the score entropy (SEDD)."""
        return self.rate(t)


class LogLinear(Schedule):
    r"""MDLM/SEDD log-linear schedule: :math:`\sigma(t) = -\log(1 - (1-\epsilon) t)`,
    so the mask probability is :math:`(1-\epsilon)t` and the DCE weight is 1/t."""

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def total(self, t):
        return -torch.log1p(-(1 - self.eps) * t)

    def rate(self, t):
        return (1 - self.eps) / (1 - (1 - self.eps) * t)


class Geometric(Schedule):
    r"""SEDD's geometric schedule: :math:`\sigma(t) = \sigma_{min}^{1-t}\sigma_{max}^{t}`."""

    def __init__(self, sigma_min: float = 1e-3, sigma_max: float = 20.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def total(self, t):
        return self.sigma_min ** (1 - t) * self.sigma_max**t

    def rate(self, t):
        return self.total(t) * math.log(self.sigma_max / self.sigma_min)


class Cosine(Schedule):
    r"""MDLM's cosine schedule: :math:`e^{-\sigma(t)} = \epsilon + (1-\epsilon)\cos(\pi t / 2)`."""

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def total(self, t):
        return -torch.log(self.eps + (1 - self.eps) * torch.cos(t * math.pi / 2))

    def rate(self, t):
        half_pi = math.pi / 2
        return half_pi * (1 - self.eps) * torch.sin(t * half_pi) / (self.eps + (1 - self.eps) * torch.cos(t * half_pi))


SCHEDULES = {"loglinear": LogLinear, "geometric": Geometric, "cosine": Cosine}
