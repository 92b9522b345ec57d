"""What a first GPU run would hit, checked without a GPU (issue 13).

Each test here runs on CPU and guards a property that only matters on a GPU:
the backend choice traces under ``torch.compile`` for CUDA devices, the
CUDA-skip switch of `tests/conftest.py` works, host syncs per step are counted,
Triton launches are guarded by the input's device, and the one-shot GPU check
(`.ci/gpu_check.py`) runs its probe code paths in its CPU mode.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys
import traceback

import pytest
import torch

import fastbound as fb
from conftest import TRITON_DEVICE
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


# Python-level reads of a tensor's value: on a GPU each one blocks the host until the
# queue drains, and each one makes the code impossible to capture in a CUDA graph.
# Counted on CPU before issue 13 item 4: a training step of each loss read twice,
# `_validate.ValueChecks.run` (the forward's value checks) and `_ops.scale_rows` (the
# backward's free-gradient test). Now the backward reads no device value, and the value
# checks read one in their default "sync" mode and none in "async" or "off"
# (`fastbound.value_checks`; tests/test_value_checks.py counts them on the accelerator path);
# `integrate_step` reads at most once. On a GPU, `torch.cuda.set_sync_debug_mode` sees the
# syncs themselves, also those that torch's C++ code makes.
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")


@contextlib.contextmanager
def count_host_reads():
    """Yields a list that collects "file:line method" for every host read of a tensor's value inside."""
    seen: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name, original):
        def read(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            seen.append(f"{pathlib.Path(caller.filename).name}:{caller.lineno} {name}")
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield seen
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


LOSSES = ["absorb", "uniform", "dce"]


def _training_step(loss_name, device="cpu", backend=None, batch=2):
    """A model, a batch and `step()`: forward of the fused loss (SEDD's weighted sum form), backward, SGD."""
    g = torch.Generator().manual_seed(0)
    length, n_cols = 8, 17
    model = torch.nn.Linear(16, n_cols).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h = torch.randn(batch, length, 16, generator=g).to(device)
    x0 = torch.randint(0, n_cols - 1, (batch, length), generator=g).to(device)
    x_t = torch.where(torch.rand(batch, length, generator=g) < 0.5, n_cols - 1, x0).to(device)
    sigma = (torch.rand(batch, generator=g) + 0.1).to(device)
    weight = (torch.rand(batch, generator=g) / batch).to(device)

    def forward():
        out = model(h)
        if loss_name == "dce":
            return fb.dce_loss(out, x_t, x0, weight=weight[:, None], reduction="sum", backend=backend)
        return fb.dse_loss(out, sigma[:, None], x_t, x0, graph=loss_name, weight=weight[:, None], reduction="sum",
                           backend=backend)

    def step():
        opt.zero_grad(set_to_none=False)
        loss = forward()
        loss.backward()
        opt.step()
        return loss

    return forward, step


def _reads_per_step(loss_name, batch):
    """(host reads in the forward, host reads in the backward) of one training step."""
    forward, _ = _training_step(loss_name, batch=batch)
    with count_host_reads() as forward_reads:
        loss = forward()
    with count_host_reads() as backward_reads:
        loss.backward()
    return forward_reads, backward_reads


@pytest.mark.parametrize("loss_name", LOSSES)
def test_loss_step_reads_a_few_values_whatever_the_batch(loss_name):
    """The forward and the backward each read at most two values, the same number at every batch size.

    On CPU a read costs no synchronisation and the code may read more there than on a GPU
    (a CPU-only fast path of the checks, the free-backward test); no read per row, ever.
    Whether a GPU is synchronised is `test_loss_backward_does_not_sync_a_gpu`.
    """
    small, large = _reads_per_step(loss_name, 2), _reads_per_step(loss_name, 64)
    for reads, more_reads in zip(small, large):
        assert len(reads) <= 2 and len(more_reads) == len(reads), (small, large)


@pytest.mark.cuda
@pytest.mark.parametrize("loss_name", LOSSES)
def test_loss_backward_does_not_sync_a_gpu(loss_name):
    forward, _ = _training_step(loss_name, "cuda")
    loss = forward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("loss_name", ["dce", "dse"])
def test_integrate_step_reads_the_device_at_most_once(loss_name):
    """One host read for the value checks (ids, index, sigma); the kernels and the accumulation read none."""
    g = torch.Generator().manual_seed(1)
    out = torch.randn(3, 5, 9, generator=g)
    x0 = torch.randint(0, 8, (3, 5), generator=g)
    x_t = torch.where(torch.rand(3, 5, generator=g) < 0.5, 8, x0)
    acc = torch.zeros(2, 2, dtype=torch.float64)
    index = torch.tensor([0, 1, 0])
    with count_host_reads() as reads:
        fb.integrate_step(out, x_t, x0, torch.rand(3, generator=g) + 0.1, 0.5, acc, loss=loss_name, index=index)
    assert len(reads) <= 1, reads


def test_host_read_counter_sees_the_reads():
    t = torch.ones(3)
    with count_host_reads() as reads:
        t.sum().item()
        bool(t[0] == 1)
        t.tolist()
    assert [r.split()[1] for r in reads] == ["item", "__bool__", "tolist"]


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("loss_name", LOSSES)
def test_training_step_captures_in_a_cuda_graph(loss_name, mode):
    """An eager training step (forward, backward, SGD) captures under torch.cuda.graph and replays.

    Capture fails on any host read of a device value. The backward reads none; the value
    checks read one in "sync" mode (the default) outside a capture, and while the stream
    captures they fall back to the kernels' NaN policy, so the default captures. In "async"
    mode the eager step syncs nowhere (sync debug mode "error") and the captured graph
    holds the device-side asserts.
    """
    _, step = _training_step(loss_name, "cuda")
    with fb.value_checks(mode):
        _capture_and_replay(step, check_no_sync=mode == "async")


def _capture_and_replay(step, check_no_sync):
    step()
    torch.cuda.synchronize()
    if check_no_sync:
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up on a side stream, as torch.cuda.graph asks
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    eager = step().detach().clone()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(captured).all() and torch.isfinite(eager).all()


# --- Triton launches: on the inputs' device, one registration path, no recompiles ---------------

TRITON_SOURCES = pathlib.Path(fb.__file__).parent / "triton_kernels"


@pytest.mark.triton
def test_every_triton_launch_and_registration_goes_through_common():
    """Only `_common` calls wrap_triton / triton_op: every other module launches via the device-guarded helper."""
    for path in TRITON_SOURCES.glob("*.py"):
        if path.name == "_common.py":
            continue
        source = path.read_text()
        assert "wrap_triton" not in source and "triton_op" not in source, path.name


@pytest.mark.triton
def test_launch_runs_under_the_tensors_device(monkeypatch):
    from fastbound.triton_kernels import _common

    events = []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            events.append(("enter", str(self.device)))

        def __exit__(self, *exc):
            events.append(("exit", str(self.device)))

    def fake_wrap(kernel):
        return {(7,): lambda *args, **meta: events.append(("launch", kernel, args, meta))}

    monkeypatch.setattr(torch.cuda, "device", Guard)
    monkeypatch.setattr(_common, "wrap_triton", fake_wrap)
    _common.launch("kernel", (7,), torch.device("cuda", 1), 1, 2, BLOCK=32)
    assert events == [("enter", "cuda:1"), ("launch", "kernel", (1, 2), {"BLOCK": 32}), ("exit", "cuda:1")]
    events.clear()
    _common.launch("kernel", (7,), torch.device("cpu"), 3)
    assert events == [("launch", "kernel", (3,), {})]


@pytest.mark.triton
def test_every_triton_op_is_registered():
    import fastbound.triton_kernels  # noqa: F401

    for name in ("dse_forward", "dse_forward_inplace", "dce_forward", "dce_forward_inplace", "integrate_step",
                 "perturb", "philox4x32"):
        assert hasattr(torch.ops.fastbound, f"{name}_triton"), name


@pytest.mark.triton
def test_perturb_kernels_do_not_specialise_seed_and_offset():
    """seed / offset typed int64 and not specialised: an offset crossing 2^31 (or a multiple of 16) reuses the kernel."""
    from triton.runtime.jit import JITFunction

    from fastbound.triton_kernels import perturb

    for kernel, names in ((perturb._bernoulli_kernel, ("seed", "offset")), (perturb._exact_k_kernel, ("seed", "offset")),
                          (perturb._philox_kernel, ("seed",))):
        options = getattr(kernel, "kwargs", None)  # the interpreter keeps jit's options here
        not_specialised = options["do_not_specialize"] if options is not None else kernel.do_not_specialize
        params = {p.name: p for p in JITFunction(kernel.fn, do_not_specialize=not_specialised).params}
        for name in names:
            assert params[name].do_not_specialize and params[name].annotation_type == "i64", (kernel.fn.__name__, name)


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.multi_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_triton_ops_run_on_the_inputs_device():
    """Scores on cuda:1 while cuda:0 is current: same loss as on the CPU (a launch on cuda:0 would fault or differ)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=g)
    x0 = torch.randint(0, 299, (64,), generator=g)
    x_t = torch.where(torch.rand(64, generator=g) < 0.5, 299, x0)
    want = fb.dce_loss(logits, x_t, x0)
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    got = fb.dce_loss(logits.to(dev), x_t.to(dev), x0.to(dev), backend="triton")
    assert got.device == dev
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    acc = torch.zeros(1, 2, dtype=torch.float64, device=dev)
    fb.integrate_step(logits.to(dev)[None], x_t.to(dev)[None], x0.to(dev)[None], None, 1.0, acc, backend="triton")
    torch.testing.assert_close(acc[0, 0].cpu().float(), want.sum(), rtol=1e-5, atol=1e-4)


@pytest.mark.triton
@pytest.mark.parametrize("loss_name", ["dce", "dse"])
def test_triton_integrate_step_shared_slots_add_in_sequence_order(loss_name):
    """Sequences sharing accumulator rows are added serially in sequence order: bitwise repeatable,
    and bitwise equal to adding each sequence's own (S_b, S_b^2) row by row in float64."""
    g = torch.Generator().manual_seed(3)
    n_seq, length, n_cols, n_slots = 23, 2, 11, 4
    out = (torch.randn(n_seq, length, n_cols, generator=g) * 3).to(TRITON_DEVICE)
    x0 = torch.randint(0, n_cols - 1, (n_seq, length), generator=g).to(TRITON_DEVICE)
    x_t = torch.where(torch.rand(n_seq, length, generator=g).to(TRITON_DEVICE) < 0.6, n_cols - 1, x0)
    sigma = (torch.rand(n_seq, generator=g, dtype=torch.float64) + 0.1).to(TRITON_DEVICE)
    weight = (torch.rand(n_seq, generator=g, dtype=torch.float64) * 5).to(TRITON_DEVICE)
    index = torch.randint(0, n_slots - 1, (n_seq,), generator=g).to(TRITON_DEVICE)  # slot n_slots-1 stays unused
    start = torch.randn(n_slots, 2, generator=g, dtype=torch.float64).to(TRITON_DEVICE)

    def step(acc, idx):
        return fb.integrate_step(out, x_t, x0, sigma, weight, acc, loss=loss_name, index=idx, backend="triton")

    runs = [step(start.clone(), index) for _ in range(3)]
    assert all(torch.equal(r, runs[0]) for r in runs)
    own = step(torch.zeros(n_seq, 2, dtype=torch.float64, device=TRITON_DEVICE), None).cpu()
    serial = start.cpu().clone()
    for b, slot in enumerate(index.tolist()):
        serial[slot, 0] += own[b, 0]
        serial[slot, 1] += own[b, 1]
    assert torch.equal(runs[0].cpu(), serial)


# --- The one-shot GPU check, in its CPU mode ---------------------------------------------------

REPO = TESTS.parent


def test_gpu_check_dry_run_runs_every_part_that_needs_no_gpu(tmp_path):
    """`.ci/gpu-check.sh --dry-run`: the CUDA-kernel query, every probe at tiny sizes on CPU (Triton in
    its interpreter) and the GPU table writer on a one-round CPU benchmark, so the script cannot rot."""
    env = {k: val for k, val in os.environ.items() if k != "FASTBOUND_REQUIRE_CUDA"}
    env.update(GPU_CHECK_LOG=str(tmp_path), GPU_CHECK_BUDGET="1500")
    run = subprocess.run(["bash", str(REPO / ".ci" / "gpu-check.sh"), "--dry-run"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    for stage in ("cuda-kernels", "probes", "bench", "report"):
        assert f"PASS {stage} (" in run.stdout, stage
    probes = (tmp_path / "probes.log").read_text()
    assert "probes: 0 failed" in probes and probes.count("PASS ") == 9, probes
    table = (tmp_path / "gpu.md").read_text()
    assert "| dce | fwd+bwd | fp32 | 4×512 | 258 |" in table and "fastbound % HBM" in table


def test_gpu_report_shares_of_the_datasheet_peak():
    from benchmarks import gpu_report

    assert gpu_report.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert gpu_report.peak_bandwidth("NVIDIA GH200 480GB") == 4.0e12
    assert gpu_report.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert gpu_report.peak_bandwidth("Tesla T4") is None
    info = dict(case="dce", mode="fwd_bwd", dtype="bf16", batch=4, length=512, vocab=32769, peak_bytes=0,
                floor_bytes=10**9, floor_op="clone", device_name="NVIDIA H200", device="cuda")
    run = {"benchmarks": [{"extra_info": dict(info, provider=p), "stats": {"min": t}}
                          for p, t in (("fastbound", 0.5e-3), ("floor", 0.45e-3), ("eager", 5e-3))]}
    row = gpu_report.report(run).strip().splitlines()[-1]
    # 2 GB of traffic: 4000 GB/s = 83% of 4.8 TB/s for fastbound, 93% for the floor.
    assert row.endswith("| 0.5 | 5 | 0.45 | 10.00× | 1.11× | 4000 | 83 | 93 |"), row
