r"""Continuous sources with exactly known warm-started densities and optimal ε-denoisers.

For checking `fastbound.continuous.nll_bound` against exact answers:

* `GaussianSource`: x ~ N(μ, diag v). With Gaussian warm-up x̃ ~ N(μ, w), w = v + σ0²; the
  optimal ε-denoiser is linear and the finite-range bound's expectation is closed-form.
* `GridMixture1D`: a 1-D Gaussian mixture warm-started with any law; q(x̃) and
  E[ε | z] computed numerically on a fine grid.
* `GaussianMixture`: an isotropic Gaussian mixture in d dimensions (e.g. 2-D) with Gaussian
  warm-up: exact density, exact denoiser, entropy by Monte Carlo.

All computations are float64. The ε-denoiser of a source whose x̃ has density q is
:math:`\hat\varepsilon^*(z, \lambda) = \mathbb E[\varepsilon\mid z] = (z - \alpha\,\mathbb E[\tilde x\mid z])/\sigma`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

LOG_2PI = math.log(2 * math.pi)


def _alpha2_sigma2(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lam = logsnr.double()
    return torch.sigmoid(lam), torch.sigmoid(-lam)


def _softplus(t: torch.Tensor) -> torch.Tensor:
    # exact in both tails (torch's softplus returns t itself above its threshold of 20)
    return t.clamp_min(0) + torch.log1p(torch.exp(-t.abs()))


class GaussianSource:
    """x ~ N(mean, diag(var)) in d dimensions."""

    def __init__(self, mean, var):
        self.mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
        self.var = torch.as_tensor(var, dtype=torch.float64).flatten()
        if self.mean.shape != self.var.shape or not bool((self.var > 0).all()):
            raise ValueError("mean and var must have the same length and var must be > 0")

    @property
    def dims(self) -> int:
        return self.mean.numel()

    def sample(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return self.mean + self.var.sqrt() * torch.randn(n, self.dims, generator=g, dtype=torch.float64)

    def eps_denoiser(self, warm_std: float = 0.0):
        r"""E[ε | z] for x̃ ~ N(μ, w): :math:`\sigma (z - \alpha\mu)/(\alpha^2 w + \sigma^2)` (exact for Gaussian warm-up)."""
        w = self.var + warm_std**2

        def denoise(z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
            a2, s2 = _alpha2_sigma2(logsnr)
            a2, s2 = a2[:, None], s2[:, None]
            eps = s2.sqrt() * (z.double().reshape(z.shape[0], -1) - a2.sqrt() * self.mean) / (a2 * w + s2)
            return eps.reshape(z.shape).to(z.dtype)

        return denoise

    def nll(self, x_warm: torch.Tensor, warm_std: float = 0.0) -> torch.Tensor:
        """−log N(x̃; μ, v + σ0²) per sample (exact for Gaussian warm-up)."""
        w = self.var + warm_std**2
        r2 = (x_warm.double().reshape(x_warm.shape[0], -1) - self.mean) ** 2
        return 0.5 * (LOG_2PI + w.log() + r2 / w).sum(1)

    def expected_nll(self, x: torch.Tensor, warm_std: float = 0.0) -> torch.Tensor:
        r""":math:`\mathbb E_u[-\log N(x + \sigma_0 u; \mu, w)]` per x: ((x−μ)² + σ0²)/w in place of r²/w (any unit-variance u)."""
        w = self.var + warm_std**2
        r2 = (x.double().reshape(x.shape[0], -1) - self.mean) ** 2 + warm_std**2
        return 0.5 * (LOG_2PI + w.log() + r2 / w).sum(1)

    def expected_bound(self, x: torch.Tensor, warm_std: float, logsnr_min: float, logsnr_max: float) -> torch.Tensor:
        r"""The exact :math:`\mathbb E_{u,\varepsilon}[B]` of `nll_bound` with `eps_denoiser` (any unit-variance u law).

        Per dimension, with w = v + σ0², r² = E(x̃ − μ)² = (x − μ)² + σ0², s = e^λ, u = s w and
        a = λ + log w, the ε-error of the linear denoiser is :math:`m = (s^2w^2 + s r^2)/(sw+1)^2`, so

        .. math:: \int_{\lambda_1}^{\lambda_2} m\,d\lambda = \int_{s_1}^{s_2}\frac{s w^2 + r^2}{(sw+1)^2}ds
                  = \Big[\mathrm{softplus}(a) + \mathrm{sigmoid}(-a)\Big]_{a_1}^{a_2}
                  + \frac{r^2}{w}\big(\mathrm{sigmoid}(-a_1) - \mathrm{sigmoid}(-a_2)\big),

        and B = d/2 log(2πe) + ½α²_min(E‖x̃‖² − d) + d/2 softplus(−λ_max) + ½∫(m − sigmoid).
        As the range grows it tends to `expected_nll`.
        """
        x = x.double().reshape(x.shape[0], -1)
        w = self.var + warm_std**2
        r2 = (x - self.mean) ** 2 + warm_std**2
        lo, hi = torch.tensor(float(logsnr_min), dtype=torch.float64), torch.tensor(float(logsnr_max), dtype=torch.float64)
        a1, a2 = lo + w.log(), hi + w.log()
        m_int = _softplus(a2) + torch.sigmoid(-a2) - _softplus(a1) - torch.sigmoid(-a1) \
            + r2 / w * (torch.sigmoid(-a1) - torch.sigmoid(-a2))
        gap = (m_int - (_softplus(hi) - _softplus(lo))).sum(1)
        d = self.dims
        sq = (x**2).sum(1) + d * warm_std**2
        return d / 2 * (LOG_2PI + 1) + 0.5 * torch.sigmoid(lo) * (sq - d) + d / 2 * _softplus(-hi) + 0.5 * gap


def _law_density(law: str, u: np.ndarray) -> np.ndarray:
    """Density of the unit-variance warm-up law at u."""
    if law == "gaussian":
        return np.exp(-0.5 * u**2) / math.sqrt(2 * math.pi)
    if law == "laplace":
        b = 1 / math.sqrt(2)
        return np.exp(-np.abs(u) / b) / (2 * b)
    if law == "logistic":
        s = math.sqrt(3) / math.pi
        e = np.exp(-np.abs(u) / s)
        return e / (s * (1 + e) ** 2)
    if law == "uniform":
        a = math.sqrt(3)
        return np.where(np.abs(u) <= a, 1 / (2 * a), 0.0)
    raise ValueError(f"unknown warm-up law {law!r}")


def _law_nodes(law: str, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Legendre nodes and weights (density included) for E[f(u)], split at the law's kink 0."""
    half = {"gaussian": 12.0, "laplace": 30.0, "logistic": 25.0, "uniform": math.sqrt(3)}[law]
    x, w = np.polynomial.legendre.leggauss(n)
    pos, wp = (x + 1) / 2 * half, w / 2 * half
    u, wu = np.concatenate([-pos[::-1], pos]), np.concatenate([wp[::-1], wp])
    wu = wu * _law_density(law, u)
    return u, wu / wu.sum()


