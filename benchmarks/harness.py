"""The benchmark harness: cases, the grid of shapes, and the check-time-measure routine.

A `Case` describes one op: how to make its inputs for a shape and dtype, the fastbound
call, and the eager call (the oracle, `fastbound.reference`). The harness derives the
other two providers itself:

* ``compile``: ``torch.compile(case.eager, dynamic=False, fullgraph=case.fullgraph)``,
  compiled and warmed before timing (dynamo is reset per benchmark, so every shape gets its
  own graph);
* ``floor``: ``inputs[case.floor].clone()``, one read and one write of the largest input,
  the memory-traffic floor for a one-pass kernel. An op that only reads that input (a
  reduction such as the integration step) passes its own ``floor_call``, e.g. one ``sum()``.
  The clone writes its copy into memory allocated as the fused kernels allocate their
  gradient (`clone_like_kernels`: from 1 MiB up, a buffer reused from the previous call, as
  the CPU kernels reuse theirs, ``csrc/cpu/buffer_pool.h``), so that neither pays page
  faults the other does not. The floor provider is timed over at least
  `FLOOR_MIN_ROUNDS` rounds and twice the target time; the ratio over the floor comes from
  fastbound's own benchmark, which after its timed rounds calls fastbound and the floor in
  alternation (`_paired_floor`), so that both see the same state of a shared machine.

A case may add providers of its own (``extra_providers``, e.g. ``F.cross_entropy`` for the
DCE loss, or the bare ``torch.ops`` call that measures fastbound's Python fixed cost).

Every (case, shape, dtype, mode, provider) is one pytest-benchmark test that

1. checks the provider against the oracle (outputs, and gradients in ``fwd_bwd`` mode), so a
   wrong fast kernel fails instead of winning;
2. times it with ``benchmark.pedantic``; the autograd leaves are made in ``setup``, outside
   the timed region, from inputs generated once per (case, shape, dtype);
3. measures its peak memory in one more call (`peak_memory`) and stores it, with the
   shape, dtype and provider, in ``benchmark.extra_info`` for `benchmarks.report`.

Modes: ``fwd`` calls the op on inputs that do not require grad; ``fwd_bwd`` makes
``case.grad_inputs`` leaves that require grad, calls the op and runs
``out.sum().backward()`` (for fastbound that is the fused forward, which writes the
gradient, plus its cheap backward).

Adding an op (e.g. ``perturb``, or the integration step) is one small file
``benchmarks/test_<op>.py``::

    CASES = [Case(name="perturb", make_inputs=perturb_inputs, fastbound=fastbound_perturb,
                  eager=eager_perturb, floor="x0", dtypes=(torch.int64,), check=check_perturb)]

    def test_perturb(spec, measure):
        measure(spec)

(`benchmarks/conftest.py` parametrises ``spec`` over the module's ``CASES`` and the grid.)
A case with no ``grad_inputs`` is forward only; a case whose outputs are random passes its
own ``check`` (the default compares every tensor with dtype-dependent tolerances). A case
whose oracle cannot be captured in one graph (Python loops, data-dependent checks) sets
``fullgraph=False``; ``info`` adds entries to ``extra_info`` for the report.
"""

from __future__ import annotations

import ctypes
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import pytest
import torch

import fastbound
from fastbound.estimators.options import _free_bytes as free_bytes  # the estimators' memory probe

PROVIDERS = ("fastbound", "eager", "compile", "floor")
MODES = ("fwd", "fwd_bwd")
MODE_LABELS = {"fwd": "fwd", "fwd_bwd": "fwd+bwd"}
DTYPE_NAMES = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int64: "int64",
}

Inputs = dict[str, Any]
"""Keyword arguments of an op: tensors, or Python scalars such as a vocabulary size."""
Result = dict[str, torch.Tensor]
"""A provider's result: ``output<i>`` for each output, ``grad[<input>]`` for each leaf's gradient."""


@dataclass(frozen=True)
class Shape:
    """Batch × sequence length tokens over a vocabulary of ``vocab`` columns (mask included)."""

    batch: int
    length: int
    vocab: int

    @property
    def tokens(self) -> int:
        return self.batch * self.length

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.length} V={self.vocab}"

    @property
    def id(self) -> str:
        return f"{self.batch}x{self.length}xV{self.vocab}"


