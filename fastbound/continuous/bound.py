r"""The warm-start information-theoretic NLL bound for continuous (and 8-bit) data: `nll_bound`.

**Setting** (Shen, Gan & Ling, "Information Theoretic Learning for Diffusion Models with
Warm Start", NeurIPS 2025, arXiv 2510.20903). The data x ∈ R^d is first perturbed by
isotropic warm-up noise, :math:`\tilde x = x + \sigma_0 u` (u i.i.d. per coordinate, mean
0, variance 1, of law ``warm``), then sent through the VP Gaussian channel
:math:`z_\lambda = \alpha_\lambda\tilde x + \sigma_\lambda\varepsilon`,
:math:`\alpha^2 = \mathrm{sigmoid}(\lambda)`, :math:`\sigma^2 = \mathrm{sigmoid}(-\lambda)`.
The denoiser predicts ε: ``denoiser(z, logsnr) -> eps_hat``; write
:math:`m(\lambda) = \mathbb E_\varepsilon\lVert\varepsilon - \hat\varepsilon(z_\lambda,\lambda)\rVert^2`.

**Pointwise I-MMSE** (Kong et al., "Information-Theoretic Diffusion", ICLR 2023, eq. 4 with
the Gaussian reference): for the optimal denoiser :math:`\hat\varepsilon^* = \mathbb E[\varepsilon\mid z]`,

.. math:: -\log q(\tilde x) = \tfrac d2\log(2\pi e) + \tfrac12\int_{-\infty}^{\infty}
          \big(m^*(\lambda) - d\,\mathrm{sigmoid}(\lambda)\big)\,d\lambda ,

(check: for :math:`\tilde x\sim N(0, v)` in 1-D, :math:`m^* = (s^2v^2 + s\tilde x^2)/(sv+1)^2`,
s = e^λ, and the integral is :math:`\log v - 1 + \tilde x^2/v`, giving
:math:`\tfrac12\log 2\pi v + \tilde x^2/2v`).

**The finite-range bound implemented.** Take the generative model: :math:`z_{\lambda_{min}}
\sim N(0, I)`, the reverse diffusion driven by ε̂ from :math:`\lambda_{min}` to
:math:`\lambda_{max}`, and the decoder :math:`\tilde x \sim N(z/\alpha_{max}, e^{-\lambda_{max}} I)`.
VDM's continuous-time variational bound (Kingma et al. 2021, eqs. 11 and 17, with
:math:`\lVert x - \hat x\rVert^2 = \lVert\varepsilon - \hat\varepsilon\rVert^2/\mathrm{SNR}` and
:math:`d\,\mathrm{SNR} = \mathrm{SNR}\,d\lambda`) gives, for every x̃,

.. math:: -\log p_\theta(\tilde x) \le B(\tilde x) =
          \underbrace{\mathrm{KL}\big(N(\alpha_{min}\tilde x, \sigma_{min}^2 I)\,\|\,N(0, I)\big)}_{\text{prior}}
          + \tfrac12\int_{\lambda_{min}}^{\lambda_{max}} m(\lambda)\,d\lambda
          + \underbrace{\mathbb E\big[-\log N(\tilde x; z_{max}/\alpha_{max}, e^{-\lambda_{max}} I)\big]}_{\text{decoder}} ,

with prior :math:`= \tfrac12[\alpha_{min}^2(\lVert\tilde x\rVert^2 - d) + d\,\mathrm{softplus}(\lambda_{min})]`
(:math:`\log\sigma^2 = -\mathrm{softplus}(\lambda)`) and decoder
:math:`= \tfrac d2\log(2\pi e) - \tfrac d2\lambda_{max}` (:math:`\tilde x - z/\alpha = -e^{-\lambda/2}\varepsilon`).
Subtracting and adding the Gaussian reference,
:math:`\tfrac12\int_{\lambda_{min}}^{\lambda_{max}} d\,\mathrm{sigmoid} = \tfrac d2[\mathrm{softplus}(\lambda_{max}) - \mathrm{softplus}(\lambda_{min})]`:

.. math:: B(\tilde x) = \text{prior} + \tfrac d2[\mathrm{softplus}(\lambda_{max}) - \mathrm{softplus}(\lambda_{min})]
          + \tfrac12\int_{\lambda_{min}}^{\lambda_{max}}\big(m(\lambda) - d\,\mathrm{sigmoid}(\lambda)\big)d\lambda
          + \text{decoder}
        = \tfrac d2\log(2\pi e) + \tfrac12\alpha_{min}^2(\lVert\tilde x\rVert^2 - d)
          + \tfrac d2\,\mathrm{softplus}(-\lambda_{max}) + \tfrac12\int_{\lambda_{min}}^{\lambda_{max}}(m - d\,\mathrm{sigmoid})\,d\lambda .

This is exactly Kong et al.'s full-range expression evaluated with the N(0, I)-optimal
denoiser :math:`\sigma z` below λ_min (its gap integrates to :math:`\tfrac12\alpha_{min}^2(\lVert\tilde x\rVert^2-d)`)
and with ε̂ = 0 above λ_max (gap :math:`d\,\mathrm{sigmoid}(-\lambda)`, integral
:math:`\tfrac d2\mathrm{softplus}(-\lambda_{max})`). `nll_bound` returns an unbiased estimate of
:math:`\mathbb E_u[B(x + \sigma_0 u)]` per x, the prior in closed form over u
(:math:`\mathbb E\lVert x + \sigma_0 u\rVert^2 = \lVert x\rVert^2 + d\sigma_0^2`), the integral by
importance sampling or quadrature; u, ε and λ are drawn afresh for every term (every pair
with ``antithetic=True``).

**What each number bounds.**

* ``data="continuous"``: ``nll`` estimates :math:`\mathbb E_u[B(x + \sigma_0 u)] \ge
  \mathbb E_u[-\log p_\theta(x + \sigma_0 u)]`, the model's NLL of the warm-started x̃ (a
  density in x's units), per x. Averaged over data it lies above the true
  :math:`\mathbb E[-\log q(\tilde x)] = h(\tilde x)`. At the optimal denoiser the expected
  gap is the truncation slack: at the low end :math:`\mathrm{KL}(q(z_{\lambda_{min}})\,\|\,N(0,I))`,
  between 0 and the expected ``prior``; at the high end
  :math:`\tfrac12\int_{\lambda_{max}}^\infty (d - \mathbb E\,m^*)\,d\lambda \le \tfrac d2\log(1 + J e^{-\lambda_{max}})`
  (``tail_bound``), by the Bayesian Cramér–Rao (Van Trees) bound
  :math:`\mathbb E\lVert\tilde x - \hat x\rVert^2 \ge d^2/(d\,\mathrm{SNR} + \mathrm{tr}\,J(\tilde x))`
  and Stam's :math:`J(\tilde x) \preceq J(\sigma_0 u) = (J_{law}/\sigma_0^2) I`, with the
  Fisher information of the unit-variance law :math:`J_{law}` = 1 (Gaussian), 2 (Laplace),
  π²/9 (logistic), ∞ (uniform: no such bound; the tail decays like :math:`e^{-\lambda/2}`).
  Without warm start (σ0 = 0) it is the plain Gaussian-channel estimate, ``tail_bound`` = ∞.
* ``data="8bit"``: x holds integers 0..255, mapped to bin centres
  :math:`y = (x + \tfrac12)/128 - 1` (bins of width Δ = 1/128 tiling [−1, 1), `from_8bit`),
  and ``nll`` = the continuous estimate for y plus :math:`d\log(1/\Delta) = d\log 128`. With
  ``warm="uniform"`` and ``warm_std = Δ/√12`` (u uniform over exactly one bin: uniform
  dequantisation) it is an upper bound on the discrete NLL :math:`-\log P_\theta(x)` of
  :math:`P_\theta(x) = \int_{\mathrm{bin}(x)} p_\theta`, by Jensen:
  :math:`-\log P_\theta(x) \le -d\log\Delta + \mathbb E_{t\sim U(\mathrm{bin})}[-\log p_\theta(t)]`
  (Theis et al. 2016; Ho et al., Flow++ 2019) — ``discrete_exact`` is True. For any other law
  or width it is :math:`d\log(1/\Delta)` plus the bound of the warm-started density at the bin
  centre, the number Shen et al. report in bits/dim; it bounds a normalised discrete
  likelihood only when the warm kernel's translates by the grid sum to at most 1/Δ^d
  (as for the uniform of width Δ), which a narrow Gaussian does not.

**Estimators** (per sample, float64 accumulation through `integrate_step`; memory flat in
``n_samples``):

* ``"importance"`` (ITD): :math:`\lambda \sim p` = `LogisticProposal` on [λ_min, λ_max],
  each draw adds :math:`S = (\lVert\varepsilon - \hat\varepsilon\rVert^2 - \mathrm{sigmoid}(\lambda)
  \lVert\varepsilon\rVert^2)/(2p(\lambda))` with one (u, ε): the reference term
  :math:`d\,\mathrm{sigmoid}(\lambda)` is replaced by the control variate
  :math:`\mathrm{sigmoid}(\lambda)\lVert\varepsilon\rVert^2` of the same mean, which follows the
  squared error draw by draw in both tails (ε̂ → 0 at high SNR, ε̂ → ε at low SNR), so the
  variance stays finite as the range grows. The estimate is the mean of n_samples i.i.d.
  draws, its standard error :math:`\sqrt{(\overline{S^2} - \bar S^2)/(n-1)}`.
* ``"quadrature"``: `LogisticProposal.quadrature` nodes (Gauss–Legendre in the proposal's
  CDF), n_samples (u, ε) per node; standard error from the per-node sample variances
  (the discretisation error of the rule is not in it).

**Antithetic pairs** (``antithetic=True``, either method; Hammersley & Morton 1956). Each draw
evaluates the denoiser twice at the same λ and x̃, at :math:`z_\pm = \alpha\tilde x \pm \sigma\varepsilon`
with targets ±ε, and adds the pair's average

.. math:: S = \frac{w}{2}\Big[\big(\lVert\varepsilon - \hat\varepsilon(z_+)\rVert^2 - c\big)
          + \big(\lVert{-\varepsilon} - \hat\varepsilon(z_-)\rVert^2 - c\big)\Big],\qquad
          c = \mathrm{sigmoid}(\lambda)\lVert\varepsilon\rVert^2 ,

w the draw's weight (1/(2p(λ)) or the node's w_k/2). *Unbiased:* ε ~ N(0, I) is symmetric, so
given (λ, x̃) the pair (−ε, z₋) has the law of (ε, z₊) (and c is even in ε): each half has the
mean of a plain draw, hence so has their average. The halves are dependent, but the pairs are
i.i.d. over draws, so the standard error is that of the pair averages,
:math:`\sqrt{(\overline{S^2} - \bar S^2)/(n-1)}` over the n pairs, never of the 2n halves.
*Why it helps:* at high SNR :math:`\hat\varepsilon(z_\pm) \approx \hat\varepsilon_0 \pm \sigma\,\partial\hat\varepsilon\,\varepsilon`
(:math:`\hat\varepsilon_0 = \hat\varepsilon(\alpha\tilde x)`), so
:math:`\lVert\pm\varepsilon - \hat\varepsilon(z_\pm)\rVert^2 = \lVert\varepsilon\rVert^2 \mp 2\varepsilon\cdot\hat\varepsilon_0
+ \lVert\hat\varepsilon_0\rVert^2 - 2\sigma\,\varepsilon\cdot\partial\hat\varepsilon\,\varepsilon
\pm 2\sigma\,\hat\varepsilon_0\cdot\partial\hat\varepsilon\,\varepsilon + O(\sigma^2)`
with the odd-in-ε terms of opposite signs: the pair average cancels them, above all the cross
term :math:`\mp 2\varepsilon\cdot\hat\varepsilon_0`, whose variance, weighted by 1/p(λ)², dominates
the upper tail. For a linear denoiser ε̂(z) = Az + b (the optimum for Gaussian data) the halves
are :math:`\lVert(I - \sigma A)\varepsilon\rVert^2 \mp 2(I - \sigma A)\varepsilon\cdot(\alpha A\tilde x + b)
+ \lVert\alpha A\tilde x + b\rVert^2` exactly, so the pair removes the odd term at every λ. Measured on the reference run's 2-D mixture with its exact denoiser, 1000 points × 32
draws: the standard error falls from 0.029 to 0.013 bits/dim with ITD's data-driven proposal and
from 0.018 to 0.0095 with `fit_proposal`'s; where the variance comes from a model's own error at
mid SNR (even in ε; the run's 8-bit digits) it changes little. *Cost:* two denoiser rows per
draw (z₋ and −ε are built from `perturb`'s x̃ and ε, no second noise draw), so where the
denoiser dominates the time it pays when it more than halves the variance. The + half of draw k is exactly the plain estimator's draw k
(the same counters), so a plain and an antithetic estimate of one seed are paired.

**The proposal** (`fit_proposal`). Any proposal on the range gives an unbiased estimate;
the variance of one importance draw is :math:`\int V(\lambda)/p(\lambda)\,d\lambda - I^2`, with
:math:`V(\lambda) = \mathbb E[S_\lambda^2]` the second moment of the unweighted pair average at λ,
minimised over all densities by :math:`p \propto \sqrt V`. `fit_proposal` measures V on an even
λ grid with a pilot denoiser on (training) data and picks the truncated logistic (loc, scale)
of least :math:`\int V/p` (trapezoid rule). Scales below 1 are not tried: in both tails √V
decays like :math:`e^{-|\lambda|}` (measured on the run's mixture; the pair's error is O(α²) at
low SNR and O(σ²) at high SNR), and a lighter-tailed proposal would let V/p grow towards the
ends of the range, where the grid has few points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from .. import _backend
from .. import _validate as v
from . import _args, _ops
from ._args import check_warm
from .integrate import run as run_step
from .reference import WARM_CODES
from .schedules import LogisticProposal, _check_range, _sigmoid, _softplus, alpha, sigma

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
METHODS = ("importance", "quadrature")
DATA_KINDS = ("continuous", "8bit")
DEFAULT_N_STEPS = 32
BIN_WIDTH_8BIT = 1 / 128
"""Δ of `from_8bit`: 256 levels on [−1, 1)."""
FISHER_INFORMATION = {"gaussian": 1.0, "laplace": 2.0, "logistic": math.pi**2 / 9, "uniform": math.inf}
r"""J of each unit-variance warm-up law: 1/b² for Laplace (b = 1/√2), 1/(3s²) for logistic (s = √3/π)."""

# Counters of the log-SNR uniforms (fastbound.sample_times' key); the warm and ε noise uses
# perturb's own key at counters [0, rows * d), row g (draw g // B of sample g % B) at g * d,
# with or without antithetic pairs (both halves of a pair share row g's u and ε).
_LOGSNR_STREAM = 3 << 60
LOGSNR_WINDOW = 1 << 16
"""Rows whose λ `nll_bound` draws at once (1 MiB of float64 λ and weights: memory flat in n_samples)."""
PROPOSAL_SCALES = tuple(1.0 + 0.25 * i for i in range(13))
"""The scales `fit_proposal` tries: 1, 1.25, …, 4 (module docstring: none below 1)."""
PROPOSAL_LOC_STEP = 0.25
"""The spacing of the locations `fit_proposal` tries, from logsnr_min to logsnr_max."""


def from_8bit(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Integers 0..255 to the bin centres (x + 1/2)/128 − 1 in (−1, 1) (bins of width 1/128)."""
    return ((x.to(torch.float64) + 0.5) * BIN_WIDTH_8BIT - 1).to(dtype)


