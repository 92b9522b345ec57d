"""The backward's row rescale ``scale_rows_`` (C++ CPU kernel, Triton kernel; contract
`csrc/common/scale_rows.h`) against ``grad * factor[:, None]``, and its use by the losses."""

import pytest
import torch

import fastbound as fb
from conftest import HAS_TRITON, TRITON_DEVICE

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
IGNORE = -100


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _case(n, v, dtype, *, mask_id=None, seed=0, device="cpu"):
    """A gradient with the loss's zero rows written as zeros, a factor, and the ids."""
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(n, v, generator=g).to(dtype)
    x0 = torch.randint(0, max(v - 1, 1), (n,), generator=g)
    x0[::5] = IGNORE
    mask = v - 1 if mask_id is None else mask_id
    x_t = torch.where(torch.rand(n, generator=g) < 0.6, torch.full_like(x0, mask), x0)
    zero = (x0 == IGNORE) | (x_t != mask)
    grad[zero] = 0
    factor = torch.randn(n, generator=g, dtype=_acc(dtype))
    factor[1::7] = 1.0
    return grad.to(device), factor.to(device), x_t.to(device), x0.to(device), mask


def _expected(grad, factor):
    return (grad.to(factor.dtype) * factor[:, None]).to(grad.dtype)


def _ops():
    ops = [("cpu", "cpu", torch.ops.fastbound.scale_rows_)]
    if HAS_TRITON:
        import fastbound.triton_kernels  # noqa: F401

        ops.append(("triton", TRITON_DEVICE, torch.ops.fastbound.scale_rows__triton))
    return ops


OPS = _ops()
IDS = [name for name, _, _ in OPS]


@pytest.mark.parametrize("name, device, op", OPS, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, v", [(1, 1), (7, 3), (13, 37), (5, 1031)])
def test_matches_grad_times_factor(name, device, op, dtype, n, v):
    grad, factor, x_t, x0, mask = _case(n, v, dtype, device=device)
    expected = _expected(grad, factor)
    op(grad, factor, x_t, x0, mask, IGNORE)
    # One rounding of the float32 product: exact, except that Triton's interpreter (numpy)
    # rounds to 16 bits by truncation, one ulp off round-to-nearest-even.
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10}.get(dtype, 0) if name == "triton" else 0
    torch.testing.assert_close(grad, expected, rtol=ulp, atol=0)


@pytest.mark.parametrize("name, device, op", OPS, ids=IDS)
def test_every_row_without_ids(name, device, op):
    """Without ids (the raw ops' backward) every row with a factor other than 1 is scaled."""
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(9, 11, generator=g).to(device)
    factor = torch.randn(9, generator=g).to(device)
    expected = grad * factor[:, None]
    op(grad, factor, None, None, -1, 0)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name, device, op", OPS, ids=IDS)
def test_skips_exactly_the_zero_rows(name, device, op):
    """Rows the ids mark as zero are not written (a sentinel survives); other rows are; a mask
    column inside the row and mask_id = -1 (uniform graph: no mask rule) too."""
    grad, factor, x_t, x0, mask = _case(12, 6, torch.float32, mask_id=2, device=device)
    factor = factor.masked_fill(factor == 1, 3.0)
    zero = (x0 == IGNORE) | (x_t != mask)
    sentinel = grad.masked_fill(zero[:, None], 7.0)
    expected = torch.where(zero[:, None], sentinel, sentinel * factor[:, None])
    op(sentinel, factor, x_t, x0, mask, IGNORE)
    torch.testing.assert_close(sentinel, expected, rtol=0, atol=0)
    again = grad.masked_fill(zero[:, None], 7.0)
    op(again, factor, x_t, x0, -1, IGNORE)  # only the ignore_index rows are skipped
    ignored = (x0 == IGNORE)[:, None]
    torch.testing.assert_close(again, torch.where(ignored, 7.0, grad.masked_fill(zero[:, None], 7.0) * factor[:, None]))


