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
importance sampling or quadrature; u, ε and λ are drawn afresh for every term.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from .. import _backend
from .. import _validate as v
from . import _args
from ._args import check_warm
from .integrate import run as run_step
from .noise import perturb
from .schedules import LogisticProposal, _check_range

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
METHODS = ("importance", "quadrature")
DATA_KINDS = ("continuous", "8bit")
DEFAULT_N_STEPS = 32
BIN_WIDTH_8BIT = 1 / 128
"""Δ of `from_8bit`: 256 levels on [−1, 1)."""
FISHER_INFORMATION = {"gaussian": 1.0, "laplace": 2.0, "logistic": math.pi**2 / 9, "uniform": math.inf}
r"""J of each unit-variance warm-up law: 1/b² for Laplace (b = 1/√2), 1/(3s²) for logistic (s = √3/π)."""

# Counters of the log-SNR uniforms (fastbound.sample_times' key); the warm and ε noise uses
# perturb's own key at counters [0, rows * d).
_LOGSNR_STREAM = 3 << 60


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
    logsnr: torch.Tensor | None = None
    integrand: torch.Tensor | None = None

    def overall_bits_per_dim(self) -> tuple[float, float]:
        """(bits/dim, standard error) of the whole batch: mean nll over samples / (d ln 2)."""
        n = self.nll.numel()
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


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _setup(method, data, warm, warm_std, logsnr_min, logsnr_max, n_samples, n_steps, proposal, seed, batch_size,
           backend) -> _Setup:
    v.check_choice("method", method, METHODS)
    v.check_choice("data", data, DATA_KINDS)
    check_warm(warm, warm_std)
    logsnr_min, logsnr_max = _check_range(logsnr_min, logsnr_max)
    n_samples = _check_int("n_samples", n_samples, 1)
    if n_steps is not None and method != "quadrature":
        raise ValueError(f"n_steps is the number of quadrature nodes; method={method!r} does not take it")
    n_steps = DEFAULT_N_STEPS if n_steps is None else _check_int("n_steps", n_steps, 1)
    if proposal is None:
        proposal = LogisticProposal(logsnr_min, logsnr_max)
    elif not isinstance(proposal, LogisticProposal):
        raise TypeError(f"proposal must be a LogisticProposal, got {type(proposal).__name__}")
    elif (proposal.logsnr_min, proposal.logsnr_max) != (logsnr_min, logsnr_max):
        raise ValueError(f"proposal covers [{proposal.logsnr_min}, {proposal.logsnr_max}] but the bound integrates "
                         f"over [logsnr_min, logsnr_max] = [{logsnr_min}, {logsnr_max}]")
    seed = _check_int("seed", seed, 0)
    if batch_size is not None:
        batch_size = _check_int("batch_size", batch_size, 1)
    return _Setup(method, data, warm, float(warm_std), logsnr_min, logsnr_max, n_samples, n_steps, proposal, seed,
                  batch_size, backend)


def _check_x(x: object, data: str) -> torch.Tensor:
    x = v.check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have shape (B, ...), got a scalar")
    if data == "8bit":
        if not (x.dtype in v.INT_DTYPES or x.is_floating_point()):
            raise TypeError(f"x must hold 8-bit values 0..255 (an integer or float tensor), got {x.dtype}")
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


def _softplus(t: float) -> float:
    return max(t, 0.0) + math.log1p(math.exp(-abs(t)))


class _Plan:
    """Row g of the virtual batch is draw k = g // B of sample b = g % B.

    ``"importance"``: draw k has its own λ (counter ``_LOGSNR_STREAM + g``) and adds to slot b.
    ``"quadrature"``: draw k is sample k % n_samples of node k // n_samples, slot node·B + b.
    """

    def __init__(self, setup: _Setup, n_seq: int, device: torch.device):
        self.setup, self.n_seq, self.device = setup, n_seq, device
        if setup.method == "quadrature":
            self.nodes, self.node_weights = setup.proposal.quadrature(setup.n_steps, device=device)
            self.n_draws = setup.n_steps * setup.n_samples
            self.n_slots = setup.n_steps * n_seq
        else:
            self.n_draws = setup.n_samples
            self.n_slots = n_seq
        self.n_rows = self.n_draws * n_seq

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
                lam, weight = self.nodes[node].expand(count), self.node_weights[node].expand(count)
                return b, lam.contiguous(), (weight / 2).contiguous(), slice(node * n + b0, node * n + b0 + count)
            return b, self.nodes[node], self.node_weights[node] / 2, node * n + b
        lam = setup.proposal.sample(count, seed=setup.seed, offset=_LOGSNR_STREAM + g0, device=self.device,
                                    backend=setup.backend)
        return b, lam, 0.5 / setup.proposal.density(lam), b


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


