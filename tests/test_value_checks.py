"""The mode of the value checks (`fastbound.value_checks`, ``FASTBOUND_VALUE_CHECKS``) and the NaN policy behind it.

On a GPU the value checks read one device value per call in "sync" mode, none in
"async" (``torch._assert_async``) and "off" (the kernels' NaN policy). Tensors on
the host are always checked synchronously; the ``accelerator`` fixture lets CPU
tensors take the accelerator path (`fastbound._validate.HOST_DEVICES` emptied), so
every mode runs here. The GPU-marked tests check the same on a device.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

import fastbound as fb
from conftest import TRITON_DEVICE
from fastbound import _names, _ops
from fastbound import _validate as v
from test_gpu_readiness import LOSSES, _training_step, count_host_reads

MODES = ("sync", "async", "off")


@pytest.fixture(autouse=True)
def default_mode(monkeypatch):
    """Every test starts from the default: no mode set, no environment variable."""
    monkeypatch.delenv(v.VALUE_CHECKS_ENV, raising=False)
    monkeypatch.setattr(v, "_mode", None)


@pytest.fixture
def accelerator(monkeypatch):
    """CPU tensors take the accelerator path: the checks follow the mode, and the backward's unit
    test answers as for a GPU tensor (without reading the upstream)."""
    monkeypatch.setattr(v, "HOST_DEVICES", frozenset())
    monkeypatch.setattr(_ops, "_unit", lambda factor: False)


def _bad_dse(kind, device="cpu"):
    """A (4, 7) score-entropy batch with one bad value: an x_t id, an x0 id or a sigma."""
    g = torch.Generator().manual_seed(0)
    score = torch.randn(4, 7, generator=g).to(device)
    x_t = torch.tensor([6, 6, 2, 6], device=device)
    x0 = torch.tensor([1, 2, 2, 3], device=device)
    sigma = torch.tensor([0.5, 1.0, 1.5, 2.0], device=device)
    if kind == "x_t":
        x_t[1] = 9
    elif kind == "x0":
        x0[1] = -3
    else:
        sigma[1] = float(kind)
    return score, sigma, x_t, x0


# --- the mode -----------------------------------------------------------------------------------


def test_setter_and_context_manager():
    assert fb.value_check_mode() == "sync"
    fb.value_checks("async")
    assert fb.value_check_mode() == "async"
    with fb.value_checks("off") as manager:
        assert isinstance(manager, fb.value_checks) and fb.value_check_mode() == "off"
        with fb.value_checks("sync"):
            assert fb.value_check_mode() == "sync"
        assert fb.value_check_mode() == "off"
    assert fb.value_check_mode() == "async"
    fb.value_checks(None)
    assert fb.value_check_mode() == "sync"


@pytest.mark.parametrize("bad", ["Sync", "none", 0, True])
def test_a_bad_mode_is_refused(bad):
    with pytest.raises(ValueError, match=r"mode must be one of \('sync', 'async', 'off'\)"):
        fb.value_checks(bad)
    assert fb.value_check_mode() == "sync"


def test_environment_variable(monkeypatch, accelerator):
    for value, mode in (("", "sync"), ("sync", "sync"), ("async", "async"), ("off", "off")):
        monkeypatch.setenv("FASTBOUND_VALUE_CHECKS", value)
        assert fb.value_check_mode() == mode
    with fb.value_checks("sync"):  # a mode set in the program wins over the environment
        assert fb.value_check_mode() == "sync"
    monkeypatch.setenv("FASTBOUND_VALUE_CHECKS", "asynch")
    with pytest.raises(ValueError, match=r"FASTBOUND_VALUE_CHECKS must be one of .* got 'asynch'"):
        fb.value_check_mode()
    with pytest.raises(ValueError, match="FASTBOUND_VALUE_CHECKS must be one of"):
        fb.dse_loss(*_bad_dse("x_t"))  # a call whose checks follow the mode reports the typo too


def test_capture_falls_back_to_the_nan_policy_in_sync_mode(monkeypatch):
    """While a CUDA stream captures, "sync" cannot read: the checks are off (as under tracing); "async" stays."""
    cuda = torch.device("cuda")
    for capturing, want in ((True, ["off", "async", "off"]), (False, list(MODES))):
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
        got = []
        for mode in MODES:
            with fb.value_checks(mode):
                got.append(v.mode_for(cuda))
                assert v.mode_for(torch.device("cpu")) == "sync"
        assert got == want, capturing


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["x_t", "x0", "0.0", "nan", "inf"])
def test_host_tensors_always_raise_the_clear_error(mode, kind):
    """On the host a check costs no sync: every mode raises the ValueError naming the argument."""
    name = "sigma" if kind[0].isdigit() or kind in ("nan", "inf") else kind
    score, sigma, x_t, x0 = _bad_dse(kind)
    with fb.value_checks(mode), pytest.raises(ValueError, match=name):
        fb.dse_loss(score, sigma, x_t, x0)


# --- the modes on the accelerator path ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["x_t", "x0", "-1.0"])
def test_sync_mode_raises_the_clear_error(accelerator, kind):
    name = "sigma" if kind == "-1.0" else kind
    score, sigma, x_t, x0 = _bad_dse(kind)
    acc = torch.zeros(1, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"{name} (contains id|must be positive)"):
        fb.integrate_step(score[None], x_t[None], x0[None], sigma[1:2], 1.0, acc, loss="dse")
    with pytest.raises(ValueError, match="index contains id 3 outside"):
        fb.integrate_step(score[None], x_t[None], x0[None], 1.0, 1.0, acc, loss="dse", index=torch.tensor([3]))


@pytest.mark.parametrize("kind", ["x_t", "x0", "-1.0"])
def test_async_mode_asserts(accelerator, kind):
    """"async" hands the verdict to torch._assert_async, which raises a RuntimeError at once on the host."""
    score, sigma, x_t, x0 = _bad_dse(kind)
    acc = torch.zeros(1, 2, dtype=torch.float64)
    fb.value_checks("async")
    with pytest.raises(RuntimeError, match=r"a value check failed \(index, x_t, x0, sigma\); "
                                           "FASTBOUND_VALUE_CHECKS=sync raises"):
        fb.integrate_step(score[None], x_t[None], x0[None], sigma[1:2], 1.0, acc, loss="dse", index=torch.tensor([0]))
    if kind != "-1.0":  # (valid ids and a bad sigma take the losses' host-only fast path on the CPU kernels)
        with pytest.raises(RuntimeError, match="a value check failed"):
            fb.dse_loss(score, sigma, x_t, x0)
    fb.integrate_step(score[None], x_t[None] * 0 + 6, x0[None] * 0 + 1, 1.0, 1.0, acc, loss="dse")  # valid: passes


def test_async_mode_covers_the_noise_samplers(accelerator):
    x0 = torch.randint(0, 5, (2, 6), generator=torch.Generator().manual_seed(1))
    fb.value_checks("async")
    for bad in (dict(sigma=torch.tensor([0.5, -1.0])), dict(mask_ratio=torch.tensor([0.5, 1.5])),
                dict(num_masked=torch.tensor([1, 7]))):
        with pytest.raises(RuntimeError, match="a value check failed"):
            fb.perturb(x0, vocab_size=5, seed=0, **bad)
    with pytest.raises(RuntimeError, match=r"a value check failed \(length\)"):
        fb.sample_num_masked(2, torch.tensor([0, 3]), weights="uniform", seed=0)
    fb.value_checks("sync")
    with pytest.raises(ValueError, match="num_masked\\[1\\] = 7 is outside \\[0, 6\\]"):
        fb.perturb(x0, vocab_size=5, seed=0, num_masked=torch.tensor([1, 7]))
    with pytest.raises(ValueError, match="length must lie in \\[1, 2147483647\\].*\\[0, 3\\]"):
        fb.sample_num_masked(2, torch.tensor([0, 3]), weights="uniform", seed=0)


def test_off_mode_leaves_bad_values_to_the_kernels(accelerator):
    """"off" runs no check: the C++ CPU kernels still refuse a bad id; an unchecked noise level has a
    defined effect (NaN or negative: never corrupted; beyond 1: always), the same on every device."""
    x0 = torch.randint(0, 5, (2, 6), generator=torch.Generator().manual_seed(1))
    fb.value_checks("off")
    for bad in (dict(sigma=torch.tensor([float("nan"), -1.0])), dict(mask_ratio=torch.tensor([[float("nan")], [-2]]))):
        assert not fb.perturb(x0, vocab_size=5, seed=0, **bad).mask.any(), bad
    assert fb.perturb(x0, vocab_size=5, seed=0, mask_ratio=torch.tensor([1.5, 9.0])).mask.all()
    with pytest.raises(ValueError, match="fastbound: x_t contains id 9"):
        fb.dse_loss(*_bad_dse("x_t"))  # the C++ CPU kernel's own id check, not a Python value check


@pytest.mark.parametrize("mode", ["async", "off"])
@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.triton
def test_training_step_reads_no_device_value(accelerator, mode, loss_name):
    """Forward, backward and SGD step of each loss read no tensor value on the host (none is a sync on a GPU)."""
    _, step = _training_step(loss_name, TRITON_DEVICE, backend="triton")
    fb.value_checks(mode)
    step()
    with count_host_reads() as reads:
        loss = step()
    assert reads == [] and torch.isfinite(loss)
    fb.value_checks("sync")
    with count_host_reads() as reads:
        step()
    assert len(reads) == 1 and "_validate.py" in reads[0], reads  # the one read of "sync"


@pytest.mark.parametrize("mode", ["async", "off"])
def test_noise_and_integration_read_no_device_value(accelerator, mode):
    g = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, 8, (3, 5), generator=g)
    out = torch.randn(3, 5, 9, generator=g)
    acc = torch.zeros(2, 2, dtype=torch.float64)
    fb.value_checks(mode)
    with count_host_reads() as reads:
        t = fb.sample_times(3, seed=0)
        x_t, _ = fb.perturb(x0, sigma=t, vocab_size=8, seed=0, offset=3)
        fb.perturb(x0, mask_ratio=t[:, None], vocab_size=8, seed=0)
        fb.perturb(x0, num_masked=fb.sample_num_masked(3, 5, seed=0), vocab_size=8, seed=0)
        fb.sample_num_masked(3, torch.full((3,), 5), weights="uniform", seed=0)
        fb.integrate_step(out, x_t, x0, t, 0.5, acc, loss="dse", index=torch.tensor([0, 1, 0]))
    assert reads == []


def test_an_int_length_is_never_read():
    with count_host_reads() as reads:
        fb.sample_num_masked(4, 9, seed=0)
        fb.sample_num_masked(4, 9, weights="uniform", seed=0)
    assert reads == []


# --- the NaN policy: what is left when no check runs --------------------------------------------

BAD_SIGMAS = (0.0, -1.0, float("inf"), float("nan"))


def _sigma_rows(graph, device, dtype):
    """(score, sigma, x_t, x0, bad) for V = 7: four rows of bad sigma that run, two good rows, and two
    rows that do not run (ignored; absorbing graph: unmasked) whose bad sigma changes nothing."""
    g = torch.Generator().manual_seed(3)
    score = torch.randn(8, 7, generator=g, dtype=dtype).to(device)
    sigma = torch.tensor([*BAD_SIGMAS, 0.7, 1.3, float("nan"), 0.0], dtype=dtype).to(device)
    if graph == "absorb":
        x_t, x0 = [6, 6, 6, 6, 6, 6, 6, 2], [1, 2, 3, 4, 5, 0, -100, 2]
    else:
        x_t, x0 = [1, 3, 3, 0, 5, 2, 1, 2], [1, 2, 3, 4, 5, 0, -100, -100]
    bad = torch.tensor([True] * 4 + [False] * 4).to(device)
    return score, sigma, torch.tensor(x_t).to(device), torch.tensor(x0).to(device), bad


def _check_nan_rows(out, grad, bad, want_out, want_grad):
    assert out[bad].isnan().all() and grad[bad].isnan().all()
    torch.testing.assert_close(out[~bad], want_out[~bad])
    torch.testing.assert_close(grad[~bad], want_grad[~bad])


@pytest.mark.triton
@pytest.mark.parametrize("graph", ["absorb", "uniform"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_kernels_give_nan_rows_for_a_bad_sigma(graph, dtype):
    """The raw Triton op (no Python check, as under "off", tracing or capture): loss and gradient rows NaN."""
    import fastbound.triton_kernels  # noqa: F401

    score, sigma, x_t, x0, bad = _sigma_rows(graph, TRITON_DEVICE, dtype)
    code, mask_id = _names.GRAPH_CODES[graph], 6 if graph == "absorb" else -1
    ones = torch.ones_like(sigma)
    out, grad = torch.ops.fastbound.dse_forward_triton(score, sigma, x_t, x0, ones, code, mask_id, -100, True)
    safe = torch.where(bad, 1.0, sigma)  # (the rows that do not run read no sigma)
    want_out, want_grad = torch.ops.fastbound.dse_forward_triton(score, safe, x_t, x0, ones, code, mask_id, -100, True)
    _check_nan_rows(out, grad, bad, want_out, want_grad)
    ref = fb.reference.dse_loss(score.cpu().double(), safe.cpu().double(), x_t.cpu(), x0.cpu(), graph=graph)
    torch.testing.assert_close(out[~bad].cpu().double(), ref[~bad.cpu()], rtol=1e-5, atol=1e-5)

    # The integration step runs the same row code: each row its own sequence.
    acc = torch.zeros(8, 2, dtype=torch.float64, device=TRITON_DEVICE)
    torch.ops.fastbound.integrate_step_triton(score[:, None], x_t[:, None], x0[:, None], sigma.double(), ones.double(),
                                              acc, None, _names.LOSS_CODES["dse"], code, mask_id, -100)
    assert acc[:4].isnan().all() and torch.isfinite(acc[4:]).all()


@pytest.mark.triton
def test_off_mode_public_losses_give_nan_rows(accelerator):
    """With the checks off, `dse_loss` / `dce_loss` on the Triton kernels: NaN rows for bad ids and sigma, a
    NaN-filled accumulator for an integration index out of range."""
    fb.value_checks("off")
    score, sigma, x_t, x0, bad = _sigma_rows("absorb", TRITON_DEVICE, torch.float32)
    out = fb.dse_loss(score, sigma, x_t, x0, backend="triton")
    assert out[bad].isnan().all() and torch.isfinite(out[~bad]).all()
    x_t_bad = x_t.clone()
    x_t_bad[4] = 9
    assert fb.dce_loss(score, x_t_bad, x0.clamp(-100, 5), backend="triton")[4] == 0  # unmasked for the DCE
    assert fb.dse_loss(score, 1.0, x_t_bad, x0, backend="triton")[4].isnan()
    acc = torch.zeros(2, 2, dtype=torch.float64, device=TRITON_DEVICE)
    fb.integrate_step(score[None, 4:6], x_t[None, 4:6], x0[None, 4:6], 1.0, 1.0, acc, loss="dse",
                      index=torch.tensor([5], device=TRITON_DEVICE), backend="triton")
    assert acc.isnan().all()
    fb.value_checks("sync")
    with pytest.raises(ValueError, match="sigma must be positive"):
        fb.dse_loss(score, sigma, x_t, x0, backend="triton")


# --- on a GPU -----------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_gpu_kernels_give_nan_rows_for_a_bad_sigma(backend, graph):
    if backend == "cuda" and not fb._backend.CUDA_KERNELS:
        pytest.skip("fastbound was built without CUDA kernels")
    score, sigma, x_t, x0, bad = _sigma_rows(graph, "cuda", torch.float32)
    score.requires_grad_(True)
    with fb.value_checks("off"):
        out = fb.dse_loss(score, sigma, x_t, x0, graph=graph, backend=backend)
        out.sum().backward()
    safe = torch.where(bad, 1.0, sigma)
    ref = fb.reference.dse_loss(score.detach().cpu().double(), safe.cpu().double(), x_t.cpu(), x0.cpu(), graph=graph)
    assert out[bad].isnan().all() and score.grad[bad].isnan().all() and torch.isfinite(score.grad[~bad]).all()
    torch.testing.assert_close(out[~bad].detach().cpu().double(), ref[~bad.cpu()], rtol=1e-5, atol=1e-5)


ASYNC_PROBE = textwrap.dedent("""
    import torch, fastbound as fb
    fb.value_checks("async")
    score = torch.randn(4, 7, device="cuda")
    x_t = torch.tensor([6, 6, 9, 6], device="cuda")
    x0 = torch.tensor([1, 2, 2, 3], device="cuda")
    fb.dse_loss(score, 1.0, x_t.clamp(max=6), x0)  # valid: loads the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    loss = fb.dse_loss(score, 1.0, x_t, x0)  # no sync: it would raise here
    torch.cuda.set_sync_debug_mode("default")
    print("launched", flush=True)
    torch.cuda.synchronize()
    print("no assert")
