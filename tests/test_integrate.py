"""The likelihood integration step (`fastbound.integrate_step`) against its oracle.

The oracle is the reference loss followed by a per-sequence sum
(`fastbound.reference.integrate_step`); the kernel must match it on every loss,
graph and dtype, on odd shapes and strides, with duplicate accumulator rows, and
refuse bad input with an error naming the argument.
"""

import pytest
import torch

from conftest import TRITON_DEVICE
from fastbound import reference
from fastbound.integrate import integrate_step

CASES = [("dce", "absorb"), ("dse", "absorb"), ("dse", "uniform")]
TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def make_inputs(loss, graph, n_seq, length, n_cols, dtype=torch.float32, seed=0, device="cpu"):
    """Scores, ids (a mix of corrupted and clean positions), per-sequence sigma and weight."""
    gen = torch.Generator().manual_seed(seed)
    out = (torch.randn(n_seq, length, n_cols, generator=gen) * 2).to(dtype)
    real = n_cols - 1 if graph == "absorb" else n_cols  # absorbing: the last column is the mask
    x0 = torch.randint(0, max(real, 1), (n_seq, length), generator=gen)
    corrupt = torch.rand(n_seq, length, generator=gen) < 0.6
    noise = torch.full_like(x0, n_cols - 1) if graph == "absorb" else torch.randint(0, n_cols, x0.shape, generator=gen)
    x_t = torch.where(corrupt, noise, x0)
    sigma = torch.rand(n_seq, generator=gen, dtype=torch.float64) * 3 + 0.05
    weight = torch.rand(n_seq, generator=gen, dtype=torch.float64) + 0.5
    return [t.to(device) for t in (out, x_t, x0, sigma, weight)]


def run_both(out, x_t, x0, sigma, weight, *, loss, graph, index=None, n_slots=None, backend="cpu", **kw):
    n_slots = out.shape[0] if n_slots is None else n_slots
    acc = torch.rand(n_slots, 2, dtype=torch.float64, device=out.device)  # accumulates onto what is there
    expected = reference.integrate_step(out, x_t, x0, sigma, weight, acc, loss=loss, graph=graph, index=index, **kw)
    got = integrate_step(out, x_t, x0, sigma, weight, acc, loss=loss, graph=graph, index=index, backend=backend, **kw)
    assert got is acc
    return got, expected


def assert_close(got, expected, dtype):
    torch.testing.assert_close(got, expected, rtol=TOL[dtype], atol=TOL[dtype] * 10)


@pytest.mark.parametrize("loss,graph", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 1, 2), (1, 9, 130), (4, 3, 2500)])
def test_matches_oracle(loss, graph, dtype, shape):
    out, x_t, x0, sigma, weight = make_inputs(loss, graph, *shape, dtype=dtype)
    assert_close(*run_both(out, x_t, x0, sigma, weight, loss=loss, graph=graph), dtype)


@pytest.mark.parametrize("loss,graph", CASES)
def test_rows_split_into_chunks(loss, graph):
    # 40000 columns: each CPU task reduces one row; 200 rows of 10 columns: one task per sequence.
    for shape in [(2, 3, 40000), (2, 200, 10)]:
        out, x_t, x0, sigma, weight = make_inputs(loss, graph, *shape)
        assert_close(*run_both(out, x_t, x0, sigma, weight, loss=loss, graph=graph), torch.float32)


@pytest.mark.parametrize("loss,graph", CASES)
def test_strided_views_and_shared_rows(loss, graph):
    out, x_t, x0, sigma, weight = make_inputs(loss, graph, 4, 6, 9)
    wide = torch.cat([out, torch.randn(4, 6, 3)], -1)[..., :9]  # row stride 12, not 9
    sequence_major = out.transpose(0, 1).contiguous().transpose(0, 1)  # stride(0) < stride(1)
    index = torch.tensor([2, 0, 2, 1])  # two sequences share accumulator row 2
    for view in (wide, sequence_major):
        assert not view.is_contiguous()
        got, expected = run_both(view, x_t, x0, sigma, weight, loss=loss, graph=graph, index=index, n_slots=3)
        assert_close(got, expected, torch.float32)