class GridMixture1D:
    r"""x ~ Σ_k π_k N(m_k, s_k²) in 1-D, warm-started x̃ = x + σ0 u with u of any unit-variance law.

    The density :math:`q(t) = \mathbb E_u[p_x(t - \sigma_0 u)]` is computed on a uniform grid of
    step ``step`` (Gauss–Legendre over u, split at 0), −log q(x̃) by linear interpolation of
    log q, and the optimal denoiser from the posterior over the grid,
    :math:`\mathbb E[\tilde x\mid z] = \sum_j t_j q_j\,\varphi((z - \alpha t_j)/\sigma) / \sum_j q_j\,\varphi(\cdot)`.
    The grid sum is an accurate integral while σ/α = e^{−λ/2} exceeds a few steps: use
    λ_max ≤ −2 log(3·step).
    """

    def __init__(self, weights, means, stds, warm: str, warm_std: float, step: float = 0.003):
        self.weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.means = np.asarray(means, dtype=np.float64)
        self.stds = np.asarray(stds, dtype=np.float64)
        self.warm, self.warm_std, self.step = warm, float(warm_std), step
        reach = {"uniform": math.sqrt(3)}.get(warm, 12.0) * warm_std
        lo = float(np.min(self.means - 9 * self.stds)) - reach
        hi = float(np.max(self.means + 9 * self.stds)) + reach
        self.grid = np.arange(lo, hi + step, step)
        u, wu = _law_nodes(warm)
        q = np.zeros_like(self.grid)
        for k in range(len(self.weights)):
            t = (self.grid[:, None] - warm_std * u[None, :] - self.means[k]) / self.stds[k]
            q += self.weights[k] * (np.exp(-0.5 * t**2) / (math.sqrt(2 * math.pi) * self.stds[k])) @ wu
        self.q = q
        self.log_q = np.log(np.maximum(q, 1e-300))
        self._nodes = (u, wu)

    def sample(self, n: int, seed: int) -> torch.Tensor:
        """n clean samples x, (n, 1) float64."""
        rng = np.random.default_rng(seed)
        k = rng.choice(len(self.weights), size=n, p=self.weights)
        return torch.from_numpy(self.means[k] + self.stds[k] * rng.standard_normal(n))[:, None]

    def nll(self, x_warm: torch.Tensor) -> torch.Tensor:
        """−log q(x̃), (B,)."""
        t = x_warm.double().reshape(-1).numpy()
        return torch.from_numpy(-np.interp(t, self.grid, self.log_q))

    def expected_nll(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\mathbb E_u[-\log q(x + \sigma_0 u)]` per x, (B,)."""
        u, wu = self._nodes
        t = x.double().reshape(-1).numpy()[:, None] + self.warm_std * u[None, :]
        return torch.from_numpy(-np.interp(t, self.grid, self.log_q) @ wu)

    def fisher_information(self) -> float:
        r""":math:`J(\tilde x) = \int q'^2/q`, by finite differences on the grid."""
        dq = np.gradient(self.q, self.step)
        return float(np.sum(dq**2 / np.maximum(self.q, 1e-300)) * self.step)

    def eps_denoiser(self, chunk: int = 256):
        """E[ε | z] from the grid posterior (rows of z in chunks of ``chunk``)."""
        grid = torch.from_numpy(self.grid)
        log_q = torch.from_numpy(self.log_q)

        def denoise(z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
            zf = z.double().reshape(-1)
            a2, s2 = _alpha2_sigma2(logsnr.reshape(-1))
            a, s = a2.sqrt(), s2.sqrt()
            out = torch.empty_like(zf)
            for i in range(0, zf.numel(), chunk):
                sl = slice(i, i + chunk)
                logits = log_q - 0.5 * ((zf[sl, None] - a[sl, None] * grid) / s[sl, None]) ** 2
                mean_x = torch.softmax(logits, dim=1) @ grid
                out[sl] = (zf[sl] - a[sl] * mean_x) / s[sl]
            return out.reshape(z.shape).to(z.dtype)

        return denoise


class GaussianMixture:
    r"""x ~ Σ_k π_k N(m_k, s_k² I) in d dimensions; with Gaussian warm-up x̃ is the mixture with s_k² + σ0²."""

    def __init__(self, weights, means, stds):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = self.weights / self.weights.sum()
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)

    @classmethod
    def ring(cls, n_components: int = 8, radius: float = 2.0, std: float = 0.25) -> "GaussianMixture":
        """Equal-weight components on a circle in 2-D (a standard toy density)."""
        angle = torch.arange(n_components, dtype=torch.float64) * (2 * math.pi / n_components)
        means = radius * torch.stack([angle.cos(), angle.sin()], 1)
        return cls(torch.ones(n_components), means, torch.full((n_components,), std))

    @property
    def dims(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        k = torch.multinomial(self.weights, n, replacement=True, generator=g)
        return self.means[k] + self.stds[k, None] * torch.randn(n, self.dims, generator=g, dtype=torch.float64)

    def _component_logits(self, y: torch.Tensor, scale: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """log π_k N(y; scale m_k, var_k I), (B, K); scale and var broadcast as (B, 1) / (B, K)."""
        r2 = ((y[:, None, :] - scale[:, :, None] * self.means[None]) ** 2).sum(-1)
        return self.weights.log() - 0.5 * (self.dims * (LOG_2PI + var.log()) + r2 / var)

    def nll(self, x_warm: torch.Tensor, warm_std: float = 0.0) -> torch.Tensor:
        """−log q(x̃) for Gaussian warm-up, (B,)."""
        y = x_warm.double().reshape(x_warm.shape[0], -1)
        var = (self.stds**2 + warm_std**2)[None].expand(y.shape[0], -1)
        return -torch.logsumexp(self._component_logits(y, torch.ones(y.shape[0], 1, dtype=torch.float64), var), 1)

    def entropy(self, warm_std: float = 0.0, n: int = 200_000, seed: int = 12345) -> tuple[float, float]:
        """h(x̃) in nats with its Monte-Carlo standard error, Gaussian warm-up."""
        x = self.sample(n, seed)
        g = torch.Generator().manual_seed(seed + 1)
        values = self.nll(x + warm_std * torch.randn(x.shape, generator=g, dtype=torch.float64), warm_std)
        return float(values.mean()), float(values.std() / math.sqrt(n))

    def eps_denoiser(self, warm_std: float = 0.0):
        r"""E[ε | z]: responsibilities of :math:`N(z; \alpha m_k, (\alpha^2 w_k + \sigma^2) I)` times :math:`\sigma(z - \alpha m_k)/(\alpha^2 w_k + \sigma^2)`."""
        w = self.stds**2 + warm_std**2

        def denoise(z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
            y = z.double().reshape(z.shape[0], -1)
            a2, s2 = _alpha2_sigma2(logsnr.reshape(-1))
            var = a2[:, None] * w[None] + s2[:, None]  # (B, K)
            resp = torch.softmax(self._component_logits(y, a2.sqrt()[:, None], var), 1)
            per_k = s2.sqrt()[:, None, None] * (y[:, None, :] - a2.sqrt()[:, None, None] * self.means[None]) \
                / var[:, :, None]
            return (resp[:, :, None] * per_k).sum(1).reshape(z.shape).to(z.dtype)

        return denoise
