"""Benchmarks of the fused output layer + loss (`fastbound.fused_linear`) against the materialised scores.

A training step's output layer and loss, forward and backward to the hidden states, the
weight and the bias: 4 × 2048 = 8192 tokens, H = 512, V = 32768 (the mask column
included), fp32 and bf16, with 15%, 50% and 100% of the positions masked, ``reduction="sum"``.
Providers, side by side in one run and each checked against the eager oracle:

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

`benchmarks.harness` knows four providers; this module gives `harness.run` one case per
provider whose ``fastbound`` call is that provider, and records the provider's name in
``extra_info["provider"]`` (with ``mask_rate`` and ``hidden``). The oracle result is shared
by the providers of one case (same case name). ``--smoke``: a small shape at 50% masking.

Summary table and chart (time and peak memory against the masking rate)::

    python -m pytest benchmarks/test_fused_linear.py --benchmark-json=fused.json
    python -m benchmarks.test_fused_linear fused.json       # writes fused.md and fused.png
"""

from __future__ import annotations

import argparse
import json
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


def _drop_sigma(fn: Callable) -> Callable:
    return lambda hidden, weight, bias, sigma, x_t, x0: fn(hidden, weight, bias, x_t, x0)


def fused_dse(hidden, weight, bias, sigma, x_t, x0):
    return fastbound.fused_linear_dse_loss(hidden, weight, bias, sigma, x_t, x0, reduction="sum")


def unfused_dse(hidden, weight, bias, sigma, x_t, x0, lib=fastbound):
    return lib.dse_loss(F.linear(hidden, weight, bias), sigma, x_t, x0, reduction="sum")


def eager_dse(hidden, weight, bias, sigma, x_t, x0):
    return unfused_dse(hidden, weight, bias, sigma, x_t, x0, lib=reference)


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


def check_integrate(actual, expected, inputs):
    """Sums of fp32 per-token losses in float64 (different orders and score roundings): 2e-5 relative."""
    torch.testing.assert_close(actual["output0"], expected["output0"], rtol=2e-5, atol=0.0)


def check_low_precision(actual, expected, inputs):
    """bf16: the providers round the scores, and the fused path the weight gradient per chunk, differently
    from the oracle's materialised bf16 scores; compare each result within bf16's relative step of the
    oracle's largest magnitude (the harness's element-wise rtol does not fit sums with cancellation)."""
    for key, want in expected.items():
        scale = want.abs().max().item() if want.numel() else 0.0
        torch.testing.assert_close(actual[key].float(), want.float(), rtol=0.0, atol=2**-7 * scale,
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
        dtype = {torch.float32: "fp32", torch.bfloat16: "bf16"}[self.dtype]
        return f"{self.op.name}-m{round(100 * self.rate)}-{dtype}-{self.shape.id}xH{self.n_hidden}-{self.provider}"

    def harness_spec(self) -> Spec:
        """A harness spec whose ``fastbound`` provider is this provider (its oracle: the op's eager call)."""
        call = self.op.providers[self.provider]
        if self.provider == "unfused_compile":
            torch._dynamo.reset()
            call = torch.compile(call, dynamic=False, fullgraph=True)
        check = self.op.check or (check_low_precision if self.dtype == torch.bfloat16 else assert_close_results)
        n_hidden, rate = self.n_hidden, self.rate
        case = Case(
            name=f"{self.op.name} m={round(100 * rate)}% H={n_hidden}",
            make_inputs=lambda shape, dtype, gen: self.op.make_inputs(shape, n_hidden, rate, dtype, gen),
            fastbound=call,
            eager=self.op.providers["eager"],
            floor="hidden",
            grad_inputs=self.op.grad_inputs,
            dtypes=(self.dtype,),
            check=check,
            working_set=lambda shape: 6 * 4 * shape.tokens * shape.vocab,
        )
        mode = "fwd_bwd" if self.op.grad_inputs else "fwd"
        return Spec(case, self.shape, self.dtype, mode, "fastbound")


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


def test_fused_linear(fused_spec, measure, benchmark):
    if fused_spec.provider == "cce" and linear_cross_entropy is None:
        pytest.skip("cut-cross-entropy is not installed (pip install --no-deps cut-cross-entropy==25.1.1)")
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


def summary(rows: dict, stat: str) -> list[str]:
    providers = ("fastbound", "unfused", "eager", "unfused_compile", "cce")
    columns = (["op", "dtype", "tokens", "V", "H", "masked"] + [f"{p} ms" for p in providers]
               + ["vs unfused", "vs compile", "vs cce"] + [f"peak {p} MiB" for p in providers] + ["peak / unfused"])
    lines = [f"Times in ms ({stat}); peak memory beyond the inputs. `vs X`: X's time over fastbound's.", "",
             "| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for (op, dtype, tokens, vocab, hidden), rates in sorted(rows.items()):
        for rate, got in sorted(rates.items()):
            time = {p: got.get(p, {}).get("time") for p in providers}
            peak = {p: got.get(p, {}).get("peak") for p in providers}
            fast = time["fastbound"]
            cells = [op, dtype, str(tokens), str(vocab), str(hidden), f"{100 * rate:.0f}%"]
            cells += ["–" if t is None else f"{1e3 * t:.3g}" for t in time.values()]
            cells += ["–" if time[p] is None or not fast else f"{time[p] / fast:.2f}×"
                      for p in ("unfused", "unfused_compile", "cce")]
            cells += ["–" if b is None else f"{b / 2**20:.3g}" for b in peak.values()]
            cells += ["–" if not peak["unfused"] or peak["fastbound"] is None
                      else f"{peak['fastbound'] / peak['unfused']:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def chart(rows: dict, path: Path) -> None:
    """Time and peak memory against the masking rate, one column of panels per (op, dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(rows)
    fig, axes = plt.subplots(2, len(keys), figsize=(4 * len(keys), 7), squeeze=False)
    for col, key in enumerate(keys):
        rates = sorted(rows[key])
        for provider in sorted({p for r in rates for p in rows[key][r]}):
            have = [r for r in rates if provider in rows[key][r]]
            axes[0][col].plot([100 * r for r in have], [1e3 * rows[key][r][provider]["time"] for r in have], "o-",
                              label=provider)
            axes[1][col].plot([100 * r for r in have], [rows[key][r][provider]["peak"] / 2**20 for r in have], "o-",
                              label=provider)
        axes[0][col].set_title(f"{key[0]} {key[1]} N={key[2]} V={key[3]} H={key[4]}", fontsize=9)
        axes[0][col].set_ylabel("time (ms)")
        axes[1][col].set_ylabel("peak memory (MiB)")
        axes[1][col].set_xlabel("masked positions (%)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.test_fused_linear",
                                     description="Summarises the fused linear benchmarks of a pytest-benchmark JSON.")
    parser.add_argument("json", type=Path)
    parser.add_argument("--stat", default="min", choices=("min", "median", "mean"))
    args = parser.parse_args(argv)
    with open(args.json) as f:
        rows = collect(json.load(f), args.stat)
    if not rows:
        raise SystemExit(f"{args.json}: no fused linear benchmarks in this file")
    markdown = "\n".join(summary(rows, args.stat)) + "\n"
    args.json.with_suffix(".md").write_text(markdown)
    chart(rows, args.json.with_suffix(".png"))
    print(markdown, end="")


if __name__ == "__main__":
    main()