@pytest.mark.parametrize("loss,graph", CASES)
def test_ignore_index_and_repeated_steps(loss, graph):
    out, x_t, x0, sigma, weight = make_inputs(loss, graph, 3, 8, 6)
    x0 = x0.clone()
    x0[:, :3] = -100  # a prompt: contributes nothing
    acc = torch.zeros(3, 2, dtype=torch.float64)
    expected = torch.zeros(3, 2, dtype=torch.float64)
    for _ in range(3):
        integrate_step(out, x_t, x0, sigma, weight, acc, loss=loss, graph=graph)
        expected = reference.integrate_step(out, x_t, x0, sigma, weight, expected, loss=loss, graph=graph)
    assert_close(acc, expected, torch.float32)
    one = reference.integrate_step(out, x_t, x0, sigma, weight, torch.zeros(3, 2, dtype=torch.float64),
                                   loss=loss, graph=graph)
    assert_close(acc, 3 * one, torch.float32)


def test_dce_mask_column_and_logits_without_it():
    out, x_t, x0, sigma, weight = make_inputs("dce", "absorb", 3, 5, 8)
    sums = []
    for mask_value in (50.0, -3.0):  # the mask column is left out of the softmax: its value must not matter
        out[..., 7] = mask_value
        got, expected = run_both(out, x_t, x0, None, weight, loss="dce", graph="absorb")
        assert_close(got, expected, torch.float32)
        sums.append(integrate_step(out, x_t, x0, None, weight, torch.zeros(3, 2, dtype=torch.float64)))
    assert_close(sums[0], sums[1], torch.float32)
    # mask_id >= V: the logits cover the real tokens only; masked positions carry id V.
    x_t_beyond = torch.where(x_t == 7, 8, x_t)
    got, expected = run_both(out, x_t_beyond, x0, None, weight, loss="dce", graph="absorb", mask_id=8)
    assert_close(got, expected, torch.float32)


@pytest.mark.parametrize("loss,graph", CASES)
def test_empty_batch_and_empty_sequences(loss, graph):
    for shape in [(0, 4, 5), (3, 0, 5)]:
        out, x_t, x0, sigma, weight = make_inputs(loss, graph, *shape)
        got, expected = run_both(out, x_t, x0, sigma, weight, loss=loss, graph=graph)
        assert_close(got, expected, torch.float32)


def test_no_gradient_and_thread_count_independent():
    out, x_t, x0, sigma, weight = make_inputs("dce", "absorb", 8, 64, 600)
    out.requires_grad_(True)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            acc = torch.zeros(8, 2, dtype=torch.float64)
            integrate_step(out, x_t, x0, None, weight, acc)
            results.append(acc)
    finally:
        torch.set_num_threads(threads)
    assert results[0].grad_fn is None and not results[0].requires_grad
    assert torch.equal(results[0], results[1])  # fixed chunks, fixed order: bit-identical


