"""pytest options and fixtures of the benchmark suite (see `benchmarks.harness`).

A benchmark module defines ``CASES`` (a list of `benchmarks.harness.Case`) and one test
taking ``spec`` and ``measure``; ``spec`` is parametrised here over the cases and the grid
chosen on the command line.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from . import harness


def pytest_addoption(parser):
    group = parser.getgroup("fastbound benchmarks")
    group.addoption(
        "--full", action="store_true", help="run the big grid (more tokens, V = 50257; needs several GiB)"
    )
    group.addoption(
        "--smoke",
        action="store_true",
        help="smallest shape only, one round each: checks that every case still runs (for CI)",
    )
    group.addoption("--bench-device", default="cpu", choices=("cpu", "cuda"), help="device to benchmark on")
    group.addoption(
        "--bench-seconds",
        type=float,
        default=1.0,
        help=f"target timed seconds per benchmark (rounds {harness.MIN_ROUNDS}..{harness.MAX_ROUNDS})",
    )


def pytest_configure(config):
    if config.getoption("--full") and config.getoption("--smoke"):
        raise pytest.UsageError("--full and --smoke exclude each other")
    if config.getoption("--bench-device") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device=cuda: no CUDA device is available")


def _grid(config) -> str:
    if config.getoption("--smoke"):
        return "smoke"
    return "full" if config.getoption("--full") else "default"


def pytest_generate_tests(metafunc):
    if "spec" in metafunc.fixturenames:
        specs = list(harness.specs(metafunc.module.CASES, _grid(metafunc.config)))
        metafunc.parametrize("spec", specs, ids=[spec.id for spec in specs])


@pytest.fixture
def measure(benchmark, request) -> Callable[[harness.Spec], None]:
    """``measure(spec)``: checks, times and measures the memory of one benchmark."""
    config = request.config
    settings = harness.Settings(
        device=torch.device(config.getoption("--bench-device")),
        seconds=config.getoption("--bench-seconds"),
        smoke=config.getoption("--smoke"),
    )
    return lambda spec: harness.run(spec, benchmark, settings)
