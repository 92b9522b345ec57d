"""Property-based fuzzing (Hypothesis) of `fastbound.continuous`'s ops against the oracle in
`fastbound.continuous.reference`.

Each property draws a whole call — the batch (empty included) and trailing shape, the dtype,
the memory layout, λ as a float or a (B,) tensor, the warm-up law and σ0, seed and offset
anywhere in [0, 2^64) (the counter wrap included), the weight and baseline forms, the
reduction, the slots — and compares with the oracle on the same inputs:

* `perturb`: z, ε and x̃ within the contract's few ulp of max(1, |term|)
  (`csrc/include/fastbound/continuous.h`): ``ATOL`` of the dtype times the magnitude of the
  largest term; the gradients to x and λ as the loss values;
* `denoising_loss`: values to a relative 1e-5 (float32 accumulation; 1e-12 in float64) of the
  summed squares, gradients to ε̂ within a unit in the last place of ε̂'s dtype of the oracle's
  float64 gradient, gradients to the weight as the values; the regenerating form against the
  oracle fed the ε that `perturb` returns (its agreement with the oracle's ε is the first property);
* `integrate_step`: the float64 accumulator to 1e-9 of its scale.

Budgets as in ``tests/test_fuzz.py`` (``FASTBOUND_FUZZ_EXAMPLES=N`` for a random campaign).
"""

import math

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from fastbound.continuous import denoising_loss, integrate_step, perturb
from fastbound.continuous import reference as R
from test_fuzz import apply_layout, budget

FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LAYOUTS = ["contiguous", "transposed", "lead_transposed", "sliced", "lead_stepped", "expanded"]
LAWS = [None, "gaussian", "laplace", "logistic", "uniform"]
ULP = {torch.float32: 2.0**-23, torch.float64: 2.0**-52, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
ATOL = {torch.float32: 8 * 2.0**-23, torch.float64: 1e-14, torch.bfloat16: 2 * 2.0**-7, torch.float16: 2 * 2.0**-10}
"""The contract's agreement (continuous.h: a few ulp of max(1, |value|) in float32; one unit in
the last place of a 16-bit output, doubled for the float32 value it rounds)."""
MAX_ELEMENTS = 20000
UINT64 = 2**64


@st.composite
def shapes(draw, max_elements=MAX_ELEMENTS):
    batch = 0 if draw(st.integers(0, 9)) == 0 else draw(st.integers(1, 6))
    trailing = tuple(draw(st.lists(st.integers(1, 40), min_size=1, max_size=3)))
    assume(batch * math.prod(trailing) <= max_elements)
    return (batch,) + trailing


def counters(draw):
    """seed and offset: small, anywhere, or just below the 2^64 wrap."""
    near_wrap = st.integers(UINT64 - 5000, UINT64 - 1)
    return (draw(st.one_of(st.integers(0, 100), st.integers(0, UINT64 - 1), near_wrap)),
            draw(st.one_of(st.integers(0, 100), st.integers(0, UINT64 - 1), near_wrap)))


def per_sample(draw, batch, gen, low, high):
    """A float, a (B,) float32 / float64 tensor, or a (1,) one."""
    form = draw(st.sampled_from(["float", "rows32", "rows64", "one"]))
    if form == "float":
        return draw(st.floats(low, high))
    n = 1 if form == "one" else batch
    values = torch.empty(n, dtype=torch.float64).uniform_(low, high, generator=gen)
    return values.to(torch.float32 if form == "rows32" else torch.float64)


def laid_out(t: torch.Tensor, layout: str, requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(the values of ``t`` in ``layout``, differentiable when asked, and a contiguous float64 leaf
    copy of those values for the oracle). "expanded" repeats the first row: the oracle sees that."""
    out = apply_layout(t.clone().requires_grad_(requires_grad), layout)
    return out, out.detach().double().clone().requires_grad_(requires_grad)


# ----------------------------------------------------------------------------- perturb


@st.composite
def perturb_cases(draw, max_elements=MAX_ELEMENTS):
    shape = draw(shapes(max_elements))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtype = draw(st.sampled_from(FLOATS))
    scale = draw(st.sampled_from([0.01, 1.0, 30.0]))
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    law = draw(st.sampled_from(LAWS))
    warm_std = draw(st.sampled_from([0.0, 1e-3, 0.3, 2.0])) if law else 0.0
    seed, offset = counters(draw)
    return dict(x=x, logsnr=per_sample(draw, shape[0], gen, -25.0, 25.0), warm=law, warm_std=warm_std, seed=seed,
                offset=offset, layout=draw(st.sampled_from(LAYOUTS)), grad_logsnr=draw(st.booleans()),
                probe=torch.randn(shape, generator=gen, dtype=torch.float64))


def _magnitude(case) -> float:
    """The largest term of z or x̃: |x| + σ0 |u| (|u| < 12 for every law's 24-bit uniforms) and |ε| < 6."""
    x = case["x"].double()
    return 1.0 + (x.abs().max().item() if x.numel() else 0.0) + 12 * case["warm_std"] + 6


@given(perturb_cases())
@budget(150)
def test_perturb_matches_the_oracle(case):
    dtype, tol = case["x"].dtype, ATOL[case["x"].dtype] * _magnitude(case)
    x, x_ref = laid_out(case["x"], case["layout"], requires_grad=True)
    logsnr = case["logsnr"]
    if case["grad_logsnr"] and isinstance(logsnr, torch.Tensor):
        logsnr = logsnr.clone().requires_grad_()
    kwargs = dict(warm=case["warm"], warm_std=case["warm_std"], seed=case["seed"], offset=case["offset"])
    got = perturb(x, logsnr, return_warm=True, **kwargs)
    logsnr_ref = logsnr.detach().clone().requires_grad_() if isinstance(logsnr, torch.Tensor) and \
        logsnr.requires_grad else logsnr
    want = R.perturb(x_ref.to(dtype), logsnr_ref, **kwargs)
    for name, g, w in zip(("z", "eps", "x_warm"), got, want):
        assert g.dtype == dtype and g.shape == case["x"].shape, name
        torch.testing.assert_close(g.double(), w.double(), rtol=0, atol=tol, msg=name)
    if not x.numel():
        return
    probe = case["probe"].to(dtype)
    wrt = (x, logsnr) if isinstance(logsnr, torch.Tensor) and logsnr.requires_grad else (x,)
    wrt_ref = (x_ref, logsnr_ref) if len(wrt) == 2 else (x_ref,)
    grads = torch.autograd.grad((got.z * probe).sum(), wrt)
    expected = torch.autograd.grad((want[0].double() * probe.double()).sum(), wrt_ref)
    torch.testing.assert_close(grads[0].double(), expected[0].double(), rtol=2 * ULP[dtype], atol=2 * ULP[dtype])
    if len(wrt) == 2:
        # Σ_i probe_i (α' x̃_i + σ' ε_i) from the kernel's float32 x̃ and ε (16-bit x too): each term
        # within the contract's few ulp, summed in float32: a few ulp of the sum of |terms|.
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        alpha, sigma = R.alpha_sigma(logsnr_ref.detach())
        view = (-1,) + (1,) * (x.dim() - 1)
        terms = probe.double() * ((alpha * sigma**2 / 2).view(view) * want[2].double()
                                  - (sigma * alpha**2 / 2).view(view) * want[1].double())
        scale = terms.abs().reshape(terms.shape[0], -1).sum(1)
        bound = 64 * ULP[acc] * scale * (_magnitude(case) if acc == torch.float32 else 1.0)
        assert bool(((grads[1].double() - expected[1].double()).abs() <= bound + 1e-300).all())


# ----------------------------------------------------------------------------- denoising_loss


@st.composite
def loss_cases(draw, max_elements=MAX_ELEMENTS):
    shape = draw(shapes(max_elements))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtype = draw(st.sampled_from(FLOATS))
    eps = torch.randn(shape, generator=gen, dtype=torch.float64)
    eps_hat = eps + draw(st.sampled_from([1e-3, 0.3, 3.0])) * torch.randn(shape, generator=gen, dtype=torch.float64)
    weight = draw(st.one_of(st.none(), st.just("tensor"), st.floats(0.0, 5.0)))
    if weight == "tensor":
        weight = torch.rand(shape[0], generator=gen, dtype=torch.float64) * 3
        weight = weight.to(draw(st.sampled_from([torch.float32, torch.float64])))
        if weight.numel():
            weight[0] = 0.0  # a zero weight still has a gradient: ½‖ε − ε̂‖²
    seed, offset = counters(draw)
    return dict(eps_hat=eps_hat.to(dtype), eps=eps.to(dtype), weight=weight,
                reduction=draw(st.sampled_from(["none", "sum", "mean"])), regenerate=draw(st.booleans()),
                seed=seed, offset=offset, layout=draw(st.sampled_from(LAYOUTS)),
                eps_layout=draw(st.sampled_from(LAYOUTS)), grad_weight=draw(st.booleans()),
                upstream=draw(st.sampled_from([1.0, 0.37, 65536.0])),
                probe=torch.randn(shape[:1], generator=gen, dtype=torch.float64))


@given(loss_cases())
@budget(200)
def test_denoising_loss_matches_the_oracle(case):
    dtype = case["eps_hat"].dtype
    eps_hat, ref_hat = laid_out(case["eps_hat"], case["layout"], requires_grad=True)
    if case["regenerate"]:  # the kernel's ε, as perturb returns it (checked against the oracle above)
        eps = perturb(torch.zeros_like(case["eps_hat"]), 0.0, seed=case["seed"], offset=case["offset"]).eps.double()
        kwargs = dict(seed=case["seed"], offset=case["offset"])
        eps_arg = None
    else:
        eps_arg, eps = laid_out(case["eps"], case["eps_layout"])
        kwargs = {}
    weight = case["weight"]
    if case["grad_weight"] and isinstance(weight, torch.Tensor):
        weight = weight.clone().requires_grad_()
    got = denoising_loss(eps_hat, eps_arg, weight=weight, reduction=case["reduction"], **kwargs)
    ref_weight = weight.detach().double().requires_grad_() if isinstance(weight, torch.Tensor) else weight
    want = R.denoising_loss(ref_hat, eps, weight=ref_weight, reduction=case["reduction"])
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    sq = 0.5 * (eps - ref_hat.detach()).square().sum() * (1 if weight is None else 5)
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * float(sq) + 1e-30, equal_nan=True)
    if not eps_hat.numel() and case["reduction"] == "mean":
        return  # NaN: the mean of nothing
    up = case["probe"] if case["reduction"] == "none" else torch.tensor(case["upstream"], dtype=torch.float64)
    wrt = (eps_hat, weight) if isinstance(weight, torch.Tensor) and weight.requires_grad else (eps_hat,)
    grads = torch.autograd.grad((got * up.to(got.dtype)).sum(), wrt)
    expected = torch.autograd.grad((want * up).sum(), (ref_hat, ref_weight) if len(wrt) == 2 else (ref_hat,))
    # The kernels compute in float32 and round once to ε̂'s dtype (a rescale after a factor rounds
    # again in 16 bits: two units); float32 values carry float32's own rounding of ε − ε̂. Against
    # the float64 gradient rounded to ε̂'s dtype (beyond float16's range both are inf).
    g, e = grads[0].double(), expected[0].to(dtype).double()
    assert grads[0].dtype == dtype
    units = 1 if dtype in (torch.float32, torch.float64) else 2
    finite = e[torch.isfinite(e)].abs()
    tol = units * ULP[dtype] * e.abs() + 4 * ULP[torch.float32 if dtype != torch.float64 else dtype] * \
        (finite.max() if finite.numel() else 0) + 1e-300
    assert bool(((g == e) | ((g - e).abs() <= tol)).all()), float((g - e).abs().max())
    if len(wrt) == 2:  # in the weight's dtype
        assert grads[1].dtype == weight.dtype
        rtol_w = rtol if weight.dtype == torch.float64 else max(rtol, 1e-6)
        torch.testing.assert_close(grads[1].double(), expected[1], rtol=rtol_w, atol=rtol_w * float(sq) * 10 + 1e-30)


# ----------------------------------------------------------------------------- integrate_step


@st.composite
def integrate_cases(draw, max_elements=MAX_ELEMENTS):
    case = draw(loss_cases(max_elements))
    batch = case["eps_hat"].shape[0]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    slots = draw(st.one_of(st.none(), st.integers(1, 4)))
    index = None if slots is None else torch.randint(0, slots, (batch,), generator=gen)
    if index is not None:
        index = index.to(draw(st.sampled_from([torch.int64, torch.int32])))
    weight = draw(st.one_of(st.floats(0.0, 4.0), st.just("tensor")))
    if weight == "tensor":
        weight = torch.rand(batch, generator=gen, dtype=torch.float64) * 4
    baseline = draw(st.one_of(st.none(), st.floats(-50.0, 50.0), st.just("tensor")))
    if baseline == "tensor":
        baseline = torch.randn(batch, generator=gen, dtype=torch.float64) * 10
    return dict(case, index=index, slots=batch if slots is None else slots, weight=weight, baseline=baseline)


@given(integrate_cases())
@budget(150)
def test_integrate_step_matches_the_oracle(case):
    eps_hat, ref_hat = laid_out(case["eps_hat"], case["layout"])
    if case["regenerate"]:
        eps = perturb(torch.zeros_like(case["eps_hat"]), 0.0, seed=case["seed"], offset=case["offset"]).eps.double()
        args, kwargs = (None,), dict(seed=case["seed"], offset=case["offset"])
    else:
        eps_arg, eps = laid_out(case["eps"], case["eps_layout"])
        args, kwargs = (eps_arg,), {}
    start = torch.randn(case["slots"], 2, dtype=torch.float64)
    acc = start.clone()
    integrate_step(eps_hat, *args, acc, weight=case["weight"], baseline=case["baseline"], index=case["index"],
                   **kwargs)
    want = R.integrate_step(ref_hat, eps, start.clone(), weight=case["weight"], baseline=case["baseline"],
                            index=None if case["index"] is None else case["index"].long())
    scale = float(want.abs().max()) + 1.0 if want.numel() else 1.0
    torch.testing.assert_close(acc, want, rtol=1e-9, atol=1e-9 * scale)
