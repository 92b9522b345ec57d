r"""Likelihood estimators for discrete diffusion models, from the I-MDCE / I-MDSE identities.

Jeon et al. 2025 ("Information-Theoretic Discrete Diffusion", arXiv 2510.24088,
code: infodis) show that the denoising losses, integrated over the noise level,
equal the negative log-likelihood when the denoiser is optimal; for any other
denoiser the same integrals are the model's likelihood bound (the ELBO of SEDD /
MDLM). Every estimator here is unbiased for its integral, reports a standard
error, and is reproducible: the same ``seed`` names the same corruptions
(`fastbound.perturb`'s counter-based RNG) on every backend and every ``batch_size``.

Identities, for a sequence :math:`x_0` with M positions that may be corrupted:

* **I-MDCE** (absorbing graph, masked cross-entropy; MDLM's continuous-time bound
  with weight :math:`\sigma'/(e^\sigma-1)`, tight at the optimum by I-MDCE). With
  :math:`\lambda = 1 - e^{-\sigma}` the masking probability and
  :math:`L_\lambda = \sum_{i\ \text{masked}} -\log p(x_0^i \mid x_\lambda)`,

  .. math:: -\log p(x_0) = \int_0^1 \frac{1}{\lambda}\,\mathbb E[L_\lambda]\,d\lambda
            = \int_0^\infty \frac{\mathbb E[L_{\sigma}]}{e^\sigma - 1}\,d\sigma .

* **I-MDSE** (score entropy, absorbing or uniform graph; SEDD's denoising score
  entropy with weight :math:`d\sigma`, tight at the optimum by I-MDSE):

  .. math:: -\log p(x_0) = \int_0^\infty \mathbb E\Big[\sum_i \ell^{DSE}_i(\sigma)\Big]\,d\sigma
            + \mathrm{KL}\big(p_{\sigma_{max}|0}(\cdot \mid x_0) \,\|\, p_{\sigma_{max}}\big),

  the terminal term vanishing as :math:`\sigma_{max}\to\infty`. For a schedule that stops
  at a finite :math:`\sigma_{max}` on the uniform graph it is the KL between the per-token
  forward marginal and the uniform prior, :math:`M(\log V - H(q_{\sigma_{max}}))` (the
  prior's entropy :math:`M\log V` minus that of the noised data), added analytically.
  At the optimum the absorbing DSE is :math:`r\cdot` the DCE with
  :math:`r = 1/(e^\sigma-1)`, which is the DSE–DCE equivalence.

* **Time-free** (the :math:`\lambda` integral done in closed form per number of masked
  tokens, :math:`\int_0^1 \lambda^{-1}\binom Mk\lambda^k(1-\lambda)^{M-k}d\lambda = 1/k`;
  the any-order autoregressive form, cf. RADD, Ou et al. 2024, and infodis):

  .. math:: -\log p(x_0) = \sum_{k=1}^{M} \frac1k\,\mathbb E_{|I|=k}\Big[\sum_{i\in I}
            -\log p(x_0^i \mid x_0 \text{ with } I \text{ masked})\Big]
            = H_M\,\mathbb E_{k \sim 1/(k H_M)}\,\mathbb E_{|I|=k}\Big[\sum_{i\in I}\cdots\Big],

  :math:`H_M = \sum_{k\le M} 1/k`. With ``loss="dse"`` the per-token term is the DSE
  times :math:`e^\sigma - 1`.

Conditional likelihood (``maskable``): the same identities with only the maskable
positions corrupted and scored give :math:`-\log p(x_0[\text{maskable}] \mid
x_0[\lnot\text{maskable}])`, with M the number of maskable positions.

Sampling and error bars (measured on the exact Markov-chain denoisers of
`fastbound.testing`): each sequence gets its own stratified uniforms (one per
stratum of [0, 1), as MDLM's time sampler), which set k (time-free) or t (mc), and
the standard error is the successive-difference estimate of a systematic sample.
The mc times are :math:`t = u^2` (weight :math:`2u`): with uniform t the absorbing
estimator's variance diverges like :math:`\int dt/t` at t = 0 (a rare masked token
weighed by 1/t); quadrature uses the same substitution, under which Gauss–Legendre
also converges fast on the uniform graph's :math:`\log(1/t)` endpoint behaviour. On
the uniform graph such rare large draws remain (weight ~ log(1/t)/t): the standard
error is right on average but the per-sequence z-scores have heavier tails.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import numpy as np
import torch

from . import _validate as v
from .integrate import integrate_step
from .noise import perturb, sample_times
from .schedules import LogLinear, Schedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Method = Literal["time_free", "mc", "quadrature", "time_free_exact"]
METHODS = ("time_free", "mc", "quadrature", "time_free_exact")
LOSSES = ("dce", "dse")
GRAPHS = ("absorb", "uniform")
DEFAULT_N_STEPS = 16
MAX_EXACT_POSITIONS = 20
IGNORE = -100

# Counter ranges of the two random streams (same Philox key, disjoint counters):
# corruptions use counters [offset, offset + rows * L), times [_TIME_STREAM + ...).
_TIME_STREAM = 1 << 60
_STREAM_STRIDE = 1 << 58
_T_MIN = 2.0**-30  # a draw at t = 0 exactly (probability 2^-24) is moved here


@dataclass(frozen=True)
class NLLEstimate:
    r"""An estimate of -log p(x0) per sequence, in nats.

    Attributes:
        nll: (B,) float64, the estimate.
        stderr: (B,) its Monte-Carlo standard error (0 for ``time_free_exact``; NaN with
            one sample): the successive-difference estimate for the stratified draws of
            ``"time_free"`` / ``"mc"``, the per-node sample variance for ``"quadrature"``
            (whose discretisation error is not included). Sequences are independent, so
            the batch's standard error is the root sum of squares.
        n_tokens: (B,) int64, the number of positions scored (maskable positions).
        bits_per_token: (B,) ``nll / (n_tokens ln 2)``.
        method: the method used.
        times: (B, n) the time of each column of ``integrand``: t for ``"mc"`` and
            ``"quadrature"``, the mask ratio k/M for ``"time_free"``; None for
            ``"time_free_exact"``.
        integrand: (B, n) an estimate of the integrand there, for plots: the weighted
            loss :math:`w(t)\sum_i \ell_i` of each draw (``"mc"``; the draws have density
            :math:`1/(2\sqrt t)`), the node's mean weighted loss
            :math:`w(t)\,\mathbb E[\ell_t]` (``"quadrature"``), or
            :math:`M/k \sum_{i\in I}\ell_i` (``"time_free"``). The terminal term of the
            uniform graph is not part of it.
    """

    nll: torch.Tensor
    stderr: torch.Tensor
    n_tokens: torch.Tensor
    bits_per_token: torch.Tensor
    method: str
    times: torch.Tensor | None = None
    integrand: torch.Tensor | None = None

    def overall_bits_per_token(self) -> tuple[float, float]:
        """(bits per token, standard error) over the whole batch: sum of nll / sum of tokens."""
        scale = 1.0 / (float(self.n_tokens.sum()) * math.log(2))
        return float(self.nll.sum()) * scale, float(self.stderr.pow(2).sum().sqrt()) * scale


class RatioEstimate(NamedTuple):
    """``value`` (B,): log p(x_a) - log p(x_b) in nats; ``stderr`` (B,): its standard error."""

    value: torch.Tensor
    stderr: torch.Tensor


@dataclass(frozen=True)
class _Setup:
    """The validated options of one estimate."""

    method: str
    loss: str
    graph: str
    schedule: Schedule
    n_samples: int
    n_steps: int
    vocab_size: int
    mask_id: int
    batch_size: int | None
    seed: int
    backend: str | None


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _setup(method, loss, graph, schedule, n_samples, n_steps, mask_id, vocab_size, batch_size, seed,
           backend) -> _Setup:
    v.check_choice("method", method, METHODS)
    v.check_choice("loss", loss, LOSSES)
    v.check_choice("graph", graph, GRAPHS)
    if graph == "uniform" and loss == "dce":
        raise ValueError("loss='dce' is the absorbing graph's loss; use loss='dse' with graph='uniform'")
    if graph == "uniform" and method in ("time_free", "time_free_exact"):
        raise ValueError(f"method={method!r} counts masked tokens and needs graph='absorb'")
    n_samples = _check_int("n_samples", n_samples, 1)
    if n_steps is not None and method != "quadrature":
        raise ValueError(f"n_steps is the number of quadrature nodes; method={method!r} does not take it")
    n_steps = DEFAULT_N_STEPS if n_steps is None else _check_int("n_steps", n_steps, 1)
    if vocab_size is None:
        if graph == "absorb" and mask_id is not None:
            vocab_size = mask_id
        else:
            raise ValueError("vocab_size (the number of real tokens) is required")
    vocab_size = _check_int("vocab_size", vocab_size, 1)
    mask_id = vocab_size if mask_id is None else _check_int("mask_id", mask_id, 0)
    if graph == "absorb" and mask_id < vocab_size:
        raise ValueError(f"mask_id {mask_id} is a real token (< vocab_size={vocab_size})")
    if batch_size is not None:
        batch_size = _check_int("batch_size", batch_size, 1)
    seed = _check_int("seed", seed, 0)
    schedule = LogLinear(eps=0.0) if schedule is None else schedule
    if not (callable(getattr(schedule, "total", None)) and callable(getattr(schedule, "rate", None))):
        raise TypeError(f"schedule must be a fastbound.schedules.Schedule, got {type(schedule).__name__}")
    return _Setup(method, loss, graph, schedule, n_samples, n_steps, vocab_size, mask_id, batch_size, seed,
                  backend)


def _check_x0(name: str, x0: object, setup: _Setup) -> torch.Tensor:
    x0 = v.check_tensor(name, x0)
    if x0.dtype not in v.INT_DTYPES:
        raise TypeError(f"{name} must hold integer token ids, got {x0.dtype}")
    if x0.dim() != 2:
        raise ValueError(f"{name} must have shape (B, L), got {tuple(x0.shape)}")
    if x0.numel():
        if setup.graph == "absorb" and bool((x0 == setup.mask_id).any()):
            raise ValueError(f"{name} contains the mask id {setup.mask_id}; clean tokens cannot be masked")
        v.check_id_range(name, x0, 0, setup.vocab_size)
    return x0.long()


def _check_maskable(maskable: object, x0: torch.Tensor) -> torch.Tensor | None:
    if maskable is None:
        if x0.shape[1] == 0 and x0.shape[0] > 0:
            raise ValueError("x0 has no positions: nothing to score")
        return None
    maskable = v.check_tensor("maskable", maskable)
    if maskable.dtype != torch.bool:
        raise TypeError(f"maskable must be a bool tensor, got {maskable.dtype}")
    if maskable.device != x0.device:
        raise ValueError(f"maskable is on {maskable.device} but x0 is on {x0.device}")
    try:
        maskable = torch.broadcast_to(maskable, x0.shape).contiguous()
    except RuntimeError:
        raise ValueError(f"maskable of shape {tuple(maskable.shape)} does not broadcast to x0's {tuple(x0.shape)}") from None
    empty = (~maskable.any(1)).nonzero()
    if empty.numel():
        raise ValueError(f"maskable has no maskable position in sequence {int(empty[0])}")
    return maskable


def _harmonic(m: torch.Tensor) -> torch.Tensor:
    """H_m = sum_{k <= m} 1/k, float64, elementwise."""
    top = int(m.max()) if m.numel() else 0
    table = torch.cat([m.new_zeros(1, dtype=torch.float64),
                       (1.0 / torch.arange(1, top + 1, dtype=torch.float64, device=m.device)).cumsum(0)])
    return table[m]


class _Plan:
    """The draws of one estimate: which rows the denoiser sees and how each is weighed.

    Row g of the virtual batch is draw d = g // B of sequence b = g % B. Per draw, a
    stratified uniform u (`_stratified`) sets the number of masked tokens
    (``"time_free"``: inverse CDF of P(k) = 1/(k H_M)) or the time (``"mc"``:
    t = u^2, see `rows`); ``"quadrature"`` draws are (node, sample) pairs.
    """

    def __init__(self, setup: _Setup, n_tokens: torch.Tensor, stream: int, per_draw_slots: bool):
        self.setup = setup
        self.n_seq = n_tokens.shape[0]
        self.n_tokens = n_tokens
        self.harmonic = _harmonic(n_tokens)
        self.device = n_tokens.device
        self.noise_offset = stream * _STREAM_STRIDE
        method, n = setup.method, setup.n_samples
        if method == "time_free_exact":
            per_seq = 2**n_tokens - 1
            self.first_row = torch.cumsum(per_seq, 0) - per_seq
            self.n_rows = int(per_seq.sum())
            self.n_slots = self.n_seq
            return
        self.n_draws = n * setup.n_steps if method == "quadrature" else n
        self.n_rows = self.n_draws * self.n_seq
        if method == "quadrature":
            # Gauss-Legendre in u on [0, 1], t = u^2 (weight 2u): the DSE integrand of the
            # uniform graph grows like log(1/t) near t = 0, which Gauss-Legendre in t
            # integrates slowly; in u it is u log u (measured: 16 nodes, error 1e-5 relative
            # in u against 2e-3 in t). For the absorbing graph both are near exact.
            nodes, weights = np.polynomial.legendre.leggauss(setup.n_steps)
            u = torch.tensor((nodes + 1) / 2, dtype=torch.float64, device=self.device)
            self.nodes = u * u
            self.node_weights = torch.tensor(weights, dtype=torch.float64, device=self.device) * u
            self.per_node = not per_draw_slots  # accumulate over a node's samples: flat in n_samples
            self.n_slots = setup.n_steps * self.n_seq if self.per_node else self.n_rows
        else:
            self.u = _stratified(n, self.n_seq, setup.seed, _TIME_STREAM + stream * _STREAM_STRIDE, self.device,
                                 setup.backend)
            self.n_slots = self.n_rows

    # -- per chunk of rows ------------------------------------------------------------

    def rows(self, g: torch.Tensor):
        """For rows g: (sequence, sigma float32, weight float64, num_masked or None, slot)."""
        setup = self.setup
        d, b = g // self.n_seq, g % self.n_seq
        m = self.n_tokens[b]
        if setup.method == "time_free":
            k = _inverse_harmonic_cdf(self.u[d, b], m, self.harmonic[b])
            sigma, weight = self._time_free_sigma_weight(k, m, self.harmonic[b])
            return b, sigma, weight, k, g
        if setup.method == "mc":
            u = self.u[d, b]
            t = u * u
        else:
            node = d // setup.n_samples
            t = self.nodes[node]
        total = setup.schedule.total(t)
        sigma = total.float()
        rate = setup.schedule.rate(t).double()
        weight = rate / torch.expm1(sigma.double()) if setup.loss == "dce" else rate
        slot = g
        if setup.method == "mc":
            # Importance sampling t = u^2, density 1/(2 sqrt t): near t = 0 a draw masks a
            # token with probability ~ M t and then weighs ~ 1/t, so uniform t would give a
            # variance growing like the integral of dt/t; this density makes it finite.
            weight = weight * 2 * u
        elif setup.method == "quadrature":
            weight = weight * self.node_weights[node]
            if self.per_node:
                slot = node * self.n_seq + b
        return b, sigma, weight, None, slot

    def _time_free_sigma_weight(self, k, m, harmonic):
        # The equivalent noise of k masked out of M: lambda = k / (M + 1), the mean of
        # lambda given k under the 1/lambda-weighted time integral (a Beta(k, M-k+1)).
        sigma = torch.log((m + 1).double() / (m + 1 - k).double()).float()
        weight = harmonic.clone()
        if self.setup.loss == "dse":
            weight = weight * torch.expm1(sigma.double())
        return sigma, weight

    def exact_rows(self, g: torch.Tensor, positions: torch.Tensor):
        """time_free_exact: rows g are the subsets 1..2^M-1 of each sequence's positions."""
        b = torch.searchsorted(self.first_row, g, right=True) - 1
        subset = g - self.first_row[b] + 1
        bits = (subset[:, None] >> torch.arange(positions.shape[1], device=g.device)) & 1
        k = bits.sum(1)
        m = self.n_tokens[b]
        sigma, weight = self._time_free_sigma_weight(k, m, self.harmonic[b])
        # 1/(k C(M, k)) in place of H_M: every subset of size k, each with weight 1/C(M, k).
        m64, k64 = m.double(), k.double()
        log_binom = torch.lgamma(m64 + 1) - torch.lgamma(k64 + 1) - torch.lgamma(m64 - k64 + 1)
        weight = weight / self.harmonic[b] / (k64 * torch.exp(log_binom))
        return b, sigma, weight, bits.bool(), b