""")


@pytest.mark.cuda
def test_async_mode_raises_on_the_device():
    """A bad id in "async" mode: no sync at the call, a device-side assert at the next sync (the assert
    is the checks', not a kernel's: one backend covers it). In a subprocess: the assert poisons the
    CUDA context."""
    env = {k: val for k, val in os.environ.items() if k != "FASTBOUND_VALUE_CHECKS"}
    run = subprocess.run([sys.executable, "-c", ASYNC_PROBE], cwd=pathlib.Path(__file__).parents[1], env=env,
                         capture_output=True, text=True, timeout=300)
    assert "launched" in run.stdout and "no assert" not in run.stdout, run.stdout + run.stderr
    assert run.returncode != 0 and "device-side assert" in run.stderr, run.stderr[-2000:]


def test_flag_and_choice_arguments_are_checked_by_type():
    """`inplace` switches a write over the scores on: only True or False is taken (the string "no" is
    truthy); an unhashable `graph` gets the choice's ValueError, not a TypeError from a dict lookup."""
    import fastbound as fb

    s, x_t, x0, sigma = torch.randn(2, 3, 5), torch.full((2, 3), 4), torch.randint(0, 4, (2, 3)), torch.ones(2, 1)
    for call in (lambda: fb.dse_loss(s, sigma, x_t, x0, inplace="no"), lambda: fb.dce_loss(s, x_t, x0, inplace=1)):
        with pytest.raises(TypeError, match="inplace must be True or False"):
            call()
    with pytest.raises(ValueError, match="graph must be one of"):
        fb.dse_loss(s, sigma, x_t, x0, graph=["absorb"])
    assert fb.dse_loss(s, sigma, x_t, x0, inplace=False).shape == (2, 3)


