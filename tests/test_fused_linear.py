"""Fused linear + loss (`fastbound.fused_linear`) against the unfused composition and the oracle."""

import math

import pytest
import torch

import fastbound as fb
from fastbound import reference as ref
from fastbound.fused_linear import chunk_rows, fused_linear_dce_loss, fused_linear_dse_loss, head_integrate_step
from fastbound.fused_linear.loss import fused_linear_loss

KINDS = ("absorb", "uniform", "dce")


def make_case(kind, shape=(3, 10), n_hidden=12, n_cols=17, dtype=torch.float32, *, seed=0, mask_frac=0.5, bias=True):
    """Hidden states, an output layer and ids; the absorbing mask (DSE and DCE) is column V-1."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, n_hidden, generator=g).to(dtype)
    weight = (torch.randn(n_cols, n_hidden, generator=g) / math.sqrt(n_hidden)).to(dtype)
    b = (0.5 * torch.randn(n_cols, generator=g)).to(dtype) if bias else None
    n_real = n_cols if kind == "uniform" else n_cols - 1
    x0 = torch.randint(0, n_real, shape, generator=g)
    noise = torch.rand(shape, generator=g) < mask_frac
    if kind == "uniform":
        x_t = torch.where(noise, torch.randint(0, n_cols, shape, generator=g), x0)
    else:
        x_t = torch.where(noise, torch.full_like(x0, n_cols - 1), x0)
    sigma = torch.rand(shape[:1] + (1,) * (len(shape) - 1), generator=g) * 2 + 0.1
    return dict(hidden=hidden, weight=weight, bias=b, sigma=sigma, x_t=x_t, x0=x0)


def fused(kind, hidden, weight, bias, sigma, x_t, x0, **kw):
    if kind == "dce":
        return fused_linear_dce_loss(hidden, weight, bias, x_t, x0, **kw)
    return fused_linear_dse_loss(hidden, weight, bias, sigma, x_t, x0, graph=kind, **kw)


def scores_of(hidden, weight, bias):
    return hidden @ weight.T if bias is None else hidden @ weight.T + bias


def unfused(kind, hidden, weight, bias, sigma, x_t, x0, *, loss_weight=None, lib=fb, **kw):
    """The composition the fused loss replaces: the matmul, then fastbound's (or the oracle's) loss."""
    s = scores_of(hidden, weight, bias)
    kw.pop("chunk_size", None)
    if kind == "dce":
        return lib.dce_loss(s, x_t, x0, weight=loss_weight, **kw)
    return lib.dse_loss(s, sigma, x_t, x0, graph=kind, weight=loss_weight, **kw)


def leaves(case, dtype=None):
    """Fresh autograd leaves of hidden, weight, bias (cast to ``dtype``)."""
    out = dict(case)
    for name in ("hidden", "weight", "bias"):
        if out[name] is not None:
            t = out[name].detach()
            out[name] = (t if dtype is None else t.to(dtype)).clone().requires_grad_()
    if dtype is not None and torch.is_tensor(out["sigma"]):
        out["sigma"] = out["sigma"].to(torch.float64 if dtype == torch.float64 else torch.float32)
    return out


def value_and_grads(fn, kind, case, probe, **kw):
    out = fn(kind, **case, **kw)
    params = [case[n] for n in ("hidden", "weight", "bias") if case[n] is not None]
    weights = probe if out.dim() else torch.ones((), dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * weights).sum(), params)
    return out.detach().double(), [g.double() for g in grads]


def max_err(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


def check_fused(kind, case, dtype, **kw):
    """Fused vs unfused in ``dtype``: fp32/fp64 agree closely; bf16/fp16 are no further from the
    float64 truth than the unfused same-dtype composition (times 2, plus one rounding of the result)."""
    truth = leaves(case, torch.float64)
    lead = case["x_t"].shape if kw.get("reduction", "none") == "none" else ()
    probe = torch.randn(lead, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want, want_grads = value_and_grads(unfused, kind, truth, probe, **kw)
    got, got_grads = value_and_grads(fused, kind, leaves(case, dtype), probe, **kw)
    base, base_grads = value_and_grads(unfused, kind, leaves(case, dtype), probe, **kw)
    if dtype in (torch.float32, torch.float64):
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=tol, atol=tol * max(1.0, w.abs().max().item()))
        return
    eps = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    pairs = [(got, base, want)] + list(zip(got_grads, base_grads, want_grads))
    for name, (g, b, w) in zip(["loss", "hidden", "weight", "bias"], pairs):
        bound = 2 * max_err(b, w) + eps * max(1e-3, w.abs().max().item())
        assert max_err(g, w) <= bound, f"{name}: fused error {max_err(g, w)} > bound {bound} (unfused {max_err(b, w)})"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_matches_unfused(kind, dtype, reduction):
    check_fused(kind, make_case(kind), dtype, reduction=reduction, chunk_size=4)


@pytest.mark.parametrize("kind", KINDS)
def test_matches_unfused_fp16_and_loss_weight(kind):
    case = make_case(kind, (4, 9), seed=3)
    w = torch.rand(4, 1, generator=torch.Generator().manual_seed(2)) + 0.5
    check_fused(kind, case, torch.float16, reduction="sum", loss_weight=w)
    check_fused(kind, case, torch.float32, reduction="none", loss_weight=w)


@pytest.mark.parametrize("kind", KINDS)
def test_matches_oracle_on_materialised_scores(kind):
    case = make_case(kind, dtype=torch.float64, seed=5)
    probe = torch.randn(case["x_t"].shape, dtype=torch.float64)
    got, got_grads = value_and_grads(fused, kind, leaves(case), probe)
    want, want_grads = value_and_grads(lambda *a, **k: unfused(*a, lib=ref, **k), kind, leaves(case), probe)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_gradcheck_float64(kind, reduction):
    case = make_case(kind, (2, 5), n_hidden=4, n_cols=6, dtype=torch.float64, seed=7)

    def fn(hidden, weight, bias):
        return fused(kind, hidden, weight, bias, case["sigma"], case["x_t"], case["x0"], reduction=reduction,
                     chunk_size=3)

    args = tuple(case[n].clone().requires_grad_() for n in ("hidden", "weight", "bias"))
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_sizes_agree(kind):
    """Chunks of 1, 3 (splitting sequences of 10 positions), 7 rows and one chunk give one answer."""
    case = make_case(kind, (3, 10), dtype=torch.float64, seed=11)
    results = []
    for chunk in (1, 3, 7, None):
        c = leaves(case)
        out = fused(kind, **c, reduction="sum", chunk_size=chunk)
        out.backward()
        results.append([out.detach()] + [c[n].grad for n in ("hidden", "weight", "bias")])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["absorb", "dce"])
@pytest.mark.parametrize("mask_frac", [0.0, 1.0])
def test_no_masked_and_all_masked(kind, mask_frac):
    case = make_case(kind, mask_frac=mask_frac, seed=2)
    check_fused(kind, case, torch.float32, reduction="sum", chunk_size=5)
    c = leaves(case)
    out = fused(kind, **c, reduction="sum")
    out.backward()
    if mask_frac == 0.0:
        assert out.item() == 0.0
        assert all(torch.count_nonzero(c[n].grad) == 0 for n in ("hidden", "weight", "bias"))


@pytest.mark.parametrize("kind", KINDS)
def test_rows_that_do_not_contribute_get_exactly_zero_gradient(kind):
    case = make_case(kind, seed=4)
    case["x0"] = case["x0"].clone()
    case["x0"][0, :4] = -100
    c = leaves(case)
    out = fused(kind, **c, reduction="none", chunk_size=4)
    out.backward(torch.randn_like(out))
    idle = case["x0"] == -100
    if kind != "uniform":
        idle |= case["x_t"] != case["weight"].shape[0] - 1
    assert torch.all(out.detach()[idle] == 0)
    assert torch.all(c["hidden"].grad[idle] == 0)
    assert torch.count_nonzero(c["hidden"].grad[~idle].abs().sum(-1)) == (~idle).sum()


@pytest.mark.parametrize("kind", KINDS)
def test_ignore_index_and_custom_value(kind):
    case = make_case(kind, seed=6)
    case["x0"] = case["x0"].clone()
    case["x0"][1, 2:7] = -7
    check_fused(kind, case, torch.float32, reduction="mean", ignore_index=-7, chunk_size=4)


@pytest.mark.parametrize("kind", KINDS)
def test_noncontiguous_hidden_and_weight_and_no_bias(kind):
    case = make_case(kind, (10, 3), seed=8, bias=False)
    case["hidden"] = case["hidden"].transpose(0, 1)  # (3, 10, H), non-contiguous
    case["x_t"], case["x0"] = case["x_t"].T, case["x0"].T
    case["sigma"] = case["sigma"][:3].reshape(3, 1)
    case["weight"] = case["weight"].T.contiguous().T  # (V, H) with column-major strides
    assert not case["hidden"].is_contiguous() and not case["weight"].is_contiguous()
    check_fused(kind, case, torch.float32, reduction="none", chunk_size=4)


def sedd_scores(hidden, weight, bias, sigma, x_t):
    """SEDD's absorbing model output (model/transformer.py, scale_by_sigma), written out."""
    x = hidden @ weight.T + bias
    esigm1_log = torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1).log().to(x.dtype)
    x = x - esigm1_log[:, None, None] - math.log(x.shape[-1] - 1)
    return torch.scatter(x, -1, x_t[..., None], torch.zeros_like(x[..., :1]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_score_param_sedd_matches_sedd_formula(dtype):
    case = make_case("absorb", (3, 8), seed=9, dtype=dtype)
    sigma = torch.tensor([0.05, 0.4, 3.0], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    got_c, want_c = leaves(case), leaves(case)
    got = fused_linear_dse_loss(got_c["hidden"], got_c["weight"], got_c["bias"], sigma[:, None], case["x_t"],
                                case["x0"], score_param="sedd", reduction="sum", chunk_size=5)
    s = sedd_scores(want_c["hidden"], want_c["weight"], want_c["bias"], sigma, case["x_t"])
    want = ref.dse_loss(s, sigma[:, None], case["x_t"], case["x0"], reduction="sum")
    got.backward()
    want.backward()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want.to(got.dtype), rtol=tol, atol=tol)
    for n in ("hidden", "weight", "bias"):
        torch.testing.assert_close(got_c[n].grad, want_c[n].grad, rtol=tol, atol=tol)


def test_score_param_sedd_is_absorbing_only():
    case = make_case("uniform")
    with pytest.raises(ValueError, match="score_param"):
        fused("uniform", **case, score_param="sedd")
    with pytest.raises(ValueError, match="score_param"):
        fused_linear_dse_loss(**case, score_param="score")


@pytest.mark.parametrize("kind", KINDS)
def test_no_grad_holds_no_gradient(kind):
    case = leaves(make_case(kind))
    with torch.no_grad():
        out = fused(kind, **case, reduction="sum")
    assert not out.requires_grad
    torch.testing.assert_close(out, unfused(kind, **case, reduction="sum").detach())


def test_raw_op_without_grad_flags_allocates_no_gradient():
    case = make_case("dce")
    flat = case["hidden"].reshape(-1, case["hidden"].shape[-1])
    xt, x0 = case["x_t"].reshape(-1), case["x0"].reshape(-1)
    _, gh, gw, gb = fused_linear_loss(flat, case["weight"], case["bias"], torch.ones(0), xt, x0, torch.ones(xt.numel()),
                                      "dce", 0, case["weight"].shape[0] - 1, -100, False, 4, "cpu", True, False, False,
                                      False)
    assert gh.numel() == gw.numel() == gb.numel() == 0


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_head_gives_hidden_gradient_only(kind):
    case = make_case(kind)
    hidden = case["hidden"].clone().requires_grad_()
    out = fused(kind, hidden, case["weight"], case["bias"], case["sigma"], case["x_t"], case["x0"], reduction="sum")
    out.backward()
    h2 = case["hidden"].clone().requires_grad_()
    unfused(kind, h2, case["weight"], case["bias"], case["sigma"], case["x_t"], case["x0"], reduction="sum").backward()
    torch.testing.assert_close(hidden.grad, h2.grad)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_scaled_upstream_and_gradient_accumulation(reduction):
    case = make_case("dce", seed=12)
    c = leaves(case)
    for scale in (0.5, 3.0):
        (scale * fused("dce", **c, reduction=reduction).sum()).backward()
    c2 = leaves(case)
    for scale in (0.5, 3.0):
        (scale * unfused("dce", **c2, reduction=reduction).sum()).backward()
    for n in ("hidden", "weight", "bias"):
        torch.testing.assert_close(c[n].grad, c2[n].grad, rtol=1e-5, atol=1e-6)
        assert not c[n].grad.requires_grad and c[n].grad.grad_fn is None


def test_double_backward_is_refused():
    c = leaves(make_case("absorb"))
    out = fused("absorb", **c, reduction="sum")
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(out, c["hidden"], create_graph=True)


@pytest.mark.parametrize("kind", ["absorb", "dce"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(kind, reduction):
    torch._dynamo.reset()
    case = make_case(kind, seed=13)

    def step(hidden, weight, bias):
        return fused(kind, hidden, weight, bias, case["sigma"], case["x_t"], case["x0"], reduction=reduction,
                     chunk_size=4)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, step):
        c = leaves(case)
        out = fn(c["hidden"], c["weight"], c["bias"])
        grads = torch.autograd.grad(out.sum(), (c["hidden"], c["weight"], c["bias"]))
        results.append((out.detach(),) + grads)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_opcheck():
    case = make_case("absorb", seed=14)
    n_cols = case["weight"].shape[0]
    flat = case["hidden"].reshape(-1, case["hidden"].shape[-1])
    xt, x0 = case["x_t"].reshape(-1), case["x0"].reshape(-1)
    sigma = case["sigma"].expand(case["x_t"].shape).reshape(-1).contiguous()
    for reduce in (True, False):
        args = (flat.clone().requires_grad_(), case["weight"].clone().requires_grad_(),
                case["bias"].clone().requires_grad_(), sigma, xt, x0, torch.ones(xt.numel()), "dse", 0, n_cols - 1,
                -100, False, 4, "cpu", reduce, True, True, True)
        torch.library.opcheck(fused_linear_loss, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_chunk_rule():
    assert chunk_rows(512, 32768, torch.float32) == 512
    assert chunk_rows(512, 32768, torch.bfloat16) == 1024
    assert chunk_rows(8, 50000, torch.float32) == 64  # the floor
    assert chunk_rows(8192, 262144, torch.float32) * 262144 * 4 <= 256 * 2**20


def integrate_case(kind, dtype=torch.float32, seed=0):
    case = make_case(kind, (4, 9), dtype=dtype, seed=seed)
    case["sigma"] = case["sigma"][:, 0].double()
    return case


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_head_integrate_step_equals_integrate_step(kind, dtype):
    case = integrate_case(kind, dtype, seed=15)
    case["x0"] = case["x0"].clone()
    case["x0"][0, :3] = -100  # a prompt
    loss, graph = ("dce", "absorb") if kind == "dce" else ("dse", kind)
    w = torch.tensor([1.0, 0.5, 2.0, 3.0], dtype=torch.float64)
    index = torch.tensor([0, 2, 0, 1])
    n_cols = case["weight"].shape[0]
    # the keywords the estimators pass to their step
    kw = dict(loss=loss, graph=graph, mask_id=n_cols - 1, ignore_index=-100, index=index, backend=None)
    want = fb.integrate_step(scores_of(case["hidden"], case["weight"], case["bias"]), case["x_t"], case["x0"],
                             case["sigma"], w, torch.ones(3, 2, dtype=torch.float64), **kw)
    acc = torch.ones(3, 2, dtype=torch.float64)
    got = head_integrate_step(case["hidden"], case["weight"], case["bias"], case["x_t"], case["x0"], case["sigma"], w,
                              acc, chunk_size=5, **kw)
    assert got is acc
    if dtype == torch.bfloat16:  # one rounding of the scores (addmm) against two (matmul, then + bias)
        truth = fb.integrate_step(scores_of(*(case[n].double() for n in ("hidden", "weight", "bias"))), case["x_t"],
                                  case["x0"], case["sigma"], w, torch.ones(3, 2, dtype=torch.float64), **kw)
        assert max_err(got, truth) <= 2 * max_err(want, truth) + 1e-3 * truth.abs().max().item()
    else:
        torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-6)


def test_head_integrate_step_sedd_and_mask_outside_head():
    case = integrate_case("absorb", torch.float64, seed=16)
    want = fb.integrate_step(sedd_scores(case["hidden"], case["weight"], case["bias"], case["sigma"], case["x_t"]),
                             case["x_t"], case["x0"], case["sigma"], None, torch.zeros(4, 2, dtype=torch.float64),
                             loss="dse")
    got = head_integrate_step(case["hidden"], case["weight"], case["bias"], case["x_t"], case["x0"], case["sigma"],
                              None, torch.zeros(4, 2, dtype=torch.float64), loss="dse", score_param="sedd")
    torch.testing.assert_close(got, want)
    n_cols = case["weight"].shape[0]
    x_t = torch.where(case["x_t"] == n_cols - 1, n_cols, case["x_t"])  # mask id V: the head has real tokens only
    want = fb.integrate_step(scores_of(case["hidden"], case["weight"], case["bias"]), x_t, case["x0"], None, None,
                             torch.zeros(4, 2, dtype=torch.float64), mask_id=n_cols)
    got = head_integrate_step(case["hidden"], case["weight"], case["bias"], x_t, case["x0"], None, None,
                              torch.zeros(4, 2, dtype=torch.float64), mask_id=n_cols, chunk_size=2)
    torch.testing.assert_close(got, want)


@pytest.mark.triton
@pytest.mark.parametrize("kind", ["absorb", "dce"])
def test_triton_backend(kind):
    from conftest import TRITON_DEVICE

    case = {k: (v.to(TRITON_DEVICE) if torch.is_tensor(v) else v) for k, v in make_case(kind, (2, 4), 8, 9).items()}
    got = fused(kind, **leaves(case), reduction="sum", backend="triton")
    want = unfused(kind, **leaves(case), reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["absorb", "dce"])
@pytest.mark.parametrize("mask_id", [0, 7])
def test_mask_column_anywhere_matches_the_unfused_loss(kind, mask_id):
    """The mask in any column (BERT's [MASK], LLaDA's): fused == matmul + loss with the same mask_id."""
    case = make_case(kind, (3, 5), 6, 11)
    case["x0"] = torch.where(case["x0"] >= mask_id, case["x0"] + 1, case["x0"]) % 11  # never the mask
    case["x0"] = torch.where(case["x0"] == mask_id, (mask_id + 1) % 11, case["x0"])
    case["x_t"] = torch.where(case["x_t"] == 10, torch.full_like(case["x_t"], mask_id), case["x0"])
    got_leaves, want_leaves = leaves(case), leaves(case)
    got = fused(kind, **got_leaves, mask_id=mask_id, reduction="sum")
    want = unfused(kind, **want_leaves, mask_id=mask_id, reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.backward()
    want.backward()
    for name in ("hidden", "weight", "bias"):
        torch.testing.assert_close(got_leaves[name].grad, want_leaves[name].grad, rtol=1e-5, atol=1e-6)


def _good(kind="absorb"):
    return dict(make_case(kind, (2, 3), 4, 10))


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: a.update(hidden=a["hidden"][..., :3]), ValueError, "weight must have shape"),
        (lambda a: a.update(weight=a["weight"][:, None]), ValueError, "weight"),
        (lambda a: a.update(bias=a["bias"][:4]), ValueError, "bias"),
        (lambda a: a.update(bias=a["bias"][:, None]), ValueError, "bias"),
        (lambda a: a.update(hidden=[1.0]), TypeError, "hidden"),
        (lambda a: a.update(hidden=a["hidden"].int()), TypeError, "hidden"),
        (lambda a: a.update(weight=a["weight"].bfloat16()), TypeError, "weight"),
        (lambda a: a.update(bias=a["bias"].double()), TypeError, "bias"),
        (lambda a: a.update(weight=a["weight"].to("meta")), ValueError, "weight"),
        (lambda a: a.update(bias=a["bias"].to("meta")), ValueError, "bias"),
        (lambda a: a.update(x0=a["x0"].to("meta")), ValueError, "x0"),
        (lambda a: a.update(x_t=a["x_t"][:, :2]), ValueError, "x_t"),
        (lambda a: a.update(x0=a["x0"].float()), TypeError, "x0"),
        (lambda a: a.update(x0=torch.full_like(a["x0"], 9)), ValueError, "x0"),
        (lambda a: a.update(sigma=torch.zeros(2, 1)), ValueError, "sigma"),
        (lambda a: a.update(mask_id=10), ValueError, "mask_id"),
        (lambda a: a.update(chunk_size=0), ValueError, "chunk_size"),
        (lambda a: a.update(loss_weight=torch.ones(5)), ValueError, "loss_weight"),
        (lambda a: a.update(reduction="avg"), ValueError, "reduction"),
        (lambda a: a.update(graph="absorbing"), ValueError, "graph"),
    ],
)
def test_dse_bad_input(mutate, exc, match):
    args = _good()
    mutate(args)
    with pytest.raises(exc, match=match):
        fused_linear_dse_loss(**args)


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: a.update(hidden=a["hidden"][..., :3]), ValueError, "H = hidden"),
        (lambda a: a.update(weight=a["weight"].half()), TypeError, "weight"),
        (lambda a: a.update(x0=torch.full_like(a["x0"], 9)), ValueError, "mask id"),
        (lambda a: a.update(mask_id=-1), ValueError, "mask_id"),
        (lambda a: a.update(x_t=a["x_t"].to("meta")), ValueError, "x_t"),
    ],
)
def test_dce_bad_input(mutate, exc, match):
    args = _good("dce")
    del args["sigma"]
    mutate(args)
    with pytest.raises(exc, match=match):
        fused_linear_dce_loss(**args)


