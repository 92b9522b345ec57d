"""Benchmarks of the fused output layer + loss (`fastbound.fused_linear`) against the materialised scores.

A training step's output layer and loss, forward and backward to the hidden states, the
weight and the bias: 4 × 2048 = 8192 tokens, H = 512, V = 32768 (the mask column
included), fp32 and bf16, with 15%, 50% and 100% of the positions masked (the uniform
graph: noised), ``reduction="sum"``. Ops: absorbing DSE, uniform DSE, DCE, and the
integration step of the NLL estimators (forward only). Providers, side by side in one run
and each checked against the eager oracle:

* ``fastbound``: `fastbound.fused_linear_dse_loss` / `fastbound.fused_linear_dce_loss`;
* ``unfused``: (a) ``F.linear(hidden, weight, bias)`` (what ``nn.Linear`` runs), then
  `fastbound.dse_loss` / `fastbound.dce_loss`;
* ``eager``: (b) the same scores, then the eager oracle (`fastbound.reference`);
* ``unfused_compile``: (c) ``torch.compile(fullgraph=True)`` of (a);
* ``cce`` (DCE only): (d) Apple's Cut Cross-Entropy, ``linear_cross_entropy(e, c, targets,
  impl="torch_compile")``; the mask goes through ``ignore_index`` (targets are x0 at masked
  positions), the bias as one more input column (e = [h, 1], c = [W, b]: CCE 25.1 takes no
  bias), and the mask column is left out of ``c``. Skipped unless ``cut-cross-entropy`` is
  installed (``pip install --no-deps cut-cross-entropy==25.1.1``: its only requirements are
  torch and triton, which must not be replaced).

The integration step from hidden states (`fastbound.fused_linear.head_integrate_step`,
forward only) runs against the materialised path: ``F.linear`` then
`fastbound.integrate_step` (``unfused``) or `fastbound.reference.integrate_step` (``eager``).

Bounded time: one call of a provider takes seconds here (fp32 on a 2-core AVX2 host: ~3 s
for fastbound at 15% masking, ~17 s for (a)), so every case takes one timed round
(``min_rounds=1``: a checked call, the timed call, a memory call), and in the default grid
`skip_reason` leaves out the cells that would not change the picture, each with its reason
in the report: (a), (b) and (c) materialise all (N, V) scores and run the same matmuls at
every masking rate, so (b) runs at 50% only, (c) on DCE at 50%, and (a) at 15% and 50%; the
uniform graph uses every row at every noise rate (50% only); bf16 runs fastbound alone, at
50%, on DCE and absorbing DSE (torch's bf16 GEMMs on an AVX2 CPU are 4-6x slower than fp32,
over a minute per materialised call). The bf16 results are checked against the oracle on
the fp32 upcast of the same inputs. ``--full`` runs every cell (and a larger shape); the
smoke grid runs every cell at one small shape. The default grid: 26 timed cells and 12
oracle calls, about 20 minutes on a quiet 2-core host.

`benchmarks.harness` knows four providers; this module gives `harness.run` one case per
provider whose ``fastbound`` call is that provider, and records the provider's name in
``extra_info["provider"]`` (with ``mask_rate`` and ``hidden``). The oracle result is shared
by the providers of one case (same case name). `benchmarks.report` renders these rows with
`summary` and `chart` (time and peak memory against the masking rate)::

    python -m pytest benchmarks -k "fused or estimate_nll_head" --benchmark-json=benchmarks/results/fused.json
    python -m benchmarks.report benchmarks/results/fused.json   # writes fused.md and fused.png
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import fastbound
from fastbound import reference
from fastbound.fused_linear import head_integrate_step

from .harness import Case, Shape, Spec, assert_close_results

try:
    from cut_cross_entropy import linear_cross_entropy
except ImportError:  # optional baseline
    linear_cross_entropy = None

MASK_RATES = (0.15, 0.5, 1.0)
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
GRIDS = {
    "default": ((Shape(4, 2048, 32768), 512),),
    "full": ((Shape(4, 2048, 32768), 512), (Shape(8, 2048, 50257), 768)),
    "smoke": ((Shape(2, 64, 258), 32),),
}
"""(tokens and vocabulary, hidden size) per grid."""


def head_inputs(shape: Shape, n_hidden: int, rate: float, dtype: torch.dtype, generator: torch.Generator) -> dict:
    """Hidden states and an output layer with unit-variance scores; x_t masks ``rate`` of the positions."""
    device, size = generator.device, (shape.batch, shape.length)
    hidden = torch.randn(*size, n_hidden, generator=generator, device=device).to(dtype)
    weight = (torch.randn(shape.vocab, n_hidden, generator=generator, device=device) / math.sqrt(n_hidden)).to(dtype)
    bias = (0.1 * torch.randn(shape.vocab, generator=generator, device=device)).to(dtype)
    x0 = torch.randint(0, shape.vocab - 1, size, generator=generator, device=device)
    masked = torch.rand(size, generator=generator, device=device) < rate
    sigma = torch.full((shape.batch, 1), -math.log1p(-min(rate, 1 - 1e-4)), device=device)  # P(masked) = rate
    return dict(hidden=hidden, weight=weight, bias=bias, sigma=sigma, x_t=torch.where(masked, shape.vocab - 1, x0),
                x0=x0)


def uniform_inputs(shape: Shape, n_hidden: int, rate: float, dtype: torch.dtype, generator: torch.Generator) -> dict:
    """`head_inputs` for the uniform graph: ``rate`` of the positions hold a uniformly drawn token."""
    inputs = head_inputs(shape, n_hidden, rate, dtype, generator)
    noised = inputs["x_t"] == shape.vocab - 1
    drawn = torch.randint(0, shape.vocab, noised.shape, generator=generator, device=generator.device)
    inputs["x_t"] = torch.where(noised, drawn, inputs["x0"])
    return inputs


def _drop_sigma(fn: Callable) -> Callable:
    return lambda hidden, weight, bias, sigma, x_t, x0: fn(hidden, weight, bias, x_t, x0)


def fused_dse(hidden, weight, bias, sigma, x_t, x0):
    return fastbound.fused_linear_dse_loss(hidden, weight, bias, sigma, x_t, x0, reduction="sum")


def unfused_dse(hidden, weight, bias, sigma, x_t, x0, lib=fastbound):
    return lib.dse_loss(F.linear(hidden, weight, bias), sigma, x_t, x0, reduction="sum")


def eager_dse(hidden, weight, bias, sigma, x_t, x0):
    return unfused_dse(hidden, weight, bias, sigma, x_t, x0, lib=reference)


def fused_uniform(hidden, weight, bias, sigma, x_t, x0):
    return fastbound.fused_linear_dse_loss(hidden, weight, bias, sigma, x_t, x0, graph="uniform", reduction="sum")


def unfused_uniform(hidden, weight, bias, sigma, x_t, x0, lib=fastbound):
    return lib.dse_loss(F.linear(hidden, weight, bias), sigma, x_t, x0, graph="uniform", reduction="sum")


def eager_uniform(hidden, weight, bias, sigma, x_t, x0):
    return unfused_uniform(hidden, weight, bias, sigma, x_t, x0, lib=reference)


def fused_dce(hidden, weight, bias, x_t, x0):
    return fastbound.fused_linear_dce_loss(hidden, weight, bias, x_t, x0, reduction="sum")


def unfused_dce(hidden, weight, bias, x_t, x0, lib=fastbound):
    return lib.dce_loss(F.linear(hidden, weight, bias), x_t, x0, reduction="sum")


def eager_dce(hidden, weight, bias, x_t, x0):
    return unfused_dce(hidden, weight, bias, x_t, x0, lib=reference)


def cce_dce(hidden, weight, bias, x_t, x0):
    mask = weight.shape[0] - 1
    e = torch.cat([hidden, hidden.new_ones(hidden.shape[:-1] + (1,))], -1)
    c = torch.cat([weight, bias[:, None]], 1)[:mask]  # the mask column is not a class
    targets = torch.where(x_t == mask, x0, -100)
    return linear_cross_entropy(e, c, targets, ignore_index=-100, reduction="sum", impl="torch_compile")


def integrate_inputs(shape: Shape, n_hidden: int, rate: float, dtype: torch.dtype, generator: torch.Generator) -> dict:
    inputs = head_inputs(shape, n_hidden, rate, dtype, generator)
    inputs["sigma"] = inputs["sigma"][:, 0].double()
    return inputs


def fused_integrate(hidden, weight, bias, sigma, x_t, x0):
    acc = torch.zeros(hidden.shape[0], 2, dtype=torch.float64, device=hidden.device)
    return head_integrate_step(hidden, weight, bias, x_t, x0, sigma, None, acc, loss="dse")


def unfused_integrate(hidden, weight, bias, sigma, x_t, x0, lib=fastbound):
    acc = torch.zeros(hidden.shape[0], 2, dtype=torch.float64, device=hidden.device)
    return lib.integrate_step(F.linear(hidden, weight, bias), x_t, x0, sigma, None, acc, loss="dse")


def eager_integrate(hidden, weight, bias, sigma, x_t, x0):
    return unfused_integrate(hidden, weight, bias, sigma, x_t, x0, lib=reference)


def via_fp32(fn: Callable) -> Callable:
    """``fn`` on the fp32 upcast of its floating-point inputs: the oracle of the bf16 cases (more
    accurate than the bf16 oracle, and one call of it takes seconds instead of a minute on AVX2)."""
    def call(**inputs):
        return fn(**{k: v.float() if v.is_floating_point() and v.dtype != torch.float64 else v
                     for k, v in inputs.items()})
    return call


def check_integrate(actual, expected, inputs):
    """Sums of fp32 per-token losses in float64 (different orders and score roundings): 2e-5 relative."""
    torch.testing.assert_close(actual["output0"], expected["output0"], rtol=2e-5, atol=0.0)


def check_low_precision(actual, expected, inputs):
    """bf16 against the oracle on the fp32 upcast (`via_fp32`): a provider that rounds the scores to
    bf16 (scores up to ~4, so ~2^-7 absolute before exp) moves the losses and gradients by a few
    percent of their largest magnitude; compare each result within 2^-5 of the oracle's largest
    magnitude (a sanity check of the timed call; the precision tests are in tests/test_fused_linear.py)."""
    for key, want in expected.items():
        scale = want.abs().max().item() if want.numel() else 0.0
        torch.testing.assert_close(actual[key].double(), want.double(), rtol=0.0, atol=2**-5 * scale,
                                   msg=lambda m, key=key: f"{key} disagrees with the oracle: {m}")


@dataclass(frozen=True)
class Op:
    """One benchmarked op: its inputs and its providers (name -> call); ``eager`` is the oracle."""

    name: str
    make_inputs: Callable
    providers: dict[str, Callable]
    grad_inputs: tuple[str, ...] = ("hidden", "weight", "bias")
    check: Callable | None = None


OPS = [
    Op("fused_dse", head_inputs,
       dict(fastbound=fused_dse, unfused=unfused_dse, eager=eager_dse, unfused_compile=unfused_dse)),
    Op("fused_dse_uniform", uniform_inputs,
       dict(fastbound=fused_uniform, unfused=unfused_uniform, eager=eager_uniform, unfused_compile=unfused_uniform)),
    Op("fused_dce", head_inputs,
       dict(fastbound=_drop_sigma(fused_dce), unfused=_drop_sigma(unfused_dce), eager=_drop_sigma(eager_dce),
            unfused_compile=_drop_sigma(unfused_dce), cce=_drop_sigma(cce_dce))),
    Op("head_integrate_dse", integrate_inputs,
       dict(fastbound=fused_integrate, unfused=unfused_integrate, eager=eager_integrate),
       grad_inputs=(), check=check_integrate),
]


@dataclass(frozen=True)
class FusedSpec:
    op: Op
    shape: Shape
    n_hidden: int
    rate: float
    dtype: torch.dtype
    provider: str

    @property
    def id(self) -> str:
        dtype = DTYPES[self.dtype]
        return f"{self.op.name}-m{round(100 * self.rate)}-{dtype}-{self.shape.id}xH{self.n_hidden}-{self.provider}"

    def harness_spec(self) -> Spec:
        """A harness spec whose ``fastbound`` provider is this provider (its oracle: the op's eager call)."""
        call = self.op.providers[self.provider]
        if self.provider == "unfused_compile":
            torch._dynamo.reset()
            call = torch.compile(call, dynamic=False, fullgraph=True)
        low = self.dtype == torch.bfloat16
        check = check_low_precision if low else self.op.check or assert_close_results
        n_hidden, rate = self.n_hidden, self.rate
        case = Case(
            name=f"{self.op.name} m={round(100 * rate)}% H={n_hidden}",
            make_inputs=lambda shape, dtype, gen: self.op.make_inputs(shape, n_hidden, rate, dtype, gen),
            fastbound=call,
            eager=via_fp32(self.op.providers["eager"]) if low else self.op.providers["eager"],
            floor="hidden",
            grad_inputs=self.op.grad_inputs,
            dtypes=(self.dtype,),
            check=check,
            working_set=lambda shape: 6 * 4 * shape.tokens * shape.vocab,
            min_rounds=1,
        )
        mode = "fwd_bwd" if self.op.grad_inputs else "fwd"
        return Spec(case, self.shape, self.dtype, mode, "fastbound")


CCE_MISSING = "cut-cross-entropy is not installed (pip install --no-deps cut-cross-entropy==25.1.1)"
MATERIALISED = ("eager", "unfused_compile")


def skip_reason(op: str, dtype: str, rate: float, provider: str) -> str | None:
    """Why the default grid leaves out a (op, dtype, masking rate, provider) cell, or None (`--full` runs all)."""
    if provider == "cce" and linear_cross_entropy is None:
        return CCE_MISSING
    if dtype == "bf16":
        if op in ("fused_dse_uniform", "head_integrate_dse"):
            return "bf16: the absorbing DSE and DCE rows show the bf16 path"
        if provider != "fastbound":
            return "bf16 (a)-(d): torch's bf16 GEMMs on an AVX2 CPU take over a minute per call (4-6x fp32)"
        if rate != 0.5:
            return "bf16 at 50% masking only (time bound of the run)"
    if op == "fused_dse_uniform":
        if rate != 0.5:
            return "uniform graph: every row contributes at every noise rate; measured at 50%"
        if provider in MATERIALISED:
            return "uniform (b), (c): the same materialised path as the absorbing graph's"
    if provider in MATERIALISED and rate != 0.5:
        return "(b), (c) run the same (N, V) matmuls at every masking rate; measured at 50%"
    if provider == "unfused_compile" and op != "fused_dce":
        return "(c) is measured on DCE (its compilation takes ~30 s a case)"
    if provider == "unfused" and rate == 1.0:
        return "(a) at 100%: the same (N, V) matmuls as at 15% and 50% (its work does not depend on the rate)"
    return None


def fused_specs(grid: str) -> list[FusedSpec]:
    rates = (0.5,) if grid == "smoke" else MASK_RATES
    return [
        FusedSpec(op, shape, n_hidden, rate, dtype, provider)
        for op in OPS
        for shape, n_hidden in GRIDS[grid]
        for rate in rates
        for dtype in (torch.float32, torch.bfloat16)
        for provider in op.providers
    ]


def pytest_generate_tests(metafunc):
    if "fused_spec" in metafunc.fixturenames:
        config = metafunc.config
        grid = "smoke" if config.getoption("--smoke") else "full" if config.getoption("--full") else "default"
        specs = fused_specs(grid)
        metafunc.parametrize("fused_spec", specs, ids=[s.id for s in specs])


def test_fused_linear(fused_spec, measure, benchmark, request):
    if fused_spec.provider == "cce" and linear_cross_entropy is None:
        pytest.skip(CCE_MISSING)
    if not (request.config.getoption("--smoke") or request.config.getoption("--full")):
        reason = skip_reason(fused_spec.op.name, DTYPES[fused_spec.dtype], fused_spec.rate, fused_spec.provider)
        if reason:
            pytest.skip(reason)
    spec = fused_spec.harness_spec()
    measure(spec)
    benchmark.extra_info.update(provider=fused_spec.provider, mask_rate=fused_spec.rate, hidden=fused_spec.n_hidden)


def collect(run: dict, stat: str) -> dict[tuple, dict[float, dict[str, dict]]]:
    """{(op, dtype, tokens, V, H): {mask rate: {provider: {time, peak}}}} from a pytest-benchmark run."""
    rows: dict[tuple, dict[float, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    for bench in run["benchmarks"]:
        info = bench["extra_info"]
        if "mask_rate" not in info:
            continue
        key = (info["case"].split(" ")[0], info["dtype"], info["batch"] * info["length"], info["vocab"], info["hidden"])
        rows[key][info["mask_rate"]][info["provider"]] = {"time": bench["stats"][stat], "peak": info["peak_bytes"]}
    return rows


PROVIDERS = ("fastbound", "unfused", "eager", "unfused_compile", "cce")


def summary(rows: dict, stat: str) -> list[str]:
    """The markdown table of the fused rows (`collect`); cells left out carry a note with `skip_reason`."""
    columns = (["op", "dtype", "tokens", "V", "H", "masked"] + [f"{p} ms" for p in PROVIDERS]
               + ["vs unfused", "vs compile", "vs cce"] + [f"peak {p} MiB" for p in PROVIDERS] + ["peak / unfused"])
    lines = ["## Fused output layer", "",
             f"Times in ms ({stat}); peak memory beyond the inputs. `vs X`: X's time over fastbound's. "
             "(a) `unfused`, (b) `eager`, (c) `unfused_compile`, (d) `cce`.", "",
             "| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    notes: dict[str, int] = {}

    def missing(op, dtype, rate, provider):
        has = any(o.name == op and provider in o.providers for o in OPS)
        reason = skip_reason(op, dtype, rate, provider) if has else None
        if reason is None:
            return "–"
        return f"skip{notes.setdefault(reason, len(notes) + 1)}"

    for (op, dtype, tokens, vocab, hidden), rates in sorted(rows.items()):
        for rate, got in sorted(rates.items()):
            time = {p: got.get(p, {}).get("time") for p in PROVIDERS}
            peak = {p: got.get(p, {}).get("peak") for p in PROVIDERS}
            fast = time["fastbound"]
            cells = [op, dtype, str(tokens), str(vocab), str(hidden), f"{100 * rate:.0f}%"]
            cells += [missing(op, dtype, rate, p) if t is None else f"{1e3 * t:.3g}" for p, t in time.items()]
            cells += ["–" if time[p] is None or not fast else f"{time[p] / fast:.2f}×"
                      for p in ("unfused", "unfused_compile", "cce")]
            cells += ["–" if b is None else f"{b / 2**20:.3g}" for b in peak.values()]
            cells += ["–" if not peak["unfused"] or peak["fastbound"] is None
                      else f"{peak['fastbound'] / peak['unfused']:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += [""] + [f"skip{n}: {reason}" + ("  " if n < len(notes) else "") for reason, n in notes.items()]
    return lines


def chart(rows: dict, path: Path) -> None:
    """Time and peak memory against the masking rate, one row of panels per (op, dtype); providers
    measured at one rate only (the materialised (b), (c)) are drawn as level dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(rows)
    fig, axes = plt.subplots(len(keys), 2, figsize=(9, 2.6 * len(keys)), squeeze=False)
    for (time_ax, peak_ax), key in zip(axes, keys):
        rates = sorted(rows[key])
        for i, provider in enumerate(p for p in PROVIDERS if any(p in rows[key][r] for r in rates)):
            have = [r for r in rates if provider in rows[key][r]]
            for ax, value in ((time_ax, lambda m: 1e3 * m["time"]), (peak_ax, lambda m: m["peak"] / 2**20)):
                ys = [value(rows[key][r][provider]) for r in have]
                if len(have) == 1 and provider in MATERIALISED:  # rate-independent: a level line
                    ax.axhline(ys[0], color=f"C{i}", linestyle="--", label=provider)
                else:
                    ax.plot([100 * r for r in have], ys, "o-", color=f"C{i}", label=provider)
        time_ax.set_title(f"{key[0]} {key[1]} N={key[2]} V={key[3]} H={key[4]}: time", fontsize=9)
        peak_ax.set_title("peak memory", fontsize=9)
        time_ax.set_ylabel("ms")
        peak_ax.set_ylabel("MiB")
        time_ax.legend(fontsize=7)
        for ax in (time_ax, peak_ax):
            ax.set_xlim(0, 105)
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
    for ax in axes[-1]:
        ax.set_xlabel("masked positions (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
