"""The losses' fast path (`fastbound.losses._fast_key`: one C++ op, ``fused_loss``, with a C++
backward) against the full path: the same values, gradients, errors and autograd behaviour.

A signature takes the fast path once a call through the full path has validated it, so every
check here calls twice (`warm`) and compares with the full path forced by ``_fast_key -> None``.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastbound as fb
from fastbound import losses
from helpers import KINDS, assert_same_outcome, make_case, outcome


def call(kind, score, sigma, x_t, x0, **kw):
    if kind == "dce":
        return fb.dce_loss(score, x_t, x0, **kw)
    return fb.dse_loss(score, sigma, x_t, x0, graph=kind, **kw)


def warm(kind, score, sigma, x_t, x0, **kw):
    """The call's signature validated (a first call, no gradient), then the call itself."""
    with torch.no_grad():
        call(kind, score.detach(), sigma, x_t, x0, **kw)
    return call(kind, score, sigma, x_t, x0, **kw)


def is_fast(out: torch.Tensor) -> bool:
    return out.grad_fn is not None and "FusedLossFunction" in out.grad_fn.name()


def full_path(monkeypatch):
    monkeypatch.setattr(losses, "_fast_key", lambda *args: None)


def loss_and_grad(kind, score, sigma, x_t, x0, upstream=None, **kw):
    leaf = score.detach().clone().requires_grad_()
    out = warm(kind, leaf, sigma, x_t, x0, **kw)
    fast = is_fast(out)
    out.backward(torch.ones_like(out) if upstream is None else upstream)
    return out.detach(), leaf.grad, fast


CASES = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="mean"),
    dict(reduction="mean", weight=2.5),
    dict(weight="rows"),
    dict(weight="column", reduction="sum"),
    dict(ignore_index=3),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fast_path_equals_the_full_path(monkeypatch, kind, dtype, case):
    kw = dict(CASES[case])
    score, sigma, x_t, x0 = make_case(kind, (3, 5), 7, dtype)
    if kw.get("weight") == "rows":
        kw["weight"] = torch.rand(3, 5, dtype=torch.float64) + 0.5
    elif kw.get("weight") == "column":
        kw["weight"] = torch.rand(3, 1) + 0.5
    if "ignore_index" in kw:
        x0 = x0.clone()
        x0[0, :2] = kw["ignore_index"]
    upstream = None if kw.get("reduction", "none") != "none" else torch.randn(3, 5)
    fast = loss_and_grad(kind, score, sigma, x_t, x0, upstream, **kw)
    full_path(monkeypatch)
    full = loss_and_grad(kind, score, sigma, x_t, x0, upstream, **kw)
    assert fast[2] and not full[2]
    torch.testing.assert_close(fast[0], full[0], rtol=0, atol=0)
    torch.testing.assert_close(fast[1], full[1], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["absorb", "uniform"])
