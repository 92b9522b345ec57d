"""Batched backwards (``torch.autograd.grad(..., is_grads_batched=True)``, vmap of a vjp): the
backwards take the out-of-place path (no host read of the upstream, no rescale of the saved
buffer, no factor prediction) and equal one ordinary backward per grad_output."""

import pytest
import torch

import fastbound as fb
from fastbound import reference as ref
from fastbound.continuous import denoising_loss
from fastbound.continuous import reference as cref

N, V, B = 6, 9, 3
KINDS = ("absorb", "uniform", "dce")
REDUCTIONS = ("none", "sum", "mean")


@pytest.fixture
def no_batching_fallback():
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule")
        yield


def case(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    score = torch.randn(N, V, generator=g, dtype=torch.float64)
    x0 = torch.randint(0, V - 1, (N,), generator=g)
    x_t = torch.where(torch.rand(N, generator=g) < 0.5, V - 1, x0)  # the mask anywhere
    if kind == "uniform":
        x_t = torch.randint(0, V, (N,), generator=g)
    sigma = torch.rand(N, generator=g, dtype=torch.float64) + 0.1
    return score, sigma, x_t, x0


def call(lib, kind, score, sigma, x_t, x0, **kw):
    if kind == "dce":
        return lib.dce_loss(score, x_t, x0, **kw)
    return lib.dse_loss(score, sigma, x_t, x0, graph=kind, **kw)


def per_output(loss_of, score, outputs):
    """The gradient for each grad_output by a separate backward of a fresh call."""
    rows = []
    for u in outputs:
        s = score.detach().requires_grad_()
        rows.append(torch.autograd.grad(loss_of(s), s, u)[0])
    return torch.stack(rows)


@pytest.mark.parametrize("weight", [None, "tensor"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_grads_batched_equals_separate_backwards(kind, reduction, weight):
    score, sigma, x_t, x0 = case(kind)
    w = torch.rand(N, dtype=torch.float64) if weight else None
    loss_of = lambda s, lib=fb: call(lib, kind, s, sigma, x_t, x0, weight=w, reduction=reduction)
    for _ in range(3):  # the first call validates the signature, the later ones take the C++ fast path
        s = score.clone().requires_grad_()
        loss = loss_of(s)
        outputs = torch.randn(B, *loss.shape, dtype=torch.float64)
        (batched,) = torch.autograd.grad(loss, s, outputs, is_grads_batched=True)
        torch.testing.assert_close(batched, per_output(loss_of, score, outputs))
        torch.testing.assert_close(batched, per_output(lambda t: loss_of(t, ref), score, outputs))


@pytest.mark.parametrize("kind", KINDS)
def test_batched_backward_leaves_buffer_and_prediction_alone(kind):
    score, sigma, x_t, x0 = case(kind)
    loss_of = lambda s: call(fb, kind, s, sigma, x_t, x0, reduction="sum")
    expect = per_output(loss_of, score, torch.tensor([0.25]))[0]
    for _ in range(3):  # an upstream of 2^-2 twice in a row: predicted and folded into the forward
        s = score.clone().requires_grad_()
        (loss_of(s) * 0.25).backward()
    s = score.clone().requires_grad_()
    loss = loss_of(s)
    outputs = torch.tensor([0.25, 1.0, -3.0], dtype=torch.float64)
    (batched,) = torch.autograd.grad(loss, s, outputs, is_grads_batched=True, retain_graph=True)
    torch.testing.assert_close(batched[0], expect)
    (again,) = torch.autograd.grad(loss, s, torch.tensor(0.25, dtype=torch.float64))  # the saved buffer intact
    torch.testing.assert_close(again, expect)
    s = score.clone().requires_grad_()
    (loss_of(s) * 0.25).backward()  # the prediction still holds
    torch.testing.assert_close(s.grad, expect)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_vmap_of_vjp(kind, reduction):
    score, sigma, x_t, x0 = case(kind)
    loss_of = lambda s: call(fb, kind, s, sigma, x_t, x0, reduction=reduction)
    _, vjp_fn = torch.func.vjp(loss_of, score)
    outputs = torch.randn(B, *loss_of(score).shape, dtype=torch.float64)
    (batched,) = torch.func.vmap(vjp_fn)(outputs)
    torch.testing.assert_close(batched, per_output(loss_of, score, outputs))


@pytest.mark.parametrize("weight", [None, "tensor"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_denoising_loss_grads_batched(reduction, weight):
    g = torch.Generator().manual_seed(1)
    eps_hat, eps = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    w = torch.rand(4, generator=g) if weight else None
    loss_of = lambda e: denoising_loss(e, eps, weight=w, reduction=reduction)
    for _ in range(3):  # the later calls take the C++ op
        e = eps_hat.clone().requires_grad_()
        loss = loss_of(e)
        outputs = torch.randn(B, *loss.shape)
        (batched,) = torch.autograd.grad(loss, e, outputs, is_grads_batched=True)
        torch.testing.assert_close(batched, per_output(loss_of, eps_hat, outputs))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_linear_grads_batched(reduction):
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(N, 4, generator=g), torch.randn(V, 4, generator=g)
    _, sigma, x_t, x0 = case("absorb")
    loss_of = lambda h: fb.fused_linear.fused_linear_dse_loss(h, weight, None, sigma.float(), x_t, x0,
                                                              reduction=reduction)
    h = hidden.clone().requires_grad_()
    loss = loss_of(h)
    outputs = torch.randn(B, *loss.shape)
    (batched,) = torch.autograd.grad(loss, h, outputs, is_grads_batched=True)
    torch.testing.assert_close(batched, per_output(loss_of, hidden, outputs))


# ----------------------------------------------------------------------------- higher order: raise, never zeros


def _loss_fn(kind, sigma, x_t, x0, w=None):
    return lambda s, sg=sigma: call(fb, kind, s, sg, x_t, x0, weight=w, reduction="sum")


@pytest.mark.parametrize("kind", KINDS)
def test_torch_func_second_derivatives_raise(kind):
    """torch.func's backwards always build a graph: an outer grad level must raise, not see the
    saved gradient as a constant (second derivatives of exactly zero)."""
    score, sigma, x_t, x0 = case(kind)
    loss_of = _loss_fn(kind, sigma, x_t, x0, torch.rand(N, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.func.grad(lambda t: torch.func.grad(loss_of)(t).pow(2).sum())(score)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.func.jacrev(torch.func.jacrev(loss_of))(score)
    if kind != "dce":  # through sigma alone
        with pytest.raises(RuntimeError, match="differentiable once"):
            torch.func.grad(lambda sg: torch.func.grad(lambda q: loss_of(score, q))(sg).pow(2).sum())(sigma)
    # first order, still exact
    first = torch.func.grad(loss_of)(score)
    torch.testing.assert_close(first, per_output(loss_of, score, [torch.tensor(1.0, dtype=torch.float64)])[0])


def test_torch_func_grad_of_inputs_requiring_grad_raises():
    """Plain autograd outside torch.func.grad would differentiate the gradient again."""
    score, sigma, x_t, x0 = case("absorb")
    loss_of = _loss_fn("absorb", sigma, x_t, x0)
    with pytest.raises(RuntimeError, match="detach"):
        torch.func.grad(loss_of)(score.clone().requires_grad_())
    torch.func.grad(loss_of)(score.clone().requires_grad_().detach())


def test_denoising_loss_torch_func_second_derivatives_are_exact():
    """Under torch.func the continuous loss (given eps) is its formula in torch ops: every
    transform follows it, second derivatives included (d²/dε̂² of ½‖ε − ε̂‖² summed is I)."""
    eps_hat, eps = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    loss_of = lambda e: denoising_loss(e, eps, reduction="sum")
    eye = torch.eye(24, dtype=torch.float64).view(4, 6, 4, 6)
    torch.testing.assert_close(torch.func.jacfwd(torch.func.jacfwd(loss_of))(eps_hat), eye)
    torch.testing.assert_close(torch.func.hessian(loss_of)(eps_hat), eye)
    torch.testing.assert_close(torch.func.grad(lambda t: torch.func.grad(loss_of)(t).pow(2).sum())(eps_hat),
                               2 * (eps_hat - eps))


@pytest.mark.parametrize("kind", KINDS)
def test_forward_over_forward_raises(kind):
    """jacfwd(jacfwd): the tangent rule's saved gradient is a constant of the forward; it gave
    all-zero Hessians once vmap was supported."""
    score, sigma, x_t, x0 = case(kind)
    loss_of = _loss_fn(kind, sigma, x_t, x0)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.func.jacfwd(torch.func.jacfwd(loss_of))(score)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.func.jacrev(torch.func.jacfwd(loss_of))(score)
    torch.testing.assert_close(torch.func.jacfwd(loss_of)(score), torch.func.grad(loss_of)(score))


@pytest.mark.usefixtures("no_batching_fallback")
@pytest.mark.parametrize("kind", KINDS)
def test_nested_vmap_of_grad(kind):
    score, sigma, x_t, x0 = case(kind)
    batch = torch.stack([score, 2 * score]).unsqueeze(0).expand(2, 2, N, V) * torch.tensor([1.0, -1.0],
                                                                                           dtype=torch.float64)[:, None, None, None]
    ours = lambda s: call(fb, kind, s, sigma, x_t, x0, reduction="sum")
    oracle = lambda s: call(ref, kind, s, sigma, x_t, x0, reduction="sum")
    nested = lambda f: torch.func.vmap(torch.func.vmap(torch.func.grad(f)))(batch)
    torch.testing.assert_close(nested(ours), nested(oracle))


def test_continuous_nested_vmap_eps_at_another_level():
    """eps vmapped outside, eps_hat inside: each pair as the oracle pairs them."""
    eps_hat, eps = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    f = lambda lib: torch.func.vmap(lambda e: torch.func.vmap(lambda h: lib(h, e, reduction="sum"))(eps_hat))(eps)
    torch.testing.assert_close(f(denoising_loss), f(cref.denoising_loss))
    g = lambda lib: torch.func.vmap(torch.func.grad(lambda h, e: lib(h, e, reduction="sum")), in_dims=(None, 0))(eps_hat[0], eps)
    torch.testing.assert_close(g(denoising_loss), g(cref.denoising_loss))


@pytest.mark.parametrize("weight", [None, "tensor", "requires_grad"])
@pytest.mark.parametrize("kind", KINDS)
def test_grads_batched_create_graph_raises(kind, weight):
    """is_grads_batched with create_graph=True raises on every call of a signature: the C++ path
    of the later calls and the Python one (a weight that requires grad takes it every time)."""
    score, sigma, x_t, x0 = case(kind)
    w = torch.rand(N, dtype=torch.float64, requires_grad=weight == "requires_grad") if weight else None
    for _ in range(3):
        s = score.clone().requires_grad_()
        loss = call(fb, kind, s, sigma, x_t, x0, weight=w)
        with pytest.raises(RuntimeError, match="differentiable once"):
            torch.autograd.grad(loss, s, torch.eye(N, dtype=torch.float64), is_grads_batched=True, create_graph=True)


@pytest.mark.parametrize("k, u", [(32, 1e-36), (-32, 1e30), (20, 1e-37)])
def test_batched_backward_after_prediction_is_exact_at_range_edges(k, u):
    """With 2^k predicted, a batched upstream far from 2^k: the factor u 2^-k would leave float's
    range (0 or inf); the saved gradient is unscaled first instead."""
    g = torch.Generator().manual_seed(3)
    score = torch.randn(N, V, generator=g)
    x0 = torch.randint(0, V - 1, (N,), generator=g)
    x_t = torch.where(torch.rand(N, generator=g) < 0.5, V - 1, x0)
    sigma = torch.rand(N, generator=g) + 0.1
    loss_of = lambda s: fb.dse_loss(s, sigma, x_t, x0, reduction="sum")
    for _ in range(4):  # 2^k twice in a row: predicted
        s = score.clone().requires_grad_()
        (loss_of(s) * 2.0**k).backward()
    s = score.clone().requires_grad_()
    (batched,) = torch.autograd.grad(loss_of(s), s, torch.tensor([u, 1.0]), is_grads_batched=True)
    expect = per_output(loss_of, score, [torch.tensor(u)])[0]
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched[0], expect, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_nested_transform_leaves_no_cached_wrapper(kind):
    """A first call under nested transforms must not cache a functorch wrapper (the row scale of
    ones) that a later transform would find escaped from its level."""
    from fastbound import losses

    losses._ONES.clear()
    score, sigma, x_t, x0 = case(kind)
    loss_of = _loss_fn(kind, sigma, x_t, x0)
    with pytest.raises(RuntimeError):
        torch.func.jacrev(torch.func.jacrev(loss_of))(score)
    assert not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in losses._ONES.values())
    torch.testing.assert_close(torch.func.grad(loss_of)(score), torch.func.grad(_loss_fn(kind, sigma, x_t, x0))(score))


@pytest.mark.parametrize("kind", ("absorb", "uniform"))
def test_create_graph_through_sigma_alone_raises(kind):
    """d loss / d sigma is a constant of the forward too: create_graph=True through it raises."""
    score, sigma, x_t, x0 = case(kind)
    for _ in range(2):
        sg = sigma.clone().requires_grad_()
        loss = call(fb, kind, score, sg, x_t, x0, reduction="sum")
        with pytest.raises(RuntimeError, match="differentiable once"):
            torch.autograd.grad(loss, sg, create_graph=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_vjp_fn_called_after_vjp_returned(kind, reduction):
    """torch.func.vjp's vjp_fn runs a create_graph backward after its level has exited: first
    order, not a double backward."""
    score, sigma, x_t, x0 = case(kind)
    loss_of = lambda s: call(fb, kind, s, sigma, x_t, x0, reduction=reduction)
    _, vjp_fn = torch.func.vjp(loss_of, score)
    u = torch.randn(loss_of(score).shape, dtype=torch.float64)
    torch.testing.assert_close(vjp_fn(u)[0], per_output(loss_of, score, [u])[0])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_denoising_loss_vjp_fn_called_after_vjp_returned(reduction):
    eps_hat, eps = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    loss_of = lambda e: denoising_loss(e, eps, reduction=reduction)
    _, vjp_fn = torch.func.vjp(loss_of, eps_hat)
    u = torch.randn(loss_of(eps_hat).shape, dtype=torch.float64)
    torch.testing.assert_close(vjp_fn(u)[0], per_output(loss_of, eps_hat, [u])[0])


@pytest.mark.usefixtures("no_batching_fallback")
@pytest.mark.parametrize("reduction", ("sum", "mean"))
@pytest.mark.parametrize("kind", KINDS + ("continuous",))
def test_per_example_gradients(kind, reduction):
    """vmap(grad(loss)) over a batch of score tensors, and vmap of the loss alone: one kernel
    call per entry (`FusedLossWithTangents.vmap`), equal to the oracle's."""
    score, sigma, x_t, x0 = case("absorb" if kind == "continuous" else kind)
    batch = torch.stack([score, score.flip(0), 2 * score])
    if kind == "continuous":
        eps = torch.randn(N, V, dtype=torch.float64)
        ours = lambda s: denoising_loss(s, eps, reduction=reduction)
        oracle = lambda s: cref.denoising_loss(s, eps, reduction=reduction)
    else:
        ours = lambda s: call(fb, kind, s, sigma, x_t, x0, reduction=reduction)
        oracle = lambda s: call(ref, kind, s, sigma, x_t, x0, reduction=reduction)
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(ours))(batch),
                               torch.func.vmap(torch.func.grad(oracle))(batch))
    torch.testing.assert_close(torch.func.vmap(ours)(batch), torch.func.vmap(oracle)(batch))


@pytest.mark.usefixtures("no_batching_fallback")
def test_per_example_gradients_with_their_own_eps():
    """The usual per-sample recipe for the continuous loss: each (eps_hat_b, eps_b) pair vmapped."""
    eps_hat, eps = torch.randn(5, 3, 2, dtype=torch.float64), torch.randn(5, 3, 2, dtype=torch.float64)
    ours = lambda h, e: denoising_loss(h[None], e[None], reduction="sum")
    oracle = lambda h, e: cref.denoising_loss(h[None], e[None], reduction="sum")
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(ours))(eps_hat, eps), eps_hat - eps)
    torch.testing.assert_close(torch.func.vmap(ours)(eps_hat, eps), torch.func.vmap(oracle)(eps_hat, eps))


@pytest.mark.parametrize("name", ["x_t", "x0", "sigma"])
def test_vmap_over_ids_or_sigma_names_the_argument(name):
    """The ids and sigma are checked on the host in one C++ pass, which has no batching rule: a vmap
    over them is refused by name (a vmap over the scores and the weight is supported)."""
    score, sigma, x_t, x0 = case("absorb")
    args = {"sigma": sigma, "x_t": x_t, "x0": x0}
    batched = torch.stack([args[name], args[name]])

    def loss(s, a):
        call = {**args, name: a}
        return fb.dse_loss(s, call["sigma"], call["x_t"], call["x0"], graph="absorb", reduction="sum")

    with pytest.raises(ValueError, match=f"vmap over {name} is not supported"):
        torch.func.vmap(loss)(torch.stack([score, score]), batched)
    if name != "sigma":
        with pytest.raises(ValueError, match=f"vmap over {name} is not supported"):
            torch.func.vmap(lambda s, a: fb.dce_loss(s, *((a, x0) if name == "x_t" else (x_t, a)),
                                                     reduction="sum"))(torch.stack([score, score]), batched)


@pytest.mark.parametrize("kind", ["absorb", "dce"])
def test_vmap_over_the_weight_matches_a_loop(kind):
    score, sigma, x_t, x0 = case(kind)
    weights = torch.rand(3, score.shape[0], dtype=score.dtype)
    scores = torch.stack([score, score * 0.5, score - 1])
    if kind == "dce":
        loss = lambda s, w: fb.dce_loss(s, x_t, x0, weight=w, reduction="sum")
    else:
        loss = lambda s, w: fb.dse_loss(s, sigma, x_t, x0, graph="absorb", weight=w, reduction="sum")
    torch.testing.assert_close(torch.func.vmap(loss)(scores, weights),
                               torch.stack([loss(s, w) for s, w in zip(scores, weights)]))
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(loss))(scores, weights),
                               torch.stack([torch.func.grad(loss)(s, w) for s, w in zip(scores, weights)]))


# ----------------------------------------------------------------------------- torch.func: the fused head

H = 5


def head_case(kind, seed=4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / 2
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    _, sigma, x_t, x0 = case(kind, seed)
    return hidden, weight, bias, sigma, x_t, x0


def head_loss(kind, sigma, x_t, x0, reduction):
    if kind == "dce":
        return lambda h, w, b: fb.fused_linear.fused_linear_dce_loss(h, w, b, x_t, x0, reduction=reduction)
    return lambda h, w, b: fb.fused_linear.fused_linear_dse_loss(h, w, b, sigma, x_t, x0, graph=kind,
                                                                 reduction=reduction)


def unfused(kind, sigma, x_t, x0, reduction):
    return lambda h, w, b: call(ref, kind, h @ w.T + b, sigma, x_t, x0, reduction=reduction)


@pytest.mark.usefixtures("no_batching_fallback")
@pytest.mark.parametrize("reduction", ("sum", "mean"))
@pytest.mark.parametrize("kind", KINDS)
def test_fused_head_torch_func_grad(kind, reduction):
    hidden, weight, bias, sigma, x_t, x0 = head_case(kind)
    fused, oracle = head_loss(kind, sigma, x_t, x0, reduction), unfused(kind, sigma, x_t, x0, reduction)
    got = torch.func.grad(fused, argnums=(0, 1, 2))(hidden, weight, bias)
    expect = torch.func.grad(oracle, argnums=(0, 1, 2))(hidden, weight, bias)
    torch.testing.assert_close(got, expect)
    # per-example gradients of the weight: vmap over a batch of hidden states
    batch = torch.stack([hidden, hidden.flip(0), 2 * hidden])
    got = torch.func.vmap(torch.func.grad(fused, argnums=1), in_dims=(0, None, None))(batch, weight, bias)
    expect = torch.stack([torch.func.grad(oracle, argnums=1)(h, weight, bias) for h in batch])
    torch.testing.assert_close(got, expect)


@pytest.mark.usefixtures("no_batching_fallback")
@pytest.mark.parametrize("kind", KINDS)
def test_fused_head_torch_func_vjp_and_jacrev(kind):
    hidden, weight, bias, sigma, x_t, x0 = head_case(kind)
    fused, oracle = head_loss(kind, sigma, x_t, x0, "none"), unfused(kind, sigma, x_t, x0, "none")
    _, vjp_fn = torch.func.vjp(fused, hidden, weight, bias)
    _, vjp_ref = torch.func.vjp(oracle, hidden, weight, bias)
    u = torch.randn(N, dtype=torch.float64)
    torch.testing.assert_close(vjp_fn(u), vjp_ref(u))
    us = torch.randn(B, N, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(vjp_fn)(us), torch.func.vmap(vjp_ref)(us))
    torch.testing.assert_close(torch.func.jacrev(fused)(hidden, weight, bias), torch.func.jacrev(oracle)(hidden, weight, bias))


@pytest.mark.parametrize("kind", KINDS)
def test_fused_head_torch_func_second_derivative_raises(kind):
    hidden, weight, bias, sigma, x_t, x0 = head_case(kind)
    fused = head_loss(kind, sigma, x_t, x0, "sum")
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.func.grad(lambda h: torch.func.grad(fused)(h, weight, bias).pow(2).sum())(hidden)
    with pytest.raises(RuntimeError, match="detach"):
        torch.func.grad(fused)(hidden, weight.clone().requires_grad_(), bias)


def test_fused_head_loss_may_change_in_place_before_backward():
    """`loss /= accum_steps; loss.backward()`: the loss is saved only under torch.func."""
    hidden, weight, bias, sigma, x_t, x0 = head_case("dce")
    for reduction in REDUCTIONS:
        h = hidden.clone().requires_grad_()
        loss = head_loss("dce", sigma, x_t, x0, reduction)(h, weight, bias)
        loss /= 4
        loss.sum().backward()
        hd = hidden.clone().requires_grad_()
        (unfused("dce", sigma, x_t, x0, reduction)(hd, weight, bias) / 4).sum().backward()
        torch.testing.assert_close(h.grad, hd.grad)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_head_torch_func_grad_of_unreduced(kind):
    """reduction="none" then .sum() under torch.func.grad: the backward's rerun of the pass."""
    hidden, weight, bias, sigma, x_t, x0 = head_case(kind)
    fused, oracle = head_loss(kind, sigma, x_t, x0, "none"), unfused(kind, sigma, x_t, x0, "none")
    torch.testing.assert_close(torch.func.grad(lambda h: fused(h, weight, bias).sum())(hidden),
                               torch.func.grad(lambda h: oracle(h, weight, bias).sum())(hidden))


def test_continuous_vmap_over_checked_inputs_names_the_argument():
    """perturb's x and logsnr and the loss's weight are value-checked on the host and the ops have no
    batching rule: a vmap over one of them (directly or under grad, as in per-sample gradients) is a
    ValueError naming it; jacrev of perturb (no vmap over its inputs' values) still runs."""
    from fastbound.continuous import perturb

    x, lam = torch.randn(4, 2, 8), torch.zeros(2)
    cases = [("x", lambda xx: perturb(xx, lam, seed=0).z, x),
             ("logsnr", lambda ll: perturb(x[0], ll, seed=0).z, torch.zeros(4, 2)),
             ("weight", lambda w: denoising_loss(x[0], x[1], weight=w), torch.ones(4, 2)),
             ("x", torch.func.grad(lambda xx: perturb(xx, lam, seed=0).z.sum()), x)]
    for name, fn, arg in cases:
        with pytest.raises(ValueError, match=f"vmap over {name} is not supported"):
            torch.func.vmap(fn)(arg)
    jac = torch.func.jacrev(lambda xx: perturb(xx, lam, seed=0).z)(x[0])
    alpha = cref.alpha_sigma(lam)[0].float()
    assert torch.allclose(jac.reshape(16, 16).diagonal(), alpha.repeat_interleave(8))
