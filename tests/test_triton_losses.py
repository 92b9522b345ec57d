"""Triton DSE / DCE kernels (`fastbound.triton_kernels`) against the oracle and the C++ kernels.

On a machine without a GPU these run in Triton's interpreter (see conftest.py),
which is slow: every shape here is tiny.
"""

import pytest
import torch

import fastbound as fb
from fastbound import reference as ref
from conftest import TRITON_DEVICE
import helpers
from helpers import TOL
from helpers import magnitude as _magnitude

pytestmark = pytest.mark.triton

DEV = TRITON_DEVICE
LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _ops_loaded():
    import fastbound.triton_kernels  # noqa: F401


def make_case(loss, shape, n_cols, dtype, *, seed=0):
    """`helpers.make_case` on DEV."""
    return helpers.make_case(loss, shape, n_cols, dtype, seed=seed, device=DEV)


def run(impl, loss, score, sigma, x_t, x0, **kw):
    """Loss and the gradient of ``out . probe`` for backend "triton", "cpu" or the oracle "ref"."""
    s = score.detach().clone().requires_grad_()
    if impl == "ref":
        fn = ref.dce_loss if loss == "dce" else ref.dse_loss
        kw.pop("inplace", None)
    else:
        fn, kw = (fb.dce_loss if loss == "dce" else fb.dse_loss), dict(kw, backend=impl)
    t = s * 1.0 if kw.get("inplace") else s  # inplace=True refuses a leaf that requires grad
    if loss == "dce":
        out = fn(t, x_t, x0, **kw)
    else:
        out = fn(t, sigma, x_t, x0, graph=loss, **kw)
    probe = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype, device=out.device).view(out.shape)
    (grad,) = torch.autograd.grad(out, s, probe) if out.numel() else (torch.zeros_like(s),)
    return out.detach(), grad


def check(loss, score, sigma, x_t, x0, **kw):
    """Triton against the float64 oracle and against the C++ kernels (same dtype)."""
    out, grad = run("triton", loss, score, sigma, x_t, x0, **kw)
    acc = torch.float64 if score.dtype == torch.float64 else torch.float32
    assert out.dtype == acc and grad.dtype == score.dtype and grad.shape == score.shape

    sig64 = sigma.double() if torch.is_tensor(sigma) else sigma
    exp_out, exp_grad = run("ref", loss, score.double(), sig64, x_t, x0, **kw)
    (lr, la), (gr, ga) = TOL[score.dtype]
    magnitude = _magnitude(exp_out)
    torch.testing.assert_close(out.double(), exp_out, rtol=lr, atol=la * magnitude)
    torch.testing.assert_close(grad.double(), exp_grad, rtol=gr, atol=ga * _magnitude(exp_grad))

    if torch.device(DEV).type == "cpu":
        cpu_out, cpu_grad = run("cpu", loss, score, sigma, x_t, x0, **kw)
        torch.testing.assert_close(out, cpu_out, rtol=1e-5, atol=1e-5 * magnitude)
        torch.testing.assert_close(grad, cpu_grad)  # dtype-default tolerances: at most an ulp or so
    return out, grad


@pytest.mark.parametrize("loss", ["absorb", "uniform", "dce"])
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_matches_oracle_and_cpu(loss, dtype, reduction):
    score, sigma, x_t, x0 = make_case(loss, (2, 3), 13, dtype)
    check(loss, score, sigma, x_t, x0, reduction=reduction)


@pytest.mark.parametrize("loss", ["absorb", "uniform", "dce"])
def test_float64(loss):
    score, sigma, x_t, x0 = make_case(loss, (2, 3), 13, torch.float64)
    check(loss, score, sigma, x_t, x0, weight=torch.rand(2, 3, dtype=torch.float64, device=DEV))


@pytest.mark.parametrize("loss", ["absorb", "uniform", "dce"])
def test_gradcheck(loss):
    score, sigma, x_t, x0 = make_case(loss, (3,), 5, torch.float64, seed=1)
    x_t[0] = 4  # at least one masked row

    def f(s):
        if loss == "dce":
            return fb.dce_loss(s, x_t, x0, backend="triton")
        return fb.dse_loss(s, sigma.view(3), x_t, x0, graph=loss, backend="triton")

    assert torch.autograd.gradcheck(f, (score.requires_grad_(),))