def test_fast_path_sigma_forms(monkeypatch, kind):
    score, _, x_t, x0 = make_case(kind, (2, 4), 6, torch.float32)
    for sigma in (0.7, 2, torch.tensor(0.3), torch.rand(2, 1) + 0.1, torch.rand(2, 4, dtype=torch.float64) + 0.1,
                  (torch.rand(4, 2) + 0.1).t()):
        fast = loss_and_grad(kind, score, sigma, x_t, x0, reduction="sum")
        with monkeypatch.context() as m:
            full_path(m)
            full = loss_and_grad(kind, score, sigma, x_t, x0, reduction="sum")
        assert fast[2] and not full[2]
        torch.testing.assert_close(fast[:2], full[:2], rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_fast_path_weight_forms(monkeypatch, kind):
    """Weights of every dtype, broadcast shape and stride become the same row scale as in the full path."""
    score, sigma, x_t, x0 = make_case(kind, (2, 4), 6, torch.float32)
    weights = (torch.tensor(1.5), torch.rand(4) + 0.5, torch.rand(2, 1, dtype=torch.float64) + 0.5,
               torch.randint(1, 4, (2, 4)), (torch.rand(4, 2) + 0.5).to(torch.bfloat16).t(), torch.rand(1, 4) + 0.5)
    for weight in weights:
        fast = loss_and_grad(kind, score, sigma, x_t, x0, weight=weight, reduction="sum")
        with monkeypatch.context() as m:
            full_path(m)
            full = loss_and_grad(kind, score, sigma, x_t, x0, weight=weight, reduction="sum")
        assert fast[2] and not full[2]
        torch.testing.assert_close(fast[:2], full[:2], rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_fast_path_odd_inputs(monkeypatch, kind):
    """Non-contiguous scores, narrow id dtypes, one token, no tokens."""
    score, _, x_t, x0 = make_case(kind, (4, 3), 9, torch.float32)
    sigma = 0.8
    wide = torch.randn(4, 3, 18)
    wide[..., ::2] = score  # every other column: stride 2 in the last dimension
    inputs = [(wide[..., ::2], x_t, x0), (score.transpose(0, 1), x_t.t(), x0.t()),
              (score, x_t.to(torch.uint8), x0.to(torch.int32)), (score[:1, :1], x_t[:1, :1], x0[:1, :1]),
              (score[:0], x_t[:0], x0[:0])]
    for s, xt, x0_ in inputs:
        fast = loss_and_grad(kind, s, sigma, xt, x0_)
        with monkeypatch.context() as m:
            full_path(m)
            full = loss_and_grad(kind, s, sigma, xt, x0_)
        assert fast[2] and not full[2]
        torch.testing.assert_close(fast[:2], full[:2], rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_fast_path_value_errors_match_the_full_path(monkeypatch, kind):
    """Each bad call after a good call of the same signature: the message of the full path."""
    score, sigma, x_t, x0 = make_case(kind, (3, 4), 9, torch.float32)
    cases = []  # (good keyword arguments, bad ones)
    bad_ids = [("x_t", -2), ("x_t", 11), ("x0", 40)] + ([("x0", 8)] if kind != "uniform" else [])  # 8: the mask
    for name, value in bad_ids:
        ids = dict(x_t=x_t.clone(), x0=x0.clone())
        ids[name][1, 2] = value
        cases.append((dict(x_t=x_t, x0=x0), ids))
    if kind != "dce":
        cases.append((dict(sigma=torch.full((3, 1), 0.5)), dict(sigma=torch.full((3, 1), -1.0))))
        cases.append((dict(sigma=0.5), dict(sigma=1e-50)))
    cases.append((dict(weight=2.0), dict(weight=1e300)))
    if kind != "uniform":
        cases.append((dict(mask_id=None), dict(mask_id=-1)))

    def messages():
        out = []
        for good, bad in cases:
            for kw in (good, bad):
                args = {**dict(score=score, sigma=sigma, x_t=x_t, x0=x0), **kw}
                if kw is good:
                    warm(kind, **args)
                    continue
                with pytest.raises(ValueError) as error:
                    call(kind, **args)
                out.append(str(error.value))
        return out

    fast = messages()
    full_path(monkeypatch)
    assert fast == messages()


@pytest.mark.parametrize("kind", KINDS)
def test_fast_path_autograd_rules(kind):
    """Retained graphs never hand out the buffer; a double backward raises; ids changed in place
    before the backward raise; the loss may be changed in place; no graph without gradients."""
    score, sigma, x_t, x0 = make_case(kind, (2, 3), 6, torch.float64)
    s = score.clone().requires_grad_()
    out = warm(kind, s, sigma, x_t, x0)
    assert is_fast(out)
    (held,) = torch.autograd.grad(out.sum(), s, retain_graph=True)
    before = held.clone()
    out.sum().backward(retain_graph=True)
    (out.sum() * 3).backward()
    torch.testing.assert_close(held, before, rtol=0, atol=0)
    torch.testing.assert_close(s.grad, 4 * before)

    out = call(kind, s, sigma, x_t, x0, reduction="sum")
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(out, s, create_graph=True)

    ids = x0.clone()
    out = call(kind, s, sigma, x_t, ids)
    ids.add_(0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()

    out = call(kind, s, sigma, x_t, x0)
    out.mul_(2)
    out.sum().backward()

    assert torch.autograd.gradcheck(lambda t: call(kind, t, sigma, x_t, x0), (s.detach().requires_grad_(),))
    with torch.no_grad():
        assert call(kind, s, sigma, x_t, x0).grad_fn is None
    with torch.inference_mode():
        assert call(kind, s, sigma, x_t, x0).grad_fn is None


def test_gradients_to_sigma_and_weight_and_tangents_take_the_full_path():
    score, sigma, x_t, x0 = make_case("absorb", (2, 3), 6, torch.float64)
    weight = torch.rand(2, 1, dtype=torch.float64, requires_grad=True)
    s = score.clone().requires_grad_()
    warm("absorb", s, sigma, x_t, x0, weight=weight.detach())
    assert not is_fast(fb.dse_loss(s, sigma, x_t, x0, weight=weight))
    assert not is_fast(fb.dse_loss(s, sigma.clone().requires_grad_(), x_t, x0, weight=weight.detach()))
    assert not is_fast(fb.dse_loss(s * 1, sigma, x_t, x0, weight=weight.detach(), inplace=True))
    assert is_fast(fb.dse_loss(s, sigma, x_t, x0, weight=weight.detach()))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_fused_loss_opcheck(kind, reduction):
    score, sigma, x_t, x0 = make_case(kind, (2, 3), 6, torch.float32)
    loss, graph = (1, 0) if kind == "dce" else (0, fb._names.GRAPH_CODES[kind])
    mask = -1 if kind == "uniform" else 5
    args = (score.requires_grad_(), sigma if kind != "dce" else None, 0.0, x_t, x0, torch.rand(2, 1), 1.0, loss, graph,
            mask, -100, reduction)
    torch.library.opcheck(torch.ops.fastbound.fused_loss.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_many_signatures_keep_the_fast_path(monkeypatch):
    """The signature tables are bounded; a full one starts again instead of refusing new shapes."""
    for table in (losses._FAST, losses._CHECKED):
        monkeypatch.setattr(table, "limit", 4)
    for n in range(1, 12):
        score, sigma, x_t, x0 = make_case("dce", (n,), 5, torch.float32)
        assert is_fast(warm("dce", score.requires_grad_(), sigma, x_t, x0))
    assert len(losses._FAST) <= 4 and len(losses._CHECKED) <= 4


@pytest.mark.parametrize("kind", KINDS)
def test_torch_func_transforms_take_the_full_path(monkeypatch, kind):
    """torch.func's wrapper tensors have no storage: a warmed signature must not send them to the C++
    op (whose error would be an opaque "doesn't have storage"); they get the full path's behaviour."""
    score, sigma, x_t, x0 = make_case(kind, (4, 5), 7, torch.float32)
    warm(kind, score, sigma, x_t, x0, reduction="sum")

    def gradient():
        return torch.func.grad(lambda s: call(kind, s, sigma, x_t, x0, reduction="sum"))(score.detach())

    warmed = outcome(gradient)
    full_path(monkeypatch)
    assert_same_outcome(warmed, outcome(gradient))


def test_checked_calls_follow_triton_interpret_from_the_environment(monkeypatch):
    # The cache keys hold FASTBOUND_BACKEND and TRITON_INTERPRET (fastbound._backend.environment_key;
    # on POSIX the environment's values are bytes): a signature checked under the interpreter must
    # not keep running Triton on CPU tensors once TRITON_INTERPRET is unset.
    pytest.importorskip("triton")
    score, sigma, x_t, x0 = make_case("absorb", (1, 2), 5, torch.float32)
    monkeypatch.setenv("FASTBOUND_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fb.dse_loss(score, sigma, x_t, x0, reduction="sum")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fb.dse_loss(score, sigma, x_t, x0, reduction="sum")


def rescales(backward) -> int:
    """How many times ``backward()`` called the rescale op ``scale_rows_``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        backward()
    return sum(event.name == "fastbound::scale_rows_" for event in prof.events())


def summed_loss_and_grad(kind, score, sigma, x_t, x0, factor, fast=True, **kw):
    """``(loss(reduction="sum") * factor).backward()``: (loss, gradient, rescale calls); ``fast``: the
    call must take the fast path."""
    leaf = score.detach().clone().requires_grad_()
    out = call(kind, leaf, sigma, x_t, x0, reduction="sum", **kw)
    assert is_fast(out) or not fast
    calls = rescales(lambda: (out * factor).backward())
    return out.detach(), leaf.grad, calls


def summed_loss_and_grad_full(kind, score, sigma, x_t, x0, factor, **kw):
    leaf = score.detach().clone().requires_grad_()
    out = call(kind, leaf, sigma, x_t, x0, reduction="sum", **kw)
    (out * factor).backward()
    return out.detach(), leaf.grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_predicted_upstream_factors_keep_the_bits(monkeypatch, kind, dtype):
    """A power-of-two factor after a summed loss (``/ B``, a GradScaler's scale, ``/ k``) is folded
    into the forward once two backwards met it: no rescale, and the loss and gradient of every
    call have the full path's bits, before and after the prediction, for any factor."""
    score, sigma, x_t, x0 = make_case(kind, (3, 5), 7, dtype)
    factors = [0.25, 65536.0, 2.0**-20, 1 / 3, 3.0, 1.0, 0.25]
    full = {}
    with monkeypatch.context() as m:
        full_path(m)
        for factor in factors:
            full[factor] = summed_loss_and_grad_full(kind, score, sigma, x_t, x0, factor)
    warm(kind, score, sigma, x_t, x0, reduction="sum")
    for factor in factors:
        for step in range(4):
            loss, grad, calls = summed_loss_and_grad(kind, score, sigma, x_t, x0, factor)
            torch.testing.assert_close(loss, full[factor][0], rtol=0, atol=0)
            torch.testing.assert_close(grad, full[factor][1], rtol=0, atol=0)
        predicted = factor in (1.0, 0.25, 65536.0, 2.0**-20)  # (fp16 takes the full path: test_fp16_upstream.py)
        assert calls == (0 if predicted else 1), (factor, calls)


@pytest.mark.parametrize("kind", KINDS)
def test_two_factors_of_one_signature_in_a_step_predict_none(kind):
    """``(a + 0.5 * b).backward()``, a and b of one signature: the factors alternate, so neither is
    predicted (the unit one stays free, the other is rescaled), and both gradients are exact."""
    score, sigma, x_t, x0 = make_case(kind, (4, 3), 6, torch.float32)
    warm(kind, score, sigma, x_t, x0, reduction="sum")
    for step in range(4):
        a, b = score.clone().requires_grad_(), (score * 2).detach().requires_grad_()
        out = call(kind, a, sigma, x_t, x0, reduction="sum") + 0.5 * call(kind, b, sigma, x_t, x0, reduction="sum")
        assert rescales(out.backward) == 1
        ref_a, ref_b = (score.clone().requires_grad_(), (score * 2).detach().requires_grad_())
        call(kind, ref_a, sigma, x_t, x0, reduction="sum").backward()
        (call(kind, ref_b, sigma, x_t, x0, reduction="sum") * 0.5).backward()
        torch.testing.assert_close(a.grad, ref_a.grad, rtol=0, atol=0)
        torch.testing.assert_close(b.grad, ref_b.grad, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("factor", "weight"), [(65536.0, 2e34), (0.25, 3e-38)])
def test_a_prediction_out_of_float_range(monkeypatch, kind, factor, weight):
    """A predicted 2^k that takes the loss out of float's normal range (2e34 x 2^16 overflows,
    3e-38 / 4 is subnormal) is dropped for that call, so the loss keeps its bits and the
    gradient of a backward with another factor is not inf. Gradient values that 2^k takes below
    2^-126 keep fewer bits on such a miss: exact above 2^-126 / 2^k, within 2^-149 / 2^k below."""
    score, sigma, x_t, x0 = make_case(kind, (3, 5), 7, torch.float32)
    warm(kind, score, sigma, x_t, x0, reduction="sum", weight=1.5)
    for _ in range(3):
        summed_loss_and_grad(kind, score, sigma, x_t, x0, factor, weight=1.5)
    loss, grad, _ = summed_loss_and_grad(kind, score, sigma, x_t, x0, 1.0, weight=weight)
    full_path(monkeypatch)
    full_loss, full_grad = summed_loss_and_grad_full(kind, score, sigma, x_t, x0, 1.0, weight=weight)
    torch.testing.assert_close(loss, full_loss, rtol=0, atol=0)
    assert torch.isfinite(grad).all()
    normal = full_grad.abs() >= 2.0**-126 / min(factor, 1.0)
    torch.testing.assert_close(grad[normal], full_grad[normal], rtol=0, atol=0)
    assert (grad - full_grad).abs().max() <= 2.0**-149 / min(factor, 1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_a_predicted_factor_under_retained_graphs(kind):
    """With a prediction in place, several backwards of one graph (retain_graph) and gradcheck
    (float64, arbitrary upstreams) give the exact factors."""
    score, sigma, x_t, x0 = make_case(kind, (2, 3), 6, torch.float64)
    warm(kind, score, sigma, x_t, x0, reduction="sum")
    for _ in range(3):
        summed_loss_and_grad(kind, score, sigma, x_t, x0, 0.125)
    s = score.clone().requires_grad_()
    out = call(kind, s, sigma, x_t, x0, reduction="sum")
    (g1,) = torch.autograd.grad(out * 0.125, s, retain_graph=True)
    (g2,) = torch.autograd.grad(out * 3.0, s)
    ref = score.clone().requires_grad_()
    call(kind, ref, sigma, x_t, x0, reduction="sum").backward()
    torch.testing.assert_close(g1, ref.grad * 0.125, rtol=0, atol=0)
    torch.testing.assert_close(g2, ref.grad * 3.0)
    assert torch.autograd.gradcheck(lambda t: call(kind, t, sigma, x_t, x0, reduction="sum") * 0.125,
                                    (score.clone().requires_grad_(),))


FACTORS = st.one_of(st.integers(-40, 40).map(lambda k: 2.0**k), st.sampled_from([1.0, 0.0, -0.5, 1 / 3, 65536.0]),
                    st.floats(1e-3, 1e3))


@given(st.sampled_from(KINDS), st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
       st.lists(st.tuples(FACTORS, st.sampled_from([1.5, 1e30, 1e-30, 0.75, 3e-38, 1e-40])), min_size=2, max_size=8))
@settings(max_examples=30, derandomize=True, deadline=None, database=None)
def test_fuzz_any_history_of_factors_keeps_the_bits(kind, dtype, steps):
    """A random history of upstream factors and weights on one signature (so any prediction,
    hit or miss): every call's loss has the full path's bits, and its gradient too but for
    values below float's normal range, which a miss may round to fewer bits."""
    score, sigma, x_t, x0 = make_case(kind, (2, 3), 5, dtype)
    warm(kind, score, sigma, x_t, x0, reduction="sum")
    for factor, weight in steps:
        loss, grad, _ = summed_loss_and_grad(kind, score, sigma, x_t, x0, factor, fast=False, weight=weight)
        with pytest.MonkeyPatch.context() as m:
            full_path(m)
            full_loss, full_grad = summed_loss_and_grad_full(kind, score, sigma, x_t, x0, factor, weight=weight)
        torch.testing.assert_close(loss, full_loss, rtol=0, atol=0, equal_nan=True)
        tiny = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny * 2.0**33
        normal = full_grad.double().abs() >= tiny
        torch.testing.assert_close(grad[normal], full_grad[normal], rtol=0, atol=0, equal_nan=True)
        assert ((grad - full_grad)[~normal].double().abs() <= tiny).all()


def predict(kind, score, sigma, x_t, x0, factor, **kw):
    """Three backwards of one signature at ``factor``: the next call's forward predicts it."""
    warm(kind, score, sigma, x_t, x0, reduction="sum", **kw)
    for _ in range(3):
        summed_loss_and_grad(kind, score, sigma, x_t, x0, factor, **kw)


def test_a_subnormal_unscaled_loss_keeps_its_bits_under_a_prediction(monkeypatch):
    """k > 0 with a loss that is subnormal before the scaling: 2^k L is normal, but 2^-k (2^k L)
    would round L a second time, so the call runs unscaled (found by review: 6.4e-40 weight)."""
    score, sigma, x_t, x0 = make_case("absorb", (1, 1), 7, torch.float32, seed=4, mask_frac=1.0)
    weight = torch.tensor(6.4460850397713045e-40)
    predict("absorb", score, sigma, x_t, x0, 65536.0, weight=weight)
    fast = summed_loss_and_grad("absorb", score, sigma, x_t, x0, 65536.0, weight=weight)
    full_path(monkeypatch)
    full = summed_loss_and_grad_full("absorb", score, sigma, x_t, x0, 65536.0, weight=weight)
    torch.testing.assert_close(fast[:2], full, rtol=0, atol=0)


def test_a_cancelling_score_entropy_is_not_scaled_into_inf(monkeypatch):
    """A tiny sigma (r ~ 7e35) lets sum e^s cancel r s_x0 in the absorbing loss (loss 0, gradient
    ~5e32): under a predicted 2^32 the gradient would overflow while the loss stays finite, and
    a backward with upstream 1 would hand out inf. The row bound |scale| 2^k (1 + r) keeps k = 0."""
    x_t, x0 = torch.tensor([2]), torch.tensor([0])
    sigma = torch.tensor([1.4281409754010587e-36])
    small = torch.tensor([[0.1, 0.2, 0.0]])
    predict("absorb", small, sigma, x_t, x0, 2.0**32)
    score = torch.tensor([[82.53740692138672, 69.07432556152344, 0.0]])
    fast = summed_loss_and_grad("absorb", score, sigma, x_t, x0, 1.0)
    full_path(monkeypatch)
    full = summed_loss_and_grad_full("absorb", score, sigma, x_t, x0, 1.0)
    assert torch.isfinite(fast[1]).all()
    torch.testing.assert_close(fast[:2], full, rtol=0, atol=0)


@pytest.mark.parametrize(("predicted", "upstream"), [(2.0**32, 1e-30), (2.0**-32, 3e38)])
def test_a_miss_whose_factor_leaves_float_range(monkeypatch, predicted, upstream):
    """A miss whose upstream / 2^k is not a normal float (1e-30 / 2^32 is subnormal, 3e38 * 2^32
    overflows) first takes the saved gradient back to its unscaled values, then applies the
    upstream: the full path's bits, not a factor that lost its bits or became inf."""
    score, sigma, x_t, x0 = make_case("dce", (4, 8), 7, torch.float32)
    predict("dce", score, sigma, x_t, x0, predicted)
    fast = summed_loss_and_grad("dce", score, sigma, x_t, x0, upstream)
    full_path(monkeypatch)
    full = summed_loss_and_grad_full("dce", score, sigma, x_t, x0, upstream)
    torch.testing.assert_close(fast[:2], full, rtol=0, atol=0)


def negative_view(t: torch.Tensor) -> torch.Tensor:
    """A tensor equal to ``t`` that stores -t with the neg bit set (what ``conj().imag`` gives)."""
    out = torch.complex(torch.zeros_like(t), -t).conj().imag
    assert out.is_neg() and torch.equal(out, t)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_negative_views_of_weight_and_sigma(kind):
    """The C++ op reads a weight's or sigma's stored values: a negative view takes the full path,
    which reads the logical ones (found by review: the loss came out with its sign flipped)."""
    score, sigma, x_t, x0 = make_case(kind, (3, 4), 7, torch.float32)
    weight = torch.rand(3, 1) + 0.5
    for _ in range(3):
        got = call(kind, score, negative_view(sigma) if kind != "dce" else sigma, x_t, x0,
                   weight=negative_view(weight), reduction="sum")
        torch.testing.assert_close(got, call(kind, score, sigma, x_t, x0, weight=weight, reduction="sum"),
                                   rtol=0, atol=0)
