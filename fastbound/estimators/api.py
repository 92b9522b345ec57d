"""The public estimators, `estimate_nll` and `log_likelihood_ratio`, and the engine behind them.

The engine functions (`nll`, `ratio`) take checked `options.Options` and the integration step
to use, so a caller can run the very same estimator with another step (the eager baseline of
the benchmarks, `benchmarks.eager_estimator`). See the package docstring for the identities.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Literal

import torch

from ..integrate import integrate_step
from ..schedules import Schedule
from . import loop
from .methods import Method as MethodObject
from .head import check_head
from .options import Batch, Options, batch, check_denoiser, check_memory, check_x0
from .results import NLLEstimate, RatioEstimate

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Method = Literal["time_free", "mc", "quadrature", "time_free_exact"]


def uniform_terminal(options: Options, n_tokens: torch.Tensor) -> torch.Tensor:
    r"""M KL(q_{σmax} || uniform): the uniform graph's terminal term when σ(1) is finite.

    :math:`q_{\sigma}` is the per-token forward marginal of a clean token,
    :math:`e^{-\sigma}\delta_{x_0} + (1 - e^{-\sigma})/V`. With it the estimate is SEDD's
    bound for the model started from the uniform prior at :math:`\sigma_{max}`; it equals
    -log p(x0) for the exact score up to :math:`O(e^{-2\sigma_{max}})`.
    """
    sigma_max = float(options.schedule.total(torch.tensor(1.0, dtype=torch.float64)))
    if options.graph != "uniform" or not math.isfinite(sigma_max):
        return torch.zeros_like(n_tokens, dtype=torch.float64)
    n = options.vocab_size
    keep = math.exp(-sigma_max)
    q_same, q_other = keep + (1 - keep) / n, (1 - keep) / n
    kl = q_same * math.log(q_same * n) + (n - 1) * (q_other * math.log(q_other * n) if q_other > 0 else 0.0)
    return n_tokens.double() * kl


def _options(arguments: dict) -> Options:
    """The `Options` among a public function's arguments (its ``locals()``)."""
    return Options(**{field.name: arguments[field.name] for field in dataclasses.fields(Options)})


def _method(options: Options, checked: Batch, stream: int, per_draw_slots: bool) -> MethodObject:
    kind, n_seq = options.kind, checked.x0.shape[0]
    check_memory(kind.kept_draws(options, n_seq, per_draw_slots), options, n_seq, checked.x0.device)
    return kind(options, checked, stream, per_draw_slots)


def _step(head: object, options: Options, device: torch.device,
          step: loop.Step) -> tuple[loop.Step, tuple[int, int] | None]:
    """The integration step and denoiser output width: ``step`` on scores, or the fused one of ``head``."""
    if head is None:
        return step, None
    if step is not integrate_step:
        raise ValueError("head= runs the fused integration step; it does not combine with another step")
    return check_head(head, options, device)


def nll(denoiser: Denoiser, x0: torch.Tensor, maskable: torch.Tensor | None, options: Options,
        step: loop.Step = integrate_step, head: tuple | None = None) -> NLLEstimate:
    """`estimate_nll` with checked ``options``, the integration step ``step`` and the output layer ``head``."""
    check_denoiser(denoiser)
    checked = batch(check_x0("x0", x0, options), maskable, options)
    step, width = _step(head, options, checked.x0.device, step)
    if checked.x0.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.float64, device=checked.x0.device)
        return NLLEstimate(empty, empty.clone(), checked.n_tokens, empty.clone(), options.method)
    with torch.inference_mode():
        method = _method(options, checked, stream=0, per_draw_slots=False)
        summary = method.summarise(loop.accumulate(denoiser, checked, method, step, width))
        estimate = summary.nll + uniform_terminal(options, checked.n_tokens)
        bits = estimate / (checked.n_tokens.double() * math.log(2))
        result = NLLEstimate(estimate, summary.stderr, checked.n_tokens, bits, options.method, summary.times,
                             summary.integrand)
    # Plain tensors for the caller (inference tensors cannot enter autograd later).
    # (dataclasses.astuple would deep-copy every tensor first.)
    fields = (getattr(result, f.name) for f in dataclasses.fields(result))
    return NLLEstimate(*(t.clone() if isinstance(t, torch.Tensor) else t for t in fields))