def test_opcheck():
    out, x_t, x0, sigma, weight = make_inputs("dse", "uniform", 2, 3, 5)
    acc = torch.zeros(2, 2, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastbound.integrate_step.default,
                          (out, x_t, x0, sigma, weight, acc, None, 0, 1, 4, -100),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(out=torch.zeros(3, 5)), "out must have shape"),
        (dict(out=torch.zeros(3, 5, 6, dtype=torch.int64)), "out must have dtype"),
        (dict(x_t=torch.zeros(3, 4, dtype=torch.int64)), "x_t must have shape"),
        (dict(x0=torch.zeros(3, 5)), "x0 must hold integer"),
        (dict(acc=torch.zeros(3, 2)), "acc must have dtype"),
        (dict(acc=torch.zeros(2, 2, dtype=torch.float64)), "acc must have one row per sequence"),
        (dict(acc=torch.zeros(3, 3, dtype=torch.float64)), "acc must be a contiguous"),
        (dict(index=torch.tensor([0, 1, 3])), "index contains id 3"),
        (dict(index=torch.tensor([0, 1])), "index must have shape"),
        (dict(weight=torch.ones(3, 5)), "weight must be a float or a"),
        (dict(loss="nll"), "loss must be one of"),
        (dict(graph="uniform"), "loss='dce' is the absorbing"),
        (dict(x0_value=6), "x0 contains id 6"),
        (dict(x0_value=5), "x0 contains the mask id 5"),
        (dict(x_t_value=9), "x_t contains id 9"),
    ],
)
def test_bad_input(change, match):
    out, x_t, x0, sigma, weight = make_inputs("dce", "absorb", 3, 5, 6)
    args = dict(out=out, x_t=x_t, x0=x0, sigma=None, weight=weight, acc=torch.zeros(3, 2, dtype=torch.float64))
    kwargs = dict(loss="dce", graph="absorb")
    if "x0_value" in change:
        x0 = x0.clone()
        x0[1, 2] = change.pop("x0_value")
        x_t = x_t.clone()
        x_t[1, 2] = 5  # masked, so the kernel would read x0
        args.update(x0=x0, x_t=x_t)
    if "x_t_value" in change:
        x_t = x_t.clone()
        x_t[0, 0] = change.pop("x_t_value")
        args.update(x_t=x_t)
    for key in ("loss", "graph", "index"):
        if key in change:
            kwargs[key] = change.pop(key)
    if "acc" in change and change["acc"].shape[0] == 2:
        kwargs.pop("index", None)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        integrate_step(args.pop("out"), args.pop("x_t"), args.pop("x0"), args.pop("sigma"), args.pop("weight"),
                       args.pop("acc"), **kwargs)


def test_bad_sigma_for_dse():
    out, x_t, x0, sigma, weight = make_inputs("dse", "absorb", 3, 5, 6)
    acc = torch.zeros(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="sigma must be positive"):
        integrate_step(out, x_t, x0, -sigma, weight, acc, loss="dse")
    with pytest.raises(ValueError, match="sigma is required"):
        integrate_step(out, x_t, x0, None, weight, acc, loss="dse")
    with pytest.raises(ValueError, match="mask_id must be a column of out"):
        integrate_step(out, x_t, x0, sigma, weight, acc, loss="dse", mask_id=out.shape[-1])


@pytest.mark.triton
@pytest.mark.parametrize("loss,graph", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_triton_matches_oracle(loss, graph, dtype):
    for shape, index in [((3, 4, 37), None), ((2, 1, 2), torch.tensor([1, 1])), ((0, 3, 5), None)]:
        out, x_t, x0, sigma, weight = make_inputs(loss, graph, *shape, dtype=dtype, device=TRITON_DEVICE)
        if index is not None:
            index = index.to(TRITON_DEVICE)
        got, expected = run_both(out, x_t, x0, sigma, weight, loss=loss, graph=graph, index=index,
                                 n_slots=2 if index is not None else None, backend="triton")
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-4)


@pytest.mark.triton
def test_triton_strided_and_mask_beyond_logits():
    out, x_t, x0, sigma, weight = make_inputs("dce", "absorb", 3, 5, 8, device=TRITON_DEVICE)
    wide = torch.cat([out, out[..., :2]], -1)[..., :8]
    got, expected = run_both(wide, x_t, x0, None, weight, loss="dce", graph="absorb", backend="triton")
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-4)
    x_t_beyond = torch.where(x_t == 7, 8, x_t)
    got, expected = run_both(out, x_t_beyond, x0, None, weight, loss="dce", graph="absorb", mask_id=8,
                             backend="triton")
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("loss,graph", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cuda_matches_oracle(loss, graph, dtype):
    from fastbound._backend import has_cuda_kernels

    if not has_cuda_kernels("fastbound::integrate_step"):
        pytest.skip("fastbound was built without CUDA kernels")
    for shape in [(3, 5, 7), (2, 1, 2), (4, 3, 40000), (0, 2, 3)]:
        out, x_t, x0, sigma, weight = make_inputs(loss, graph, *shape, dtype=dtype, device="cuda")
        index = torch.zeros(shape[0], dtype=torch.int64, device="cuda")  # every sequence into row 0
        got, expected = run_both(out, x_t, x0, sigma, weight, loss=loss, graph=graph, index=index, n_slots=1,
                                 backend="cuda")
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-4)


EXTREME_SIGMAS = [1e-8, 1e-6, 0.3, 30.0, 89.0, 100.0, 500.0]