def _stratified(n: int, n_seq: int, seed: int, offset: int, device: torch.device, backend: str | None) -> torch.Tensor:
    """(n, B) uniforms in (0, 1), float64: per sequence, one in each stratum, u = (d + v_{d,b}) / n.

    The rule of ``sample_times(method="stratified")`` applied per sequence, with the v from
    one i.i.d. call (counters offset + d B + b). Unlike
    the antithetic set (one shared random start), independent strata keep the
    successive-difference variance estimate honest when the integrand has steps (the
    integer k of the time-free estimator), and different sequences get independent draws.
    """
    v = sample_times(n * n_seq, method="iid", eps=0.0, seed=seed, offset=offset, device=device, backend=backend)
    strata = torch.arange(n, dtype=torch.float64, device=device)[:, None]
    return ((strata + v.double().view(n, n_seq)) / n).clamp_min(_T_MIN)


def _inverse_harmonic_cdf(u: torch.Tensor, m: torch.Tensor, harmonic: torch.Tensor) -> torch.Tensor:
    """k in {1..M} with P(k) = 1/(k H_M), from uniforms u: the smallest k with H_k >= u H_M."""
    top = int(m.max())
    table = (1.0 / torch.arange(1, top + 1, dtype=torch.float64, device=u.device)).cumsum(0)
    k = torch.searchsorted(table, u * harmonic) + 1
    return torch.minimum(k, m)