def _accumulate(denoiser: Denoiser, x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Per draw: perturb (reads x, writes z and ε), the denoiser, ‖ε‖² (reads ε) and the
    integration step (reads ε̂ and ε), whose arguments are built here (checked by construction)."""
    setup = plan.setup
    d = math.prod(x.shape[1:])
    acc = torch.zeros(plan.n_slots, 2, dtype=torch.float64, device=x.device)
    chunk = setup.batch_size or max(plan.n_seq, 1)
    cond_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    backend = _backend.select(x.device, setup.backend)
    for g0 in range(0, plan.n_rows, chunk):
        count = min(plan.n_rows, g0 + chunk) - g0
        b, lam, weight, slot = plan.rows(g0, count)
        noised = perturb(x[b], lam, warm=setup.warm, warm_std=setup.warm_std, seed=setup.seed, offset=g0 * d,
                         backend=setup.backend)
        eps_hat = _args.rows(_denoise(denoiser, noised.z, lam.to(cond_dtype)))
        eps = noised.eps.reshape(count, d)
        # Control variate: sigmoid(λ)‖ε‖² has mean d·sigmoid(λ), and as λ → ±∞ it tracks ‖ε − ε̂‖²
        # draw by draw (ε̂ → 0 at high SNR, ε̂ → ε at low SNR), so the draws' variance stays
        # finite however wide [λ_min, λ_max] is; with d·sigmoid(λ) it would grow like 1/p(λ).
        # ‖ε‖² accumulated in float32 (float64 for float64 x): relative error ~1e-7, far below
        # the Monte-Carlo error, where a float64 norm first copies ε to float64 (10x the time).
        eps_sq = torch.linalg.vector_norm(eps, dim=1, dtype=cond_dtype).double().square_()
        baseline = eps_sq.mul_(torch.sigmoid(lam))
        if isinstance(slot, slice):
            run_step(backend, eps_hat, eps, acc[slot], weight, baseline, None, 0, 0, True)
        else:
            run_step(backend, eps_hat, eps, acc, weight, baseline, slot, 0, 0, True)
    if not bool(torch.isfinite(acc).all()):
        raise ValueError("the denoiser returned non-finite values (NaN or infinity) in eps_hat")
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
        integrand = (2 * mean / plan.node_weights[:, None]).T.contiguous()
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
            `LogisticProposal.from_data` for ITD's data-driven choice).
        seed: names every draw; the same seed gives the same estimate for any ``batch_size``.
        batch_size: rows per denoiser call (default B).
        backend: kernel backend of `perturb` / `integrate_step`.

    Runs under ``torch.inference_mode()``. Raises ValueError / TypeError naming the bad
    argument (non-finite x, an empty range, σ0 < 0, an unknown law, 8-bit values out of
    range, a denoiser output of the wrong shape or with NaN / infinity).
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable (z, logsnr) -> eps_hat, got {type(denoiser).__name__}")
    setup = _setup(method, data, warm, warm_std, logsnr_min, logsnr_max, n_samples, n_steps, proposal, seed,
                   batch_size, backend)
    x = _check_x(x, data)
    n_seq, d = x.shape[0], math.prod(x.shape[1:])
    lo, hi = setup.logsnr_min, setup.logsnr_max
    reference = d / 2 * (_softplus(hi) - _softplus(lo))
    decoder = d / 2 * (math.log(2 * math.pi) + 1 - hi)
    discretisation = d * math.log(1 / BIN_WIDTH_8BIT) if data == "8bit" else 0.0
    j = FISHER_INFORMATION.get(setup.warm, math.inf)
    tail = d / 2 * math.log1p(j * math.exp(-hi) / setup.warm_std**2) if setup.warm_std > 0 and math.isfinite(j) \
        else math.inf
    exact = data == "8bit" and setup.warm == "uniform" and \
        math.isclose(setup.warm_std, uniform_dequantisation_std(), rel_tol=1e-6)
    with torch.inference_mode():
        # ‖x‖² in float32 (float64 for float64 x): it enters the prior times α²_min only.
        acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        sq = torch.linalg.vector_norm(x.reshape(n_seq, d), dim=1, dtype=acc_dtype).double().square() \
            + d * setup.warm_std**2
        alpha2 = 1 / (1 + math.exp(-lo))
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
    return ContinuousNLLEstimate(clone(nll), clone(stderr), d, clone(bits), method, data, clone(prior), reference,
                                 clone(integral), decoder, discretisation, tail, exact, clone(logsnr), clone(integrand))