@pytest.mark.parametrize("loss", ["absorb", "uniform", "dce"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_weight_and_ignore_index(loss, reduction):
    score, sigma, x_t, x0 = make_case(loss, (2, 4), 11, torch.float32, seed=2)
    x0[0, 1] = x0[1, 3] = -7
    x_t[0, 1] = x_t[1, 3] = 10  # would contribute if not ignored
    weight = torch.rand(2, 4, device=DEV) + 0.5
    out, grad = check(loss, score, sigma, x_t, x0, weight=weight, reduction=reduction, ignore_index=-7)
    assert not grad[0, 1].any() and not grad[1, 3].any()
    if reduction == "none":
        assert out[0, 1] == 0 and out[1, 3] == 0


@pytest.mark.parametrize("loss", ["absorb", "uniform"])
@pytest.mark.parametrize("sigma_form", ["float", "per_sequence", "per_token"])
def test_sigma_forms(loss, sigma_form):
    score, sigma, x_t, x0 = make_case(loss, (2, 3), 9, torch.float32, seed=3)
    sigma = {"float": 0.8, "per_sequence": sigma, "per_token": torch.rand(2, 3, device=DEV) * 2 + 0.01}[sigma_form]
    check(loss, score, sigma, x_t, x0, reduction="sum")


@pytest.mark.parametrize("loss", ["absorb", "uniform", "dce"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace(loss, dtype):
    score, sigma, x_t, x0 = make_case(loss, (2, 3), 13, dtype, seed=4)
    out, grad = run("triton", loss, score, sigma, x_t, x0, reduction="sum")
    out_ip, grad_ip = run("triton", loss, score, sigma, x_t, x0, reduction="sum", inplace=True)
    torch.testing.assert_close(out_ip, out, rtol=0, atol=0)
    torch.testing.assert_close(grad_ip, grad, rtol=0, atol=0)
    check(loss, score, sigma, x_t, x0, reduction="sum", inplace=True)


@pytest.mark.parametrize("loss", ["absorb", "uniform", "dce"])
@pytest.mark.parametrize("n_cols", [2, 1031])
def test_odd_vocab_sizes(loss, n_cols):
    score, sigma, x_t, x0 = make_case(loss, (3,), n_cols, torch.float32, seed=5)
    check(loss, score, sigma, x_t, x0)


@pytest.mark.parametrize("loss", ["absorb", "uniform", "dce"])
def test_many_blocks_per_row(loss, monkeypatch):
    """Rows that span several chunks, with x0 and x_t in later chunks than the first."""
    from fastbound.triton_kernels import _common

    monkeypatch.setattr(_common, "MAX_BLOCK", 32)
    score, sigma, x_t, x0 = make_case(loss, (4,), 75, torch.float32, seed=6)
    x0[:2] = torch.tensor([40, 73])
    check(loss, score, sigma, x_t, x0)


def test_dce_chunk_of_minus_inf(monkeypatch):
    """A whole chunk of -inf logits (a masked-out vocabulary range) adds nothing, not NaN."""
    from fastbound.triton_kernels import _common

    monkeypatch.setattr(_common, "MAX_BLOCK", 32)
    score, _, x_t, x0 = make_case("dce", (3,), 80, torch.float32, seed=7)
    score[:, :40] = float("-inf")
    x_t[:] = 79
    x0[:] = torch.tensor([40, 55, 78])
    out, grad = check("dce", score, None, x_t, x0)
    assert torch.isfinite(out).all() and not grad[:, :40].any()


@pytest.mark.parametrize("mask_id", [0, 5, 13, 20])
def test_dce_mask_id(mask_id):
    """mask_id inside the logits (left out of the softmax) or beyond them (real tokens only)."""
    score, _, x_t, x0 = make_case("dce", (6,), 13, torch.float32, seed=8)
    x0 = torch.where(x0 == mask_id, (x0 + 1) % 12, x0)
    x_t = torch.where(torch.arange(6, device=DEV) < 4, torch.full_like(x_t, mask_id), x0)
    _, grad = check("dce", score, None, x_t, x0, mask_id=mask_id)
    if mask_id < 13:
        assert not grad[:, mask_id].any()


@pytest.mark.parametrize("loss", ["absorb", "uniform", "dce"])
@pytest.mark.parametrize("shape", [(1,), (1, 1), (0,), (2, 0)])
def test_one_token_and_empty_batch(loss, shape):
    score, sigma, x_t, x0 = make_case(loss, shape, 7, torch.float32, seed=9)
    if x_t.numel():
        x_t.fill_(6 if loss != "uniform" else 2)
    out, _ = check(loss, score, sigma, x_t, x0)
    assert out.shape == shape


@pytest.mark.parametrize("loss", ["absorb", "uniform", "dce"])
def test_sliced_scores(loss):
    """Scores that are a column slice of a wider tensor: rows strided by more than V."""
    score, sigma, x_t, x0 = make_case(loss, (2, 3), 21, torch.float32, seed=10)
    narrow = score[..., :12]
    x_t, x0 = x_t.clamp(max=11), x0.clamp(max=10)
    if loss != "uniform":
        x_t[:, :2] = 11
    assert narrow.stride(-2) == 21
    check(loss, narrow, sigma, x_t, x0)


def _op_args(loss, score, sigma, x_t, x0):
    scale = torch.rand(score.shape[0], device=DEV) + 0.5
    if loss == "dce":
        return (score, x_t, x0, scale, score.shape[1] - 1, -100)
    code = fb._names.GRAPH_CODES[loss]
    return (score, sigma.expand(x_t.shape).contiguous(), x_t, x0, scale, code, score.shape[1] - 1, -100)


@pytest.mark.parametrize("loss", ["absorb", "uniform", "dce"])
@pytest.mark.parametrize("need_grad", [False, True])
def test_ops_match_cpp_ops(loss, need_grad):
    """The raw *_triton ops on row-strided (N, V) scores give what the C++ ops give."""
    if torch.device(DEV).type != "cpu":
        pytest.skip("the C++ ops run on CPU tensors")
    score, sigma, x_t, x0 = make_case(loss, (5,), 10, torch.float32, seed=11)
    wide = torch.randn(5, 16)
    wide[:, :10] = score
    args = _op_args(loss, wide[:, :10], sigma, x_t, x0)
    name = "dce_forward" if loss == "dce" else "dse_forward"
    loss_t, grad_t = getattr(torch.ops.fastbound, name + "_triton")(*args, need_grad)
    loss_c, grad_c = getattr(torch.ops.fastbound, name)(*args, need_grad)
    torch.testing.assert_close(loss_t, loss_c)
    torch.testing.assert_close(grad_t, grad_c)
    assert grad_t.shape == ((5, 10) if need_grad else (0,))

    buf_t, buf_c = wide.clone(), wide.clone()
    loss_ip = getattr(torch.ops.fastbound, name + "_inplace_triton")(buf_t[:, :10], *args[1:])
    getattr(torch.ops.fastbound, name + "_inplace")(buf_c[:, :10], *args[1:])
    torch.testing.assert_close(loss_ip, loss_c)
    torch.testing.assert_close(buf_t, buf_c)  # the columns past the slice are untouched
    assert torch.equal(buf_t[:, 10:], wide[:, 10:])


def test_no_grad_returns_loss_only():
    score, sigma, x_t, x0 = make_case("absorb", (4,), 9, torch.float32, seed=12)
    with torch.no_grad():
        out = fb.dse_loss(score.requires_grad_(), sigma.view(4), x_t, x0, backend="triton")
    expected = ref.dse_loss(score.detach(), sigma.view(4), x_t, x0)
    torch.testing.assert_close(out, expected)
    assert out.grad_fn is None


def test_backend_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    score, sigma, x_t, x0 = make_case("absorb", (2,), 5, torch.float32)
    with pytest.raises(ValueError, match="backend='triton'.*TRITON_INTERPRET"):
        fb.dse_loss(score.cpu(), 1.0, x_t.cpu(), x0.cpu(), backend="triton")
    with pytest.raises(ValueError, match="backend='triton'.*TRITON_INTERPRET"):
        fb.dce_loss(score.cpu(), x_t.cpu(), x0.cpu(), backend="triton")


def test_op_input_checks_name_the_argument():
    score, sigma, x_t, x0 = make_case("absorb", (3,), 6, torch.float32)
    args = _op_args("absorb", score, sigma, x_t, x0)
    op = torch.ops.fastbound.dse_forward_triton
    with pytest.raises(ValueError, match="score"):
        op(score.view(-1), *args[1:], False)
    with pytest.raises(ValueError, match="sigma"):
        op(score, args[1].double(), *args[2:], False)
    with pytest.raises(ValueError, match="x0"):
        op(score, args[1], x_t, x0.int(), *args[4:], False)
    with pytest.raises(ValueError, match="graph"):
        op(*args[:5], 7, *args[6:], False)
    dce_args = _op_args("dce", score, None, x_t, x0)
    with pytest.raises(ValueError, match="row_scale"):
        torch.ops.fastbound.dce_forward_triton(score, x_t, x0, dce_args[3][:2], 5, -100, False)
    with pytest.raises(ValueError, match="mask_id"):
        torch.ops.fastbound.dce_forward_triton(score, x_t, x0, dce_args[3], -1, -100, False)


@pytest.mark.cuda
@pytest.mark.parametrize("loss", ["absorb", "dce"])
def test_compiles_fullgraph(loss):
    """torch.compile traces through the triton_ops (needs a GPU: the interpreter cannot be traced)."""
    score, sigma, x_t, x0 = make_case(loss, (2, 3), 13, torch.float32, seed=13)

    def f(s):
        if loss == "dce":
            return fb.dce_loss(s, x_t, x0, reduction="mean", backend="triton")
        return fb.dse_loss(s, sigma, x_t, x0, reduction="mean", backend="triton")

    eager_s, compiled_s = score.clone().requires_grad_(), score.clone().requires_grad_()
    expected = f(eager_s)
    expected.backward()
    out = torch.compile(f, fullgraph=True)(compiled_s)
    out.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(compiled_s.grad, eager_s.grad)


EXTREME_SIGMAS = [1e-8, 1e-6, 0.3, 30.0, 89.0, 100.0, 500.0]
"""From sigma -> 0 (r = 1/(e^sigma - 1) ~ 1e8) to e^sigma far past the float32 range (~88.7)."""


def extreme_sigma_case(loss, n_cols, dtype, seed):
    """Rows that all contribute: masked for "absorb"; for "uniform" half with x_t == x0, half not."""
    score, _, x_t, x0 = make_case(loss, (4,), n_cols, dtype, seed=seed)
    if loss == "absorb":
        x_t[:] = n_cols - 1
    else:
        x_t = torch.where(torch.arange(4, device=DEV) % 2 == 0, x0, (x0 + 3) % n_cols)
    return score, x_t, x0


@pytest.mark.parametrize("loss", ["absorb", "uniform"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sigma", EXTREME_SIGMAS)
def test_extreme_sigma(loss, dtype, sigma):
    """Finite, and equal to the float64 oracle and the C++ kernels, for tiny and huge sigma."""
    score, x_t, x0 = extreme_sigma_case(loss, 9, dtype, seed=14)
    out, grad = check(loss, score, sigma, x_t, x0)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("loss", ["absorb", "uniform"])
def test_sigma_past_float64_overflow(loss):
    """e^1000 overflows even float64; the loss is then its sigma -> inf limit (the oracle at sigma = 700)."""
    score, x_t, x0 = extreme_sigma_case(loss, 9, torch.float64, seed=15)
    out, grad = run("triton", loss, score, 1000.0, x_t, x0)
    exp_out, exp_grad = run("ref", loss, score, 700.0, x_t, x0)
    torch.testing.assert_close(out, exp_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, exp_grad, rtol=1e-12, atol=1e-12)


# Rows (x_t, x0, expected) for V = 13 (DSE absorbing and DCE: mask column 12). "nan": an id out of
# its range, so loss and gradient row NaN; "zero": a row that does not contribute (its x0 is never
# read); "loss": an ordinary row.
BAD_ID_ROWS = {
    "absorb": [(12, 3, "loss"), (13, 3, "nan"), (-1, 3, "nan"), (50, -100, "nan"), (12, 12, "nan"),
               (12, 50, "nan"), (12, -5, "nan"), (12, -100, "zero"), (4, 50, "zero")],
    "uniform": [(3, 3, "loss"), (3, 5, "loss"), (13, 3, "nan"), (-1, 3, "nan"), (3, 13, "nan"),
                (3, -2, "nan"), (13, -100, "nan"), (3, -100, "zero")],
    "dce": [(12, 3, "loss"), (12, 12, "nan"), (12, 13, "nan"), (12, -1, "nan"), (12, -100, "zero"),
            (3, 50, "zero"), (50, 3, "zero")],
}


@pytest.mark.parametrize("loss", ["absorb", "uniform", "dce"])
@pytest.mark.parametrize("variant", ["grad", "no_grad", "inplace"])
def test_ops_give_nan_rows_for_ids_out_of_range(loss, variant):
    """The raw ops (no Python validation, as under torch.compile) mark a bad id's row NaN, as the CUDA kernels do."""
    if torch.device(DEV).type != "cpu":
        pytest.skip("compares with the C++ ops, which run on CPU tensors")
    rows = BAD_ID_ROWS[loss]
    x_t = torch.tensor([r[0] for r in rows])
    x0 = torch.tensor([r[1] for r in rows])
    expected = [r[2] for r in rows]
    bad = torch.tensor([e == "nan" for e in expected])
    score = torch.randn(len(rows), 13, generator=torch.Generator().manual_seed(16))
    args = _op_args(loss, score, torch.full((1,), 0.7), x_t, x0)
    name = "dce_forward" if loss == "dce" else "dse_forward"
    if variant == "inplace":
        grad = score.clone()
        out = getattr(torch.ops.fastbound, name + "_inplace_triton")(grad, *args[1:])
    else:
        out, grad = getattr(torch.ops.fastbound, name + "_triton")(*args, variant == "grad")

    assert out[bad].isnan().all() and not out[~bad].isnan().any()
    good_args = [a[~bad] if torch.is_tensor(a) else a for a in args]
    exp_out, exp_grad = getattr(torch.ops.fastbound, name)(*good_args, True)  # the C++ op: these rows are valid
    torch.testing.assert_close(out[~bad], exp_out)
    zero = torch.tensor([e == "zero" for e in expected])
    assert not out[zero].any()
    if variant != "no_grad":
        assert grad[bad].isnan().all()
        torch.testing.assert_close(grad[~bad], exp_grad)


@pytest.mark.parametrize("mask_id", [20, 0])
def test_dce_op_nan_rows_with_mask_id_beyond_or_first(mask_id):
    """x0 == mask_id or outside [0, V) is bad wherever the mask id lies; ids other than mask_id in x_t are not."""
    x_t = torch.tensor([mask_id, mask_id, mask_id, mask_id, 5])
    x0 = torch.tensor([3, 13, mask_id, -1, 50])
    bad = torch.tensor([False, True, True, True, False])
    score = torch.randn(5, 13, generator=torch.Generator().manual_seed(17))
    scale = torch.ones(5)
    out, grad = torch.ops.fastbound.dce_forward_triton(score, x_t, x0, scale, mask_id, -100, True)
    assert out[bad].isnan().all() and grad[bad].isnan().all()
    assert torch.isfinite(out[~bad]).all() and torch.isfinite(grad[~bad]).all()
    assert out[0] > 0 and out[4] == 0


@pytest.mark.parametrize("loss", ["absorb", "uniform", "dce"])
def test_inplace_ops_refuse_overlapping_rows(loss):
    """Writing the gradient over rows that share memory would race: the in-place ops refuse, naming the argument."""
    score, sigma, x_t, x0 = make_case(loss, (3,), 7, torch.float32, seed=18)
    args = _op_args(loss, score, sigma, x_t, x0)
    name = "dce_forward" if loss == "dce" else "dse_forward"
    op = getattr(torch.ops.fastbound, name + "_inplace_triton")
    arg_name = "logits" if loss == "dce" else "score"
    expanded = score[:1].expand(3, 7)
    overlapping = torch.randn(20, device=DEV).as_strided((3, 7), (4, 1))  # rows 4 apart, 7 long
    for shared in (expanded, overlapping):
        with pytest.raises(ValueError, match=f"{arg_name}.*overlap"):
            op(shared, *args[1:])
    sliced = torch.randn(3, 9, device=DEV)[:, :7]  # rows apart by more than V: fine
    op(sliced, *args[1:])


# --- The absorbing mask column anywhere (CONTRACTS.md section 1) ------------------------------


def _dse_triton(score, sigma, x_t, x0, scale, graph, mask_id, need_grad, inplace=False):
    """The registered Triton DSE op with ``mask_id``."""
    if inplace:
        return torch.ops.fastbound.dse_forward_inplace_triton(score, sigma, x_t, x0, scale, graph, mask_id, -100)
    return torch.ops.fastbound.dse_forward_triton(score, sigma, x_t, x0, scale, graph, mask_id, -100, need_grad)


def _mask_case(n, n_cols, mask_id, dtype, seed):
    """Scores, sigma, ids and row scales with the mask in column ``mask_id``; and the permutation
    of the columns that moves the mask to V-1 (where the oracle has it), with its id map."""
    g = torch.Generator().manual_seed(seed)
    score = (torch.randn(n, n_cols, generator=g) * 2).to(dtype)
    tokens = torch.tensor([c for c in range(n_cols) if c != mask_id])
    x0 = tokens[torch.randint(0, n_cols - 1, (n,), generator=g)]
    x_t = torch.where(torch.rand(n, generator=g) < 0.6, mask_id, x0)
    x0[0] = -100  # an ignored row
    sigma = (torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.05).to(ref._acc(score).dtype)
    scale = (torch.rand(n, generator=g) + 0.5).to(sigma.dtype)
    perm = torch.cat([tokens, torch.tensor([mask_id])])
    new_id = torch.empty(n_cols, dtype=torch.long)
    new_id[perm] = torch.arange(n_cols)
    return score, sigma, x_t, x0, scale, perm, new_id


def _oracle_with_mask_last(score, sigma, x_t, x0, scale, perm, new_id):
    """The oracle's loss and gradient (in the original column order) on the permuted scores."""
    s = score.double()[:, perm].requires_grad_()
    x0_p = torch.where(x0 == -100, x0, new_id[x0.clamp_min(0)])
    loss = ref.dse_loss(s, sigma.double(), new_id[x_t], x0_p, weight=scale.double())
    (grad,) = torch.autograd.grad(loss.sum(), s)
    unpermuted = torch.empty_like(grad)
    unpermuted[:, perm] = grad
    return loss.detach(), unpermuted


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mask_id", [0, 6, 15, 16])
@pytest.mark.parametrize("variant", ["functional", "inplace", "no_grad"])
def test_dse_absorb_mask_column_anywhere(mask_id, dtype, variant):
    score, sigma, x_t, x0, scale, perm, new_id = _mask_case(9, 17, mask_id, dtype, seed=mask_id)
    want_loss, want_grad = _oracle_with_mask_last(score, sigma, x_t, x0, scale, perm, new_id)
    args = [t.to(DEV) for t in (score, sigma, x_t, x0, scale)]
    absorb = fb._names.GRAPH_CODES["absorb"]
    if variant == "inplace":
        buffer = args[0].clone()
        loss = _dse_triton(buffer, *args[1:], absorb, mask_id, True, inplace=True)
        grad = buffer
    else:
        loss, grad = _dse_triton(*args, absorb, mask_id, variant == "functional")
    (lr, la), (gr, ga) = TOL[dtype]
    torch.testing.assert_close(loss.double().cpu(), want_loss, rtol=lr, atol=la * _magnitude(want_loss))
    if variant == "no_grad":
        assert grad.numel() == 0
    else:
        torch.testing.assert_close(grad.double().cpu(), want_grad, rtol=gr, atol=ga * _magnitude(want_grad))
        assert not grad[:, mask_id].any()  # the mask column's score is ignored


def test_dse_mask_id_checked_and_ignored_by_uniform():
    score, sigma, x_t, x0, scale, *_ = _mask_case(5, 8, 7, torch.float32, seed=1)
    args = [t.to(DEV) for t in (score, sigma, x_t, x0, scale)]
    for bad in (-1, 8):
        with pytest.raises(ValueError, match="mask_id"):
            _dse_triton(*args, fb._names.GRAPH_CODES["absorb"], bad, True)
    uniform = fb._names.GRAPH_CODES["uniform"]
    x0_real = args[3].clamp_min(0)
    loss_a, grad_a = _dse_triton(*args[:3], x0_real, args[4], uniform, -1, True)
    loss_b, grad_b = _dse_triton(*args[:3], x0_real, args[4], uniform, 3, True)
    assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)


@pytest.mark.parametrize("mask_id", [0, 6, 16])
def test_integrate_step_dse_mask_column_anywhere(mask_id):
    """The Triton integration step with the absorbing mask in column mask_id, against the oracle on
    the permuted columns."""
    import fastbound.triton_kernels.integrate  # noqa: F401

    n_seq, length, n_cols = 3, 4, 17
    score, sigma_rows, x_t, x0, _, perm, new_id = _mask_case(n_seq * length, n_cols, mask_id, torch.float32, seed=5)
    out = score.view(n_seq, length, n_cols)
    sigma = torch.tensor([0.3, 1.1, 2.5], dtype=torch.float64)
    weight = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    got = torch.zeros(n_seq, 2, dtype=torch.float64, device=DEV)
    torch.ops.fastbound.integrate_step_triton(
        out.to(DEV), x_t.view(n_seq, length).to(DEV), x0.view(n_seq, length).to(DEV), sigma.to(DEV),
        weight.to(DEV), got, None, fb._names.LOSS_CODES["dse"], fb._names.GRAPH_CODES["absorb"], mask_id, -100)
    x0_p = torch.where(x0 == -100, x0, new_id[x0.clamp_min(0)])
    want = ref.integrate_step(out[..., perm].double(), new_id[x_t].view(n_seq, length), x0_p.view(n_seq, length),
                              sigma, weight, torch.zeros(n_seq, 2, dtype=torch.float64), loss="dse")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


# --- Large logits (issue 11 item 3) ----------------------------------------------------------


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_dce_large_logits_keep_fp32_accuracy(offset):
    """(m - z[x0]) + log sum cancels the offset first: the fp32 kernel is as close to the fp64 oracle
    as the fp32 oracle is (m + log sum - z[x0] loses ~ulp(offset))."""
    score, _, x_t, x0 = make_case("dce", (16,), 300, torch.float32, seed=4)
    logits = score + offset
    out, grad = run("triton", "dce", logits, None, x_t, x0)
    want, want_grad = run("ref", "dce", logits.double(), None, x_t, x0)
    fp32_oracle = ref.dce_loss(logits, x_t, x0).double()
    budget = max(2 * (fp32_oracle - want).abs().max().item(), 1e-6)
    assert (out.double() - want).abs().max().item() <= budget
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)
    acc = torch.zeros(1, 2, dtype=torch.float64, device=DEV)
    fb.integrate_step(logits[None], x_t[None], x0[None], None, 1.0, acc, backend="triton")
    assert abs(acc[0, 0].item() - want.sum().item()) <= 16 * budget


# --- Narrow id dtypes in the Triton perturb (issue 11 item 9) --------------------------------


@pytest.mark.parametrize("dtype,graph,vocab_size,mask_id", [
    (torch.uint8, "uniform", 256, 0), (torch.uint8, "absorb", 256, 255), (torch.int8, "uniform", 128, 0),
    (torch.int8, "absorb", 128, 127), (torch.int16, "absorb", 40000 // 2, 19999),
])
@pytest.mark.parametrize("mode", ["bernoulli", "exact_k"])
def test_perturb_op_narrow_id_dtypes_match_cpu(dtype, graph, vocab_size, mask_id, mode):
    """Ids at the top of uint8 / int8 / int16 and the mask id at the dtype's maximum: the Triton op
    writes what the C++ op writes, bit for bit, for a seed and an offset beyond 2^31."""
    import fastbound.triton_kernels.perturb  # noqa: F401

    g = torch.Generator().manual_seed(7)
    n_real = vocab_size if graph == "uniform" else mask_id
    x0 = torch.randint(0, n_real, (3, 37), generator=g).to(dtype)
    x0[0, :3] = torch.tensor([0, n_real - 1, n_real - 1]).to(dtype)
    threshold = torch.full((3, 1), 1 << 23, dtype=torch.int32) if mode == "bernoulli" else None
    num_masked = torch.tensor([0, 17, 37]) if mode == "exact_k" else None
    args = (vocab_size, mask_id, fb._names.GRAPH_CODES[graph], -(2**62) - 5, 2**31 + 3)
    want = torch.ops.fastbound.perturb(x0, threshold, num_masked, None, *args)
    dev = [None if t is None else t.to(DEV) for t in (x0, threshold, num_masked)]
    got = torch.ops.fastbound.perturb_triton(*dev, None, *args)
    assert got[0].dtype == dtype
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