def _denoise(denoiser: Denoiser, x_t: torch.Tensor, sigma: torch.Tensor, width: tuple[int, int]) -> torch.Tensor:
    out = denoiser(x_t, sigma)
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        raise TypeError(f"the denoiser must return a float tensor, got {type(out).__name__}"
                        + (f" of {out.dtype}" if isinstance(out, torch.Tensor) else ""))
    lo, hi = width
    expected = f"{lo}" if lo == hi else f">= {lo}"
    if out.dim() != 3 or out.shape[:2] != x_t.shape or not lo <= out.shape[2] <= hi:
        raise ValueError(f"the denoiser output must have shape ({x_t.shape[0]}, {x_t.shape[1]}, {expected}) "
                         f"for these inputs, got {tuple(out.shape)}")
    if out.device != x_t.device:
        raise ValueError(f"the denoiser output is on {out.device} but x0 is on {x_t.device}")
    return out


def _output_width(setup: _Setup) -> tuple[int, int]:
    """Allowed number of columns of the denoiser output (min, max)."""
    if setup.loss == "dce":
        return setup.vocab_size, 1 << 62  # extra columns (a mask column, padding) take part only if < mask_id
    if setup.graph == "absorb":
        return setup.mask_id + 1, setup.mask_id + 1  # SEDD's absorbing score: the mask is the last column
    return setup.vocab_size, setup.vocab_size


