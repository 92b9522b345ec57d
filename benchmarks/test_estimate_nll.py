r"""Estimator overhead: `fastbound.estimate_nll` with a denoiser that does no work.

Issue 4 asks that an estimate spend its time in the denoiser: the estimator's own work
(plan, noise through `fastbound.perturb`, the integration step, the accumulation and
the summary) should cost about one read of the denoiser output per denoiser call. To
see that work alone, the denoiser here returns a stored (B, L, V) output
(`StoredOutput`, well under a microsecond per call: measured by `seconds_per_call` and
subtracted by the report), so the time of an estimate is its overhead. The case runs
the default method (``"time_free"``, I-MDCE) with ``DRAWS`` draws per sequence, one
denoiser call per draw (``batch_size`` = B). The fused step reads only the rows of
masked positions, and a time-free draw masks k of the M positions with
P(k) = 1/(k H_M), 1/H_M of them on average (15% at M = 512; the four seed-0 draws at
4×512 mask 18%); the floor is nevertheless a read of the whole output, which the
denoiser has to produce anyway.

Providers:

* ``fastbound``: `fastbound.estimate_nll`;
* ``eager``: `benchmarks.eager_estimator.estimate_nll`, the same estimator with the dense
  reference loss and a sum in place of the fused step; same arguments, same draws;
* ``compile``: ``torch.compile(fullgraph=False)`` of that oracle estimator. It cannot be
  one graph (``fullgraph=True`` fails): argument checks read data (``bool(x.any())``,
  ``int(n.max())``), the draws are a Python loop over denoiser calls and the result is a
  dataclass copied with ``dataclasses.astuple``. Dynamo compiles the pieces between the
  graph breaks instead: 26 graphs, all built by the first call (later calls compile
  nothing). The dense loss is where the time goes, so at V = 32769 this is as fast as
  compiling only the oracle's step (measured: 0.88 s both, fp32). Building the graphs
  takes 5-25 s (warm / cold inductor cache), more than CI's smoke run should add, so the
  smoke grid leaves this provider out;
* ``floor``: ``DRAWS`` reads (``sum()``) of the denoiser output, one per denoiser call.

The ``estimate_nll_head`` case is issue 10's likelihood evaluation without logits: the
denoiser returns stored (B, L, H) hidden states (H = `HIDDEN`) of a model that ends in a
linear layer. ``fastbound`` passes the layer as ``estimate_nll(head=(weight, bias))``, which
forms the scores of the masked rows only, a chunk at a time; ``eager`` is the materialised
path, the same `fastbound.estimate_nll` on ``F.linear(hidden, weight, bias)`` computed by the
denoiser (the (B, L, V) scores every call). Same draws, so the estimates agree to float
rounding (`HEAD_RTOL`); the peak memory of ``fastbound`` does not grow with V·L.

Agreement: both estimators with the same seed see the same draws, so their estimates
and standard errors agree to float rounding (`check_estimate`). The report puts these
rows in their own table, with overhead = (estimate time - denoiser time) / floor time
(see `benchmarks.report`).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import fastbound

from . import data, eager_estimator
from .harness import Case, Shape

DRAWS = 4
"""Draws per sequence (n_samples), hence denoiser calls per estimate."""
METHOD = "time_free"
RTOL = 1e-6
"""Relative tolerance, also absolute as a fraction of the largest estimate: the per-draw
sums agree to ~1e-8 relative (fp32 losses summed in float64, in different orders)."""


HIDDEN = 512
"""Hidden size of the ``estimate_nll_head`` case (issue 10's H)."""
HEAD_RTOL = 1e-5
"""Tolerance of the head case: the chunk's matmul over masked rows and the full (B·L, V) matmul
block the fp32 dot products differently (~1e-7 relative per score)."""


class StoredOutput:
    """A denoiser that returns the same stored (B, L, V) output for any input: no work of its own."""

    def __init__(self, out: torch.Tensor):
        self.out = out

    def __call__(self, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.out


def seconds_per_call(calls: int = 10_000) -> float:
    """Time of one `StoredOutput` call (the fastest of 5 batches of ``calls``): the denoiser's time."""
    denoiser, x_t = StoredOutput(torch.zeros(1, 1, 2)), torch.zeros(1, 1, dtype=torch.long)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            denoiser(x_t, x_t)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def estimate_inputs(shape: Shape, dtype: torch.dtype, generator: torch.Generator) -> dict:
    """Logits over V - 1 tokens plus the mask column (last), and clean sequences."""
    out = data.scores(shape, dtype, generator)
    return dict(denoiser=StoredOutput(out), out=out, x0=data.clean_ids(shape, shape.vocab - 1, generator))


def _options(width: int) -> dict:
    """The estimate of ``width`` output columns: the real tokens and the mask (last)."""
    return dict(method=METHOD, loss="dce", vocab_size=width - 1, n_samples=DRAWS, seed=0)


def fastbound_estimate(denoiser, out, x0):
    estimate = fastbound.estimate_nll(denoiser, x0, **_options(out.shape[-1]))
    return estimate.nll, estimate.stderr


def eager_estimate(denoiser, out, x0):
    estimate = eager_estimator.estimate_nll(denoiser, x0, **_options(out.shape[-1]))
    return estimate.nll, estimate.stderr


def head_inputs(shape: Shape, dtype: torch.dtype, generator: torch.Generator) -> dict:
    """Hidden states, an output layer of V = vocab columns (the mask last) with unit-scale scores, clean sequences."""
    device = generator.device
    hidden = torch.randn(shape.batch, shape.length, HIDDEN, generator=generator, device=device).to(dtype)
    weight = (torch.randn(shape.vocab, HIDDEN, generator=generator, device=device) / HIDDEN**0.5).to(dtype)
    bias = (0.1 * torch.randn(shape.vocab, generator=generator, device=device)).to(dtype)
    return dict(hidden=hidden, weight=weight, bias=bias, x0=data.clean_ids(shape, shape.vocab - 1, generator))


def head_estimate(hidden, weight, bias, x0):
    estimate = fastbound.estimate_nll(StoredOutput(hidden), x0, head=(weight, bias), **_options(weight.shape[0]))
    return estimate.nll, estimate.stderr


def materialised_estimate(hidden, weight, bias, x0):
    denoiser = lambda x_t, sigma: F.linear(hidden, weight, bias)  # noqa: E731
    estimate = fastbound.estimate_nll(denoiser, x0, **_options(weight.shape[0]))
    return estimate.nll, estimate.stderr


def check_head_estimate(actual: dict, expected: dict, inputs: dict) -> None:
    scale = expected["output0"].abs().max().item()
    for key in ("output0", "output1"):
        torch.testing.assert_close(actual[key], expected[key], rtol=HEAD_RTOL, atol=HEAD_RTOL * scale)


def read_each_draw(denoiser, out, x0):
    """The floor: one read of the denoiser output per denoiser call."""
    return torch.stack([out.sum() for _ in range(DRAWS)])


def check_estimate(actual: dict, expected: dict, inputs: dict) -> None:
    """Estimate (output0) and standard error (output1) equal the oracle estimator's within `RTOL`."""
    scale = expected["output0"].abs().max().item()
    for key, name in (("output0", "estimate"), ("output1", "standard error")):
        torch.testing.assert_close(actual[key], expected[key], rtol=RTOL, atol=RTOL * scale,
                                   msg=lambda m, name=name: f"the {name} disagrees with the oracle estimator's: {m}")


CASES = [
    Case(
        "estimate_nll_dce",
        estimate_inputs,
        fastbound_estimate,
        eager_estimate,
        floor="out",
        check=check_estimate,
        floor_call=read_each_draw,
        floor_op=f"{DRAWS}×sum",
        fullgraph=False,
        smoke_providers=("fastbound", "eager", "floor"),
        info=dict(draws=DRAWS, method=METHOD, denoiser_seconds=DRAWS * seconds_per_call()),
    ),
    Case(
        "estimate_nll_head",
        head_inputs,
        head_estimate,
        materialised_estimate,
        floor="hidden",
        check=check_head_estimate,
        dtypes=(torch.float32,),
        fullgraph=False,
        smoke_providers=("fastbound", "eager", "floor"),
        working_set=lambda shape: 4 * 4 * shape.tokens * shape.vocab,
        info=dict(draws=DRAWS, method=METHOD, hidden=HIDDEN, eager="materialised scores"),
    ),
]


def test_estimate_nll(spec, measure):
    measure(spec)