INTEGER_ARGUMENTS = {
    "dse_loss": ("mask_id", "ignore_index"),
    "dce_loss": ("mask_id", "ignore_index"),
    "integrate_step": ("ignore_index",),
    "philox_words": ("n", "seed", "offset"),
    "perturb": ("seed", "offset"),
    "nll_bound": ("n_samples", "seed", "batch_size"),
}


def _integer_calls(n, only=None):
    """Calls with their integer arguments given as ``n(value)`` (every one, or only the one named)."""
    from fastbound import continuous

    def i(name, value):
        return n(value) if only in (None, name) else value

    torch.manual_seed(0)
    s, x_t, x0, sigma = torch.randn(2, 3, 5), torch.full((2, 3), 4), torch.randint(0, 4, (2, 3)), torch.ones(2, 1)
    x0[0, 0] = -7
    x = torch.rand(2, 4) * 2 - 1
    return {
        "dse_loss": lambda: fb.dse_loss(s, sigma, x_t, x0, mask_id=i("mask_id", 4), ignore_index=i("ignore_index", -7)),
        "dce_loss": lambda: fb.dce_loss(s, x_t, x0, mask_id=i("mask_id", 4), ignore_index=i("ignore_index", -7)),
        "integrate_step": lambda: fb.integrate_step(s, x_t, x0, sigma.reshape(2), torch.ones(2),
                                                    torch.zeros(2, 2, dtype=torch.float64),
                                                    ignore_index=i("ignore_index", -7)),
        "philox_words": lambda: fb.noise.philox_words(i("n", 3), seed=i("seed", 2**64 - 1), offset=i("offset", 5)),
        "perturb": lambda: continuous.perturb(x, torch.zeros(2), warm="uniform", warm_std=0.1, seed=i("seed", 3),
                                              offset=i("offset", 2**63)).z,
        "nll_bound": lambda: continuous.nll_bound(lambda z, lam: torch.zeros_like(z), x, n_samples=i("n_samples", 2),
                                                  seed=i("seed", 1), batch_size=i("batch_size", 1)).nll,
    }