def test_head_integrate_step_bad_input():
    case = integrate_case("absorb")
    args = (case["hidden"], case["weight"], case["bias"], case["x_t"], case["x0"], case["sigma"], None)
    with pytest.raises(ValueError, match="acc"):
        head_integrate_step(*args, torch.zeros(3, 2, dtype=torch.float64), loss="dse")
    with pytest.raises(TypeError, match="acc"):
        head_integrate_step(*args, torch.zeros(4, 2), loss="dse")
    with pytest.raises(ValueError, match="hidden"):
        head_integrate_step(case["hidden"][0], *args[1:], torch.zeros(4, 2, dtype=torch.float64), loss="dse")
    with pytest.raises(ValueError, match="sigma"):
        head_integrate_step(*args[:5], None, None, torch.zeros(4, 2, dtype=torch.float64), loss="dse")
    with pytest.raises(ValueError, match="mask_id"):
        head_integrate_step(*args, torch.zeros(4, 2, dtype=torch.float64), loss="dse", mask_id=10**6)


def test_retained_graph_backwards_never_share_the_saved_gradient():
    """Three backwards of a retained reduced loss accumulate 3x; a held gradient is not the .grad buffer."""
    case = leaves(make_case("absorb", (2, 4), 6, 9, torch.float64))
    out = fused("absorb", **case, reduction="sum")
    (held,) = torch.autograd.grad(out, case["hidden"], retain_graph=True)
    before = held.clone()
    for _ in range(2):
        out.backward(retain_graph=True)
    out.backward()
    assert case["hidden"].grad.data_ptr() != held.data_ptr()
    torch.testing.assert_close(case["hidden"].grad, 3 * before)
    case["hidden"].grad.zero_()
    torch.testing.assert_close(held, before, rtol=0, atol=0)