@pytest.mark.parametrize("name, device, op", OPS, ids=IDS)
def test_a_zero_row_with_a_non_finite_factor_is_nan(name, device, op):
    """0 * inf and 0 * NaN are NaN, as autograd's grad * factor gives: such zero rows are written."""
    grad, factor, x_t, x0, mask = _case(12, 6, torch.float32, device=device)
    zero = (x0 == IGNORE) | (x_t != mask)
    rows = zero.nonzero()[:, 0]
    factor[rows[0]], factor[rows[1]] = float("inf"), float("nan")
    expected = _expected(grad, factor)
    op(grad, factor, x_t, x0, mask, IGNORE)
    assert grad[rows[:2]].isnan().all()
    torch.testing.assert_close(grad, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name, device, op", OPS, ids=IDS)
def test_non_contiguous_factor_and_strided_rows(name, device, op):
    grad, factor, x_t, x0, mask = _case(10, 17, torch.float32, device=device)
    wide = torch.zeros(10, 40, device=device)
    wide[:, 3:20] = grad
    rows = wide[:, 3:20]  # row stride 40 > V
    strided = torch.stack([factor, factor * 2], 1)[:, 1]  # stride 2
    broadcast = torch.tensor([0.5], device=device).expand(10)  # stride 0, as from a .sum()
    for f in (strided, broadcast):
        expected = _expected(rows, f)
        op(rows, f, x_t, x0, mask, IGNORE)
        torch.testing.assert_close(rows, expected, rtol=0, atol=0)
    assert (wide[:, :3] == 0).all() and (wide[:, 20:] == 0).all()


@pytest.mark.parametrize("name, device, op", OPS, ids=IDS)
def test_bumps_the_version(name, device, op):
    grad, factor, x_t, x0, mask = _case(4, 5, torch.float32, device=device)
    before = grad._version
    op(grad, factor, x_t, x0, mask, IGNORE)
    assert grad._version > before


@pytest.mark.parametrize("name, device, op", OPS, ids=IDS)
@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(grad=a["grad"][:, None]), "grad"),
        (lambda a: a.update(grad=a["grad"].t()), "grad"),
        (lambda a: a.update(factor=a["factor"][:3]), "factor"),
        (lambda a: a.update(factor=a["factor"].double()), "factor"),
        (lambda a: a.update(x0=a["x0"].int()), "x0"),
        (lambda a: a.update(grad=torch.zeros(1, 6).expand(6, 6), factor=torch.ones(6), x_t=None, x0=None), "overlap"),
    ],
)
def test_bad_arguments_are_named(name, device, op, change, match):
    grad, factor, x_t, x0, mask = _case(6, 6, torch.float32, device=device)
    args = dict(grad=grad, factor=factor, x_t=x_t, x0=x0)
    change(args)
    args = {k: (t.to(device) if isinstance(t, torch.Tensor) else t) for k, t in args.items()}
    with pytest.raises((ValueError, RuntimeError), match=match):
        op(args["grad"], args["factor"], args["x_t"], args["x0"], mask, IGNORE)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        grad = torch.empty(4, 5)
        torch.ops.fastbound.scale_rows_(grad, torch.empty(4), None, None, -1, 0)
    assert grad.shape == (4, 5)


# ----------------------------------------------------------------------------- through the losses

KINDS = ["absorb", "uniform", "dce"]