GRIDS: dict[str, tuple[Shape, ...]] = {
    # Byte-level vocabulary and the headline LM case (issue 2: 4x512 tokens, V = 32768 + mask).
    "default": (Shape(4, 512, 258), Shape(4, 512, 32769)),
    # Adds more tokens and GPT-2's vocabulary; shapes that do not fit in memory are skipped.
    "full": (
        Shape(4, 512, 258),
        Shape(16, 1024, 258),
        Shape(4, 512, 32769),
        Shape(8, 1024, 32769),
        Shape(4, 512, 50257),
        Shape(8, 1024, 50257),
    ),
}
GRIDS["smoke"] = GRIDS["default"][:1]
SMALL_GRIDS: dict[str, tuple[Shape, ...]] = {
    # Issue 14: one token (the fixed cost of a call) and 4x64 tokens at small vocabularies
    # (infodis's V = 4 + mask, characters 26 + mask, bytes 256 + 2).
    "default": (Shape(1, 1, 27), Shape(4, 64, 5), Shape(4, 64, 27), Shape(4, 64, 258)),
    "full": (Shape(1, 1, 27), Shape(4, 64, 5), Shape(4, 64, 27), Shape(4, 64, 258)),
    "smoke": (Shape(1, 1, 27),),
}
"""Shapes of the small-size cases (`Case.shapes`)."""
HEADLINE: dict[str, tuple[Shape, ...]] = {
    "default": (Shape(4, 512, 32769),),
    "full": (Shape(4, 512, 32769), Shape(8, 1024, 50257)),
    "smoke": GRIDS["smoke"],
}
"""The headline LM shape only (the backward-form cases)."""

WORKING_SET_FACTOR = 8
"""fp32 (N, V) buffers a case may hold at once: the cached input and oracle gradient, a checked
result, and the eager oracle's peak (measured: up to 4 buffers, uniform graph fwd+bwd), with headroom."""


def dense_working_set(shape: Shape) -> int:
    """Default memory estimate for ops over an (N, V) tensor: see `WORKING_SET_FACTOR`."""
    return WORKING_SET_FACTOR * 4 * shape.tokens * shape.vocab


TOLERANCES = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-6),
    torch.float16: (2e-3, 1e-4),
    torch.bfloat16: (8e-3, 1e-3),
}
"""(rtol, atol as a fraction of the largest expected magnitude) per result dtype. Providers
compute in fp32 (fp64 for fp64) and round once, so low-precision results differ by at most one
unit in the last place (bf16: 2**-7 relative)."""


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_MADV_HUGEPAGE, _HUGE = 14, 1 << 21
_FLOOR_BUFFERS: dict[tuple, torch.Tensor] = {}
"""`reused_like`'s buffers of the current case (`_Prepared` frees them with its inputs)."""


def _reuses_memory(t: torch.Tensor) -> bool:
    """Whether the CPU kernels would write an output like ``t`` into a reused buffer
    (``csrc/cpu/buffer_pool.h``: from 1 MiB up, while fastbound's buffer cache is on)."""
    return t.device.type == "cpu" and t.nbytes >= 1 << 20 and fastbound.cpu_buffer_cache().max_bytes >= t.nbytes


def reused_like(t: torch.Tensor, slot: int = 0) -> torch.Tensor:
    """An uninitialised buffer like ``t``, got as the CPU kernels get their outputs: where they
    reuse memory, the same buffer from call to call (one per ``slot``), allocated once with its
    2 MiB-aligned interior advised huge pages from 4 MiB up (madvise MADV_HUGEPAGE, Linux), so
    that the floor and the kernels see the same pages and neither pays the OS's zeroing of fresh
    ones; elsewhere a new one."""
    if not _reuses_memory(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format)
    key = (t.shape, t.dtype, slot)
    out = _FLOOR_BUFFERS.get(key)
    if out is None:
        out = _FLOOR_BUFFERS[key] = torch.empty_like(t, memory_format=torch.contiguous_format)
        begin = out.data_ptr()
        lo, hi = (begin + _HUGE - 1) & ~(_HUGE - 1), (begin + out.nbytes) & ~(_HUGE - 1)
        if _LIBC is not None and out.nbytes >= 2 * _HUGE and hi > lo:
            _LIBC.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_HUGEPAGE)
    return out