def ratio(denoiser: Denoiser, x_a: torch.Tensor, x_b: torch.Tensor, coupled: bool, maskable: torch.Tensor | None,
          options: Options, step: loop.Step = integrate_step, head: tuple | None = None) -> RatioEstimate:
    """`log_likelihood_ratio` with checked ``options``, the integration step ``step`` and the output layer ``head``."""
    check_denoiser(denoiser)
    if not isinstance(coupled, bool):
        raise TypeError(f"coupled must be a bool, got {type(coupled).__name__}")
    x_a, x_b = check_x0("x_a", x_a, options), check_x0("x_b", x_b, options)
    if x_a.shape != x_b.shape:
        raise ValueError(f"x_a and x_b must have the same shape, got {tuple(x_a.shape)} and {tuple(x_b.shape)}")
    if x_a.device != x_b.device:
        raise ValueError(f"x_a is on {x_a.device} but x_b is on {x_b.device}")
    batch_a = batch(x_a, maskable, options)
    batch_b = batch_a._replace(x0=x_b)
    step, width = _step(head, options, x_a.device, step)
    if x_a.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.float64, device=x_a.device)
        return RatioEstimate(empty, empty.clone())
    with torch.inference_mode():
        method_a = _method(options, batch_a, stream=0, per_draw_slots=True)
        method_b = _method(options, batch_b, stream=0 if coupled else 1, per_draw_slots=True)
        draws_a = method_a.per_draw(loop.accumulate(denoiser, batch_a, method_a, step, width))
        draws_b = method_b.per_draw(loop.accumulate(denoiser, batch_b, method_b, step, width))
        if coupled:
            value, stderr = method_a.mean_and_stderr(draws_b - draws_a)
        else:
            (nll_a, se_a), (nll_b, se_b) = method_a.mean_and_stderr(draws_a), method_b.mean_and_stderr(draws_b)
            value, stderr = nll_b - nll_a, (se_a**2 + se_b**2).sqrt()
    return RatioEstimate(value.clone(), stderr.clone())


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
    head: tuple[torch.Tensor, torch.Tensor | None] | None = None,
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
        batch_size: rows per denoiser call (default B): the denoiser output of one call is the
            largest memory an estimate holds. Beyond it, ``"time_free"`` and ``"mc"`` keep each
            draw (its uniform, its loss sum, its time and integrand), so their memory grows with
            B·``n_samples``; ``"quadrature"`` keeps one sum per node (flat in ``n_samples``). An
            estimate whose draws would not fit in half the free memory is refused (ValueError
            naming ``n_samples``).
        seed: names the draws; the same seed gives the same estimate on every backend
            and ``batch_size``.
        backend: kernel backend for the noise and the integration step (see `fastbound._backend`).
        head: ``(weight, bias)`` (or ``(weight,)``) of a denoiser that ends in a linear layer:
            ``denoiser(x_t, sigma)`` then returns (B, L, H) hidden states, the scores are
            ``hidden @ weight.T + bias`` (weight (V, H) with V the width above, bias (V,) or
            None), and each chunk's integrand is computed from the contributing rows only
            (`fastbound.fused_linear.head_integrate_step`), never forming the (B, L, V) output.
            The estimate is that of the denoiser returning the scores, seed for seed.

    Runs under ``torch.inference_mode()``. Raises ValueError / TypeError naming the bad
    argument (including a denoiser output of the wrong shape or with NaN).
    """
    return nll(denoiser, x0, maskable, _options(locals()), head=head)


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
    head: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> RatioEstimate:
    r""":math:`\log p(x_a) - \log p(x_b)` per pair of sequences, with its standard error.

    ``x_a`` and ``x_b`` are (B, L) and are compared row by row. With ``coupled=True``
    (default) both sequences of a pair see the very same draws — the same times or
    numbers of masked tokens, the same uniforms for the positions (same seed and
    offsets in `fastbound.perturb`) — and the standard error comes from the per-draw
    differences: where the sequences agree the losses cancel draw by draw (the coupled
    Monte-Carlo estimator of Jeon et al. 2025). ``coupled=False`` uses independent
    draws for ``x_b`` and adds the two variances. The remaining arguments are those of
    `estimate_nll`; the uniform graph's terminal term cancels in the ratio (``head=`` included).
    """
    return ratio(denoiser, x_a, x_b, coupled, maskable, _options(locals()), head=head)