def test_gemm_dtype_rule(monkeypatch):
    """Half precision multiplies in fp32 on a CPU without native half GEMMs, in its own dtype elsewhere."""
    from fastbound.fused_linear import head

    cpu = torch.device("cpu")
    for native in (False, True):
        monkeypatch.setattr(head, "_cpu_has_half_gemm", lambda dtype, native=native: native)
        for dtype in (torch.bfloat16, torch.float16):
            assert head.gemm_dtype(dtype, cpu) == (dtype if native else torch.float32)
    for dtype in (torch.float32, torch.float64):
        assert head.gemm_dtype(dtype, cpu) == dtype
    assert head.gemm_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("native", [False, True])
def test_bf16_gemm_dtype_paths(kind, native, monkeypatch):
    """bf16 inputs: with fp32 GEMMs (AVX2 CPUs) the result is the fp32 fused result on the same values,
    rounded once; with native bf16 GEMMs it stays within the unfused bf16 error (`check_fused`)."""
    from fastbound.fused_linear import head

    monkeypatch.setattr(head, "_cpu_has_half_gemm", lambda dtype: native)
    case = make_case(kind, shape=(3, 11), n_hidden=24, n_cols=37, seed=21)
    case = {k: v.bfloat16() if k in ("hidden", "weight", "bias") else v for k, v in case.items()}
    if native:
        check_fused(kind, case, torch.bfloat16, reduction="sum", chunk_size=4)
        return
    got = leaves(case)
    want = leaves(case, torch.float32)
    loss = fused(kind, **got, reduction="sum", chunk_size=4)
    loss.backward()
    ref_loss = fused(kind, **want, reduction="sum", chunk_size=4)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name in ("hidden", "weight", "bias"):
        assert got[name].grad.dtype == torch.bfloat16
        torch.testing.assert_close(got[name].grad, want[name].grad.bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_fused_head_takes_ids_made_under_inference_mode(reduction):
    """Ids made under torch.inference_mode cannot be saved for backward: the fused head saves a copy
    (reduction="none" reruns the pass in the backward from them), as the unfused losses do."""
    import fastbound as fb

    with torch.inference_mode():
        x0, x_t = torch.tensor([[0, 1, 2]]), torch.tensor([[4, 1, 4]])
    h, w = torch.randn(1, 3, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    loss = fb.fused_linear_dce_loss(h, w, None, x_t, x0, reduction=reduction)
    loss.sum().backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    fb.dce_loss(h2 @ w2.T, x_t, x0).sum().backward()
    assert torch.allclose(h.grad, h2.grad) and torch.allclose(w.grad, w2.grad)