@pytest.mark.triton
@pytest.mark.parametrize("graph", ["absorb", "uniform"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_extreme_sigma(graph, dtype):
    """One sequence per sigma, from 1e-8 to past float32's e^sigma range: the float64 oracle's sums."""
    out, x_t, x0, _, weight = make_inputs("dse", graph, len(EXTREME_SIGMAS), 3, 9, dtype=dtype, device=TRITON_DEVICE)
    sigma = torch.tensor(EXTREME_SIGMAS, dtype=torch.float64, device=TRITON_DEVICE)
    zeros = torch.zeros(len(EXTREME_SIGMAS), 2, dtype=torch.float64, device=TRITON_DEVICE)
    got = integrate_step(out, x_t, x0, sigma, weight, zeros.clone(), loss="dse", graph=graph, backend="triton")
    expected = reference.integrate_step(out.double(), x_t, x0, sigma, weight, zeros, loss="dse", graph=graph)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=2e-5 if dtype == torch.float32 else 1e-10, atol=1e-6)


@pytest.mark.triton
@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_triton_sigma_past_float64_overflow(graph):
    """e^1000 overflows float64: the sums are the sigma -> inf limit (the oracle at sigma = 700)."""
    out, x_t, x0, _, weight = make_inputs("dse", graph, 2, 4, 9, dtype=torch.float64, device=TRITON_DEVICE)
    zeros = torch.zeros(2, 2, dtype=torch.float64, device=TRITON_DEVICE)
    got = integrate_step(out, x_t, x0, 1000.0, weight, zeros.clone(), loss="dse", graph=graph, backend="triton")
    expected = reference.integrate_step(out, x_t, x0, 700.0, weight, zeros, loss="dse", graph=graph)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# (loss, graph, (x_t, x0) pairs with an id out of range, a pair whose x0 is never read) for V = 7.
BAD_IDS = [
    ("dce", "absorb", [(6, 7), (6, 6), (6, -1)], (2, 50)),
    ("dse", "absorb", [(6, 6), (6, 9), (6, -2), (9, 2), (-1, 2)], (2, 50)),
    ("dse", "uniform", [(2, 7), (2, -3), (7, 2), (-3, 2), (7, -100)], (2, -100)),
]


@pytest.mark.triton
@pytest.mark.parametrize("loss,graph,bad_pairs,unread", BAD_IDS)
def test_triton_op_nan_for_ids_out_of_range(loss, graph, bad_pairs, unread):
    """The raw op (no Python checks, as under torch.compile) adds NaN to a sequence with a bad id, as CUDA does."""
    if torch.device(TRITON_DEVICE).type != "cpu":
        pytest.skip("compares with the C++ op, which runs on CPU tensors")
    from fastbound._names import GRAPH_CODES, LOSS_CODES
    import fastbound.triton_kernels.integrate  # noqa: F401

    out, x_t, x0, sigma, weight = make_inputs(loss, graph, 3, 4, 7)
    x_t[2, 0], x0[2, 0] = unread
    codes = (LOSS_CODES[loss], GRAPH_CODES[graph], 6, -100)
    for pair in bad_pairs:
        bad_t, bad_0 = x_t.clone(), x0.clone()
        bad_t[1, 2], bad_0[1, 2] = pair
        got = torch.zeros(3, 2, dtype=torch.float64)
        torch.ops.fastbound.integrate_step_triton(out, bad_t, bad_0, sigma, weight, got, None, *codes)
        bad_t[1, 2], bad_0[1, 2] = 0, -100  # a row that adds nothing: the C++ op gives the other sequences
        expected = torch.zeros(3, 2, dtype=torch.float64)
        torch.ops.fastbound.integrate_step(out, bad_t, bad_0, sigma, weight, expected, None, *codes)
        assert got[1].isnan().all(), pair
        torch.testing.assert_close(got[[0, 2]], expected[[0, 2]], rtol=2e-5, atol=2e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("loss,graph,bad_pairs,unread", BAD_IDS)
def test_cuda_op_nan_for_ids_out_of_range(loss, graph, bad_pairs, unread):
    """The CUDA op follows the same bad-id rule as the Triton op and the loss kernels."""
    from fastbound._names import GRAPH_CODES, LOSS_CODES

    out, x_t, x0, sigma, weight = make_inputs(loss, graph, 3, 4, 7)
    x_t[2, 0], x0[2, 0] = unread
    codes = (LOSS_CODES[loss], GRAPH_CODES[graph], 6, -100)
    for pair in bad_pairs:
        bad_t, bad_0 = x_t.clone(), x0.clone()
        bad_t[1, 2], bad_0[1, 2] = pair
        got = torch.zeros(3, 2, dtype=torch.float64, device="cuda")
        torch.ops.fastbound.integrate_step(out.cuda(), bad_t.cuda(), bad_0.cuda(), sigma.cuda(), weight.cuda(),
                                           got, None, *codes)
        bad_t[1, 2], bad_0[1, 2] = 0, -100
        expected = torch.zeros(3, 2, dtype=torch.float64)
        torch.ops.fastbound.integrate_step(out, bad_t, bad_0, sigma, weight, expected, None, *codes)
        assert got[1].isnan().all(), pair
        torch.testing.assert_close(got.cpu()[[0, 2]], expected[[0, 2]], rtol=2e-5, atol=2e-4)


def test_host_checks_name_index_first_and_a_negative_dse_id():
    # On the host the id and sigma checks are one C++ pass; an out-of-range index is still named
    # first, and -1 is an id like any other (not a "no exception" marker) for the score entropy.
    out = torch.randn(2, 3, 9)
    x0 = torch.zeros(2, 3, dtype=torch.long)
    x_t = torch.full((2, 3), 8)
    sigma, acc = torch.ones(2, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64)
    bad_xt = x_t.clone()
    bad_xt[0, 0] = 99
    with pytest.raises(ValueError, match="index"):
        integrate_step(out, bad_xt, x0, sigma, None, acc, loss="dse", index=torch.tensor([0, 5]))
    bad_xt[0, 0] = -1
    bad_x0 = x0.clone()
    bad_x0[1, 1] = 99
    with pytest.raises(ValueError, match="^x_t contains id -1"):
        integrate_step(out, bad_xt, bad_x0, sigma, None, acc, loss="dse")


@pytest.mark.parametrize("backend", [None, pytest.param("triton", marks=pytest.mark.triton)])
def test_writing_acc_bumps_its_version(backend):
    """acc is written in place: its version moves, so a tensor saved for a backward before the step
    makes autograd raise instead of using the new sums (found: the op's write did not bump it, and
    ``(acc * w).sum().backward()`` then gave w the new acc as its gradient)."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    out, x_t, x0, sigma, weight = make_inputs("dse", "absorb", 2, 3, 6, device=device)
    acc = torch.zeros(2, 2, dtype=torch.float64, device=device)
    w = torch.ones(2, 2, dtype=torch.float64, device=device, requires_grad=True)
    saved = (acc * w).sum()
    before = acc._version
    integrate_step(out, x_t, x0, sigma, weight, acc, loss="dse", backend=backend)
    assert acc._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


def test_an_accumulator_that_requires_grad_is_refused_by_name():
    """Both integration steps add into acc in place below autograd, so an acc that requires grad
    would get no gradient (PyTorch refuses an in-place op on such a leaf): a ValueError naming acc,
    on the first call and on the cached fast path; under no_grad the update runs, as torch's would."""
    import fastbound.continuous as fc

    acc = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    calls = [lambda: integrate_step(torch.randn(1, 3, 5), torch.full((1, 3), 4), torch.tensor([[1, 2, 3]]),
                                    torch.tensor([0.5]), 1.0, acc)]
    calls += [lambda: fc.integrate_step(torch.randn(1, 4), torch.randn(1, 4), acc, weight=1.0)] * 2
    fc.integrate_step(torch.randn(1, 4), torch.randn(1, 4), torch.zeros(1, 2, dtype=torch.float64), weight=1.0)
    for call in calls:
        with pytest.raises(ValueError, match="acc requires grad"):
            call()
    assert torch.equal(acc, torch.zeros(1, 2, dtype=torch.float64))
    with torch.no_grad():
        calls[1]()
    assert bool((acc[:, 1] > 0).all())