def clone_like_kernels(t: torch.Tensor) -> torch.Tensor:
    """``t.clone()`` into a buffer got as the CPU kernels get their gradient (`reused_like`)."""
    return reused_like(t).copy_(t)


def read_floor(name: str) -> Callable[..., torch.Tensor]:
    """A ``floor_call`` that reads ``inputs[name]`` once (its ``sum()``): the floor of an op
    that only reads that input and writes a few numbers (``clone()`` would also write, and
    fault in, a fresh buffer of the same size)."""
    return lambda **inputs: inputs[name].sum()


def assert_close_results(actual: Result, expected: Result, inputs: Inputs) -> None:
    """Default check: every output and gradient equals the oracle's within `TOLERANCES`."""
    assert actual.keys() == expected.keys(), f"results {sorted(actual)} != oracle's {sorted(expected)}"
    for key, want in expected.items():
        got = actual[key]
        rtol, atol = TOLERANCES.get(want.dtype, (0.0, 0.0))
        scale = want.abs().max().item() if want.is_floating_point() and want.numel() else 0.0
        torch.testing.assert_close(
            got, want, rtol=rtol, atol=atol * scale, msg=lambda m, key=key: f"{key} disagrees with the oracle: {m}"
        )


@dataclass(frozen=True)
class Case:
    """One op to benchmark.

    Attributes:
        name: short id used in test ids, groups and the report (``"dse_absorb"``).
        make_inputs: ``(shape, dtype, generator) -> inputs``, on ``generator.device``.
        fastbound: ``(**inputs) -> tensor or tuple of tensors``, the fastbound call.
        eager: the same call through the oracle; also what ``compile`` compiles.
        floor: name of the input that the ``floor`` provider clones (the largest one).
        grad_inputs: float inputs made autograd leaves in ``fwd_bwd`` mode; empty: forward only.
        dtypes: dtypes passed to ``make_inputs``.
        check: ``(actual, expected, inputs)``, raises AssertionError when a provider's result
            disagrees with the oracle's (``expected``); default `assert_close_results`.
        shapes: per-grid shapes that replace `GRIDS` for this case (ops whose cost is not (N, V)).
        working_set: ``shape -> bytes`` needed; shapes that do not fit are skipped.
        floor_call: ``(**inputs) -> tensor``, the ``floor`` provider (default: ``clone()`` of
            ``inputs[floor]``, checked to equal it); not compared with the oracle.
        floor_op: how the floor touches ``inputs[floor]``, for the report (``"clone"``, ``"sum"``).
        fullgraph: passed to ``torch.compile`` for the ``compile`` provider.
        smoke_providers: the providers of the smoke grid (CI), e.g. without a ``compile``
            whose many graphs take longer to build than the whole smoke run should (default: all).
        info: extra entries for ``benchmark.extra_info`` (e.g. an estimator's number of draws).
        extra_providers: more providers, name -> callable like ``fastbound`` (checked against the
            oracle, shown in the report beside the others).
        mode_only: time only this mode (e.g. ``"fwd_bwd"`` for a backward form).
        min_rounds: fewest timed rounds (default `MIN_ROUNDS`; 1 for calls of several seconds).
    """

    name: str
    make_inputs: Callable[[Shape, torch.dtype, torch.Generator], Inputs]
    fastbound: Callable[..., object]
    eager: Callable[..., object]
    floor: str
    grad_inputs: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
    check: Callable[[Result, Result, Inputs], None] = assert_close_results
    shapes: dict[str, tuple[Shape, ...]] | None = None
    working_set: Callable[[Shape], int] = dense_working_set
    floor_call: Callable[..., object] | None = None
    floor_op: str = "clone"
    fullgraph: bool = True
    smoke_providers: tuple[str, ...] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    extra_providers: dict[str, Callable[..., object]] = field(default_factory=dict)
    mode_only: str | None = None
    min_rounds: int | None = None

    @property
    def modes(self) -> tuple[str, ...]:
        if self.mode_only is not None:
            return (self.mode_only,)
        return MODES if self.grad_inputs else ("fwd",)

    @property
    def providers(self) -> tuple[str, ...]:
        return PROVIDERS + tuple(self.extra_providers)


