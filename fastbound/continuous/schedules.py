r"""Variance-preserving noise schedules in log-SNR, and the log-SNR proposal of the bound.

The Gaussian channel of continuous diffusion, written in the log signal-to-noise ratio
λ (Kingma et al., "Variational Diffusion Models" (VDM), 2021; Kong et al.,
"Information-Theoretic Diffusion" (ITD), 2023):

.. math:: z_\lambda = \alpha_\lambda \tilde x + \sigma_\lambda \varepsilon,\quad
          \alpha_\lambda^2 = \mathrm{sigmoid}(\lambda),\ \sigma_\lambda^2 = \mathrm{sigmoid}(-\lambda),\
          \mathrm{SNR} = \alpha^2/\sigma^2 = e^\lambda .

A *schedule* maps a time t ∈ [0, 1] to λ(t), decreasing from ``logsnr_max`` (t = 0, almost
clean) to ``logsnr_min`` (t = 1, almost pure noise). VDM writes γ(t) = −λ(t) and uses
γ ∈ [−13.3, 5], that is λ ∈ [−5, 13.3]: the defaults of `LinearLogSNR`. A time integral
becomes a log-SNR integral through :math:`d\lambda = \lambda'(t)\,dt`, so a loss weighted
by :math:`\tfrac12 |\lambda'(t)|` with t ~ U(0, 1) estimates :math:`\tfrac12\int d\lambda`.

The likelihood bound (`fastbound.continuous.bound`) integrates over λ directly, by
importance sampling from `LogisticProposal` (ITD's truncated logistic) or by its
deterministic quadrature rule (`LogisticProposal.quadrature`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import _validate as v
from ..noise import sample_times

VDM_LOGSNR_MIN = -5.0
"""λ at t = 1 in VDM (γ_max = 5)."""
VDM_LOGSNR_MAX = 13.3
"""λ at t = 0 in VDM (γ_min = −13.3)."""


def _as_float64(x) -> torch.Tensor:
    return x.double() if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float64)


def alpha(logsnr) -> torch.Tensor:
    r""":math:`\alpha_\lambda = \sqrt{\mathrm{sigmoid}(\lambda)}`, float64."""
    return torch.sigmoid(_as_float64(logsnr)).sqrt()


def sigma(logsnr) -> torch.Tensor:
    r""":math:`\sigma_\lambda = \sqrt{\mathrm{sigmoid}(-\lambda)}`, float64 (exact for large λ, unlike √(1 − α²))."""
    return torch.sigmoid(-_as_float64(logsnr)).sqrt()


def _softplus(t: float) -> float:
    """log(1 + e^t) for a float, exact in both tails."""
    return max(t, 0.0) + math.log1p(math.exp(-abs(t)))


def _log_sigmoid(y: float) -> float:
    """log(1 / (1 + e^{-y})) = −softplus(−y) for a float."""
    return -_softplus(-y)


def _sigmoid(y: float) -> float:
    """1 / (1 + e^{-y}) for a float, without overflow in either tail."""
    if y >= 0:
        return 1 / (1 + math.exp(-y))
    e = math.exp(y)
    return e / (1 + e)


def _check_range(logsnr_min: float, logsnr_max: float) -> tuple[float, float]:
    for name, value in (("logsnr_min", logsnr_min), ("logsnr_max", logsnr_max)):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if not logsnr_min < logsnr_max:
        raise ValueError(f"logsnr_min must be < logsnr_max, got logsnr_min={logsnr_min} >= logsnr_max={logsnr_max}")
    return float(logsnr_min), float(logsnr_max)


class LogSNRSchedule:
    """A VP schedule: λ(t) decreasing on [0, 1] from ``logsnr_max`` to ``logsnr_min``."""

    logsnr_min: float
    logsnr_max: float

    def logsnr(self, t) -> torch.Tensor:
        """λ(t), float64."""
        raise NotImplementedError

    def dlogsnr_dt(self, t) -> torch.Tensor:
        """λ'(t) (< 0), float64."""
        raise NotImplementedError

    def time(self, logsnr) -> torch.Tensor:
        """t(λ), the inverse of `logsnr`, float64."""
        raise NotImplementedError

    def alpha(self, t) -> torch.Tensor:
        return alpha(self.logsnr(t))

    def sigma(self, t) -> torch.Tensor:
        return sigma(self.logsnr(t))