def uniform_dequantisation_std(bin_width: float = BIN_WIDTH_8BIT) -> float:
    """σ0 at which ``warm="uniform"`` spreads x̃ uniformly over exactly one bin: Δ/√12."""
    return bin_width / math.sqrt(12)


@dataclass(frozen=True)
class ContinuousNLLEstimate:
    r"""An estimate of the warm-start bound per sample, in nats (see the module docstring).

    Attributes:
        nll: (B,) float64: ``prior + reference + integral + decoder + discretisation``.
        stderr: (B,) its Monte-Carlo standard error (NaN with one draw per node or sample).
        dims: d, the number of dimensions per sample.
        bits_per_dim: (B,) ``nll / (d ln 2)``.
        method, data: as passed.
        prior: (B,) :math:`\mathbb E_u\,\mathrm{KL}(q(z_{\lambda_{min}}\mid\tilde x)\,\|\,N(0,I))`, closed form.
        reference: :math:`\tfrac d2[\mathrm{softplus}(\lambda_{max}) - \mathrm{softplus}(\lambda_{min})]`.
        integral: (B,) the estimate of :math:`\tfrac12\int(m - d\,\mathrm{sigmoid})\,d\lambda`.
        decoder: :math:`\tfrac d2\log(2\pi e) - \tfrac d2\lambda_{max}`.
        discretisation: :math:`d\log(1/\Delta)` for ``"8bit"``, else 0.
        tail_bound: bound on the expected high-SNR truncation slack at the optimal denoiser,
            :math:`\tfrac d2\log(1 + J_{law}e^{-\lambda_{max}}/\sigma_0^2)` (∞ for uniform or σ0 = 0).
            The low-SNR slack lies between 0 and ``prior`` (in expectation over the data).
        discrete_exact: ``"8bit"`` with uniform warm-up over exactly one bin (a bound on −log P(x)).
        antithetic: each draw was an antithetic ε pair (``stderr`` is over the pair averages).
        logsnr, integrand: quadrature only: the nodes (n_steps,) and (B, n_steps) estimates of
            :math:`m(\lambda) - d\,\mathrm{sigmoid}(\lambda)` there (None for importance sampling).
    """

    nll: torch.Tensor
    stderr: torch.Tensor
    dims: int
    bits_per_dim: torch.Tensor
    method: str
    data: str
    prior: torch.Tensor
    reference: float
    integral: torch.Tensor
    decoder: float
    discretisation: float
    tail_bound: float
    discrete_exact: bool
    antithetic: bool = False
    logsnr: torch.Tensor | None = None
    integrand: torch.Tensor | None = None

    def overall_bits_per_dim(self) -> tuple[float, float]:
        """(bits/dim, standard error) of the whole batch: mean nll over samples / (d ln 2)."""
        n = self.nll.numel()
        if n == 0 or self.dims == 0:
            return math.nan, math.nan  # no sample or no dimension: as bits_per_dim gives
        scale = 1.0 / (n * self.dims * math.log(2))
        return float(self.nll.sum()) * scale, float(self.stderr.pow(2).sum().sqrt()) * scale