@dataclass(frozen=True)
class Spec:
    """One benchmark: a case at one shape, dtype, mode and provider."""

    case: Case
    shape: Shape
    dtype: torch.dtype
    mode: str
    provider: str

    @property
    def backward(self) -> bool:
        return self.mode == "fwd_bwd"

    @property
    def id(self) -> str:
        return f"{self.case.name}-{self.mode}-{DTYPE_NAMES[self.dtype]}-{self.shape.id}-{self.provider}"

    @property
    def group(self) -> str:
        """pytest-benchmark group: the four providers of one case sit side by side."""
        return f"{self.case.name} {MODE_LABELS[self.mode]} {DTYPE_NAMES[self.dtype]} {self.shape.label}"


def specs(cases: list[Case], grid: str) -> Iterator[Spec]:
    """All benchmarks of ``cases`` on ``grid``, providers innermost so inputs are made once per case."""
    for case in cases:
        shapes = (case.shapes or GRIDS)[grid]
        for shape in shapes:
            for dtype in case.dtypes:
                for mode in case.modes:
                    for provider in (case.smoke_providers or case.providers) if grid == "smoke" else case.providers:
                        yield Spec(case, shape, dtype, mode, provider)


@dataclass(frozen=True)
class Settings:
    """Command-line settings (`benchmarks/conftest.py`)."""

    device: torch.device
    seconds: float
    """Target timed seconds per benchmark; rounds are derived from it within [MIN_ROUNDS, MAX_ROUNDS]."""
    smoke: bool
    """One timed round per benchmark: only checks that every case still runs."""


