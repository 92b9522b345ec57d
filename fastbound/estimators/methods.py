r"""The estimation methods, one object each: its draws, their weights, and its error estimate.

A method lays out a virtual batch of rows (row g is one corrupted copy of one sequence, given
to the denoiser) and an accumulator of slots that the integration step adds
:math:`(S, S^2)` into (:math:`S` = the row's weighted loss sum). Per chunk of rows,
`Method.draws` says which sequence each row copies, its noise (σ, an exact number of masked
tokens, or an explicit subset), its weight and its slot; `Method.summarise` turns the filled
accumulator into the estimate, its standard error and the per-draw integrand.

* `TimeFree`: k masked tokens with P(k) = 1/(k H_M) by the inverse CDF of a stratified
  uniform, weight :math:`H_M` (I-MDCE's time-free form; ×(e^σ - 1) for the DSE).
* `TimeFreeExact`: every subset of the M positions, weight 1/(k C(M, k)): no noise.
* `MonteCarlo`: one time :math:`t = u^2` per draw (u stratified), weight :math:`2u\,w(t)`.
* `Quadrature`: Gauss–Legendre nodes in u with :math:`t = u^2`, ``n_samples`` corruptions each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, NamedTuple

import numpy as np
import torch

from .. import _harmonic
from ..noise import sample_times
from . import variance

if TYPE_CHECKING:
    from .options import Batch, Options

# Counter ranges of the two random streams (same Philox key, disjoint counters):
# corruptions use counters [offset, offset + rows * L), times [_TIME_STREAM + ...).
_TIME_STREAM = 1 << 60
_STREAM_STRIDE = 1 << 58
_T_MIN = 2.0**-30  # a draw at t = 0 exactly (probability 2^-24) is moved here


class Draws(NamedTuple):
    """One chunk of rows: each row's sequence, noise, weight and accumulator slot.

    The noise is ``mask`` (an explicit subset, (rows, L) bool) if given, else exactly
    ``num_masked`` tokens if given, else total noise ``sigma``.
    """

    seq: torch.Tensor  # (rows,) int64
    sigma: torch.Tensor  # (rows,) float32: what the denoiser is told
    weight: torch.Tensor  # (rows,) float64
    slot: torch.Tensor  # (rows,) int64
    num_masked: torch.Tensor | None = None
    mask: torch.Tensor | None = None


class Summary(NamedTuple):
    nll: torch.Tensor
    stderr: torch.Tensor
    times: torch.Tensor | None
    integrand: torch.Tensor | None


def stratified(n: int, n_seq: int, seed: int, offset: int, device: torch.device, backend: str | None) -> torch.Tensor:
    """(n, B) uniforms in (0, 1), float64: per sequence, one in each stratum, u = (d + v_{d,b}) / n.

    The rule of ``sample_times(method="stratified")`` applied per sequence, with the v from
    one i.i.d. call (counters offset + d B + b). Unlike the antithetic set (one shared random
    start), independent strata keep the successive-difference variance estimate honest when
    the integrand has steps (the integer k of the time-free estimator), and different
    sequences get independent draws. The division is by a tensor on the same device: a
    Python divisor lets a GPU multiply by its reciprocal, which is not bit-identical.
    """
    v = sample_times(n * n_seq, method="iid", eps=0.0, seed=seed, offset=offset, device=device, backend=backend)
    strata = torch.arange(n, dtype=torch.float64, device=device)[:, None]
    count = torch.full((), n, dtype=torch.float64, device=device)
    return ((strata + v.double().view(n, n_seq)) / count).clamp_min(_T_MIN)


def inverse_harmonic_cdf(u: torch.Tensor, m: torch.Tensor, harmonic: torch.Tensor) -> torch.Tensor:
    """k in {1..M} with P(k) = 1/(k H_M), from uniforms u: the smallest k with H_k >= u H_M."""
    return torch.minimum(_harmonic.smallest_k(u * harmonic, int(m.max())), m)


def time_free_sigma_weight(loss: str, k: torch.Tensor, m: torch.Tensor, harmonic: torch.Tensor):
    """σ and the weight H_M of k masked out of M (×(e^σ - 1) for the DSE, whose integrand is r·DCE).

    The equivalent noise: λ = k / (M + 1), the mean of λ given k under the 1/λ-weighted time
    integral (a Beta(k, M-k+1)).
    """
    sigma = torch.log((m + 1).double() / (m + 1 - k).double()).float()
    weight = harmonic.clone()
    if loss == "dse":
        weight = weight * torch.expm1(sigma.double())
    return sigma, weight


class Method:
    """Base of the methods: the batch's rows, one per (draw, sequence), in draw-major order."""

    name: ClassVar[str]
    counts_masked_tokens: ClassVar[bool] = False  # draws k, so absorbing graph only
    counts_subsets: ClassVar[bool] = False  # enumerates 2^M - 1 subsets
    has_nodes: ClassVar[bool] = False  # takes n_steps

    def __init__(self, options: Options, batch: Batch, stream: int, per_draw_slots: bool):
        self.options = options
        self.n_seq = batch.n_tokens.shape[0]
        self.n_tokens = batch.n_tokens
        self.harmonic = _harmonic.harmonic_numbers(int(batch.n_tokens.max()), batch.n_tokens.device)[batch.n_tokens]
        self.device = batch.n_tokens.device
        self.noise_offset = stream * _STREAM_STRIDE
        self.n_draws = options.n_samples
        self.n_rows = self.n_draws * self.n_seq
        self.n_slots = self.n_rows

    @classmethod
    def kept_draws(cls, options: Options, n_seq: int, per_draw_slots: bool) -> int:
        """How many per-draw records an estimate holds (its memory beyond one chunk), before it allocates them."""
        return options.n_samples * n_seq

    def draws(self, g: torch.Tensor) -> Draws:
        raise NotImplementedError

    def summarise(self, acc: torch.Tensor) -> Summary:
        raise NotImplementedError

    def per_draw(self, acc: torch.Tensor) -> torch.Tensor:
        """(B, draws) weighted loss sums of the draws, from a per-draw accumulator."""
        return acc[:, 0].view(self.n_draws, self.n_seq).T

    def mean_and_stderr(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Estimate and standard error from per-draw values (B, draws)."""
        raise NotImplementedError

    def _split(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return g // self.n_seq, g % self.n_seq


class _Stratified(Method):
    """Methods with one stratified uniform per draw and the successive-difference error."""

    def __init__(self, options: Options, batch: Batch, stream: int, per_draw_slots: bool):
        super().__init__(options, batch, stream, per_draw_slots)
        self.u = stratified(options.n_samples, self.n_seq, options.seed, _TIME_STREAM + stream * _STREAM_STRIDE,
                            self.device, options.backend)

    def mean_and_stderr(self, values):
        return variance.successive_difference(values, self.u.T)


class TimeFree(_Stratified):
    name = "time_free"
    counts_masked_tokens = True

    def draws(self, g):
        d, b = self._split(g)
        m = self.n_tokens[b]
        k = inverse_harmonic_cdf(self.u[d, b], m, self.harmonic[b])
        sigma, weight = time_free_sigma_weight(self.options.loss, k, m, self.harmonic[b])
        return Draws(b, sigma, weight, g, num_masked=k)

    def summarise(self, acc):
        values = self.per_draw(acc)
        nll, stderr = self.mean_and_stderr(values)
        m = self.n_tokens[:, None]
        harmonic = self.harmonic[:, None]
        k = inverse_harmonic_cdf(self.u.T.contiguous(), m.expand(-1, self.n_draws), harmonic.expand(-1, self.n_draws))
        return Summary(nll, stderr, k.double() / m, values * m / (k * harmonic))


class MonteCarlo(_Stratified):
    name = "mc"

    def draws(self, g):
        d, b = self._split(g)
        u = self.u[d, b]
        sigma, weight = _time_sigma_weight(self.options, u * u)
        # Importance sampling t = u^2, density 1/(2 sqrt t): near t = 0 a draw masks a
        # token with probability ~ M t and then weighs ~ 1/t, so uniform t would give a
        # variance growing like the integral of dt/t; this density makes it finite.
        return Draws(b, sigma, weight * 2 * u, g)

    def summarise(self, acc):
        values = self.per_draw(acc)
        nll, stderr = self.mean_and_stderr(values)
        u = self.u.T
        return Summary(nll, stderr, u * u, values / (2 * u))


def _time_sigma_weight(options: Options, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """σ(t) as the denoiser sees it (float32) and the loss's time weight w(t) (float64)."""
    sigma = options.schedule.total(t).float()
    rate = options.schedule.rate(t).double()
    return sigma, (rate / torch.expm1(sigma.double()) if options.loss == "dce" else rate)


class Quadrature(Method):
    """Gauss–Legendre in u on [0, 1] with t = u^2 (weight 2u), ``n_samples`` draws per node.

    The DSE integrand of the uniform graph grows like log(1/t) near t = 0, which Gauss–Legendre
    in t integrates slowly; in u it is u log u (measured: 16 nodes, error 1e-5 relative in u
    against 2e-3 in t). For the absorbing graph both are near exact. The accumulator has one
    slot per (node, sequence), so memory is flat in ``n_samples``, unless a ratio needs the
    draws one by one (``per_draw_slots``).
    """

    name = "quadrature"
    has_nodes = True

    def __init__(self, options: Options, batch: Batch, stream: int, per_draw_slots: bool):
        super().__init__(options, batch, stream, per_draw_slots)
        nodes, weights = np.polynomial.legendre.leggauss(options.n_steps)
        u = torch.tensor((nodes + 1) / 2, dtype=torch.float64, device=self.device)
        self.nodes = u * u
        self.node_weights = torch.tensor(weights, dtype=torch.float64, device=self.device) * u
        self.n_draws = options.n_samples * options.n_steps
        self.n_rows = self.n_draws * self.n_seq
        self.per_node = not per_draw_slots
        self.n_slots = options.n_steps * self.n_seq if self.per_node else self.n_rows

    @classmethod
    def kept_draws(cls, options, n_seq, per_draw_slots):
        return options.n_steps * n_seq * (options.n_samples if per_draw_slots else 1)

    def draws(self, g):
        d, b = self._split(g)
        node = d // self.options.n_samples
        sigma, weight = _time_sigma_weight(self.options, self.nodes[node])
        slot = node * self.n_seq + b if self.per_node else g
        return Draws(b, sigma, weight * self.node_weights[node], slot)

    def summarise(self, acc):
        n = self.options.n_samples
        sums = acc.view(self.options.n_steps, self.n_seq, 2).permute(1, 0, 2)  # (B, nodes, 2)
        node_mean, node_var = variance.node_moments_from_sums(sums, n)
        nll, stderr = variance.quadrature_error(node_mean, node_var, n)
        return Summary(nll, stderr, self.nodes.expand(self.n_seq, -1), node_mean / self.node_weights)

    def mean_and_stderr(self, values):
        per_node = values.reshape(self.n_seq, self.options.n_steps, self.options.n_samples)
        return variance.quadrature_error(*variance.node_moments(per_node), self.options.n_samples)


class TimeFreeExact(Method):
    """The time-free sum over all 2^M - 1 subsets of each sequence's maskable positions."""

    name = "time_free_exact"
    counts_masked_tokens = True
    counts_subsets = True

    def __init__(self, options: Options, batch: Batch, stream: int, per_draw_slots: bool):
        super().__init__(options, batch, stream, per_draw_slots)
        per_seq = 2**self.n_tokens - 1
        self.first_row = torch.cumsum(per_seq, 0) - per_seq
        self.n_rows = int(per_seq.sum())
        self.n_draws = 1
        self.n_slots = self.n_seq
        keep = batch.maskable if batch.maskable is not None else torch.ones_like(batch.x0, dtype=torch.bool)
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # maskable positions first
        self.positions = order[:, : int(self.n_tokens.max())]
        self.length = batch.x0.shape[1]

    @classmethod
    def kept_draws(cls, options, n_seq, per_draw_slots):
        return n_seq

    def draws(self, g):
        b = torch.searchsorted(self.first_row, g, right=True) - 1
        subset = g - self.first_row[b] + 1
        bits = (subset[:, None] >> torch.arange(self.positions.shape[1], device=g.device)) & 1
        k = bits.sum(1)
        m = self.n_tokens[b]
        sigma, weight = time_free_sigma_weight(self.options.loss, k, m, self.harmonic[b])
        # 1/(k C(M, k)) in place of H_M: every subset of size k, each with weight 1/C(M, k).
        m64, k64 = m.double(), k.double()
        log_binom = torch.lgamma(m64 + 1) - torch.lgamma(k64 + 1) - torch.lgamma(m64 - k64 + 1)
        weight = weight / self.harmonic[b] / (k64 * torch.exp(log_binom))
        mask = torch.zeros(g.shape[0], self.length, dtype=torch.bool, device=g.device)
        mask.scatter_(1, self.positions[b], bits.bool())
        return Draws(b, sigma, weight, b, mask=mask)

    def per_draw(self, acc):
        return acc[:, :1]

    def mean_and_stderr(self, values):
        return values[:, 0], torch.zeros_like(values[:, 0])

    def summarise(self, acc):
        nll, stderr = self.mean_and_stderr(self.per_draw(acc))
        return Summary(nll.clone(), stderr, None, None)


METHODS: dict[str, type[Method]] = {m.name: m for m in (TimeFree, MonteCarlo, Quadrature, TimeFreeExact)}
"""Method names (``estimate_nll(method=...)``) to their classes."""
