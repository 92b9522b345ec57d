"""Test configuration.

Triton kernels run on CPU tensors only in Triton's interpreter, which must be
switched on before triton is imported; on a machine with a GPU the Triton
tests run on the GPU instead.

``FASTBOUND_REQUIRE_CUDA=1`` (set by `.ci/gpu-check.sh`) turns every skip of a
``cuda``- or ``triton``-marked test into a failure, so a GPU run cannot go
green with zero GPU kernels run (no device visible, a build without CUDA
kernels, triton missing). Tests marked ``multi_gpu`` keep their skip.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


HAS_TRITON = _has_triton()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REQUIRE_CUDA = os.environ.get("FASTBOUND_REQUIRE_CUDA") == "1"
GPU_MARKERS = ("cuda", "triton")


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs Triton kernels (interpreter on CPU)")
    config.addinivalue_line("markers", "cuda: needs a CUDA device")
    config.addinivalue_line("markers", "multi_gpu: needs two CUDA devices (its skip stays a skip)")


def pytest_collection_modifyitems(config, items):
    skip_triton = pytest.mark.skip(reason="triton is not installed")
    skip_cuda = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "triton" in item.keywords and not HAS_TRITON:
            item.add_marker(skip_triton)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    required = any(m in item.keywords for m in GPU_MARKERS) and "multi_gpu" not in item.keywords
    if REQUIRE_CUDA and required and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"FASTBOUND_REQUIRE_CUDA=1 turns this GPU test's skip into a failure: {reason}"