MIN_ROUNDS, MAX_ROUNDS = 5, 2000
PAIRED_MAX_ROUNDS = 50
"""Most alternating (fastbound, floor) calls of `_paired_floor`, the ratio over the floor."""
PAIRED_MAX_PROVIDER_ROUNDS = 400
"""Most alternating (fastbound, provider) calls of `_paired_provider` (small-size cases: calls of tens of µs)."""
FLOOR_MIN_ROUNDS, FLOOR_TIME_FACTOR = 20, 2
"""The floor is the denominator of every ratio: at least FLOOR_MIN_ROUNDS rounds and
FLOOR_TIME_FACTOR times the target seconds, so that its minimum is stable run to run."""
ESTIMATE_CALLS, ESTIMATE_SHARE = 5, 0.2
"""Rounds are estimated from the fastest of up to ESTIMATE_CALLS warm calls, made while they
take less than ESTIMATE_SHARE of the target time (one noisy call must not cut the rounds)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _leaves(inputs: Inputs, grad_inputs: tuple[str, ...]) -> Inputs:
    """Fresh autograd leaves (sharing storage with ``inputs``) for the names in ``grad_inputs``."""
    return {k: v.detach().requires_grad_() if k in grad_inputs else v for k, v in inputs.items()}


def _call(fn: Callable[..., object], inputs: Inputs, backward: bool, device: torch.device) -> tuple:
    """Runs ``fn`` and, when ``backward``, ``sum of outputs .backward()``; waits for the device."""
    outputs = fn(**inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    if backward:
        differentiable = [out for out in outputs if out.requires_grad]
        if differentiable:
            sum(out.sum() for out in differentiable).backward()
    _sync(device)
    return outputs


def outcome(fn: Callable[..., object], inputs: Inputs, grad_inputs: tuple[str, ...], device: torch.device) -> Result:
    """Runs ``fn`` once (with a backward when ``grad_inputs``) and collects outputs and gradients."""
    leaves = _leaves(inputs, grad_inputs)
    outputs = _call(fn, leaves, bool(grad_inputs), device)
    result = {f"output{i}": out.detach() for i, out in enumerate(outputs)}
    for name in grad_inputs:
        if leaves[name].grad is not None:
            result[f"grad[{name}]"] = leaves[name].grad
    return result


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while ``fn()`` runs, beyond what was allocated before it started.

    CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak. CPU: torch's CPU
    allocator reports every allocation and free to the profiler when ``profile_memory`` is on;
    the peak is the largest running sum of those events in time order. This sees every tensor
    allocated during the call (the oracle's (N, V) temporaries, the buffers that inductor's
    generated code allocates, tensors autograd materialises, the gradients), which an RSS
    high-water mark would blur with glibc's caching and the interpreter; it does not see raw
    ``malloc`` inside a kernel (fastbound's CPU kernels allocate only through torch).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


class _Prepared:
    """Inputs and oracle result of the current (case, shape, dtype), shared by its benchmarks."""

    key: tuple | None = None
    inputs: Inputs = {}
    expected: Result = {}

    @classmethod
    def get(cls, spec: Spec, device: torch.device) -> tuple[Inputs, Result]:
        key = (spec.case.name, spec.shape, spec.dtype, device)
        if cls.key != key:
            cls.key, cls.inputs, cls.expected = None, {}, {}  # free the previous case first
            _FLOOR_BUFFERS.clear()
            generator = torch.Generator(device).manual_seed(0)
            inputs = spec.case.make_inputs(spec.shape, spec.dtype, generator)
            cls.expected = outcome(spec.case.eager, inputs, spec.case.grad_inputs, device)
            cls.key, cls.inputs = key, inputs
        return cls.inputs, cls.expected


def provider_fn(spec: Spec) -> Callable[..., object]:
    """The callable that ``spec.provider`` times."""
    case = spec.case
    if spec.provider == "fastbound":
        return case.fastbound
    if spec.provider == "eager":
        return case.eager
    if spec.provider == "compile":
        torch._dynamo.reset()
        return torch.compile(case.eager, dynamic=False, fullgraph=case.fullgraph)
    if spec.provider == "floor":
        return case.floor_call or (lambda **inputs: clone_like_kernels(inputs[case.floor].detach()))
    if spec.provider in case.extra_providers:
        return case.extra_providers[spec.provider]
    raise ValueError(f"unknown provider {spec.provider!r}")


def _seconds(target: Callable[..., None], leaves: Inputs) -> float:
    """Duration of one call of ``target(**leaves)``."""
    start = time.perf_counter()
    target(**leaves)
    return time.perf_counter() - start


def _paired_floor(target: Callable[..., None], setup: Callable[[], tuple[tuple, Inputs]], floor: Callable[..., object],
                  inputs: Inputs, device: torch.device, rounds: int) -> dict[str, float]:
    """``rounds`` alternating (fastbound, floor) calls: each one's fastest time and the median
    of the pairs' ratios.

    On a shared machine the floor's minimum moves by ~20% from one case to the next (the
    state of the neighbours, huge pages found or not) and with it every ratio; timed in
    alternation, the two calls of a pair see the same machine. The median of the pairs'
    ratios is what the report divides by: one lucky floor call (a ratio of minimums pairs the
    fastest of each, which need not have seen the same machine) cannot move it.
    """
    fast, base = [], []
    for _ in range(rounds):
        fast.append(_seconds(target, setup()[1]))  # its gradient is freed after the clock stops
        start = time.perf_counter()
        out = floor(**inputs)
        _sync(device)
        base.append(time.perf_counter() - start)
        del out  # as the floor's copy, outside the timed region
    return {"paired_seconds": min(fast), "paired_floor_seconds": min(base),
            "paired_ratio": statistics.median(f / b for f, b in zip(fast, base)), "paired_rounds": rounds}


def _paired_provider(target: Callable[..., None], other: Callable[..., None], setup: Callable[[], tuple[tuple, Inputs]],
                     rounds: int) -> float:
    """The median over ``rounds`` alternating (fastbound, other provider) calls of other / fastbound:
    the `vs <provider>` ratio of two calls that saw the same machine (calls of tens of µs, whose
    separate benchmarks' minimums move by more than the difference they would show)."""
    ratios = []
    for i in range(rounds):  # each goes first in every other pair: no order effect
        if i % 2:
            slow = _seconds(other, setup()[1])
            ratios.append(slow / _seconds(target, setup()[1]))
        else:
            fast = _seconds(target, setup()[1])
            ratios.append(_seconds(other, setup()[1]) / fast)
    return statistics.median(ratios)


def _check(spec: Spec, actual: Result, expected: Result, inputs: Inputs) -> None:
    if spec.provider == "floor":
        if spec.case.floor_call is None:
            assert torch.equal(actual["output0"], inputs[spec.case.floor]), "floor: clone() differs from its input"
        return
    if not spec.backward:
        expected = {k: v for k, v in expected.items() if not k.startswith("grad[")}
    spec.case.check(actual, expected, inputs)


def run(spec: Spec, benchmark, settings: Settings) -> None:
    """Checks, times and measures one benchmark (see the module docstring)."""
    device = settings.device
    need, free = spec.case.working_set(spec.shape), free_bytes(device)
    if free is not None and need > free:
        pytest.skip(f"{spec.shape.label} needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available")
    inputs, expected = _Prepared.get(spec, device)
    fn = provider_fn(spec)
    grad_inputs = spec.case.grad_inputs if spec.backward else ()

    def target(**leaves) -> None:
        _call(fn, leaves, spec.backward, device)

    def setup() -> tuple[tuple, Inputs]:
        return (), _leaves(inputs, grad_inputs)

    # 1. Agreement with the oracle (also the warm-up, and compilation for "compile").
    actual = outcome(fn, inputs, grad_inputs, device)
    _check(spec, actual, expected, inputs)
    del actual

    # 2. Timing: rounds from the duration of warm calls; leaves are made in setup (not timed).
    rounds = 1
    if not settings.smoke:
        # Warm calls only: the first one compiled, or took the validating full path, or
        # faulted in fresh memory, and would cut the rounds to a few noisy ones.
        calls: list[float] = []
        while len(calls) < ESTIMATE_CALLS and sum(calls) < ESTIMATE_SHARE * settings.seconds:
            calls.append(_seconds(target, setup()[1]))
        least, seconds = spec.case.min_rounds or MIN_ROUNDS, settings.seconds
        if spec.provider == "floor":
            least, seconds = FLOOR_MIN_ROUNDS, FLOOR_TIME_FACTOR * settings.seconds
        rounds = min(MAX_ROUNDS, max(least, math.ceil(seconds / max(min(calls), 1e-9))))
    benchmark.group = spec.group
    benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    paired = {}
    if spec.provider == "fastbound" and not settings.smoke:
        paired = _paired_floor(target, setup, provider_fn(replace(spec, provider="floor")), inputs,
                               device, min(rounds, PAIRED_MAX_ROUNDS))
        for name, other in spec.case.extra_providers.items():
            def other_target(other=other, **leaves) -> None:
                _call(other, leaves, spec.backward, device)

            paired[f"paired_vs_{name}"] = _paired_provider(target, other_target, setup,
                                                           min(rounds, PAIRED_MAX_PROVIDER_ROUNDS))

    # 3. Peak memory of one more call (the profiler would distort the timing).
    leaves = setup()[1]
    peak = peak_memory(lambda: _call(fn, leaves, spec.backward, device), device)
    floor_bytes = inputs[spec.case.floor].nbytes
    if spec.provider == "floor" and spec.case.floor_call is None:
        if _reuses_memory(inputs[spec.case.floor]):
            peak = floor_bytes  # its kept buffer: allocated before the profiler looked
        assert peak >= floor_bytes, f"peak memory {peak} B misses the clone's {floor_bytes} B"
    benchmark.extra_info.update(
        case=spec.case.name,
        mode=spec.mode,
        dtype=DTYPE_NAMES[spec.dtype],
        batch=spec.shape.batch,
        length=spec.shape.length,
        vocab=spec.shape.vocab,
        provider=spec.provider,
        device=device.type,
        device_name=device_name(device),
        threads=torch.get_num_threads(),
        cpu_isa=fastbound.cpu_isa(),
        torch=torch.__version__,
        rounds=rounds,
        peak_bytes=peak,
        floor_bytes=floor_bytes,
        floor_op=spec.case.floor_op,
        memory_method="cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler(profile_memory)",
        **paired,
        **spec.case.info,
    )
