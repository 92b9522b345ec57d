"""The raw C++ ops' own contracts (csrc/), called through ``torch.ops.fastbound`` directly.

What the Python layer cannot show: the absorbing DSE's ``mask_id`` column anywhere
(checked against `fastbound.reference` with the columns permuted so that the mask
sits at V-1, where the oracle puts it), the in-place ops refusing overlapping rows,
and the precision of the loss at large logits.
"""

import pytest
import torch

from fastbound import reference as ref

IGNORE = -100
ABSORB, UNIFORM = 0, 1
LOSS_DSE, LOSS_DCE = 0, 1


def mask_last(n_cols, mask_id):
    """The column permutation that moves column mask_id to V-1, and its inverse (old id -> new id)."""
    perm = torch.tensor([c for c in range(n_cols) if c != mask_id] + [mask_id])
    return perm, torch.argsort(perm)


def absorb_case(n_rows, n_cols, mask_id, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    score = torch.randn(n_rows, n_cols, generator=g).to(dtype)
    x0 = torch.randint(0, n_cols - 1, (n_rows,), generator=g)
    x0 = x0 + (x0 >= mask_id).long()  # any column but the mask
    x_t = torch.where(torch.rand(n_rows, generator=g) < 0.6, torch.full_like(x0, mask_id), x0)
    x0[::7] = IGNORE
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    sigma = (torch.rand(n_rows, generator=g) * 3 + 0.05).to(acc)
    row_scale = (torch.rand(n_rows, generator=g) + 0.5).to(acc)
    return score, sigma, x_t, x0, row_scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_at", ["first", "middle", "last"])
def test_dse_absorb_mask_column_anywhere(dtype, mask_at):
    """dse_forward's mask_id column: the oracle's loss and gradient with that column moved to V-1."""
    n_rows, n_cols = 23, 11
    mask_id = {"first": 0, "middle": 5, "last": n_cols - 1}[mask_at]
    score, sigma, x_t, x0, row_scale = absorb_case(n_rows, n_cols, mask_id, dtype)
    loss, grad = torch.ops.fastbound.dse_forward(score, sigma, x_t, x0, row_scale, ABSORB, mask_id, IGNORE, True)

    perm, new_id = mask_last(n_cols, mask_id)
    s64 = score.double()[:, perm].requires_grad_()
    keep = x0 != IGNORE
    ids = lambda x: torch.where(x == IGNORE, x, new_id[x.clamp_min(0)])  # noqa: E731
    expected = ref.dse_loss(s64, sigma.double(), ids(x_t), ids(x0), graph="absorb") * row_scale.double()
    (g64,) = torch.autograd.grad(expected.sum(), s64)
    expected_grad = torch.empty_like(g64)
    expected_grad[:, perm] = g64
    assert (loss[~keep] == 0).all()
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), expected.detach(), **tol)
    torch.testing.assert_close(grad.double(), expected_grad, **tol)
    assert (grad[:, mask_id] == 0).all()

    buffer = score.clone()
    loss_ip = torch.ops.fastbound.dse_forward_inplace(buffer, sigma, x_t, x0, row_scale, ABSORB, mask_id, IGNORE)
    torch.testing.assert_close(loss_ip, loss, rtol=0, atol=0)
    torch.testing.assert_close(buffer, grad, rtol=0, atol=0)


