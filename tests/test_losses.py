"""Fused DSE / DCE losses (C++ CPU kernels) against the oracle in `fastbound.reference`."""

import numpy as np
import pytest
import torch

import fastbound as fb
from fastbound import reference as ref
from helpers import KINDS, TOL, make_case
from helpers import magnitude as _magnitude

def fused(graph, score, sigma, x_t, x0, **kw):
    if graph == "dce":
        return fb.dce_loss(score, x_t, x0, **kw)
    return fb.dse_loss(score, sigma, x_t, x0, graph=graph, **kw)


def oracle(graph, score, sigma, x_t, x0, **kw):
    if graph == "dce":
        return ref.dce_loss(score, x_t, x0, **kw)
    return ref.dse_loss(score, sigma, x_t, x0, graph=graph, **kw)


def check_against_oracle(graph, score, sigma, x_t, x0, **kw):
    """Compares loss and gradient with the oracle evaluated in float64 on the same inputs."""
    dtype = score.dtype
    (lr, la), (gr, ga) = TOL[dtype]
    s = score.detach().clone().requires_grad_()
    out = fused(graph, s, sigma, x_t, x0, **kw)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    s64 = score.detach().double().requires_grad_()
    expected = oracle(graph, s64, sigma.double() if torch.is_tensor(sigma) else sigma, x_t, x0, **kw)
    torch.testing.assert_close(out.double(), expected, rtol=lr, atol=la * _magnitude(expected))
    if out.numel():
        probe = torch.randn_like(expected) if out.dim() else torch.tensor(1.0, dtype=torch.float64)
        (g,) = torch.autograd.grad(out, s, probe.to(out.dtype))
        (g64,) = torch.autograd.grad(expected, s64, probe)
        assert g.dtype == dtype and g.shape == score.shape
        torch.testing.assert_close(g.double(), g64, rtol=gr, atol=ga * _magnitude(g64))
    return out


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("graph", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_matches_oracle(graph, dtype, reduction):
    score, sigma, x_t, x0 = make_case(graph, (3, 5), 37, dtype)
    check_against_oracle(graph, score, sigma, x_t, x0, reduction=reduction)


@pytest.mark.parametrize("graph", KINDS)
@pytest.mark.parametrize("n_cols", [2, 3, 1031, 2049, 50257])
def test_odd_vocab_sizes(graph, n_cols):
    score, sigma, x_t, x0 = make_case(graph, (2, 3), n_cols, torch.float32, seed=n_cols, scale=0.5)
    check_against_oracle(graph, score, sigma, x_t, x0)


@pytest.mark.parametrize("graph", KINDS)
def test_large_vocab(graph):
    score, sigma, x_t, x0 = make_case(graph, (2,), 131072, torch.float32, seed=1, scale=0.1)
    check_against_oracle(graph, score, sigma, x_t, x0, reduction="sum")


@pytest.mark.parametrize("graph", KINDS)
def test_one_token_and_empty_batch(graph):
    for shape in [(1,), (1, 1), (0, 7), (0,)]:
        score, sigma, x_t, x0 = make_case(graph, shape, 9, torch.float32)
        if shape[0] == 1 and graph != "uniform":
            x_t = torch.full_like(x_t, 8)  # make the single token contribute
        for reduction in ["none", "sum", "mean"]:
            out = check_against_oracle(graph, score, sigma, x_t, x0, reduction=reduction)
            assert out.shape == (x_t.shape if reduction == "none" else ())


@pytest.mark.parametrize("graph", KINDS)
def test_sliced_and_noncontiguous_scores(graph):
    wide, sigma, x_t, x0 = make_case(graph, (4, 6), 40, torch.float32)
    sliced = wide[..., :33]  # row stride 40, unit column stride
    x_t = torch.where(x_t == 39, 32, x_t).clamp_max(32)
    x0 = x0.clamp_max(31)
    check_against_oracle(graph, sliced, sigma, x_t, x0)
    transposed = wide[..., :33].permute(0, 2, 1).contiguous().permute(0, 2, 1)  # column stride 6
    assert transposed.stride(-1) != 1
    check_against_oracle(graph, transposed, sigma, x_t, x0)
    every_other = wide[::2]  # batch stride doubled
    check_against_oracle(graph, every_other[..., :33], sigma[::2], x_t[::2], x0[::2])


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
@pytest.mark.parametrize("sigma", [1e-8, 1e-6, 0.3, 19.9, 20.1, 89.0, 100.0, 500.0])
def test_extreme_sigma_stays_finite_and_exact(graph, sigma):
    """Per-row constants come from log(e^sigma - 1): no inf * 0 when e^sigma overflows float32."""
    score, _, x_t, x0 = make_case(graph, (3, 4), 17, torch.float32)
    out = check_against_oracle(graph, score, sigma, x_t, x0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_sigma_per_token_and_scalar(graph):
    score, _, x_t, x0 = make_case(graph, (3, 4), 17, torch.float32)
    per_token = torch.rand(3, 4) * 2 + 1e-3
    check_against_oracle(graph, score, per_token, x_t, x0)
    check_against_oracle(graph, score, 0.7, x_t, x0)
    tiny = torch.full((3, 1), 1e-6)  # expm1 keeps the small-sigma digits
    check_against_oracle(graph, score, tiny, x_t, x0)


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigma_runs_repeating_and_returning(graph, dtype):
    # The CPU kernels keep the constants of the last sigma a task saw (csrc/cpu/loss_row_kernels.h,
    # SigmaMemo): runs of one value, a return to an earlier one and both accumulation dtypes
    # must each give their own row's constants.
    score, _, x_t, x0 = make_case(graph, (2, 9), 23, dtype)
    a, b, c = 0.05, 1.3, 7.0
    sigma = torch.tensor([[a, a, b, a, b, b, c, a, c], [c, c, c, b, a, a, b, c, a]])
    check_against_oracle(graph, score, sigma, x_t, x0)
    integrated = fb.integrate_step(score, x_t, x0, sigma[:, 0].double(), None, torch.zeros(2, 2, dtype=torch.float64),
                                   loss="dse", graph=graph)
    expected = oracle(graph, score.double(), sigma[:, :1].expand(2, 9).double(), x_t, x0, reduction="none").sum(1)
    torch.testing.assert_close(integrated[:, 0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("graph", KINDS)
def test_weight_and_ignore_index(graph):
    score, sigma, x_t, x0 = make_case(graph, (3, 5), 23, torch.float32)
    x0 = x0.clone()
    x0[0, 1] = -100
    x0[2, 4] = -100
    weight = torch.rand(3, 1) + 0.5
    for reduction in ["none", "sum", "mean"]:
        out = check_against_oracle(graph, score, sigma, x_t, x0, weight=weight, reduction=reduction)
        if reduction == "none":
            assert out[0, 1] == 0 and out[2, 4] == 0
    x0[...] = 7
    x0[1, 2] = -1
    check_against_oracle(graph, score, sigma, x_t, x0, ignore_index=-1, weight=0.25, reduction="mean")


@pytest.mark.parametrize("graph", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_writes_gradient_over_scores(graph, dtype):
    score, sigma, x_t, x0 = make_case(graph, (3, 5), 29, dtype)
    leaf = score.clone().requires_grad_()
    expected = fused(graph, leaf, sigma, x_t, x0, reduction="sum")
    (g_expected,) = torch.autograd.grad(expected, leaf)

    leaf2 = score.clone().requires_grad_()
    buffer = leaf2 * 1  # a non-leaf whose producer does not need it for backward
    out = fused(graph, buffer, sigma, x_t, x0, reduction="sum", inplace=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(buffer.detach(), g_expected)  # clobbered with the gradient
    (g,) = torch.autograd.grad(2 * out, leaf2)
    torch.testing.assert_close(g, 2 * g_expected)


@pytest.mark.parametrize("graph", KINDS)
def test_no_grad_path_writes_no_gradient(graph):
    score, sigma, x_t, x0 = make_case(graph, (3, 5), 19, torch.float32)
    score.requires_grad_()
    with torch.no_grad():
        a = fused(graph, score, sigma, x_t, x0)
    b = oracle(graph, score.detach().double(), sigma.double(), x_t, x0)
    torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    assert not a.requires_grad


@pytest.mark.parametrize("graph", KINDS)
def test_gradcheck_float64(graph):
    score, sigma, x_t, x0 = make_case(graph, (2, 3), 7, torch.float64)
    score.requires_grad_()
    weight = torch.rand(2, 3, dtype=torch.float64) + 0.5
    for reduction in ["none", "mean"]:
        assert torch.autograd.gradcheck(
            lambda s: fused(graph, s, sigma.double(), x_t, x0, weight=weight, reduction=reduction), (score,)
        )


@pytest.mark.parametrize("graph", KINDS)
def test_double_backward_is_refused(graph):
    """The gradient is a constant of the forward: a second derivative would silently be wrong."""
    score, sigma, x_t, x0 = make_case(graph, (2, 3), 7, torch.float64)
    score.requires_grad_()
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(fused(graph, score, sigma, x_t, x0, reduction="sum"), score, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(fused(graph, score, sigma, x_t, x0, reduction="none"), score,
                            torch.ones(2, 3, dtype=torch.float64), create_graph=True)


@pytest.mark.parametrize("graph", KINDS)
def test_retain_graph_backward_twice_accumulates(graph):
    score, sigma, x_t, x0 = make_case(graph, (3, 4), 9, torch.float32)
    leaf = score.clone().requires_grad_()
    loss = fused(graph, leaf, sigma, x_t, x0, reduction="mean")
    loss.backward(retain_graph=True)
    once = leaf.grad.clone()
    loss.backward()
    torch.testing.assert_close(leaf.grad, 2 * once)
    s64 = score.double().requires_grad_()
    oracle(graph, s64, sigma.double(), x_t, x0, reduction="mean").backward()
    torch.testing.assert_close(once.double(), s64.grad, rtol=1e-5, atol=1e-6)


def _op_samples(graph):
    score, sigma, x_t, x0 = make_case(graph, (6,), 13, torch.float32)
    flat = score.requires_grad_()
    rows = torch.rand(6) + 0.5
    xt, x0 = x_t.long(), x0.long()
    if graph == "dce":
        return torch.ops.fastbound.dce_forward, (flat, xt, x0, rows, 12, -100, True)
    mask = 12 if graph == "absorb" else -1
    return torch.ops.fastbound.dse_forward, (flat, sigma.expand(6).contiguous(), xt, x0, rows, fb._names.GRAPH_CODES[graph], mask, -100, True)


@pytest.mark.parametrize("graph", KINDS)
def test_opcheck(graph):
    op, args = _op_samples(graph)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    inplace = torch.ops.fastbound.dce_forward_inplace if graph == "dce" else torch.ops.fastbound.dse_forward_inplace
    inplace_args = (args[0].detach().clone(),) + args[1:-1]
    torch.library.opcheck(inplace, inplace_args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("graph", KINDS)
def test_torch_compile_fullgraph(graph):
    torch._dynamo.reset()
    score, sigma, x_t, x0 = make_case(graph, (2, 4), 21, torch.float32)
    lin = torch.nn.Linear(21, 21).double().float()

    def step(h):
        return fused(graph, lin(h), sigma, x_t, x0, reduction="mean")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    h = score.clone().requires_grad_()
    out = compiled(h)
    (g,) = torch.autograd.grad(out, h)
    h2 = score.clone().requires_grad_()
    expected = step(h2)
    (g2,) = torch.autograd.grad(expected, h2)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(g, g2)


def test_matches_sedd_formula_with_small_and_large_sigma():
    """SEDD computes e^sigma - 1 with expm1 below 0.5 and exp - 1 above; both agree with ours."""
    score, _, x_t, x0 = make_case("absorb", (4, 8), 12, torch.float64)
    for s in [1e-4, 0.3, 0.6, 8.0]:
        out = fb.dse_loss(score, s, x_t, x0)
        sig = torch.tensor(s, dtype=torch.float64)
        esigm1 = torch.where(sig < 0.5, torch.expm1(sig), torch.exp(sig) - 1)
        r = 1 / esigm1
        masked = x_t == 11
        direct = score[..., :-1].exp().sum(-1) - r * score.gather(-1, x0[..., None]).squeeze(-1) + r * (r.log() - 1)
        torch.testing.assert_close(out, torch.where(masked, direct, torch.zeros_like(direct)))


def test_exp_matches_torch_from_subnormal_to_overflow():
    """The vectorised exp is ~1 ulp from e^x up to FLT_MAX and gradually underflows below FLT_MIN."""
    x = torch.cat([torch.linspace(-110, 89, 4001), torch.tensor([88.38, 88.6, 88.72, 88.73, -87.4, -103.9, -104.5])])
    n = x.numel()
    score = torch.cat([x, torch.zeros(1)])[None].requires_grad_()  # the mask column is last
    x_t = torch.tensor([n])
    x0 = torch.tensor([0])
    loss = fb.dse_loss(score, 1.0, x_t, x0, reduction="sum")
    (g,) = torch.autograd.grad(loss, score)
    e = g[0, 1:n]  # d loss / d s_y = e^{s_y} away from x0
    expected = torch.exp(x[1:].double())
    finite = expected < torch.finfo(torch.float32).max
    torch.testing.assert_close(e.double()[finite], expected[finite], rtol=3e-7, atol=1e-45)
    assert torch.isinf(e[~finite]).all()


def test_cpu_isa_is_reported():
    assert fb.cpu_isa() in ("avx512", "avx2", "baseline")


# ----------------------------------------------------------------------------- bad input


def _good(graph="absorb"):
    score, sigma, x_t, x0 = make_case(graph, (2, 3), 10, torch.float32)
    return score, sigma, x_t, x0


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: a.update(score=a["score"].long()), TypeError, "score"),
        (lambda a: a.update(score=[1.0, 2.0]), TypeError, "score"),
        (lambda a: a.update(x_t=a["x_t"].float()), TypeError, "x_t"),
        (lambda a: a.update(x0=a["x0"].float()), TypeError, "x0"),
        (lambda a: a.update(x_t=a["x_t"][:, :2]), ValueError, "x_t"),
        (lambda a: a.update(x0=a["x0"][:1]), ValueError, "x0"),
        (lambda a: a.update(x0=torch.full_like(a["x0"], 10)), ValueError, "x0"),
        (lambda a: a.update(x0=torch.full_like(a["x0"], 9)), ValueError, "x0"),  # the mask id
        (lambda a: a.update(x_t=torch.full_like(a["x_t"], -3)), ValueError, "x_t"),
        (lambda a: a.update(sigma=torch.zeros(2, 1)), ValueError, "sigma"),
        (lambda a: a.update(sigma=torch.tensor([[1.0], [float("nan")]])), ValueError, "sigma"),
        (lambda a: a.update(sigma=-1.0), ValueError, "sigma"),
        (lambda a: a.update(sigma=torch.ones(3, 3)), ValueError, "sigma"),
        (lambda a: a.update(weight=torch.ones(4)), ValueError, "weight"),
        (lambda a: a.update(weight="x"), TypeError, "weight"),
        (lambda a: a.update(reduction="avg"), ValueError, "reduction"),
        (lambda a: a.update(graph="absorbing"), ValueError, "graph"),
        (lambda a: a.update(backend="metal"), ValueError, "backend"),
        (lambda a: a.update(backend="cuda"), ValueError, "backend"),
        (lambda a: a.update(x0=a["x0"].to("meta")), ValueError, "x0"),
    ],
)
def test_dse_bad_input(mutate, exc, match):
    score, sigma, x_t, x0 = _good()
    args = dict(score=score, sigma=sigma, x_t=x_t, x0=x0)
    mutate(args)
    with pytest.raises(exc, match=match):
        fb.dse_loss(**args)


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: a.update(logits=a["logits"].int()), TypeError, "logits"),
        (lambda a: a.update(x_t=a["x_t"].double()), TypeError, "x_t"),
        (lambda a: a.update(x0=a["x0"][:, 1:]), ValueError, "x0"),
        (lambda a: a.update(x0=torch.full_like(a["x0"], 9)), ValueError, "mask id"),
        (lambda a: a.update(x0=torch.full_like(a["x0"], 12)), ValueError, "x0"),
        (lambda a: a.update(x_t=torch.full_like(a["x_t"], 11)), ValueError, "x_t"),
        (lambda a: a.update(mask_id=-2), ValueError, "mask_id"),
        (lambda a: a.update(mask_id="9"), TypeError, "mask_id must be an int"),
        (lambda a: a.update(ignore_index=1.5), TypeError, "ignore_index"),
    ],
)
def test_dce_bad_input(mutate, exc, match):
    score, _, x_t, x0 = _good("dce")
    args = dict(logits=score, x_t=x_t, x0=x0)
    mutate(args)
    with pytest.raises(exc, match=match):
        fb.dce_loss(**args)


def test_mask_id_outside_logits():
    """mask_id >= V: the logits hold the real tokens only and nothing is excluded."""
    score, _, x_t, x0 = make_case("dce", (3, 4), 8, torch.float32)
    x_t = torch.where(x_t == 7, 8, x_t)
    check_against_oracle("dce", score, None, x_t, x0, mask_id=8)


def test_sizes_that_overflow_int32_are_refused():
    huge = torch.zeros(1, 1).expand(2**31, 2)  # no memory behind it
    ids = torch.zeros(1, dtype=torch.long).expand(2**31)
    with pytest.raises(ValueError, match="score has 2147483648 positions"):
        fb.dse_loss(huge, 1.0, ids, ids)
    wide = torch.zeros(1, 1).expand(1, 2**31)
    one = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="logits has 2147483648 columns"):
        fb.dce_loss(wide, one, one)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_mean_counts_ignored_positions_on_any_id_dtype(dtype):
    """ignore_index = -100 wraps to 156 in uint8: the count must use the ids the kernel sees."""
    n_cols = 200
    score = torch.randn(3, n_cols)
    x0 = torch.full((3,), 156, dtype=dtype)
    x_t = torch.full((3,), n_cols - 1, dtype=dtype)
    out = fb.dse_loss(score, 1.0, x_t, x0, reduction="mean")
    expected = ref.dse_loss(score.double(), 1.0, x_t.long(), x0.long(), reduction="mean")
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_dce_nan_in_a_whole_leading_chunk_propagates():
    """A chunk of the online log-sum-exp that holds only NaN / -inf must not drop the NaN."""
    score, _, x_t, x0 = make_case("dce", (2,), 4097, torch.float32)
    x_t[:] = 4096
    score[0, :2048] = float("nan")
    score[1, :2048] = float("-inf")
    score[1, 5] = float("nan")
    out = fb.dce_loss(score, x_t, x0)
    assert torch.isnan(out).all()
    assert torch.isnan(ref.dce_loss(score, x_t, x0)).all()


@pytest.mark.parametrize("graph", KINDS)
def test_inplace_on_overlapping_rows_is_refused(graph):
    base = torch.randn(1, 11)
    x_t = torch.full((4,), 10)
    x0 = torch.full((4,), 3)
    with pytest.raises(ValueError, match="inplace=True needs"):
        fused(graph, base.expand(4, 11), torch.ones(4), x_t, x0, inplace=True)
    with pytest.raises(RuntimeError, match="single memory location"):  # the raw op refuses it too
        torch.ops.fastbound.dce_forward_inplace(base.expand(4, 11), x_t, x0, torch.ones(4), 10, -100)
    out = fused(graph, base.expand(4, 11), torch.ones(4), x_t, x0)  # out of place is fine
    torch.testing.assert_close(out, out[:1].expand(4))


def test_ids_that_do_not_fit_int64_are_refused():
    score, sigma, x_t, x0 = _good()
    with pytest.raises(ValueError, match="ignore_index"):
        fb.dse_loss(score, sigma, x_t, x0, ignore_index=2**63)
    with pytest.raises(ValueError, match="mask_id"):
        fb.dce_loss(score, x_t, x0, mask_id=2**64)


def test_raw_op_without_gradient_cannot_be_backpropagated():
    op, args = _op_samples("absorb")
    args = list(args)
    args[-1] = False
    loss, _ = op(*args)
    with pytest.raises(RuntimeError, match="need_grad=False"):
        loss.sum().backward()


def test_make_fx_traces_the_losses():
    """Tracing with make_fx skips the data-dependent checks instead of failing on them."""
    from torch.fx.experimental.proxy_tensor import make_fx

    score, sigma, x_t, x0 = make_case("absorb", (2, 3), 7, torch.float32)
    for mode in ["real", "fake", "symbolic"]:
        gm = make_fx(lambda s, sg, a, b: fb.dse_loss(s, sg, a, b, reduction="sum"), tracing_mode=mode)(
            score, sigma, x_t, x0
        )
        torch.testing.assert_close(gm(score, sigma, x_t, x0), fb.dse_loss(score, sigma, x_t, x0, reduction="sum"))


def test_raw_op_refuses_out_of_range_ids():
    """Even without the Python checks (as under torch.compile) the kernel never reads out of bounds."""
    op, args = _op_samples("absorb")
    args = list(args)
    args[3] = torch.full_like(args[3], 99)
    args[2] = torch.full_like(args[2], 12)
    with pytest.raises(ValueError, match="x0 contains id 99"):
        op(*args)


@pytest.mark.parametrize("graph", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradient_is_the_rounded_float32_gradient(graph, dtype):
    """The kernels compute in float32 and round once: the 16-bit gradient equals torch's rounding
    of the float32 kernel's gradient bit for bit, over values from subnormal to overflow."""
    score, sigma, x_t, x0 = make_case(graph, (8, 16), 300, dtype, scale=6.0)
    score[0, :, :40] = torch.linspace(-30, 12, 40).to(dtype)  # tiny and huge exp(score)
    outs = {}
    for dt in (dtype, torch.float32):
        s = score.to(dt).requires_grad_()
        loss = fused(graph, s, sigma, x_t, x0, weight=3.0, reduction="sum")
        (outs[dt],) = torch.autograd.grad(loss, s)
    assert torch.equal(outs[dtype].view(torch.int16), outs[torch.float32].to(dtype).view(torch.int16))


# ----------------------------------------------------------------------------- upstream factors (issue 14)


FORMS = {
    "sedd": lambda loss, w, B: (w * loss(reduction="none")).sum(-1).mean(),
    "sum_div_B": lambda loss, w, B: loss(weight=w, reduction="sum") / B,
    "grad_scaler": lambda loss, w, B: loss(weight=w, reduction="sum") * 65536.0,
    "accumulation": lambda loss, w, B: loss(weight=w, reduction="mean") / 4,
    "per_position": lambda loss, w, B: (loss(reduction="none") * w.expand(-1, 5).flip(0)).sum(),
}


@pytest.mark.parametrize("graph", KINDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("inplace", [False, True])
def test_forms_with_upstream_factors_match_the_oracle(graph, form, inplace):
    """A factor after the call rescales the saved gradient in place: same gradient as the oracle's."""
    score, sigma, x_t, x0 = make_case(graph, (3, 5), 11, torch.float32)
    w = torch.rand(3, 1) + 0.5
    s = score.clone().requires_grad_()
    h = s * 1.0  # inplace=True needs a non-leaf
    out = FORMS[form](lambda **kw: fused(graph, h, sigma, x_t, x0, inplace=inplace, **kw), w, 3)
    out.backward()
    s64 = score.double().requires_grad_()
    expected = FORMS[form](lambda **kw: oracle(graph, s64, sigma.double(), x_t, x0, **kw), w.double(), 3)
    expected.backward()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-5, atol=1e-5 * _magnitude(s64.grad))


@pytest.mark.parametrize("graph", KINDS)
def test_retain_graph_with_upstream_factor_keeps_the_saved_gradient(graph):
    score, sigma, x_t, x0 = make_case(graph, (3, 4), 9, torch.float32)
    leaf = score.clone().requires_grad_()
    loss = fused(graph, leaf, sigma, x_t, x0, reduction="sum")
    (2 * loss).backward(retain_graph=True)
    once = leaf.grad.clone()
    (3 * loss).backward()
    torch.testing.assert_close(leaf.grad, 2.5 * once)


@pytest.mark.parametrize("graph", KINDS)
def test_gradient_is_a_plain_tensor(graph):
    score, sigma, x_t, x0 = make_case(graph, (2, 3), 7, torch.float32)
    s = score.requires_grad_()
    for reduction in ("sum", "none"):
        out = fused(graph, s, sigma, x_t, x0, reduction=reduction)
        (g,) = torch.autograd.grad(out, s, torch.ones_like(out))
        assert not g.requires_grad and g.grad_fn is None
        g.zero_()
    op, args = _op_samples(graph)
    (g,) = torch.autograd.grad(op(*args)[0].sum(), args[0])  # the raw op too
    assert not g.requires_grad


# ----------------------------------------------------------------------------- gradients to sigma and weight


@pytest.mark.parametrize("graph", KINDS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_gradcheck_score_sigma_and_weight(graph, reduction):
    score, sigma, x_t, x0 = make_case(graph, (3, 4), 7, torch.float64, seed=3)
    x0[0, 0] = -100
    score.requires_grad_()
    sig = (sigma.double() + 0.2).requires_grad_()
    weight = torch.rand(3, 4, dtype=torch.float64)
    weight[1, 2] = 0.0  # the gradient to a zero weight is the unweighted loss
    weight.requires_grad_()
    if graph == "dce":
        fn = lambda s, w: fb.dce_loss(s, x_t, x0, weight=w, reduction=reduction)
        assert torch.autograd.gradcheck(fn, (score, weight))
        return
    fn = lambda s, sg, w: fb.dse_loss(s, sg, x_t, x0, graph=graph, weight=w, reduction=reduction)
    assert torch.autograd.gradcheck(fn, (score, sig, weight))


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
@pytest.mark.parametrize("sigma", [1e-3, 0.7, 30.0])
def test_sigma_gradient_matches_the_oracle(graph, sigma):
    score, _, x_t, x0 = make_case(graph, (4, 6), 12, torch.float32)
    sg = torch.full((4, 1), sigma, requires_grad=True)
    fb.dse_loss(score, sg, x_t, x0, graph=graph, reduction="sum").backward()
    sg64 = torch.full((4, 1), sigma, dtype=torch.float64, requires_grad=True)
    ref.dse_loss(score.double(), sg64, x_t, x0, graph=graph, reduction="sum").backward()
    torch.testing.assert_close(sg.grad.double(), sg64.grad, rtol=1e-4, atol=1e-6 * _magnitude(sg64.grad))


@pytest.mark.parametrize("graph", KINDS)
def test_forward_mode_jvp_matches_the_oracle(graph):
    score, sigma, x_t, x0 = make_case(graph, (3, 4), 9, torch.float64)
    tangent = torch.randn_like(score)
    f = lambda s: fused(graph, s, sigma.double(), x_t, x0, reduction="sum")
    g = lambda s: oracle(graph, s, sigma.double(), x_t, x0, reduction="sum")
    _, t = torch.func.jvp(f, (score,), (tangent,))
    _, t_ref = torch.func.jvp(g, (score,), (tangent,))
    torch.testing.assert_close(t, t_ref)
    with torch.autograd.forward_ad.dual_level():
        out = f(torch.autograd.forward_ad.make_dual(score, tangent))
        torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(out).tangent, t_ref)


# ----------------------------------------------------------------------------- in place (issue 11)


@pytest.mark.parametrize("graph", KINDS)
def test_inplace_over_a_saved_tensor_raises(graph):
    score, sigma, x_t, x0 = make_case(graph, (2, 3), 7, torch.float32)
    z = score.clone().requires_grad_()
    s = z.exp()  # exp saves its output for the backward
    loss = fused(graph, s, sigma, x_t, x0, reduction="sum", inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("graph", KINDS)
def test_inplace_on_a_leaf_that_requires_grad_is_refused(graph):
    score, sigma, x_t, x0 = make_case(graph, (2, 3), 7, torch.float32)
    with pytest.raises(ValueError, match="leaf tensor that requires grad"):
        fused(graph, torch.nn.Parameter(score), sigma, x_t, x0, inplace=True)


@pytest.mark.parametrize("graph", KINDS)
def test_inplace_on_a_column_slice(graph):
    score, sigma, x_t, x0 = make_case(graph, (2, 3), 7, torch.float32)
    wide = torch.cat([score, torch.randn(2, 3, 4)], -1)
    h = wide.clone().requires_grad_()
    out = fused(graph, (h * 1.0)[..., :7], sigma, x_t, x0, reduction="sum", inplace=True)
    out.backward()
    s64 = score.double().requires_grad_()
    oracle(graph, s64, sigma.double(), x_t, x0, reduction="sum").backward()
    torch.testing.assert_close(h.grad[..., :7].double(), s64.grad, rtol=1e-5, atol=1e-6)
    assert not h.grad[..., 7:].any()


@pytest.mark.parametrize("graph", KINDS)
def test_inplace_under_torch_compile_fullgraph(graph):
    torch._dynamo.reset()
    score, sigma, x_t, x0 = make_case(graph, (2, 4), 9, torch.float32)

    def step(h):
        return fused(graph, h * 2.0, sigma, x_t, x0, reduction="sum", inplace=True)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    h = score.clone().requires_grad_()
    (g,) = torch.autograd.grad(compiled(h), h)
    h2 = score.clone().requires_grad_()
    (g2,) = torch.autograd.grad(step(h2), h2)
    torch.testing.assert_close(g, g2)


# ----------------------------------------------------------------------------- the mask anywhere


@pytest.mark.parametrize("mask_id", [0, 5, 10])
@pytest.mark.parametrize("weight", [None, "w"])
def test_dse_mask_column_anywhere_matches_oracle_with_columns_permuted(mask_id, weight):
    """Moving the mask column to m and the other columns around it equals the oracle's V-1 layout."""
    n_cols = 11
    score, sigma, x_t, x0 = make_case("absorb", (3, 4), n_cols, torch.float32)
    w = torch.rand(3, 1) if weight else None
    perm = torch.tensor([c for c in range(n_cols) if c != n_cols - 1][:mask_id] + [n_cols - 1]
                        + [c for c in range(n_cols - 1)][mask_id:])  # perm[new column] = old column
    inverse = torch.argsort(perm)  # old id -> new column
    s = score[..., perm].clone().requires_grad_()
    out = fb.dse_loss(s, sigma, inverse[x_t], inverse[x0], mask_id=mask_id, weight=w, reduction="none")
    s64 = score.double().requires_grad_()
    expected = ref.dse_loss(s64, sigma.double(), x_t, x0, weight=w, reduction="none")
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    probe = torch.randn_like(expected)
    (out * probe.float()).sum().backward()
    (expected * probe).sum().backward()
    torch.testing.assert_close(s.grad.double(), s64.grad[..., perm], rtol=1e-5, atol=1e-6)


def test_dse_mask_id_checks():
    score, sigma, x_t, x0 = _good()
    with pytest.raises(ValueError, match=r"mask_id must be a column of score, in \[0, 10\), got 10"):
        fb.dse_loss(score, sigma, x_t, x0, mask_id=10)
    out = fb.dse_loss(score, sigma, x_t, x0, mask_id=np.int64(9))
    torch.testing.assert_close(out, fb.dse_loss(score, sigma, x_t, x0))
    fb.dse_loss(score, sigma, x_t, x0, graph="uniform", mask_id=3)  # ignored by the uniform graph


# ----------------------------------------------------------------------------- messages (issue 11 item 13)


def test_numpy_integer_mask_id_is_accepted():
    score, _, x_t, x0 = _good("dce")
    torch.testing.assert_close(fb.dce_loss(score, x_t, x0, mask_id=np.int64(9)), fb.dce_loss(score, x_t, x0))


def test_no_columns_does_not_blame_an_unpassed_mask_id():
    with pytest.raises(ValueError, match="real token column") as info:
        fb.dce_loss(torch.zeros(2, 0), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    assert "-1" not in str(info.value)


def test_sigma_overflowing_the_accumulation_dtype_names_sigma():
    score, _, x_t, x0 = _good()
    with pytest.raises(ValueError, match="sigma .*torch.float32"):
        fb.dse_loss(score, 1e300, x_t, x0)


@pytest.mark.parametrize("kind", ["sparse", "nested"])
def test_sparse_and_nested_tensors_are_refused(kind):
    score, sigma, x_t, x0 = _good()
    bad = score.to_sparse() if kind == "sparse" else torch.nested.nested_tensor([score[0], score[1]])
    with pytest.raises(TypeError, match="score must be a dense tensor"):
        fb.dse_loss(bad, sigma, x_t, x0)
    with pytest.raises(TypeError, match="x_t must be a dense tensor"):
        fb.dse_loss(score, sigma, x_t.to_sparse(), x0)


def test_dce_columns_after_the_mask_enter_the_softmax():
    """Only the mask column is left out: a huge logit after it lowers the loss of every other token."""
    score, _, x_t, x0 = make_case("dce", (2, 3), 10, torch.float32)
    x_t[:] = 4
    x0 = torch.where(x0 >= 4, 0, x0)
    base = fb.dce_loss(score, x_t, x0, mask_id=4)
    score[..., 4] = 50.0  # the mask column: ignored
    torch.testing.assert_close(fb.dce_loss(score, x_t, x0, mask_id=4), base)
    score[..., 7] = 50.0  # a column after the mask: in the softmax
    assert (fb.dce_loss(score, x_t, x0, mask_id=4) > base + 10).all()


def test_cached_argument_checks_still_check_values_and_the_backend(monkeypatch):
    """The data-free checks are cached per signature; ids, sigma and the backend choice are not."""
    score, sigma, x_t, x0 = _good()
    fb.dse_loss(score, sigma, x_t, x0)
    with pytest.raises(ValueError, match="x_t"):
        fb.dse_loss(score, sigma, torch.full_like(x_t, 10), x0)
    with pytest.raises(ValueError, match="sigma"):
        fb.dse_loss(score, -sigma, x_t, x0)
    monkeypatch.setenv("FASTBOUND_BACKEND", "metal")
    with pytest.raises(ValueError, match="backend"):
        fb.dse_loss(score, sigma, x_t, x0)


def test_backward_decides_the_unit_upstream_without_reading_device_values():
    """Only CPU values are read (no host-device sync): a meta tensor would raise if read."""
    assert not fb._ops._unit(torch.ones(4, device="meta"))
    assert fb._ops._unit(torch.ones(1).expand(4))
    assert not fb._ops._unit(torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("bad", [dict(reduction=["sum"]), dict(backend=["cpu"])])
def test_unhashable_options_are_named(bad):
    score, sigma, x_t, x0 = _good()
    with pytest.raises(ValueError, match=next(iter(bad))):
        fb.dse_loss(score, sigma, x_t, x0, **bad)


# ----------------------------------------------------------------------------- the saved buffer is never shared


@pytest.mark.parametrize("graph", KINDS)
def test_retained_graph_backwards_never_share_the_saved_gradient(graph):
    """A gradient the user holds stays intact through later backwards of a retained graph, and
    three backwards into .grad accumulate (AccumulateGrad adopts a returned buffer as .grad)."""
    score, sigma, x_t, x0 = make_case(graph if graph != "dce" else "absorb", (2, 3), 6, torch.float64)
    loss_fn = (lambda s: fb.dce_loss(s, x_t, x0)) if graph == "dce" else (
        lambda s: fb.dse_loss(s, sigma, x_t, x0, graph=graph))
    s = score.clone().requires_grad_()
    out = loss_fn(s)
    (held,) = torch.autograd.grad(out.sum(), s, retain_graph=True)
    before = held.clone()
    for _ in range(2):
        out.sum().backward(retain_graph=True)
    out.sum().backward()
    s.grad.zero_()
    torch.testing.assert_close(held, before, rtol=0, atol=0)
    fresh = score.clone().requires_grad_()
    again = loss_fn(fresh)
    for keep in (True, True, False):
        again.sum().backward(retain_graph=keep)
    torch.testing.assert_close(fresh.grad, 3 * before)


# ----------------------------------------------------------------------------- the fixed cost of a call


@pytest.mark.parametrize("graph", KINDS)
def test_cached_row_scale_of_ones_is_never_written(graph):
    """The row scale of ones is cached between calls: no form, in place or not, may change it."""
    score, sigma, x_t, x0 = make_case(graph, (2, 3), 7, torch.float32)
    for inplace in (False, True):
        for reduction in ("none", "sum", "mean"):
            s = score.clone().requires_grad_()
            src = s * 1 if inplace else s
            out = fused(graph, src, sigma, x_t, x0, reduction=reduction, inplace=inplace)
            (out.sum() * 3.0).backward()
    assert fb.losses._ONES and all(bool((ones == 1).all()) for ones in fb.losses._ONES.values())


@pytest.mark.parametrize("graph", KINDS)
def test_cpu_value_checks_name_the_first_bad_id_as_the_python_checks(graph):
    """On CPU tensors the checks are one C++ pass (``check_loss_ids``); same rules and messages
    as `check_dse_ids` / `check_dce_ids` (which other devices run)."""
    from fastbound import _validate as v
    from fastbound import losses

    score, sigma, x_t, x0 = make_case(graph, (3, 4), 9, torch.float32)
    bads = [("x_t", torch.tensor(-2)), ("x_t", torch.tensor(11)), ("x0", torch.tensor(9)), ("x0", torch.tensor(40))]
    for name, value in bads:
        args = dict(x_t=x_t.clone(), x0=x0.clone())
        args[name][1, 2] = value
        checks = v.ValueChecks()
        if graph == "dce":
            losses.check_dce_ids(checks, args["x_t"], args["x0"], 9, 8, -100)
        else:
            losses.check_dse_ids(checks, graph, args["x_t"], args["x0"], 9, -100)
        with pytest.raises(ValueError) as python:
            checks.run()
        with pytest.raises(ValueError) as cpu:
            fused(graph, score, sigma, **args)
        assert str(cpu.value) == str(python.value)


def test_forward_without_gradients_builds_no_graph():
    score, sigma, x_t, x0 = make_case("absorb", (2, 3), 7, torch.float32)
    assert fb.dse_loss(score, sigma, x_t, x0, reduction="sum").grad_fn is None
    assert fb.dse_loss(score.requires_grad_(), sigma, x_t, x0).grad_fn is not None


# --- regressions found in review: inference tensors, the cached row scale, float sigma, raw ops, -inf chunks


@pytest.mark.parametrize("loss", ["dce", "absorb", "uniform"])
def test_ids_made_under_inference_mode_train(loss):
    """The backward saves the ids (to skip zero rows); inference tensors cannot be saved: a copy is."""
    with torch.inference_mode():
        x_t = torch.tensor([5, 5, 2, 5])
        x0 = torch.tensor([0, 1, 2, 3])
    score = torch.randn(4, 6, requires_grad=True)
    if loss == "dce":
        out = fb.dce_loss(score * 1, x_t, x0, reduction="none")
    else:
        out = fb.dse_loss(score * 1, 0.7, x_t, x0, graph=loss, reduction="none")
    (out * torch.arange(1.0, 5.0)).sum().backward()
    assert torch.isfinite(score.grad).all() and score.grad.abs().sum() > 0


def test_a_first_call_under_inference_mode_does_not_break_later_training():
    """The cached row scale of ones made inside inference mode is a normal tensor."""
    score = torch.randn(3, 7)
    x_t, x0 = torch.full((3,), 6), torch.tensor([0, 1, 2])
    with torch.inference_mode():
        fb.dce_loss(score, x_t, x0, reduction="sum")
    trained = score.clone().requires_grad_()
    fb.dce_loss(trained * 1, x_t, x0, reduction="sum").backward()
    assert trained.grad is not None


@pytest.mark.parametrize("sigma", [1e-50, 1e300])
def test_a_float_sigma_that_rounds_away_in_float32_is_refused(sigma):
    score = torch.randn(2, 5)
    with pytest.raises(ValueError, match="sigma must be positive and finite"):
        fb.dse_loss(score, sigma, torch.full((2,), 4), torch.tensor([0, 1]))


def test_the_raw_op_backward_leaves_the_returned_buffer_alone():
    """The raw op returns its gradient buffer: a later backward must neither rescale it nor adopt it."""
    score = torch.randn(4, 6, requires_grad=True)
    x_t, x0 = torch.full((4,), 5), torch.tensor([0, 1, 2, 3])
    loss, grad = torch.ops.fastbound.dce_forward(score, x_t, x0, torch.ones(4), 5, -100, True)
    kept = grad.clone()
    (loss * 3).sum().backward()
    torch.testing.assert_close(grad, kept, rtol=0, atol=0)
    assert score.grad.data_ptr() != grad.data_ptr()
    torch.testing.assert_close(score.grad, 3 * kept)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dce_gradient_ignores_minus_inf_chunks_before_a_low_max(dtype):
    """A chunk of -inf scores (split off by the mask column) before a row whose max is below -88:
    its gradient is 0 and the rest is softmax - onehot, not NaN (e^{0 - max} overflowed)."""
    score = (torch.randn(3, 6) - 100).to(dtype)
    score[:, 0] = float("-inf")
    x_t, x0 = torch.full((3,), 1), torch.full((3,), 3)
    low = score.clone().requires_grad_()
    fb.dce_loss(low, x_t, x0, mask_id=1, reduction="sum").backward()
    kept = score.float().index_fill(1, torch.tensor([1]), float("-inf"))
    want = torch.softmax(kept, dim=1) - torch.nn.functional.one_hot(x0, 6)
    assert torch.isfinite(low.grad).all()
    torch.testing.assert_close(low.grad.float(), want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_streamed_gradient_rows_equal_the_ordinary_ones(kind, dtype):
    """A gradient of 32 MiB or more (csrc/cpu/loss_rows.h kStreamBytes) writes its zero rows, and
    the DCE's 16-bit rows, by non-temporal stores: the same bits as the rows of a small call
    (ordinary stores). An odd V puts the rows at every alignment; masked, unmasked and ignored
    rows mix; the big gradient reuses a NaN-filled buffer (the CPU buffer pool), so no byte is
    skipped."""
    v = 262147
    n = -(-(32 << 20) // (v * dtype.itemsize)) + 3
    score, sigma, x_t, x0 = make_case(kind, (n,), v, dtype, mask_frac=0.5)
    x0[::7] = -100  # ignored rows: zero rows on every graph
    if kind != "uniform":
        assert (x_t == v - 1).any() and (x_t != v - 1).any()

    def loss_and_grad(rows):
        leaf = score[rows].detach().clone().requires_grad_()
        s = sigma[rows] if sigma.dim() else sigma
        out = (fb.dce_loss(leaf, x_t[rows], x0[rows]) if kind == "dce"
               else fb.dse_loss(leaf, s, x_t[rows], x0[rows], graph=kind))
        out.sum().backward()
        return out.detach(), leaf.grad

    before = fb.cpu_buffer_cache().max_bytes
    fb.cpu_buffer_cache(1 << 30)
    try:
        poisoned = loss_and_grad(slice(None))[1].fill_(float("nan"))
        address = poisoned.data_ptr()
        del poisoned
        big = loss_and_grad(slice(None))
    finally:
        fb.cpu_buffer_cache(before)
    assert big[1].nbytes >= 32 << 20
    assert big[1].data_ptr() == address, "the gradient must reuse the NaN-filled buffer: every byte is written"
    for start in range(0, n, 16):
        rows = slice(start, min(n, start + 16))
        small = loss_and_grad(rows)
        torch.testing.assert_close(big[0][rows], small[0], rtol=0, atol=0)
        torch.testing.assert_close(big[1][rows], small[1], rtol=0, atol=0)


@pytest.mark.parametrize("loss", ["dse", "dce"])
def test_ignore_index_may_be_the_mask_id(loss):
    """A position whose x0 is ignore_index contributes nothing, whatever that id is: with
    ignore_index = mask id (a padding id reused as the mask), the host checks skip those positions
    as the kernels do, and the loss, its gradient and the integration step match the oracle,
    on the first call and the cached fast path."""
    import fastbound as fb
    from fastbound import reference as R

    V, mask = 7, 2
    g = torch.Generator().manual_seed(0)
    score = torch.randn(2, 5, V, generator=g, dtype=torch.float64)
    x0 = torch.tensor([[0, 2, 3, 4, 2], [5, 6, 2, 0, 1]])
    x_t = torch.where(torch.rand(2, 5, generator=g) < 0.6, torch.tensor(mask), x0)
    sigma = torch.tensor([[0.7], [1.3]], dtype=torch.float64)
    for _ in range(2):
        leaf = score.clone().requires_grad_()
        if loss == "dse":
            got = fb.dse_loss(leaf, sigma, x_t, x0, mask_id=mask, ignore_index=mask)
            want = R.dse_loss(score, sigma, x_t, x0, mask_id=mask, ignore_index=mask)
        else:
            got = fb.dce_loss(leaf, x_t, x0, mask_id=mask, ignore_index=mask)
            want = R.dce_loss(score, x_t, x0, mask_id=mask, ignore_index=mask)
        assert torch.allclose(got, want)
        got.sum().backward()
        ref_leaf = score.clone().requires_grad_()
        (R.dse_loss(ref_leaf, sigma, x_t, x0, mask_id=mask, ignore_index=mask) if loss == "dse"
         else R.dce_loss(ref_leaf, x_t, x0, mask_id=mask, ignore_index=mask)).sum().backward()
        assert torch.allclose(leaf.grad, ref_leaf.grad)
    acc = torch.zeros(2, 2, dtype=torch.float64)
    fb.integrate_step(score, x_t, x0, sigma[:, 0], 1.0, acc, loss=loss, mask_id=mask, ignore_index=mask)
    assert torch.allclose(acc, R.integrate_step(score, x_t, x0, sigma[:, 0], 1.0, torch.zeros_like(acc), loss=loss,
                                                mask_id=mask, ignore_index=mask))
    with pytest.raises(ValueError, match="x0 contains the mask id"):  # not ignored: still refused
        fb.dce_loss(score, x_t, x0, mask_id=mask) if loss == "dce" else fb.dse_loss(score, sigma, x_t, x0, mask_id=mask)