@dataclass(frozen=True)
class _Setup:
    method: str
    data: str
    warm: str | None
    warm_std: float
    logsnr_min: float
    logsnr_max: float
    n_samples: int
    n_steps: int
    proposal: LogisticProposal
    seed: int
    batch_size: int | None
    backend: str | None
    antithetic: bool


def _setup(method, data, warm, warm_std, logsnr_min, logsnr_max, n_samples, n_steps, proposal, seed, batch_size,
           backend, antithetic=False) -> _Setup:
    v.check_choice("method", method, METHODS)
    v.check_choice("data", data, DATA_KINDS)
    check_warm(warm, warm_std)
    logsnr_min, logsnr_max = _check_range(logsnr_min, logsnr_max)
    n_samples = v.as_int("n_samples", n_samples, minimum=1)
    if n_steps is not None and method != "quadrature":
        raise ValueError(f"n_steps is the number of quadrature nodes; method={method!r} does not take it")
    n_steps = DEFAULT_N_STEPS if n_steps is None else v.as_int("n_steps", n_steps, minimum=1)
    if proposal is None:
        proposal = LogisticProposal(logsnr_min, logsnr_max)
    elif not isinstance(proposal, LogisticProposal):
        raise TypeError(f"proposal must be a LogisticProposal, got {type(proposal).__name__}")
    elif (proposal.logsnr_min, proposal.logsnr_max) != (logsnr_min, logsnr_max):
        raise ValueError(f"proposal covers [{proposal.logsnr_min}, {proposal.logsnr_max}] but the bound integrates "
                         f"over [logsnr_min, logsnr_max] = [{logsnr_min}, {logsnr_max}]")
    seed = v.as_int("seed", seed, minimum=0)
    if not isinstance(antithetic, bool):
        raise TypeError(f"antithetic must be a bool, got {type(antithetic).__name__}")
    if batch_size is not None:
        # With pairs batch_size still bounds the denoiser's rows per call: batch_size // 2 draws.
        batch_size = v.as_int("batch_size", batch_size, minimum=2 if antithetic else 1)
    return _Setup(method, data, warm, float(warm_std), logsnr_min, logsnr_max, n_samples, n_steps, proposal, seed,
                  batch_size, backend, antithetic)