def _evaluate(denoiser: Denoiser, x0: torch.Tensor, maskable: torch.Tensor | None, plan: _Plan, step) -> torch.Tensor:
    """Runs every row of the plan through the denoiser in chunks; returns the (slots, 2) accumulator."""
    setup = plan.setup
    n_seq, length = x0.shape
    acc = torch.zeros(plan.n_slots, 2, dtype=torch.float64, device=x0.device)
    chunk = setup.batch_size or max(n_seq, 1)
    width = _output_width(setup)
    x0_scored = x0 if maskable is None else torch.where(maskable, x0, IGNORE)
    if setup.method == "time_free_exact":
        keep = maskable if maskable is not None else torch.ones_like(x0, dtype=torch.bool)
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # maskable positions first
        positions = order[:, : int(plan.n_tokens.max())]
    for g0 in range(0, plan.n_rows, chunk):
        g = torch.arange(g0, min(plan.n_rows, g0 + chunk), device=x0.device)
        if setup.method == "time_free_exact":
            b, sigma, weight, bits, slot = plan.exact_rows(g, positions)
            masked = torch.zeros(g.shape[0], length, dtype=torch.bool, device=x0.device)
            masked.scatter_(1, positions[b], bits)
            x_t = torch.where(masked, setup.mask_id, x0[b])
        else:
            b, sigma, weight, k, slot = plan.rows(g)
            noise = dict(num_masked=k) if k is not None else dict(sigma=sigma)
            x_t = perturb(
                x0[b], **noise, graph=setup.graph, vocab_size=setup.vocab_size,
                mask_id=setup.mask_id if setup.graph == "absorb" else None,
                maskable=None if maskable is None else maskable[b], seed=setup.seed,
                offset=plan.noise_offset + g0 * length, backend=setup.backend,
            ).x_t
        out = _denoise(denoiser, x_t, sigma, width)
        step(out, x_t, x0_scored[b], sigma.double(), weight, acc, loss=setup.loss, graph=setup.graph,
             mask_id=setup.mask_id, ignore_index=IGNORE, index=slot, backend=setup.backend)
    if bool(torch.isnan(acc).any()):
        bad = int(torch.isnan(acc[:, 0]).nonzero()[0])
        raise ValueError(f"the denoiser output contains NaN where the loss reads it (accumulator row {bad})")
    return acc


