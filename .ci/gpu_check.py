"""GPU probes of fastbound: what the CPU test suite cannot check (issue 13), run by `.ci/gpu-check.sh`.

    python .ci/gpu_check.py             # on a machine with a GPU, after a build with CUDA kernels
    python .ci/gpu_check.py --dry-run   # on CPU: the same probe code at tiny sizes (CI runs this)

Each probe prints PASS or FAIL with its time and the run goes on; the exit status is the
number of failed probes. The probes:

* ``compile``: ``torch.compile(fullgraph=True)`` with the default backend and ``backend=None``
  (the auto choice must trace, issue 13 item 1), forward and backward of every loss;
* ``large``: N·V above 2^31 elements in bf16 for the CUDA and the Triton kernels (int64
  indexing), the last rows against the oracle;
* ``grid``: more rows than the CUDA loss kernels' grid cap (2^20 blocks, grid-stride rows),
  warp-per-row and block-per-row sizes, rows at both ends against the oracle;
* ``inplace``: ``inplace=True`` bitwise equal to the functional op (loss and gradient), at a
  realistic size, every loss, CUDA and Triton;
* ``perturb``: CPU == CUDA == Triton bit for bit, both graphs, Bernoulli and exact-k modes,
  with ``maskable`` and a seed / offset past 2^63 / 2^31; ``integrate``: the three
  integration steps agree and the GPU ones are bitwise repeatable with shared slots.

Stream ordering (the raw ops run on the current stream) and CUDA-graph capture are GPU
tests (`tests/test_gpu_readiness.py`), which the check runs with ``FASTBOUND_REQUIRE_CUDA=1``.
``--dry-run`` replaces the device by the CPU, the CUDA kernels by the C++ CPU kernels and
runs Triton in its interpreter, with sizes a few thousand times smaller (and the compile
probe on the "eager" backend, which traces the same graph without building C++).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

import fastbound as fb  # noqa: E402
from fastbound import reference  # noqa: E402

LOSSES = ("absorb", "uniform", "dce")


@dataclass(frozen=True)
class Plan:
    """Where and how large the probes run."""

    device: str
    backends: tuple[str, ...]
    """The GPU backends ("cuda", "triton"); in a dry run the C++ CPU kernels stand in for CUDA."""
    compile_backend: str
    large_elements: int
    large_vocab: int
    grid_rows: dict[int, int]
    """Vocabulary -> rows of the grid-cap probe (more rows than 2^20 blocks hold)."""
    parity_shape: tuple[int, int]
    perturb_shape: tuple[int, int]
    integrate_shape: tuple[int, int, int]


GPU = Plan(
    device="cuda", backends=("cuda", "triton"), compile_backend="inductor", large_elements=2**31, large_vocab=50257,
    grid_rows={8: 8 * 2**20 + 777, 2000: 2**20 + 777}, parity_shape=(1024, 50257), perturb_shape=(64, 4099),
    integrate_shape=(96, 256, 1000),
)
DRY = Plan(
    device="cpu", backends=("cpu", "triton"), compile_backend="eager", large_elements=2**9, large_vocab=37,
    grid_rows={8: 19, 2000: 3}, parity_shape=(5, 33), perturb_shape=(3, 37), integrate_shape=(5, 3, 9),
)


def _ids(n: int, n_cols: int, loss: str, generator: torch.Generator, device: str):
    """x_t, x0 for n rows: mask at V-1 (absorb, dce) on about 60% of the rows; uniform: any ids."""
    n_real = n_cols if loss == "uniform" else n_cols - 1
    x0 = torch.randint(0, n_real, (n,), generator=generator, device=device)
    other = torch.randint(0, n_cols, (n,), generator=generator, device=device) if loss == "uniform" else n_cols - 1
    x_t = torch.where(torch.rand(n, generator=generator, device=device) < 0.6, other, x0)
    return x_t, x0


def _loss(loss: str, score, x_t, x0, **kw):
    if loss == "dce":
        return fb.dce_loss(score, x_t, x0, **kw)
    return fb.dse_loss(score, 0.7, x_t, x0, graph=loss, **kw)


def _oracle(loss: str, score, x_t, x0):
    if loss == "dce":
        return reference.dce_loss(score, x_t, x0)
    return reference.dse_loss(score, 0.7, x_t, x0, graph=loss)


def _close_to_oracle(loss: str, score, x_t, x0, rows, got) -> bool:
    want = _oracle(loss, score[rows].double(), x_t[rows], x0[rows])
    return torch.allclose(got[rows].double(), want, rtol=1e-4, atol=1e-3)


def probe_compile(plan: Plan) -> bool:
    """fullgraph compile with backend=None on the plan's device, values and gradients as eager."""
    ok = True
    g = torch.Generator(plan.device).manual_seed(1)
    for loss in LOSSES:
        torch._dynamo.reset()
        score = torch.randn(64, 33, device=plan.device, generator=g)
        x_t, x0 = _ids(64, 33, loss, g, plan.device)
        fn = torch.compile(lambda s: _loss(loss, s, x_t, x0, reduction="sum"), fullgraph=True,
                           backend=plan.compile_backend)
        leaf, eager_leaf = score.clone().requires_grad_(), score.clone().requires_grad_()
        got, want = fn(leaf), _loss(loss, eager_leaf, x_t, x0, reduction="sum")
        got.backward()
        want.backward()
        ok &= torch.allclose(got, want, rtol=1e-5) and torch.allclose(leaf.grad, eager_leaf.grad, rtol=1e-5, atol=1e-7)
    return ok