def _check_denoiser(denoiser: object) -> None:
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable (z, logsnr) -> eps_hat, got {type(denoiser).__name__}")


def _check_x(x: object, data: str) -> torch.Tensor:
    x = v.check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have shape (B, ...), got a scalar")
    if data == "8bit":
        if not (x.dtype in v.INT_DTYPES or x.is_floating_point()):
            names = ", ".join(str(d).removeprefix("torch.") for d in v.INT_DTYPES)
            raise TypeError(f"x must hold 8-bit values 0..255 as {names} or a floating-point dtype, got {x.dtype}")
        if x.numel():
            bad = (x < 0) | (x > 255)
            if x.is_floating_point():
                bad |= ~torch.isfinite(x) | (x != x.round())
            if bool(bad.any()):
                raise ValueError(f"x must hold integers in [0, 255] for data='8bit', got {x[bad].flatten()[0].item()}")
        return from_8bit(x, torch.float64 if x.dtype == torch.float64 else torch.float32)
    x = v.check_float_tensor("x", x)
    _args.check_finite("x", x, eager=True)
    return x


class _Plan:
    """Row g of the virtual batch is draw k = g // B of sample b = g % B (a pair with ``antithetic``).

    ``"importance"``: draw k has its own λ (counter ``_LOGSNR_STREAM + g``) and adds to slot b.
    ``"quadrature"``: draw k is sample k % n_samples of node k // n_samples, slot node·B + b;
    ``nodes`` = (λ_k, per-draw weight) replaces the proposal's rule (`fit_proposal`'s grid).
    """

    def __init__(self, setup: _Setup, n_seq: int, device: torch.device,
                 nodes: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.setup, self.n_seq, self.device = setup, n_seq, device
        if setup.method == "quadrature":
            if nodes is None:
                lam, node_weights = setup.proposal.quadrature(setup.n_steps, device=device)
                nodes = lam, node_weights / 2  # the bound's ½∫
            self.nodes, self.draw_weights = nodes
            self.n_draws = self.nodes.numel() * setup.n_samples
            self.n_slots = self.nodes.numel() * n_seq
        else:
            self.n_draws = setup.n_samples
            self.n_slots = n_seq
        self.n_rows = self.n_draws * n_seq
        self._window = (0, None, None)  # importance: (first row, λ, weight) of the rows drawn last

    def _importance(self, g0: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """λ and weight 1/(2p(λ)) of rows g0 .. g0 + count - 1, drawn `LOGSNR_WINDOW` rows at a time
        (elementwise in the counter, so the values of any window are the same)."""
        w0, lam, weight = self._window
        if lam is None or not w0 <= g0 <= g0 + count <= w0 + lam.shape[0]:
            setup, n = self.setup, min(self.n_rows - g0, max(count, LOGSNR_WINDOW))
            lam = setup.proposal.sample(n, seed=setup.seed, offset=_LOGSNR_STREAM + g0, device=self.device,
                                        backend=setup.backend)
            w0, weight = g0, 0.5 / setup.proposal.density(lam)
            self._window = (w0, lam, weight)
        return lam[g0 - w0:g0 - w0 + count], weight[g0 - w0:g0 - w0 + count]

    def rows(self, g0: int, count: int) -> tuple[slice | torch.Tensor, torch.Tensor, torch.Tensor, slice | torch.Tensor]:
        """(samples b, λ float64, weight float64, slots) of rows g0 .. g0 + count - 1.

        Rows of one draw (no wrap past sample B - 1) are consecutive samples with consecutive
        slots: b and the slots are then slices (x and the accumulator rows as views, no gather).
        """
        setup, n = self.setup, self.n_seq
        b0, k0 = g0 % n, g0 // n
        if b0 + count <= n:
            b: slice | torch.Tensor = slice(b0, b0 + count)
            k: int | torch.Tensor = k0
        else:
            g = torch.arange(g0, g0 + count, device=self.device)
            k, b = g // n, g % n
        if setup.method == "quadrature":
            node = k // setup.n_samples
            if isinstance(b, slice):
                lam, weight = self.nodes[node].expand(count), self.draw_weights[node].expand(count)
                return b, lam.contiguous(), weight.contiguous(), slice(node * n + b0, node * n + b0 + count)
            return b, self.nodes[node], self.draw_weights[node], node * n + b
        return (b, *self._importance(g0, count), b)


def _denoise(denoiser: Denoiser, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    out = denoiser(z, logsnr)
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        raise TypeError("the denoiser must return a float tensor (its ε prediction), got "
                        + (f"a tensor of {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__))
    if out.shape != z.shape:
        raise ValueError(f"the denoiser must return eps_hat of z's shape {tuple(z.shape)}, got {tuple(out.shape)}")
    if out.device != z.device:
        raise ValueError(f"the denoiser output is on {out.device} but z is on {z.device}")
    if out.dtype != z.dtype:
        raise TypeError(f"the denoiser must return eps_hat of z's dtype {z.dtype}, got {out.dtype}")
    return out


def _perturb(rows: torch.Tensor, alpha_sigma: tuple[torch.Tensor, torch.Tensor], setup: _Setup, offset: int,
             return_warm: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`perturb`'s kernel on checked (rows, d) x (finite: `_check_x`) and (α, σ) in the compute dtype:
    its (z, ε, x̃) without the per-call checks, which would read x again on every draw."""
    seed_bits, offset_bits = _args.seed_offset(setup.seed, offset)
    return _ops.perturb(backend, rows, *alpha_sigma, WARM_CODES[setup.warm], setup.warm_std, seed_bits, offset_bits,
                        return_warm)


def _pairs(z_plus: torch.Tensor, eps: torch.Tensor, x_warm: torch.Tensor, a: torch.Tensor, s: torch.Tensor,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, target), each (rows, 2, d) of ``dtype``: [:, 0] and [:, 1] are (z₊, ε) and (z₋, −ε) of a row.

    ``z_plus``, ``eps`` and ``x_warm`` are perturb's (rows, d) output in the compute dtype (float32,
    or float64 for float64 x), ``a`` and ``s`` the (rows,) α, σ it used (rounded once from float64):
    z₋ = α x̃ − σ ε is formed there, and each half is rounded once to ``dtype``, as perturb rounds
    z₊. Rounding is odd, so (z₋, −ε) keeps the law of (z₊, ε) in every dtype (z₋ from 16-bit x̃ and ε
    would carry their rounding, ~2⁻⁹|x̃|, about σ itself at high SNR), and z₋ = −z₊ exactly where x̃ = 0.
    """
    count = eps.shape[0]
    z = torch.empty((count, 2) + eps.shape[1:], dtype=dtype, device=eps.device)
    z[:, 0] = z_plus
    z[:, 1] = a[:, None] * x_warm - s[:, None] * eps
    target = torch.empty_like(z)
    target[:, 0] = eps
    torch.neg(target[:, 0], out=target[:, 1])
    return z, target


def _accumulate(denoiser: Denoiser, x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Per draw: perturb (reads x, writes z and ε), the denoiser, ‖ε‖² (reads ε) and the
    integration step (reads ε̂ and ε), whose arguments are built here (checked by construction).

    With antithetic pairs the denoiser sees the draws' (z₊, z₋) rows interleaved (`_pairs`),
    and one integration step per chunk reads each pair as one row of 2d: its squared error is
    the sum of the halves', so weight w/2 and baseline 2c add the pair average S (module
    docstring) and S² to the draw's slot; the standard error is then over the pairs.

    x is made (rows, d) once (a copy only when strided; in the compute dtype for pairs of
    16-bit x, a float32 copy), not once per draw.
    """
    setup = plan.setup
    d = math.prod(x.shape[1:])
    acc = torch.zeros(plan.n_slots, 2, dtype=torch.float64, device=x.device)
    pair = 2 if setup.antithetic else 1
    chunk = setup.batch_size // pair if setup.batch_size else max(plan.n_seq, 1)  # draws per denoiser call
    cond_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    backend = _backend.select(x.device, setup.backend)
    v.check_size("x", min(plan.n_rows, chunk) * d, "elements")  # perturb's limit, per call: the largest chunk
    # Pairs draw in the compute dtype (`_pairs`); the same counters, so the + half is the plain draw.
    x_rows = _args.rows(x.to(cond_dtype) if setup.antithetic else x)
    for g0 in range(0, plan.n_rows, chunk):
        count = min(plan.n_rows, g0 + chunk) - g0
        b, lam, weight, slot = plan.rows(g0, count)
        a, s = alpha(lam).to(cond_dtype), sigma(lam).to(cond_dtype)  # as `perturb` rounds them
        z, eps, x_warm = _perturb(x_rows[b], (a, s), setup, g0 * d, setup.antithetic, backend)
        if setup.antithetic:
            z, target = _pairs(z, eps, x_warm, a, s, x.dtype)
            eps = target[:, 0]  # ε rounded to x's dtype, as the denoiser's target
        # Control variate: sigmoid(λ)‖ε‖² has mean d·sigmoid(λ), and as λ → ±∞ it tracks ‖ε − ε̂‖²
        # draw by draw (ε̂ → 0 at high SNR, ε̂ → ε at low SNR), so the draws' variance stays
        # finite however wide [λ_min, λ_max] is; with d·sigmoid(λ) it would grow like 1/p(λ).
        # ‖ε‖² accumulated in float32 (float64 for float64 x): relative error ~1e-7, far below
        # the Monte-Carlo error, where a float64 norm first copies ε to float64 (10x the time).
        eps_sq = torch.linalg.vector_norm(eps, dim=1, dtype=cond_dtype).double().square_()
        baseline = eps_sq.mul_(torch.sigmoid(lam))
        if setup.antithetic:
            eps_hat = _denoise(denoiser, z.view((2 * count,) + x.shape[1:]), lam.repeat_interleave(2).to(cond_dtype))
            eps_hat, eps = _args.rows(eps_hat).view(count, pair * d), target.view(count, pair * d)
            weight, baseline = weight / 2, baseline.mul_(2)
        else:
            eps_hat = _args.rows(_denoise(denoiser, z.view((count,) + x.shape[1:]), lam.to(cond_dtype)))
        if isinstance(slot, slice):
            run_step(backend, eps_hat, eps, acc[slot], weight, baseline, None, 0, 0, True)
        else:
            run_step(backend, eps_hat, eps, acc, weight, baseline, slot, 0, 0, True)
    if not bool(torch.isfinite(acc).all()):
        raise ValueError("the denoiser returned non-finite values (NaN or infinity) in eps_hat, or values whose "
                         "squared error overflows the accumulator")
    return acc


def _summarise(acc: torch.Tensor, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(integral, stderr, per-node integrand or None) from the accumulator."""
    n = plan.setup.n_samples
    sums = acc.view(-1, plan.n_seq, 2)  # (1 or nodes, B, 2)
    mean = sums[..., 0] / n
    var = (sums[..., 1] / n - mean**2).clamp_min(0) * (n / (n - 1)) if n > 1 else torch.full_like(mean, math.nan)
    integral, stderr = mean.sum(0), (var.sum(0) / n).sqrt()
    integrand = None
    if plan.setup.method == "quadrature":
        integrand = (mean / plan.draw_weights[:, None]).T.contiguous()
    return integral, stderr, integrand


def nll_bound(
    denoiser: Denoiser,
    x: torch.Tensor,
    *,
    warm: Literal["gaussian", "laplace", "logistic", "uniform"] | None = None,
    warm_std: float = 0.0,
    logsnr_min: float = -10.0,
    logsnr_max: float = 15.0,
    n_samples: int = 64,
    method: Literal["importance", "quadrature"] = "importance",
    data: Literal["continuous", "8bit"] = "continuous",
    n_steps: int | None = None,
    proposal: LogisticProposal | None = None,
    antithetic: bool = False,
    seed: int = 0,
    batch_size: int | None = None,
    backend: str | None = None,
) -> ContinuousNLLEstimate:
    r"""Estimates the warm-start NLL bound :math:`\mathbb E_u[B(x + \sigma_0 u)]` of each sample (module docstring).

    Args:
        denoiser: ``denoiser(z, logsnr) -> eps_hat``: z of x's shape (x's dtype; float32 for
            8-bit data), logsnr (rows,) float32 (float64 for float64 x); returns ε̂ of z's shape.
        x: (B, ...) data, finite floats (``data="continuous"``) or values 0..255 (``"8bit"``).
        warm, warm_std: the warm-up law (None: no warm start) and σ0 ≥ 0.
        logsnr_min, logsnr_max: the integration range [λ_min, λ_max], λ_min < λ_max.
        n_samples: draws of (λ, u, ε) per sample (``"importance"``), or of (u, ε) per node.
        method: ``"importance"`` (λ from ``proposal``) or ``"quadrature"`` (``n_steps`` nodes, default 32).
        data: ``"continuous"`` or ``"8bit"`` (see the module docstring for what the number bounds).
        proposal: a `LogisticProposal` on [λ_min, λ_max] (default loc 0, scale 2; see
            `LogisticProposal.from_data` for ITD's data-driven choice and `fit_proposal`).
        antithetic: each draw is an antithetic pair (z₊, ε) and (z₋, −ε) at one λ and x̃, an
            unbiased estimate of the same bound, often with a much smaller standard error, at
            twice the denoiser rows per draw (module docstring). The denoiser then sees the
            pairs as consecutive rows, (z₊, z₋) of a draw, with their λ repeated.
        seed: names every draw; the same seed gives the same estimate for any ``batch_size``.
        batch_size: the most rows per denoiser call (with ``antithetic``: ``batch_size // 2``
            pairs, so it must be ≥ 2); default one draw of every sample, B rows (2B with pairs).
        backend: kernel backend of `perturb` / `integrate_step`.

    Runs under ``torch.inference_mode()``. Raises ValueError / TypeError naming the bad
    argument (non-finite x, an empty range, σ0 < 0, an unknown law, 8-bit values out of
    range, a denoiser output of the wrong shape or with NaN / infinity).
    """
    _check_denoiser(denoiser)
    setup = _setup(method, data, warm, warm_std, logsnr_min, logsnr_max, n_samples, n_steps, proposal, seed,
                   batch_size, backend, antithetic)
    x = _check_x(x, data)
    n_seq, d = x.shape[0], math.prod(x.shape[1:])
    lo, hi = setup.logsnr_min, setup.logsnr_max
    reference = d / 2 * (_softplus(hi) - _softplus(lo))
    decoder = d / 2 * (math.log(2 * math.pi) + 1 - hi)
    discretisation = d * math.log(1 / BIN_WIDTH_8BIT) if data == "8bit" else 0.0
    j = FISHER_INFORMATION.get(setup.warm, math.inf)
    # log1p(j e^{-hi} / σ0²) in log space: no overflow for a very low hi or underflow of σ0².
    tail = d / 2 * _softplus(math.log(j) - hi - 2 * math.log(setup.warm_std)) \
        if setup.warm_std > 0 and math.isfinite(j) else math.inf
    exact = data == "8bit" and setup.warm == "uniform" and \
        math.isclose(setup.warm_std, uniform_dequantisation_std(), rel_tol=1e-6)
    with torch.inference_mode():
        # ‖x‖² in float32 (float64 for float64 x): it enters the prior times α²_min only.
        acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        sq = torch.linalg.vector_norm(x.reshape(n_seq, d), dim=1, dtype=acc_dtype).double().square() \
            + d * setup.warm_std**2
        alpha2 = _sigmoid(lo)
        prior = 0.5 * (alpha2 * (sq - d) + d * _softplus(lo))
        plan = _Plan(setup, n_seq, x.device)
        if n_seq:
            integral, stderr, integrand = _summarise(_accumulate(denoiser, x, plan), plan)
        else:
            integral = stderr = torch.zeros(0, dtype=torch.float64, device=x.device)
            integrand = torch.zeros(0, setup.n_steps, dtype=torch.float64, device=x.device) \
                if method == "quadrature" else None
        nll = prior + reference + integral + decoder + discretisation
        bits = nll / (d * math.log(2)) if d else torch.full_like(nll, math.nan)
        logsnr = plan.nodes.clone() if method == "quadrature" else None
    clone = (lambda t: None if t is None else t.clone())  # plain tensors (inference tensors cannot enter autograd)
    return ContinuousNLLEstimate(
        clone(nll), clone(stderr), d, clone(bits), method, data, clone(prior), reference, clone(integral), decoder,
        discretisation, tail, exact, antithetic=setup.antithetic, logsnr=clone(logsnr), integrand=clone(integrand))


def fit_proposal(
    denoiser: Denoiser,
    x: torch.Tensor,
    *,
    warm: Literal["gaussian", "laplace", "logistic", "uniform"] | None = None,
    warm_std: float = 0.0,
    logsnr_min: float = -10.0,
    logsnr_max: float = 15.0,
    data: Literal["continuous", "8bit"] = "continuous",
    n_grid: int = 53,
    n_pilot: int = 512,
    seed: int = 0,
    batch_size: int | None = None,
    backend: str | None = None,
) -> LogisticProposal:
    r"""The truncated-logistic proposal of least antithetic-estimator variance on a pilot (module docstring).

    :math:`V(\lambda_j)` is the mean square of the unweighted pair average
    (:math:`\tfrac12[(\lVert\varepsilon - \hat\varepsilon(z_+)\rVert^2 - c) + (\lVert\varepsilon + \hat\varepsilon(z_-)\rVert^2 - c)]`,
    one (u, ε) pair per row) over the first ``n_pilot`` rows of x at ``n_grid`` evenly spaced
    :math:`\lambda_j` from λ_min to λ_max; the result minimises the trapezoid rule of
    :math:`\int V/p\,d\lambda` over loc on a `PROPOSAL_LOC_STEP` grid of the range and scale in
    `PROPOSAL_SCALES`. Fit on training data (a pilot denoiser and data apart from the held-out
    set), then pass it to `nll_bound` (``proposal=``, best with ``antithetic=True``); any
    proposal keeps the estimate unbiased.

    Args:
        denoiser, x, warm, warm_std, logsnr_min, logsnr_max, data, backend: as in `nll_bound`.
        n_grid: λ grid points, ≥ 2. n_pilot: rows of x used, ≥ 1 (all of x if it has fewer).
        seed: names the pilot's u and ε (the counters of `nll_bound`'s quadrature rows).
        batch_size: the most rows per denoiser call (≥ 2; default 2·min(n_pilot, B)).
    """
    _check_denoiser(denoiser)
    n_grid = v.as_int("n_grid", n_grid, minimum=2)
    n_pilot = v.as_int("n_pilot", n_pilot, minimum=1)
    setup = _setup("quadrature", data, warm, warm_std, logsnr_min, logsnr_max, 1, n_grid, None, seed, batch_size,
                   backend, antithetic=True)
    x = _check_x(x, data)
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one row (the pilot's data), got an empty batch")
    x = x[:n_pilot]
    lo, hi = setup.logsnr_min, setup.logsnr_max
    with torch.inference_mode():
        grid = torch.linspace(lo, hi, n_grid, dtype=torch.float64, device=x.device)
        plan = _Plan(setup, x.shape[0], x.device, nodes=(grid, torch.ones_like(grid)))
        second = _accumulate(denoiser, x, plan).view(n_grid, x.shape[0], 2)[..., 1].mean(1).cpu()
    grid = grid.cpu()
    trapezoid = torch.full((n_grid,), (hi - lo) / (n_grid - 1), dtype=torch.float64)
    trapezoid[[0, -1]] /= 2
    best = None
    for k in range(math.floor((hi - lo) / PROPOSAL_LOC_STEP + 1e-9) + 1):
        for scale in PROPOSAL_SCALES:
            candidate = LogisticProposal(lo, hi, loc=lo + k * PROPOSAL_LOC_STEP, scale=scale)
            cost = float((trapezoid * second / candidate.density(grid)).sum())
            if best is None or cost < best[0]:
                best = (cost, candidate)
    return best[1]