def _loss(kind, score, sigma, x_t, x0, **kw):
    if kind == "dce":
        return fb.dce_loss(score, x_t, x0, **kw)
    return fb.dse_loss(score, sigma, x_t, x0, graph=kind, **kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_forms_after_the_call_match_the_weight_fast_path(kind, dtype, inplace):
    """A per-position factor after reduction="none", /B, a GradScaler scale and .mean() give the
    gradient of the same factor passed as ``weight=`` (the rescale of the saved buffer)."""
    from helpers import make_case

    score, sigma, x_t, x0 = make_case(kind, (3, 7), 23, dtype, seed=3)
    x0[0, :2] = IGNORE
    factor = torch.rand(3, 7, dtype=_acc(dtype)) + 0.5
    forms = {
        "per-position": (lambda s: (factor * _loss(kind, s, sigma, x_t, x0, inplace=inplace)).sum(), factor),
        "/B": (lambda s: _loss(kind, s, sigma, x_t, x0, reduction="sum", inplace=inplace) / 3, 1 / 3),
        "scaler": (lambda s: _loss(kind, s, sigma, x_t, x0, reduction="sum", inplace=inplace) * 65536.0, 65536.0),
        "unit": (lambda s: _loss(kind, s, sigma, x_t, x0, reduction="sum", inplace=inplace), 1.0),
    }
    for name, (form, weight) in forms.items():
        s = score.clone().requires_grad_()
        src = s * 1 if inplace else s  # inplace needs a non-leaf
        form(src).backward()
        ref = score.clone().requires_grad_()
        _loss(kind, ref, sigma, x_t, x0, weight=weight, reduction="sum").backward()
        (rl, ra) = (1e-6, 1e-7) if dtype in (torch.float32, torch.float64) else (1e-2, 1e-3)
        torch.testing.assert_close(s.grad, ref.grad, rtol=rl, atol=ra, msg=name)


def test_ids_changed_before_the_backward_raise():
    """The backward skips rows by the ids, so the ids are saved: changing them in place raises."""
    score, x0 = torch.randn(2, 4, 5, requires_grad=True), torch.randint(0, 4, (2, 4))
    x_t = torch.full_like(x0, 4)
    loss = fb.dce_loss(score, x_t, x0, reduction="sum") * 2
    x_t[0, 0] = 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("kind", KINDS)
def test_triton_backend_rescales_with_its_kernel(kind):
    """backend="triton": the backward's rescale is the Triton ``scale_rows_`` (a per-position factor)."""
    from helpers import make_case

    score, sigma, x_t, x0 = make_case(kind, (2, 5), 11, torch.float32, seed=5, device=TRITON_DEVICE)
    factor = torch.rand(2, 5, device=TRITON_DEVICE) + 0.5
    grads = []
    for backend in ("triton", None):  # None: the C++ kernels (CUDA ones where built)
        s = score.clone().requires_grad_()
        (factor * _loss(kind, s, sigma, x_t, x0, backend=backend)).sum().backward()
        grads.append(s.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_opcheck():
    """Schema, fake kernel and the AOT path of the C++ ops added for the backward and the checks."""
    grad, factor, x_t, x0, mask = _case(6, 9, torch.float32)
    torch.library.opcheck(torch.ops.fastbound.scale_rows_.default, (grad, factor, x_t, x0, mask, IGNORE))
    torch.library.opcheck(torch.ops.fastbound.check_loss_ids.default,
                          (x_t.clamp_min(0), x0.clamp_min(0), torch.ones(6), 9, 1, 0, mask, IGNORE))


@pytest.mark.parametrize(
    "sigma, ok",
    [(torch.ones(3), True), (torch.tensor([1.0, 0.0, 1.0]), False), (torch.tensor([1.0, float("nan"), 1.0]), False),
     (torch.tensor([1.0, float("inf"), 1.0], dtype=torch.float64), False), (torch.tensor([2.0, 1e-30, 3.0]), True)],
)
def test_check_loss_ids_refuses_sigma_not_positive_and_finite(sigma, ok):
    x0, x_t = torch.tensor([1, 2, 3]), torch.tensor([4, 4, 1])
    check = torch.ops.fastbound.check_loss_ids.default
    if ok:
        check(x_t, x0, sigma, 5, 0, 0, 4, IGNORE)
    else:
        with pytest.raises(ValueError, match="sigma must be positive and finite"):
            check(x_t, x0, sigma, 5, 0, 0, 4, IGNORE)


@pytest.mark.parametrize("factor", [0.5, 3.0, 1e-3, 2.0**-100])
def test_every_bfloat16_pattern_rounds_as_torch(factor):
    """All 65536 bfloat16 bit patterns (subnormals, ±inf, NaNs) times a factor: the same bits as
    torch's float product rounded to bfloat16 (the AVX512_BF16 conversion where the CPU has it,
    with its subnormal and NaN fallback; csrc/cpu/row_pass.cpp store_bf16_native)."""
    x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(64, 1024)
    g = x.clone()
    torch.ops.fastbound.scale_rows_(g, torch.full((64,), factor), None, None, -1, 0)
    expect = (x.float() * factor).bfloat16()
    same = (g.view(torch.int16) == expect.view(torch.int16)) | (g.isnan() & expect.isnan())
    assert bool(same.all()), f"{int((~same).sum())} patterns differ"