def probe_large(plan: Plan, backend: str) -> bool:
    """bf16 scores with N·V > 2^31 elements: the last rows' loss and gradient against the oracle."""
    n_cols = plan.large_vocab
    n = plan.large_elements // n_cols + 64
    g = torch.Generator(plan.device).manual_seed(2)
    ok = True
    for loss in ("absorb", "dce"):
        score = torch.randn(n, n_cols, device=plan.device, dtype=torch.bfloat16, generator=g).requires_grad_()
        x_t, x0 = _ids(n, n_cols, loss, g, plan.device)
        got = _loss(loss, score, x_t, x0, backend=backend)
        (grad,) = torch.autograd.grad(got.sum(), score)
        tail = torch.arange(n - 64, n, device=plan.device)
        ok &= bool(torch.isfinite(got[tail]).all()) and _close_to_oracle(loss, score.detach(), x_t, x0, tail, got)
        s = score.detach()[tail].double().requires_grad_()
        (want_grad,) = torch.autograd.grad(_oracle(loss, s, x_t[tail], x0[tail]).sum(), s)
        ok &= torch.allclose(grad[tail].double(), want_grad, rtol=2e-2, atol=2e-3)
        del score, grad
    return ok


def probe_grid(plan: Plan, backend: str) -> bool:
    """More rows than 2^20 blocks: every loss finite, rows at both ends and the middle exact."""
    ok = True
    g = torch.Generator(plan.device).manual_seed(3)
    for n_cols, n in plan.grid_rows.items():
        score = torch.randn(n, n_cols, device=plan.device, generator=g)
        x_t, x0 = _ids(n, n_cols, "absorb", g, plan.device)
        got = _loss("absorb", score, x_t, x0, backend=backend)
        rows = torch.tensor(sorted({0, n // 2, n - 2, n - 1}), device=plan.device)
        ok &= bool(torch.isfinite(got).all()) and _close_to_oracle("absorb", score, x_t, x0, rows, got)
    return ok


def probe_inplace(plan: Plan, backend: str) -> bool:
    """inplace=True against the functional op, bitwise, in bf16."""
    n, n_cols = plan.parity_shape
    g = torch.Generator(plan.device).manual_seed(4)
    score = torch.randn(n, n_cols, device=plan.device, dtype=torch.bfloat16, generator=g)
    ok = True
    for loss in LOSSES:
        x_t, x0 = _ids(n, n_cols, loss, g, plan.device)
        a, b = score.clone().requires_grad_(), score.clone().requires_grad_()
        la = _loss(loss, a, x_t, x0, reduction="sum", backend=backend)
        la.backward()
        lb = _loss(loss, b * 1, x_t, x0, reduction="sum", inplace=True, backend=backend)
        lb.backward()
        ok &= torch.equal(la, lb) and torch.equal(a.grad, b.grad)
    return ok


def probe_perturb(plan: Plan) -> bool:
    """perturb on the CPU and on every backend of the plan, bit for bit."""
    rows, cols = plan.perturb_shape
    g = torch.Generator().manual_seed(5)
    x0 = torch.randint(0, 1000, (rows, cols), generator=g)
    maskable = torch.rand(rows, cols, generator=g) < 0.8
    noise = [dict(sigma=torch.rand(rows, generator=g, dtype=torch.float64) * 2),
             dict(num_masked=torch.minimum(torch.randint(0, cols, (rows,), generator=g), maskable.sum(1)))]
    ok = True
    for graph in ("absorb", "uniform"):
        for kw in noise:
            for keep in (None, maskable):
                args = dict(kw, vocab_size=1001, graph=graph, seed=2**63 + 12345, offset=2**31 + 7)
                want = fb.perturb(x0, **args, maskable=keep, backend="cpu")
                for backend in plan.backends:
                    on = {k: v.to(plan.device) for k, v in kw.items()}
                    got = fb.perturb(x0.to(plan.device), **dict(args, **on),
                                     maskable=None if keep is None else keep.to(plan.device), backend=backend)
                    ok &= torch.equal(got.x_t.cpu(), want.x_t) and torch.equal(got.mask.cpu(), want.mask)
    return ok


def probe_integrate(plan: Plan) -> bool:
    """The integration steps of every backend agree with the CPU one; the GPU ones are bitwise
    repeatable when sequences share accumulator rows."""
    n_seq, length, n_cols = plan.integrate_shape
    g = torch.Generator().manual_seed(6)
    out = torch.randn(n_seq, length, n_cols, generator=g)
    x_t, x0 = _ids(n_seq * length, n_cols, "absorb", g, "cpu")
    x_t, x0 = x_t.view(n_seq, length), x0.view(n_seq, length)
    sigma = torch.rand(n_seq, generator=g, dtype=torch.float64) + 0.1
    index = torch.randint(0, 3, (n_seq,), generator=g)
    ok = True
    for loss in ("dce", "dse"):
        want = fb.integrate_step(out, x_t, x0, sigma, 0.5, torch.zeros(3, 2, dtype=torch.float64), loss=loss,
                                 index=index, backend="cpu")
        for backend in plan.backends:
            dev = [t.to(plan.device) for t in (out, x_t, x0, sigma, index)]
            runs = [fb.integrate_step(*dev[:4], 0.5, torch.zeros(3, 2, dtype=torch.float64, device=plan.device),
                                      loss=loss, index=dev[4], backend=backend) for _ in range(3)]
            ok &= all(torch.equal(r, runs[0]) for r in runs)
            ok &= torch.allclose(runs[0].cpu(), want, rtol=1e-6, atol=1e-6)
    return ok


def probes(plan: Plan) -> list[tuple[str, Callable[[], bool]]]:
    listed = [("compile fullgraph, default backend, backend=None", lambda: probe_compile(plan))]
    for backend in plan.backends:
        listed += [
            (f"N*V > 2^31 in bf16, {backend}", lambda b=backend: probe_large(plan, b)),
            (f"more rows than the grid cap, {backend}", lambda b=backend: probe_grid(plan, b)),
            (f"in-place == functional bitwise, {backend}", lambda b=backend: probe_inplace(plan, b)),
        ]
    listed += [(f"perturb: cpu == {' == '.join(plan.backends)} bitwise", lambda: probe_perturb(plan)),
               ("integrate_step: backends agree, repeatable with shared slots", lambda: probe_integrate(plan))]
    return listed


def run(plan: Plan, only: str | None = None) -> int:
    """Runs the probes (those whose name contains ``only``); returns the number that failed."""
    failed = []
    for name, probe in probes(plan):
        if only and only not in name:
            continue
        start = time.perf_counter()
        try:
            ok = bool(probe())
        except Exception as error:  # noqa: BLE001 (a probe that raises has failed; the others still run)
            ok = False
            print("   ", "".join(traceback.format_exception_only(type(error), error)).strip()[:600])
        if plan.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        print(f"{'PASS' if ok else 'FAIL'} {name} ({time.perf_counter() - start:.1f} s)", flush=True)
        if not ok:
            failed.append(name)
    print(f"probes: {len(failed)} failed" + "".join(f"\n  FAILED: {name}" for name in failed))
    return len(failed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="run the probes' code on CPU at tiny sizes")
    parser.add_argument("--only", help="run only the probes whose name contains this text")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    plan = DRY if args.dry_run else GPU
    if not args.dry_run:
        print("device:", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability(),
              "torch", torch.__version__, "CUDA", torch.version.cuda)
    return run(plan, args.only)


if __name__ == "__main__":
    sys.exit(main())
