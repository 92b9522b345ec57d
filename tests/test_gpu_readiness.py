"""What a first GPU run would hit, checked without a GPU (issue 13).

Each test here runs on CPU and guards a property that only matters on a GPU:
the backend choice traces under ``torch.compile`` for CUDA devices, the
CUDA-skip switch of `tests/conftest.py` works, host syncs per step are counted,
Triton launches are guarded by the input's device, and the one-shot GPU check
(`.ci/gpu_check.py`) runs its probe code paths in its CPU mode.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from fastbound import _backend

TESTS = pathlib.Path(__file__).parent


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


SKIPPING_GPU_TESTS = """
import pytest

@pytest.mark.cuda
def test_needs_cuda():
    pass

@pytest.mark.triton
def test_skips_itself():
    pytest.skip("built without CUDA kernels")

@pytest.mark.cuda
@pytest.mark.multi_gpu
@pytest.mark.skipif(True, reason="one GPU")
def test_needs_two_gpus():
    pass

def test_cpu():
    pytest.skip("not a GPU test")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the switch where CUDA tests skip")
@pytest.mark.parametrize("require", [None, "1"])
def test_require_cuda_turns_gpu_skips_into_failures(tmp_path, require):
    (tmp_path / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    (tmp_path / "test_probe.py").write_text(SKIPPING_GPU_TESTS)
    env = {k: val for k, val in os.environ.items() if k != "FASTBOUND_REQUIRE_CUDA"}
    if require:
        env["FASTBOUND_REQUIRE_CUDA"] = require
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    summary = run.stdout.strip().splitlines()[-1]
    if require:
        # The marker's skip fails at setup (an error), the test's own skip in its call (a failure).
        assert run.returncode == 1 and summary.startswith("1 failed, 2 skipped, 1 error"), run.stdout
        assert "skip into a failure: Skipped: no CUDA device" in run.stdout
        assert "skip into a failure: Skipped: built without CUDA kernels" in run.stdout
    else:
        assert run.returncode == 0 and "4 skipped" in summary, run.stdout


def _raw_dce(backend):
    if backend == "triton":
        import fastbound.triton_kernels  # noqa: F401  (registers the *_triton ops)

        return torch.ops.fastbound.dce_forward_triton
    if not _backend.has_cuda_kernels():
        pytest.skip("fastbound was built without CUDA kernels")
    return torch.ops.fastbound.dce_forward


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_raw_ops_run_on_the_current_stream(backend):
    """The op's kernel runs on the current (side) stream, ordered after the copy that fills its input.

    The side stream is held behind a long sleep before the copy: a kernel launched on
    another stream would read the zeros first. The raw op is used because the public
    functions' value checks may sync the host, which would hide a wrong-stream launch.
    """
    op = _raw_dce(backend)
    n, n_cols = 4096, 2000
    g = torch.Generator(device="cuda").manual_seed(0)
    score = torch.randn(n, n_cols, device="cuda", generator=g)
    ones = torch.ones(n, device="cuda")
    x_t = torch.full((n,), n_cols - 1, device="cuda")
    x0 = torch.randint(0, n_cols - 1, (n,), device="cuda", generator=g)
    want, _ = op(score, x_t, x0, ones, n_cols - 1, -100, False)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        filled = torch.zeros_like(score)
        torch.cuda._sleep(500_000_000)
        filled.copy_(score)
        got, _ = op(filled, x_t, x0, ones, n_cols - 1, -100, False)
    torch.cuda.synchronize()
    assert torch.equal(got, want)