def test_dse_uniform_ignores_mask_id():
    score, sigma, x_t, x0, row_scale = absorb_case(9, 6, 5, torch.float32)
    a = torch.ops.fastbound.dse_forward(score, sigma, x_t, x0, row_scale, UNIFORM, -1, IGNORE, True)
    b = torch.ops.fastbound.dse_forward(score, sigma, x_t, x0, row_scale, UNIFORM, 2, IGNORE, True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("bad_mask", [-1, 11, 50])
def test_dse_absorb_mask_id_out_of_range_is_refused(bad_mask):
    score, sigma, x_t, x0, row_scale = absorb_case(4, 11, 10, torch.float32)
    with pytest.raises(ValueError, match="mask_id"):
        torch.ops.fastbound.dse_forward(score, sigma, x_t, x0, row_scale, ABSORB, bad_mask, IGNORE, True)
    with pytest.raises(ValueError, match="mask_id"):
        torch.ops.fastbound.dse_forward_inplace(score.clone(), sigma, x_t, x0, row_scale, ABSORB, bad_mask, IGNORE)


def test_dse_absorb_x0_at_the_mask_column_is_refused():
    score, sigma, x_t, x0, row_scale = absorb_case(4, 11, 3, torch.float32)
    x_t[:], x0[1] = 3, 3
    with pytest.raises(ValueError, match="mask id 3"):
        torch.ops.fastbound.dse_forward(score, sigma, x_t, x0, row_scale, ABSORB, 3, IGNORE, True)


@pytest.mark.parametrize("mask_id", [0, 4, 9])
def test_integrate_step_absorbing_dse_mask_column_anywhere(mask_id):
    """integrate_step's mask_id for loss=DSE, graph=absorb: the oracle with the mask column moved to V-1."""
    n_seq, length, n_cols = 3, 8, 10
    g = torch.Generator().manual_seed(1)
    out = torch.randn(n_seq, length, n_cols, generator=g)
    x0 = torch.randint(0, n_cols - 1, (n_seq, length), generator=g)
    x0 = x0 + (x0 >= mask_id).long()
    x_t = torch.where(torch.rand(n_seq, length, generator=g) < 0.5, torch.full_like(x0, mask_id), x0)
    sigma = torch.rand(n_seq, dtype=torch.float64, generator=g) + 0.1
    weight = torch.rand(n_seq, dtype=torch.float64, generator=g) + 0.5
    acc = torch.zeros(n_seq, 2, dtype=torch.float64)
    torch.ops.fastbound.integrate_step(out, x_t, x0, sigma, weight, acc, None, LOSS_DSE, ABSORB, mask_id, IGNORE)
    perm, new_id = mask_last(n_cols, mask_id)
    expected = ref.integrate_step(out.double()[..., perm], new_id[x_t], new_id[x0], sigma, weight,
                                  torch.zeros(n_seq, 2, dtype=torch.float64), loss="dse", graph="absorb")
    torch.testing.assert_close(acc, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mask_id"):
        torch.ops.fastbound.integrate_step(out, x_t, x0, sigma, weight, acc, None, LOSS_DSE, ABSORB, n_cols, IGNORE)


def _inplace_calls(n_cols):
    """(name, call(score)) for each raw in-place op, with valid ids for an (N, n_cols) batch."""
    rows = torch.ones(3)
    x_t, x0 = torch.full((3,), n_cols - 1), torch.full((3,), 1)
    sigma = torch.full((3,), 0.7)
    return [
        ("dse absorb", lambda s: torch.ops.fastbound.dse_forward_inplace(s, sigma, x_t, x0, rows, ABSORB, n_cols - 1, IGNORE)),
        ("dse uniform", lambda s: torch.ops.fastbound.dse_forward_inplace(s, sigma, x_t, x0, rows, UNIFORM, -1, IGNORE)),
        ("dce", lambda s: torch.ops.fastbound.dce_forward_inplace(s, x_t, x0, rows, n_cols - 1, IGNORE)),
    ]


@pytest.mark.parametrize("row_stride", [0, 1, 4, 6])
def test_inplace_ops_refuse_overlapping_rows(row_stride):
    """Rows that share memory (expanded, or as_strided with a row stride below V, which
    at::assert_no_internal_overlap cannot judge) would race: the raw op refuses them."""
    n_cols = 7
    for name, call in _inplace_calls(n_cols):
        shared = torch.randn(40).as_strided((3, n_cols), (row_stride, 1))
        before = shared.clone()
        with pytest.raises(RuntimeError, match="overlap"):
            call(shared)
        assert torch.equal(shared, before), name  # refused before anything was written


@pytest.mark.parametrize("row_stride", [7, 9])
def test_inplace_ops_accept_disjoint_strided_rows(row_stride):
    """Rows at least V apart (a column slice, as_strided) do not overlap: accepted, as in the functional op."""
    n_cols = 7
    for name, call in _inplace_calls(n_cols):
        base = torch.randn(40)
        rows = base.as_strided((3, n_cols), (row_stride, 1))
        expected = call(rows.clone())
        torch.testing.assert_close(call(rows), expected, rtol=0, atol=0, msg=name)


def _offset_case(n_rows=64, n_cols=257, offset=1e4, seed=2):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n_rows, n_cols, generator=g) * 3 + offset).float()
    x0 = torch.randint(0, n_cols - 1, (n_rows,), generator=g)
    x_t = torch.full_like(x0, n_cols - 1)
    return logits, x_t, x0


def test_dce_precision_at_large_logits():
    """Logits offset by 1e4: the kernel's loss and gradient stay as close to the float64 oracle as the
    float32 oracle is (the loss is formed as (m - s_x0) + log sum, which cancels the offset first)."""
    logits, x_t, x0 = _offset_case()
    n_cols = logits.shape[1]
    s64 = logits.double().requires_grad_()
    exact = ref.dce_loss(s64, x_t, x0)
    (exact_grad,) = torch.autograd.grad(exact.sum(), s64)
    s32 = logits.clone().requires_grad_()
    fp32 = ref.dce_loss(s32, x_t, x0)
    (fp32_grad,) = torch.autograd.grad(fp32.sum(), s32)
    loss, grad = torch.ops.fastbound.dce_forward(logits, x_t, x0, torch.ones(len(x0)), n_cols - 1, IGNORE, True)
    oracle_err = (fp32.double() - exact).abs().max().item()
    kernel_err = (loss.double() - exact).abs().max().item()
    assert kernel_err <= 4 * oracle_err + 1e-6, (kernel_err, oracle_err)
    oracle_grad_err = (fp32_grad.double() - exact_grad).abs().max().item()
    kernel_grad_err = (grad.double() - exact_grad).abs().max().item()
    assert kernel_grad_err <= 4 * oracle_grad_err + 1e-7, (kernel_grad_err, oracle_grad_err)


def test_integrate_step_dce_precision_at_large_logits():
    logits, x_t, x0 = _offset_case(n_rows=48)
    out, x_t, x0 = logits.view(4, 12, -1), x_t.view(4, 12), x0.view(4, 12)
    n_cols = out.shape[-1]
    ones = torch.ones(4, dtype=torch.float64)
    zeros = torch.zeros(4, 2, dtype=torch.float64)
    acc = zeros.clone()
    torch.ops.fastbound.integrate_step(out, x_t, x0, ones, ones, acc, None, LOSS_DCE, ABSORB, n_cols - 1, IGNORE)
    exact = ref.integrate_step(out.double(), x_t, x0, ones, ones, zeros, loss="dce")
    fp32 = ref.integrate_step(out, x_t, x0, ones, ones, zeros, loss="dce")
    oracle_err = (fp32[:, 0] - exact[:, 0]).abs().max().item()
    kernel_err = (acc[:, 0] - exact[:, 0]).abs().max().item()
    assert kernel_err <= 4 * oracle_err + 1e-5, (kernel_err, oracle_err)