@pytest.mark.parametrize("api", list(INTEGER_ARGUMENTS))
def test_integer_arguments_take_numpy_integers(api):
    """Every integer argument takes what `operator.index` takes (an index from a NumPy array, say)
    and gives what the Python int gives."""
    import numpy as np

    def numpy_int(value):
        return np.uint64(value) if value >= 2**63 else np.int64(value)

    torch.testing.assert_close(_integer_calls(numpy_int)[api](), _integer_calls(int)[api](), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [True, 2.0, torch.tensor(2)], ids=["bool", "float", "tensor"])
@pytest.mark.parametrize("api, argument", [(api, arg) for api, args in INTEGER_ARGUMENTS.items() for arg in args])
def test_integer_arguments_refuse_bools_floats_and_tensors(api, argument, bad):
    """One argument at a time, so that each argument's own check is what raises."""
    with pytest.raises(TypeError, match=f"^{argument} must be an int, got"):
        _integer_calls(lambda value: bad, only=argument)[api]()


def test_int_or_tensor_arguments_take_numpy_integers():
    """num_masked and length also take an integer tensor; as ints they follow `as_int`."""
    import numpy as np

    from fastbound.continuous import LogisticProposal

    x0 = torch.randint(0, 9, (2, 8))
    for n in (int, np.int64):
        masked = fb.perturb(x0, num_masked=n(3), vocab_size=9, seed=1)[1]
        assert masked.sum(1).tolist() == [3, 3]
        assert fb.noise.sample_num_masked(4, length=n(8), seed=1).shape == (4,)
        assert LogisticProposal(-5.0, 5.0).quadrature(n(3))[0].shape == (3,)
    with pytest.raises(TypeError, match="num_masked must be an int or an integer tensor, got bool"):
        fb.perturb(x0, num_masked=True, vocab_size=9, seed=1)
    with pytest.raises(TypeError, match="length must be an int or an integer tensor, got float"):
        fb.noise.sample_num_masked(4, length=8.0, seed=1)
    with pytest.raises(TypeError, match="n_steps must be an int, got bool"):
        LogisticProposal(-5.0, 5.0).quadrature(True)