@dataclass(frozen=True)
class LinearLogSNR(LogSNRSchedule):
    r"""λ(t) = λ_max − (λ_max − λ_min) t, λ'(t) = −(λ_max − λ_min) (VDM's fixed linear γ)."""

    logsnr_min: float = VDM_LOGSNR_MIN
    logsnr_max: float = VDM_LOGSNR_MAX

    def __post_init__(self):
        _check_range(self.logsnr_min, self.logsnr_max)

    def logsnr(self, t) -> torch.Tensor:
        return self.logsnr_max - (self.logsnr_max - self.logsnr_min) * _as_float64(t)

    def dlogsnr_dt(self, t) -> torch.Tensor:
        return torch.full_like(_as_float64(t), -(self.logsnr_max - self.logsnr_min))

    def time(self, logsnr) -> torch.Tensor:
        return (self.logsnr_max - _as_float64(logsnr)) / (self.logsnr_max - self.logsnr_min)


COSINE_LOGSNR_LIMIT = 1400.0
"""The largest |λ| `CosineLogSNR` takes: e^{−|λ|/2} stays a normal float64."""


@dataclass(frozen=True)
class CosineLogSNR(LogSNRSchedule):
    r"""The cosine schedule α² = cos²(πt/2) (Nichol & Dhariwal 2021) in log-SNR, truncated to [λ_min, λ_max].

    Without truncation :math:`\lambda(t) = -2\log\tan(\pi t/2)`. Its shifted form (Kingma &
    Gao, "Understanding Diffusion Objectives", 2023) maps [0, 1] onto [λ_min, λ_max]:

    .. math:: \lambda(t) = -2\log\tan(a t + b),\quad b = \arctan e^{-\lambda_{max}/2},\
              a = \arctan e^{-\lambda_{min}/2} - b,

    :math:`\lambda'(t) = -2a/(\sin(at+b)\cos(at+b))`, and
    :math:`t(\lambda) = (\arctan e^{-\lambda/2} - b)/a`. Near θ = at + b → π/2 (low SNR) cos θ
    is taken as sin c with c = π/2 − θ = arctan e^{λ_min/2} + a(1 − t), which keeps its relative
    precision where cos θ would cancel: λ = −2(log sin θ − log sin c). |λ| up to
    `COSINE_LOGSNR_LIMIT`, where e^{−|λ|/2} is still a normal float64.
    """

    logsnr_min: float = -15.0
    logsnr_max: float = 15.0

    def __post_init__(self):
        _check_range(self.logsnr_min, self.logsnr_max)
        for name in ("logsnr_min", "logsnr_max"):
            if abs(getattr(self, name)) > COSINE_LOGSNR_LIMIT:
                raise ValueError(f"{name} must be within ±{COSINE_LOGSNR_LIMIT} for CosineLogSNR (float64 range), "
                                 f"got {getattr(self, name)}")

    @property
    def _ab(self) -> tuple[float, float]:
        b = math.atan(math.exp(-self.logsnr_max / 2))
        return math.atan(math.exp(-self.logsnr_min / 2)) - b, b

    def _angles(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(θ, c = π/2 − θ) at t, each formed without cancellation."""
        a, b = self._ab
        t = _as_float64(t)
        return a * t + b, math.atan(math.exp(self.logsnr_min / 2)) + a * (1 - t)

    def logsnr(self, t) -> torch.Tensor:
        theta, c = self._angles(t)
        return -2 * (torch.log(torch.sin(theta)) - torch.log(torch.sin(c)))

    def dlogsnr_dt(self, t) -> torch.Tensor:
        theta, c = self._angles(t)
        return -2 * self._ab[0] / (torch.sin(theta) * torch.sin(c))

    def time(self, logsnr) -> torch.Tensor:
        a, b = self._ab
        return (torch.atan(torch.exp(-_as_float64(logsnr) / 2)) - b) / a


def _log_sigmoid_pair(y: torch.Tensor) -> torch.Tensor:
    """log(sigmoid(y) sigmoid(−y)) = −|y| − 2 log(1 + e^{−|y|}), exact in both tails."""
    a = y.abs()
    return -a - 2 * torch.log1p(torch.exp(-a))


@dataclass(frozen=True)
class LogisticProposal:
    r"""The truncated logistic density over log-SNR that ITD samples λ from (Kong et al. 2023).

    With :math:`y = (\lambda - \mu)/s` and the truncation [λ_min, λ_max],

    .. math:: p(\lambda) = \frac{\mathrm{sigmoid}(y)\,\mathrm{sigmoid}(-y)}{s\,Z},\quad
              Z = \mathrm{sigmoid}(y_{max}) - \mathrm{sigmoid}(y_{min}),

    sampled by the inverse CDF :math:`\lambda = \mu + s\,\mathrm{logit}(\mathrm{sigmoid}(y_{min})
    + Z u)`, u ~ U[0, 1) (ITD's ``logistic_integrate``, whose truncation is μ ± 4s, i.e.
    :math:`Z = \tanh(2)`). Why logistic: for Gaussian data with covariance eigenvalues
    :math:`v_i` the ε-MMSE is :math:`\sum_i \mathrm{sigmoid}(\lambda + \log v_i)`, a sum of
    logistic CDFs centred at :math:`-\log v_i`, so the integrand's mass lies around
    :math:`-\log v_i`. ITD's data-driven choice (`from_data`) is :math:`\mu = -\overline{\log v}`
    and :math:`s = \sqrt{1 + \tfrac{3}{\pi}\mathrm{Var}(\log v)}`; before seeing data it uses
    μ = 0, s = 2 (the defaults here).
    """

    logsnr_min: float
    logsnr_max: float
    loc: float = 0.0
    scale: float = 2.0

    def __post_init__(self):
        _check_range(self.logsnr_min, self.logsnr_max)
        for name in ("loc", "scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite float, got {value!r}")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")

    @classmethod
    def from_data(cls, x: torch.Tensor, logsnr_min: float, logsnr_max: float, warm_std: float = 0.0,
                  ) -> "LogisticProposal":
        r"""ITD's location and scale from samples x (N, ...) of the data (``dataset_info`` in ITD's code).

        :math:`\log v_i` are the log-eigenvalues of the covariance of x̃ = x + σ0 u,
        Cov(x) + σ0² I (floored at 1e-12 of the largest when singular). ITD's code takes
        :math:`s^2 = 1 + \tfrac3\pi\mathrm{Var}(\log v)`; matching the variance of the
        logistic mixture exactly would give :math:`1 + \tfrac{3}{\pi^2}\mathrm{Var}`, so ITD's
        proposal is the wider (safer) of the two.
        """
        flat = x.detach().reshape(x.shape[0], -1).double()
        if flat.shape[0] < 2:
            raise ValueError(f"from_data needs at least 2 samples, got {flat.shape[0]}")
        cov = torch.cov(flat.T).reshape(flat.shape[1], flat.shape[1])
        eig = torch.linalg.eigvalsh(cov) + warm_std**2
        eig = eig.clamp_min(1e-12 * float(eig.max().clamp_min(1e-300)))
        log_eig = eig.log()
        var = float(log_eig.var()) if log_eig.numel() > 1 else 0.0
        return cls(logsnr_min, logsnr_max, loc=-float(log_eig.mean()), scale=math.sqrt(1 + 3 / math.pi * var))

    @property
    def _y_range(self) -> tuple[float, float]:
        return (self.logsnr_min - self.loc) / self.scale, (self.logsnr_max - self.loc) / self.scale

    def log_density(self, logsnr) -> torch.Tensor:
        """log p(λ) on [λ_min, λ_max] (−inf outside), float64."""
        lam = _as_float64(logsnr)
        out = _log_sigmoid_pair((lam - self.loc) / self.scale) - math.log(self.scale) - self._log_z()
        inside = (lam >= self.logsnr_min) & (lam <= self.logsnr_max)
        return torch.where(inside, out, torch.full_like(out, -math.inf))

    def _log_z(self) -> float:
        """log(sigmoid(hi) − sigmoid(lo)) = log sigmoid(hi) + log sigmoid(−lo) + log(1 − e^{lo − hi}):
        no cancellation, and finite however far the window lies in a tail."""
        lo, hi = self._y_range
        return _log_sigmoid(hi) + _log_sigmoid(-lo) + math.log(-math.expm1(lo - hi))

    def density(self, logsnr) -> torch.Tensor:
        return self.log_density(logsnr).exp()

    def _tail(self) -> tuple[bool, float, float]:
        """(reflect, log a, log b): the CDF window [a, b] of y, or of −y when the window lies mostly
        above loc, as logarithms.

        sigmoid keeps its relative precision only in the lower tail (sigmoid(y) ≈ e^y), so a window
        in the upper tail is handled through y' = −y; otherwise 1 − sigmoid(y) would cancel. In
        logarithms a window far in the tail (a, b below float64's range) keeps its resolution.
        """
        lo, hi = self._y_range
        if lo + hi > 0:
            return True, _log_sigmoid(-hi), _log_sigmoid(-lo)
        return False, _log_sigmoid(lo), _log_sigmoid(hi)

    def icdf(self, u) -> torch.Tensor:
        """λ = F⁻¹(u) for u in [0, 1], float64, clamped into [λ_min, λ_max] against rounding.

        p = a (1 − u') + b u' as log p = logaddexp(log a + log(1 − u'), log b + log u'), then
        y = log p − log(1 − p)."""
        reflect, log_a, log_b = self._tail()
        u = _as_float64(u)
        u = 1 - u if reflect else u
        log_p = torch.logaddexp(log_a + torch.log1p(-u), log_b + torch.log(u))
        y = log_p - torch.log1p(-log_p.exp())
        return (self.loc + self.scale * (-y if reflect else y)).clamp(self.logsnr_min, self.logsnr_max)

    def cdf(self, logsnr) -> torch.Tensor:
        reflect, log_a, log_b = self._tail()
        y = (_as_float64(logsnr).clamp(self.logsnr_min, self.logsnr_max) - self.loc) / self.scale
        # (F − a) / (b − a) = e^{log F − log b} (1 − e^{log a − log F}) / (1 − e^{log a − log b})
        log_f = torch.nn.functional.logsigmoid(-y if reflect else y)
        share = torch.exp(log_f - log_b + torch.log(-torch.expm1(log_a - log_f)) - math.log(-math.expm1(log_a - log_b)))
        return 1 - share if reflect else share

    def sample(self, n: int, *, seed: int, offset: int = 0, device=None, backend: str | None = None) -> torch.Tensor:
        """n draws, float64, from fastbound's counter-based uniforms (`fastbound.sample_times`, iid)."""
        u = sample_times(n, method="iid", eps=0.0, seed=seed, offset=offset, device=device, backend=backend)
        return self.icdf(u.double())

    def quadrature(self, n_steps: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        r"""(nodes λ_k, weights w_k), float64, with :math:`\sum_k w_k f(\lambda_k) \approx \int f\,d\lambda`.

        Gauss–Legendre with n_steps nodes in the proposal's CDF coordinate u ∈ [0, 1]:
        :math:`\int f\,d\lambda = \int_0^1 f(F^{-1}(u))/p(F^{-1}(u))\,du`, so the nodes are
        spread as the proposal's mass is and the weights are :math:`w^{GL}_k / p(\lambda_k)`.
        """
        nodes, weights = np.polynomial.legendre.leggauss(v.as_int("n_steps", n_steps, minimum=1))
        u = torch.tensor((nodes + 1) / 2, dtype=torch.float64, device=device)
        lam = self.icdf(u)
        w = torch.tensor(weights / 2, dtype=torch.float64, device=device) / self.density(lam)
        return lam, w