def _uniform_terminal(setup: _Setup, n_tokens: torch.Tensor) -> torch.Tensor:
    r"""M KL(q_{σmax} || uniform): the uniform graph's terminal term when σ(1) is finite.

    :math:`q_{\sigma}` is the per-token forward marginal of a clean token,
    :math:`e^{-\sigma}\delta_{x_0} + (1 - e^{-\sigma})/V`. With it the estimate is SEDD's
    bound for the model started from the uniform prior at :math:`\sigma_{max}`; it equals
    -log p(x0) for the exact score up to :math:`O(e^{-2\sigma_{max}})`.
    """
    sigma_max = float(setup.schedule.total(torch.tensor(1.0, dtype=torch.float64)))
    if setup.graph != "uniform" or setup.method not in ("mc", "quadrature") or not math.isfinite(sigma_max):
        return torch.zeros_like(n_tokens, dtype=torch.float64)
    n = setup.vocab_size
    keep = math.exp(-sigma_max)
    q_same, q_other = keep + (1 - keep) / n, (1 - keep) / n
    kl = q_same * math.log(q_same * n) + (n - 1) * (q_other * math.log(q_other * n) if q_other > 0 else 0.0)
    return n_tokens.double() * kl


def _per_draw(acc: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """(B, draws) weighted loss sums of the draws, from a per-draw accumulator."""
    return acc[:, 0].view(plan.n_draws, plan.n_seq).T


def _mean_and_stderr(values: torch.Tensor, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Estimate and standard error from per-draw values (B, draws).

    Quadrature: independent draws per node, the usual variance of a mean per node.
    Antithetic draws (``"mc"``, ``"time_free"``) form a systematic sample of u; their
    variance is the successive-difference estimator over the draws sorted by u,
    :math:`\sum_i (y_{(i+1)} - y_{(i)})^2 / (2 n (n-1))` (Wolter, "Introduction to
    Variance Estimation", 1985), which, unlike the i.i.d. formula, does not count the
    trend in u that the stratification removes.
    """
    setup = plan.setup
    if setup.method == "quadrature":
        per_node = values.reshape(plan.n_seq, setup.n_steps, setup.n_samples)
        mean = per_node.mean(-1).sum(-1)
        var = per_node.var(-1) if setup.n_samples > 1 else torch.full_like(per_node[..., 0], math.nan)
        return mean, (var.sum(-1) / setup.n_samples).sqrt()
    n = values.shape[1]
    if n == 1:
        return values[:, 0], torch.full_like(values[:, 0], math.nan)
    ordered = values.gather(1, plan.u.T.argsort(1))
    var_of_mean = ordered.diff(dim=1).pow(2).sum(1) / (2 * n * (n - 1))
    return values.mean(1), var_of_mean.sqrt()


def _summarise(acc: torch.Tensor, plan: _Plan) -> NLLEstimate:
    setup = plan.setup
    setup_n = setup.n_samples
    times = integrand = None
    if setup.method == "time_free_exact":
        nll, stderr = acc[:, 0].clone(), torch.zeros_like(acc[:, 0])
    elif setup.method == "quadrature" and plan.per_node:
        sums = acc.view(setup.n_steps, plan.n_seq, 2).permute(1, 0, 2)  # (B, nodes, 2)
        node_mean = sums[..., 0] / setup_n
        node_var = (sums[..., 1] - setup_n * node_mean**2).clamp_min(0) / (setup_n - 1) if setup_n > 1 else \
            torch.full_like(node_mean, math.nan)
        nll, stderr = node_mean.sum(1), (node_var.sum(1) / setup_n).sqrt()
        times = plan.nodes.expand(plan.n_seq, -1)
        integrand = node_mean / plan.node_weights
    else:
        values = _per_draw(acc, plan)
        nll, stderr = _mean_and_stderr(values, plan)
        if setup.method == "mc":
            u = plan.u.T
            times, integrand = u * u, values / (2 * u)
        else:
            m = plan.n_tokens[:, None]
            k = _inverse_harmonic_cdf(plan.u.T.contiguous(), m.expand(-1, plan.n_draws),
                                      plan.harmonic[:, None].expand(-1, plan.n_draws))
            times = k.double() / m
            integrand = values * m / (k * plan.harmonic[:, None])
    nll = nll + _uniform_terminal(setup, plan.n_tokens)
    bits = nll / (plan.n_tokens.double() * math.log(2))
    return NLLEstimate(nll, stderr, plan.n_tokens, bits, setup.method, times, integrand)


def _n_tokens(x0: torch.Tensor, maskable: torch.Tensor | None) -> torch.Tensor:
    if maskable is None:
        return torch.full((x0.shape[0],), x0.shape[1], dtype=torch.int64, device=x0.device)
    return maskable.sum(1)


def _check_exact_size(setup: _Setup, n_tokens: torch.Tensor) -> None:
    if setup.method == "time_free_exact" and n_tokens.numel() and int(n_tokens.max()) > MAX_EXACT_POSITIONS:
        raise ValueError(f"method='time_free_exact' enumerates 2^M - 1 subsets; M = {int(n_tokens.max())} "
                         f"maskable positions is more than {MAX_EXACT_POSITIONS}: use method='time_free'")


def _estimate_nll(denoiser, x0, *, method="time_free", loss="dce", graph="absorb", schedule=None, n_samples=64,
                  n_steps=None, maskable=None, mask_id=None, vocab_size=None, batch_size=None, seed=0,
                  backend=None, step=integrate_step) -> NLLEstimate:
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable (x_t, sigma) -> (B, L, V), got {type(denoiser).__name__}")
    setup = _setup(method, loss, graph, schedule, n_samples, n_steps, mask_id, vocab_size, batch_size, seed, backend)
    x0 = _check_x0("x0", x0, setup)
    maskable = _check_maskable(maskable, x0)
    n_tokens = _n_tokens(x0, maskable)
    _check_exact_size(setup, n_tokens)
    if x0.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.float64, device=x0.device)
        return NLLEstimate(empty, empty.clone(), n_tokens, empty.clone(), setup.method)
    with torch.inference_mode():
        plan = _Plan(setup, n_tokens, stream=0, per_draw_slots=False)
        estimate = _summarise(_evaluate(denoiser, x0, maskable, plan, step), plan)
    # Plain tensors for the caller (inference tensors cannot enter autograd later).
    return NLLEstimate(*(t.clone() if isinstance(t, torch.Tensor) else t for t in dataclasses.astuple(estimate)))


def estimate_nll(
    denoiser: Denoiser,
    x0: torch.Tensor,
    *,
    method: Method = "time_free",
    loss: Literal["dce", "dse"] = "dce",
    graph: Literal["absorb", "uniform"] = "absorb",
    schedule: Schedule | None = None,
    n_samples: int = 64,
    n_steps: int | None = None,
    maskable: torch.Tensor | None = None,
    mask_id: int | None = None,
    vocab_size: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    backend: str | None = None,
) -> NLLEstimate:
    r"""Estimates :math:`-\log p(x_0)` of each sequence under a diffusion model (see the module docstring).

    Args:
        denoiser: ``denoiser(x_t, sigma) -> (B, L, W)``. For ``loss="dce"``: logits or
            log-probabilities of :math:`x_0` given :math:`x_t` (W >= vocab_size; a column at
            ``mask_id``, if present, is left out of the softmax). For ``loss="dse"``: SEDD
            log-scores (W = mask_id + 1 with the mask last for ``"absorb"``, W = vocab_size
            for ``"uniform"``). ``sigma`` is a (B,) float32 tensor of total noise; the
            time-free methods pass :math:`\sigma = -\log(1-\lambda)` with
            :math:`\lambda = k/(M+1)` for k masked tokens out of M.
        x0: (B, L) clean token ids in [0, vocab_size).
        method: ``"time_free"`` (default; k ~ 1/k stratified over the draws, scaled by
            :math:`H_M`), ``"mc"`` (one time per draw, :math:`t = u^2` with u stratified,
            weighted by :math:`2u`: a finite variance where uniform t has none),
            ``"quadrature"`` (Gauss–Legendre in u with :math:`t = u^2`, ``n_steps`` nodes,
            ``n_samples`` corruptions per node) or ``"time_free_exact"`` (the time-free sum
            enumerated over all :math:`2^M - 1` subsets; M <= 20; no noise, stderr 0).
        loss: ``"dce"`` (I-MDCE) or ``"dse"`` (I-MDSE).
        graph: ``"absorb"`` (masking) or ``"uniform"`` (``loss="dse"``, ``"mc"`` or
            ``"quadrature"`` only).
        schedule: σ(t) for ``"mc"`` / ``"quadrature"`` (`fastbound.schedules`). Default
            ``LogLinear(eps=0)``, which spans σ in (0, ∞) so the estimate is exact in
            expectation. A schedule with finite σ(1) truncates the integral: for the
            uniform graph the terminal KL to the uniform prior is added analytically (the
            model's SEDD bound); for the absorbing graph the tail beyond σ(1) is missing
            (a relative error of about :math:`e^{-\sigma(1)}`).
        n_samples: draws per sequence (per node for quadrature), >= 1.
        n_steps: quadrature nodes (default 16).
        maskable: bool, broadcastable to x0: corrupt and score only these positions, for
            :math:`-\log p(x_0[\text{maskable}] \mid x_0[\lnot\text{maskable}])` (M per
            sequence = its number of maskable positions, at least one).
        mask_id: the absorbing mask token (default ``vocab_size``).
        vocab_size: number of real tokens V. Required, except for ``graph="absorb"``
            with ``mask_id`` given, where it defaults to ``mask_id``.
        batch_size: rows per denoiser call (default B). Memory is flat in ``n_samples``.
        seed: names the draws; the same seed gives the same estimate on every backend
            and ``batch_size``.
        backend: kernel backend for the noise and the integration step (see `fastbound._backend`).

    Runs under ``torch.inference_mode()``. Raises ValueError / TypeError naming the bad
    argument (including a denoiser output of the wrong shape or with NaN).
    """
    return _estimate_nll(denoiser, x0, method=method, loss=loss, graph=graph, schedule=schedule,
                         n_samples=n_samples, n_steps=n_steps, maskable=maskable, mask_id=mask_id,
                         vocab_size=vocab_size, batch_size=batch_size, seed=seed, backend=backend)


def _log_likelihood_ratio(denoiser, x_a, x_b, *, coupled=True, method="time_free", loss="dce", graph="absorb",
                          schedule=None, n_samples=64, n_steps=None, maskable=None, mask_id=None, vocab_size=None,
                          batch_size=None, seed=0, backend=None, step=integrate_step) -> RatioEstimate:
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable (x_t, sigma) -> (B, L, V), got {type(denoiser).__name__}")
    if not isinstance(coupled, bool):
        raise TypeError(f"coupled must be a bool, got {type(coupled).__name__}")
    setup = _setup(method, loss, graph, schedule, n_samples, n_steps, mask_id, vocab_size, batch_size, seed, backend)
    x_a, x_b = _check_x0("x_a", x_a, setup), _check_x0("x_b", x_b, setup)
    if x_a.shape != x_b.shape:
        raise ValueError(f"x_a and x_b must have the same shape, got {tuple(x_a.shape)} and {tuple(x_b.shape)}")
    if x_a.device != x_b.device:
        raise ValueError(f"x_a is on {x_a.device} but x_b is on {x_b.device}")
    maskable = _check_maskable(maskable, x_a)
    n_tokens = _n_tokens(x_a, maskable)
    _check_exact_size(setup, n_tokens)
    if x_a.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.float64, device=x_a.device)
        return RatioEstimate(empty, empty.clone())
    with torch.inference_mode():
        plan_a = _Plan(setup, n_tokens, stream=0, per_draw_slots=True)
        plan_b = _Plan(setup, n_tokens, stream=0 if coupled else 1, per_draw_slots=True)
        acc_a = _evaluate(denoiser, x_a, maskable, plan_a, step)
        acc_b = _evaluate(denoiser, x_b, maskable, plan_b, step)
        if setup.method == "time_free_exact":
            value, stderr = acc_b[:, 0] - acc_a[:, 0], torch.zeros_like(acc_a[:, 0])
        elif coupled:
            value, stderr = _mean_and_stderr(_per_draw(acc_b, plan_b) - _per_draw(acc_a, plan_a), plan_a)
        else:
            nll_a, se_a = _mean_and_stderr(_per_draw(acc_a, plan_a), plan_a)
            nll_b, se_b = _mean_and_stderr(_per_draw(acc_b, plan_b), plan_b)
            value, stderr = nll_b - nll_a, (se_a**2 + se_b**2).sqrt()
    return RatioEstimate(value.clone(), stderr.clone())


def log_likelihood_ratio(
    denoiser: Denoiser,
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    *,
    coupled: bool = True,
    maskable: torch.Tensor | None = None,
    method: Method = "time_free",
    loss: Literal["dce", "dse"] = "dce",
    graph: Literal["absorb", "uniform"] = "absorb",
    schedule: Schedule | None = None,
    n_samples: int = 64,
    n_steps: int | None = None,
    mask_id: int | None = None,
    vocab_size: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    backend: str | None = None,
) -> RatioEstimate:
    r""":math:`\log p(x_a) - \log p(x_b)` per pair of sequences, with its standard error.

    ``x_a`` and ``x_b`` are (B, L) and are compared row by row. With ``coupled=True``
    (default) both sequences of a pair see the very same draws — the same times or
    numbers of masked tokens, the same uniforms for the positions (same seed and
    offsets in `fastbound.perturb`) — and the standard error comes from the per-draw
    differences: where the sequences agree the losses cancel draw by draw (the coupled
    Monte-Carlo estimator of Jeon et al. 2025). ``coupled=False`` uses independent
    draws for ``x_b`` and adds the two variances. The remaining arguments are those of
    `estimate_nll`; the uniform graph's terminal term cancels in the ratio.
    """
    return _log_likelihood_ratio(denoiser, x_a, x_b, coupled=coupled, method=method, loss=loss, graph=graph,
                                 schedule=schedule, n_samples=n_samples, n_steps=n_steps, maskable=maskable,
                                 mask_id=mask_id, vocab_size=vocab_size, batch_size=batch_size, seed=seed,
                                 backend=backend)
