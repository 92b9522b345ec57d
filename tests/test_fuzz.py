"""Property-based fuzzing (Hypothesis) of the public ops against the oracle in `fastbound.reference`.

Each property draws a whole call — shapes, dtypes, memory layouts, graphs, losses, mask ids,
σ and weight forms, reductions, ignored positions, ``inplace`` — and compares the kernel
with the oracle evaluated in float64 on the same (rounded) inputs:

* values: relative error 1e-4 (float32 and 16-bit inputs, whose losses are float32) or 1e-9
  (float64), of a scale that bounds the terms the loss cancels (``_loss_scale``);
* gradients: float32 relative error 1e-4; bf16 / fp16 within one ulp of the float64 gradient
  rounded to the gradient dtype (the kernels compute in float32 and round once), beyond
  float32's own rounding of the terms that cancel;
* `fastbound.perturb`: bit for bit; `fastbound.integrate_step`: as the values.

CI runs a fixed seed (``derandomize``) and a small example budget per property; set
``FASTBOUND_FUZZ_EXAMPLES=N`` for a random campaign of N examples per property
(``pytest tests/test_fuzz.py --hypothesis-show-statistics`` counts them).
"""

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastbound as fb
from fastbound import reference as ref

CAMPAIGN = int(os.environ.get("FASTBOUND_FUZZ_EXAMPLES", "0"))
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ID_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]
LAYOUTS = ["contiguous", "transposed", "lead_transposed", "sliced", "lead_stepped", "expanded"]
STRIDED_ROWS = ("sliced", "lead_stepped")  # rows of (N, V) at a stride > V (issue 11 item 1)
INPLACE_LAYOUTS = LAYOUTS
STRIDED_LAYOUTS = tuple(layout for layout in LAYOUTS if layout != "expanded")
RTOL = {torch.float64: 1e-9}
RTOL_32 = 1e-4
GRAD_SLACK_32 = 8 * 2.0**-23  # float32 rounding (a few ulps) of the terms a 16-bit gradient entry cancels
MAX_ELEMENTS = 30000
TINY_COLS = st.integers(2, 24)  # the Triton interpreter's shapes


def budget(ci_examples: int, *, interpreter: bool = False):
    """CI: a fixed seed and ``ci_examples`` examples; campaign: FASTBOUND_FUZZ_EXAMPLES random ones
    (a hundredth of them, at least ``ci_examples``, for the Triton interpreter, ~100x slower).
    """
    examples = max(CAMPAIGN // 100, ci_examples) if CAMPAIGN and interpreter else CAMPAIGN or ci_examples
    return settings(max_examples=examples, derandomize=not CAMPAIGN, deadline=None,
                    database=None, print_blob=True, suppress_health_check=list(HealthCheck))


def _fits(value: int, dtype: torch.dtype) -> bool:
    return torch.iinfo(dtype).min <= value <= torch.iinfo(dtype).max


# ----------------------------------------------------------------------------- layouts


def apply_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same (..., V) values in another memory layout (differentiable; NaN in the gaps, so reads outside show)."""
    if layout == "transposed":  # column stride != 1
        return t.movedim(-1, 0).contiguous().movedim(0, -1)
    if layout == "lead_transposed" and t.dim() >= 3:  # leading strides out of order
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "sliced":  # row stride > V, storage offset
        pad = torch.full(t.shape[:-1] + (3,), float("nan"), dtype=t.dtype)
        return torch.cat([pad[..., :2], t, pad], -1)[..., 2:2 + t.shape[-1]]
    if layout == "lead_stepped" and t.dim() >= 2:  # every other row of a larger batch
        return torch.stack([t, torch.full_like(t, float("nan"))], 1).flatten(0, 1)[::2]
    if layout == "expanded" and t.dim() >= 2 and t.shape[0] > 0:  # rows that share memory (stride 0)
        return t[:1].expand(t.shape)
    return t


# ----------------------------------------------------------------------------- loss cases


@st.composite
def loss_cases(draw, *, dtypes=FLOATS, losses=("absorb", "uniform", "dce"), layouts=LAYOUTS,
               inplace_layouts=INPLACE_LAYOUTS, inplace=st.booleans(), max_elements=MAX_ELEMENTS,
               leads=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
               cols=st.one_of(st.integers(2, 40), st.sampled_from([64, 127, 257, 1031, 2049, 4100])),
               dce_offsets=st.one_of(st.just(0.0), st.floats(-1e4, 1e4))):
    """One call of `dse_loss` / `dce_loss`: a dict of everything the kernel and the oracle need."""
    loss = draw(st.sampled_from(losses))
    dtype = draw(st.sampled_from(dtypes))
    id_dtype = draw(st.sampled_from(ID_DTYPES))
    n_cols = draw(cols)
    lead = draw(leads)
    if draw(st.integers(0, 9)) == 0:  # now and then an empty batch
        lead = lead[:-1] + (0,)
    assume(math.prod(lead) * n_cols <= max_elements)
    assume(_fits(n_cols + 8, id_dtype))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    # DCE's mask may lie beyond V (logits of the real tokens only); the absorbing DSE mask is a column.
    mask_forms = {"dce": ["default", "last", "middle", "beyond"], "uniform": ["none"],
                  "absorb": ["default", "last", "middle"]}[loss]
    mask_form = draw(st.sampled_from(mask_forms))
    mask_id = {"none": None, "default": None, "last": n_cols - 1,
               "middle": draw(st.integers(0, n_cols - 1)), "beyond": n_cols + draw(st.integers(0, 3))}[mask_form]
    mask_col = None if loss == "uniform" else (n_cols - 1 if mask_id is None else mask_id)

    tokens = torch.tensor([y for y in range(n_cols) if y != mask_col])
    x0 = tokens[torch.randint(0, len(tokens), lead, generator=gen)]
    noise = torch.rand(lead, generator=gen)
    other = torch.randint(0, n_cols, lead, generator=gen)  # may hit the mask column: then it is masked
    if loss == "uniform":
        x_t = torch.where(noise < draw(st.sampled_from([0.0, 0.5, 1.0])), other, x0)
    else:
        x_t = torch.where(noise < draw(st.sampled_from([0.6, 0.9, 1.0, 0.0])), torch.full_like(x0, mask_col), other)

    candidates = [-100, -1, n_cols + 5, draw(st.integers(0, n_cols - 1))]
    ignore_index = draw(st.sampled_from([c for c in candidates if c != mask_col]))
    if _fits(ignore_index, id_dtype) and draw(st.booleans()):
        x0 = torch.where(torch.rand(lead, generator=gen) < 0.3, torch.full_like(x0, ignore_index), x0)

    if loss == "dce":
        offset = draw(dce_offsets)
        scale = draw(st.sampled_from([0.1, 1.0, 5.0, 20.0]))
    else:
        offset = draw(st.floats(-6.0, 3.0))
        scale = draw(st.sampled_from([0.1, 1.0, 3.0]))
    base = (torch.randn(lead + (n_cols,), generator=gen, dtype=torch.float64) * scale + offset).to(dtype)

    sigma = None
    if loss != "dce":
        sigma = draw(tensor_or_number(lead, gen, lambda n: torch.exp(torch.empty(n).uniform_(
            math.log(1e-4), math.log(1e3), generator=gen))))
    weight = draw(st.one_of(st.none(), tensor_or_number(lead, gen, lambda n: torch.rand(n, generator=gen) * 3)))
    layout = draw(st.sampled_from(layouts))
    # inplace on expanded rows: refused for (n, V) scores (rows share memory); for more leading dims the
    # kernel reads a reshaped copy, whose gradient autograd sums back, so it is drawn out of place only.
    inplace = layout in inplace_layouts and draw(inplace) and not (layout == "expanded" and len(lead) > 1)
    return dict(loss=loss, dtype=dtype, base=base, x_t=x_t.to(id_dtype), x0=x0.to(id_dtype), mask_id=mask_id,
                sigma=sigma, weight=weight, reduction=draw(st.sampled_from(["none", "sum", "mean"])),
                ignore_index=ignore_index, inplace=inplace, layout=layout,
                probe=torch.randn(lead, generator=gen, dtype=torch.float64))


@st.composite
def tensor_or_number(draw, lead, gen, values):
    """A per-position factor as a float, an int, a 0-d tensor, or a tensor that broadcasts to ``lead``."""
    form = draw(st.sampled_from(["float", "int", "scalar_tensor", "per_row", "per_position", "broadcast"]))
    if form == "float":
        return float(values(1)[0])
    if form == "int":
        return draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    if form == "scalar_tensor":
        shape = ()
    elif form == "per_row":
        shape = lead[:1] + (1,) * (len(lead) - 1)
    elif form == "per_position":
        shape = lead
    else:  # trailing dims of lead, some of them 1
        keep = draw(st.integers(0, len(lead)))
        shape = tuple(d if draw(st.booleans()) else 1 for d in lead[len(lead) - keep:])
    return values(math.prod(shape)).reshape(shape).to(dtype)


# ----------------------------------------------------------------------------- calls and comparisons


def _kwargs(case, backend=None):
    kw = dict(weight=case["weight"], reduction=case["reduction"], ignore_index=case["ignore_index"])
    if case["mask_id"] is not None:
        kw["mask_id"] = case["mask_id"]
    if backend is not None:
        kw["backend"] = backend
    return kw


def run_kernel(case, score, backend=None):
    kw = _kwargs(case, backend)
    if case["loss"] == "dce":
        return fb.dce_loss(score, case["x_t"], case["x0"], inplace=case["inplace"], **kw)
    return fb.dse_loss(score, case["sigma"], case["x_t"], case["x0"], graph=case["loss"], inplace=case["inplace"], **kw)


def _as_acc(value, acc):
    """σ or a weight as the kernel reads it (rounded to the accumulation dtype), in float64."""
    if isinstance(value, torch.Tensor):
        return value.to(acc).double()
    return value if value is None else torch.tensor(float(value), dtype=acc).double()


def run_oracle(case, score64):
    acc = torch.float64 if case["dtype"] == torch.float64 else torch.float32
    kw = _kwargs(case)
    kw["weight"] = _as_acc(case["weight"], acc)
    if case["loss"] == "dce":
        return ref.dce_loss(score64, case["x_t"], case["x0"], **kw)
    return ref.dse_loss(score64, _as_acc(case["sigma"], acc), case["x_t"], case["x0"], graph=case["loss"], **kw)


def _inv_a_and_log_a(loss, sigma64, lead):
    """Per position 1/(e^σ - 1) and log(e^σ - 1) (both 0 for DCE)."""
    if loss == "dce":
        return torch.zeros(lead, dtype=torch.float64), torch.zeros(lead, dtype=torch.float64)
    log_a = ref._log_expm1(torch.as_tensor(sigma64, dtype=torch.float64).expand(lead))
    return torch.exp(-log_a), log_a


def _row_factor(case, lead, acc):
    """|d out / d l| per position under a unit upstream gradient: weight, 1/count (mean), 0 where ignored."""
    x0 = case["x0"].long()
    keep = (x0 != case["ignore_index"]).double()
    w = torch.as_tensor(1.0 if case["weight"] is None else _as_acc(case["weight"], acc)).expand(lead).abs()
    f = keep * w
    if case["reduction"] == "mean":
        return f / keep.sum().clamp_min(1)
    return f


def _softmax_logits(score64, mask_id):
    """DCE's logits as its softmax sees them: the mask column (when it is one, ``mask_id`` < V) at -inf."""
    n = score64.shape[-1]
    mask_id = n - 1 if mask_id is None else mask_id
    return score64.index_fill(-1, torch.tensor([mask_id]), -math.inf) if mask_id < n else score64


def _loss_scale(loss, score64, sigma64, x_t, x0, mask_id=None):
    """Beyond |l|, a bound on the terms each position's loss sums before they cancel (float32 rounds each).

    DCE: (m - s_x0) + log sum_y e^{s_y - m}, m the row's largest logit (a shift of every logit changes
    nothing; the 0.01 covers the rounding of log sum near 0). Absorbing DSE: sum_y e^{s_y} - r s_x0 + r (log r - 1),
    r = 1/a. Uniform DSE: the mean score, and where x_t != x0 also s_x0 / a and the constant's
    (1/N + 1/a) log1p(N/a) (with x_t == x0 the constant is at most 1).
    """
    n = score64.shape[-1]
    inv_a, log_a = _inv_a_and_log_a(loss, sigma64, score64.shape[:-1])
    s_x0 = score64.gather(-1, x0.long().clamp(0, n - 1)[..., None]).squeeze(-1).abs()
    x_t_is_x0 = x_t.long() == x0.long()
    if loss == "dce":
        return (_softmax_logits(score64, mask_id).amax(-1) - s_x0).abs() + 0.01
    if loss == "absorb":
        return inv_a * (s_x0 + log_a.abs() + 1)
    moved = inv_a * s_x0 + (1 / n + inv_a) * torch.log1p(n * inv_a)
    return score64.abs().mean(-1) + 1 + torch.where(x_t_is_x0, 0.0, moved)


def _gradient_scale(loss, score64, g64, factor, inv_a, x0, mask_id=None):
    """Per entry: |g| plus, times the position's factor, the terms float32 rounds before they cancel: the
    constant subtracted (r = 1/a, or 1/a and 1 at x0; c/N <= 1/N on the uniform graph), and for DCE
    p_y (|s_y - m| + log V + 1), p_y = e^{(s_y - m) - log sum} carrying the rounding of its argument."""
    n = g64.shape[-1]
    at_x0 = torch.nn.functional.one_hot(x0.long().clamp(0, n - 1), n).double()
    subtracted = at_x0 * (1 + inv_a)[..., None] + (1 / n if loss == "uniform" else 0.0)
    if loss == "dce":
        logits = _softmax_logits(score64, mask_id)
        shifted = logits - logits.amax(-1, keepdim=True)
        subtracted = subtracted + (shifted.softmax(-1) * (shifted.abs() + math.log(n) + 1)).nan_to_num()  # 0 * inf
    return g64.abs() + factor[..., None] * subtracted


def check_loss_case(case, backend=None):
    dtype, base = case["dtype"], case["base"]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rtol = RTOL.get(dtype, RTOL_32)
    if case["inplace"]:
        leaf = base.clone().requires_grad_()
        score = apply_layout(leaf.clone(), case["layout"])  # a non-leaf: the kernel overwrites it
        values64 = score.detach().clone().double()
        if case["layout"] == "expanded" and score.shape[0] > 1 and score.shape[-1] and score.numel():
            with pytest.raises(ValueError, match="inplace=True needs"):
                run_kernel(case, score, backend)
            return
    else:
        score = apply_layout(base, case["layout"]).detach().requires_grad_()
        leaf, values64 = score, score.detach().clone().double()
    out = run_kernel(case, score, backend)
    assert out.dtype == acc

    s64 = values64.clone().requires_grad_()
    expected = run_oracle(case, s64)
    lead = base.shape[:-1]
    factor = _row_factor(case, lead, acc)
    sigma64 = _as_acc(case["sigma"], acc)
    scale = _loss_scale(case["loss"], values64, sigma64, case["x_t"], case["x0"], case["mask_id"]) * factor
    if case["reduction"] != "none":
        scale = scale.sum()
    assert torch.isfinite(expected).all()
    err = (out.detach().double() - expected).abs()
    assert (err <= rtol * (expected.abs() + scale) + 1e-30).all(), (out, expected)

    if not out.numel():
        return
    # Unit upstream first (the kernel's own gradient), then the probe: for reduction="none" the backward
    # rescales the saved gradient (already rounded to the score dtype), so 16-bit rounds twice.
    none = case["reduction"] == "none"
    unit = torch.ones(lead, dtype=acc) if none else torch.tensor(1.0, dtype=acc)
    (g,) = torch.autograd.grad(out, leaf, unit, retain_graph=none)
    (g64,) = torch.autograd.grad(expected, s64, unit.double())
    assert g.dtype == dtype and g.shape == leaf.shape
    inv_a, _ = _inv_a_and_log_a(case["loss"], sigma64, lead)
    g_scale = _gradient_scale(case["loss"], values64, g64, factor, inv_a, case["x0"], case["mask_id"])
    compare_gradients(g, g64, g_scale, dtype)
    if none:
        probe = case["probe"].to(acc)
        (g_probe,) = torch.autograd.grad(out, leaf, probe)
        scaled = g.double() * probe.double()[..., None]
        compare_gradients(g_probe, scaled, scaled.abs(), dtype)


def _ordered(bits: torch.Tensor) -> torch.Tensor:
    """16-bit float bit patterns as integers in the order of their values (±0 both 0)."""
    bits = bits.to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def compare_gradients(g, g64, scale, dtype):
    """float32/64: error <= 1e-4 / 1e-9 of the entry's scale (`_gradient_scale`); 16-bit: within one ulp of the
    float64 gradient rounded to the gradient dtype, or within float32's rounding of the terms that cancel."""
    g = g.detach()
    err = (g.double() - g64).abs()
    if dtype in (torch.float16, torch.bfloat16):
        rounded = g64.to(dtype)
        ulps = (_ordered(g.view(torch.int16)) - _ordered(rounded.view(torch.int16))).abs()
        same_inf = torch.isinf(g) & (g == rounded)
        bad = ~((ulps <= 1) | (err <= GRAD_SLACK_32 * scale) | same_inf)
    else:
        rtol = RTOL.get(dtype, RTOL_32)
        bad = ~(err <= rtol * (scale + torch.finfo(dtype).tiny))  # relative to the smallest normal below it
    assert not bad.any(), f"{int(bad.sum())} gradient entries off, e.g. {g[bad][:4]} vs {g64[bad][:4]}"


@given(loss_cases())
@budget(150)
def test_losses_match_the_oracle(case):
    check_loss_case(case)


@given(loss_cases(layouts=STRIDED_ROWS, inplace_layouts=STRIDED_ROWS, inplace=st.just(True)))
@budget(10)
def test_inplace_on_strided_rows_matches_the_oracle(case):
    check_loss_case(case)


@given(loss_cases(dtypes=[torch.float32], losses=("dce",), dce_offsets=st.floats(5e3, 1e4)))
@budget(20)
def test_dce_large_logit_offsets_match_the_oracle(case):
    check_loss_case(case)


# ----------------------------------------------------------------------------- refused input


def _bad_ids(case, which):
    """Values of ``which`` the checks must refuse: outside [0, V) (and for x0 the mask), never exempt ones."""
    n_cols, m = case["base"].shape[-1], case["mask_id"]
    mask_col = None if case["loss"] == "uniform" else (n_cols - 1 if m is None else m)
    candidates = [n_cols, n_cols + 1, n_cols + 4, -1, -2, -101]
    if which == "x0" and mask_col is not None:
        candidates.append(mask_col)
    exempt = {case["ignore_index"]} if which == "x0" else ({mask_col} if mask_col is not None else set())
    return [c for c in candidates if c not in exempt and _fits(c, case["x0"].dtype)]


@given(loss_cases(max_elements=3000), st.data())
@budget(40)
def test_out_of_range_ids_are_refused_naming_the_argument(case, data):
    assume(case["x_t"].numel() > 0)
    which = data.draw(st.sampled_from(["x_t", "x0"]))
    bad = data.draw(st.sampled_from(_bad_ids(case, which)))
    ids = case[which].clone()
    ids.view(-1)[data.draw(st.integers(0, ids.numel() - 1))] = bad
    with pytest.raises(ValueError, match=which):
        run_kernel(dict(case, **{which: ids}), case["base"].clone().requires_grad_() * 1.0)  # a non-leaf, as inplace needs


@given(st.integers(2, 40), st.integers(0, 5))
@budget(10)
def test_dse_mask_id_beyond_v_is_refused(n_cols, beyond):
    score = torch.randn(3, n_cols)
    ids = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="mask_id"):
        fb.dse_loss(score, 1.0, ids, ids, mask_id=n_cols + beyond)


# ----------------------------------------------------------------------------- integrate_step


def _per_sequence(draw, n_seq, gen, values):
    """A per-sequence factor: a float, a (B,) or a (B, 1) float64 tensor."""
    form = draw(st.sampled_from(["float", "tensor", "column"]))
    column = values(n_seq).double()
    if form == "float" or not n_seq:
        return float(values(1)[0])
    return column if form == "tensor" else column[:, None]


@st.composite
def integrate_cases(draw, *, dtypes=FLOATS, max_elements=MAX_ELEMENTS, cols=TINY_COLS):
    """One call of `integrate_step`: (B, L, V) outputs, ids, per-sequence σ and weight, accumulator rows."""
    # The scores, ids, ignore_index and mask id of a loss case of shape (B, L, V).
    case = draw(loss_cases(dtypes=dtypes, max_elements=max_elements, layouts=("contiguous",), cols=cols,
                           leads=st.tuples(st.integers(1, 4), st.integers(1, 6))))
    kind, out, x_t, x0 = case["loss"], case["base"], case["x_t"], case["x0"]
    # The absorbing DSE mask stays the last column here: `reference.integrate_step` passes mask_id to DCE only.
    n_seq = out.shape[0]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    sigma = None
    if kind != "dce" or draw(st.booleans()):
        sigma = _per_sequence(draw, n_seq, gen, lambda k: torch.exp(torch.empty(k).uniform_(
            math.log(1e-4), math.log(1e3), generator=gen)))
    weight = None
    if draw(st.booleans()):
        weight = _per_sequence(draw, n_seq, gen, lambda k: torch.rand(k, generator=gen) * 3)
    index, n_slots = None, n_seq
    if n_seq and draw(st.booleans()):
        n_slots = draw(st.integers(1, n_seq + 1))  # fewer rows than sequences: rows are shared
        index = torch.randint(0, n_slots, (n_seq,), generator=gen).to(draw(st.sampled_from([torch.int64, torch.int32])))
    return dict(loss="dce" if kind == "dce" else "dse", graph="uniform" if kind == "uniform" else "absorb",
                kind=kind, out=apply_layout(out, draw(st.sampled_from(STRIDED_LAYOUTS))), x_t=x_t, x0=x0,
                sigma=sigma, weight=weight, index=index, n_slots=n_slots,
                mask_id=case["mask_id"] if kind == "dce" else None, ignore_index=case["ignore_index"],
                acc0=torch.rand(n_slots, 2, generator=gen, dtype=torch.float64) * 10)


def check_integrate_case(case, backend=None):
    out, n_seq = case["out"], case["out"].shape[0]
    rtol = RTOL.get(out.dtype, RTOL_32)
    kw = dict(loss=case["loss"], graph=case["graph"], mask_id=case["mask_id"], ignore_index=case["ignore_index"],
              index=case["index"])
    got = fb.integrate_step(out, case["x_t"], case["x0"], case["sigma"], case["weight"], case["acc0"].clone(),
                            backend=backend, **kw)
    out64 = out.detach().clone().double()
    flat = [v.reshape(-1) if isinstance(v, torch.Tensor) else v for v in (case["sigma"], case["weight"])]
    expected = ref.integrate_step(out64, case["x_t"], case["x0"], *flat, case["acc0"], **kw)  # takes (B,) only

    sigma64 = None
    if case["loss"] == "dse":
        sigma64 = torch.as_tensor(case["sigma"], dtype=torch.float64).reshape(-1).expand(n_seq)[:, None]
        per_pos = ref.dse_loss(out64, sigma64, case["x_t"], case["x0"], graph=case["graph"],
                               ignore_index=case["ignore_index"])
    else:
        per_pos = ref.dce_loss(out64, case["x_t"], case["x0"], mask_id=case["mask_id"],
                               ignore_index=case["ignore_index"])
    keep = (case["x0"].long() != case["ignore_index"]).double()
    w = torch.as_tensor(1.0 if case["weight"] is None else case["weight"], dtype=torch.float64)
    w = w.reshape(-1).expand(n_seq)
    terms = per_pos.abs() + _loss_scale(case["kind"], out64, sigma64, case["x_t"], case["x0"], case["mask_id"])
    seq_scale = (terms * keep).sum(-1) * w.abs()
    total = (per_pos.sum(-1) * w).abs()
    rows = torch.arange(n_seq) if case["index"] is None else case["index"].long()
    zeros = torch.zeros(case["n_slots"], dtype=torch.float64)
    tol = torch.stack([zeros.index_add(0, rows, seq_scale),
                       zeros.index_add(0, rows, seq_scale * (2 * total + rtol * seq_scale))], -1)
    assert torch.isfinite(expected).all()
    assert ((got - expected).abs() <= rtol * tol + 1e-12 * case["acc0"].abs()).all(), (got, expected)


@given(integrate_cases(cols=st.one_of(st.integers(2, 40), st.sampled_from([257, 2049, 40000]))))
@budget(80)
def test_integrate_step_matches_the_oracle(case):
    check_integrate_case(case)


# ----------------------------------------------------------------------------- perturb


def _noise_level(draw, level, shape, gen):
    """σ or λ as a float or a tensor of ``shape``, and the corruption probability p the oracle compares against."""
    hi = 40.0 if level == "sigma" else 1.0
    if shape is None:
        value = draw(st.one_of(st.just(0.0), st.just(hi), st.floats(0.0, hi)))
        p = -math.expm1(-value) if level == "sigma" else value
        return value, torch.tensor(p, dtype=torch.float64)
    raw = torch.rand(shape, generator=gen, dtype=torch.float64) ** 2 * hi
    value = raw.to(draw(st.sampled_from([torch.float32, torch.float64, torch.float16])))
    p = value.double()
    return value, -torch.expm1(-p) if level == "sigma" else p


@st.composite
def perturb_cases(draw, *, max_length=60):
    """One call of `perturb`, with its arguments as the oracle takes them ((B, L) ids, p or k)."""
    id_dtype = draw(st.sampled_from(ID_DTYPES))
    graph = draw(st.sampled_from(["absorb", "uniform"]))
    vocab = draw(st.one_of(st.integers(1, 120), st.integers(121, 2**16)))
    mask_id = None if graph == "uniform" else draw(st.one_of(st.none(), st.integers(vocab, vocab + 3)))
    oracle_mask = None if graph == "uniform" else (vocab if mask_id is None else mask_id)
    assume(_fits(vocab - 1 if oracle_mask is None else oracle_mask, id_dtype))
    one_row = draw(st.booleans())
    n_seq, length = (1 if one_row else draw(st.integers(0, 4))), draw(st.integers(0, max_length))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x0 = torch.randint(0, vocab, (n_seq, length), generator=gen).to(id_dtype)
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    if layout == "transposed":
        x0 = x0.t().contiguous().t()
    elif layout == "sliced":
        x0 = torch.cat([x0, x0], 1)[:, length // 2:length // 2 + length]

    maskable = draw(st.sampled_from([None, (n_seq, length), (length,), (n_seq, 1)]))
    if maskable is not None:
        maskable = torch.rand(maskable, generator=gen) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    takes_part = torch.ones(n_seq, length, dtype=torch.bool) if maskable is None else maskable.expand(n_seq, length)

    level = draw(st.sampled_from(["sigma", "mask_ratio", "num_masked"]))
    form = draw(st.sampled_from(["float", (n_seq,), (n_seq, 1), (n_seq, length)]))
    p = k = None
    if level == "num_masked":
        available = takes_part.sum(1)
        k = (torch.rand(n_seq, generator=gen) * (available + 1)).floor().long().clamp_max(available)
        value = k
        if form == "float" and n_seq:
            value = int(available.min())
            k = torch.full((n_seq,), value)
    else:
        value, p = _noise_level(draw, level, None if form == "float" else form, gen)
        if form == (n_seq,):
            p = p[:, None]
    if one_row:  # (L,) ids: per-sequence values have one entry, per-token ones are (L,)
        x0 = x0[0]
        if maskable is not None and maskable.dim() == 2:
            maskable = maskable[0]
        if level != "num_masked" and form == (n_seq, length):
            value = value[0]
    return dict(x0=x0, kwargs={level: value}, graph=graph, vocab=vocab, mask_id=mask_id, maskable=maskable,
                seed=draw(st.integers(0, 2**64 - 1)), offset=draw(st.integers(0, 2**64 - 1)),
                p=p, k=k, oracle_mask=oracle_mask, takes_part=None if maskable is None else takes_part,
                shape=(n_seq, length))


def check_perturb_case(case, backend=None):
    x0 = case["x0"]
    got = fb.perturb(x0, **case["kwargs"], graph=case["graph"], vocab_size=case["vocab"], mask_id=case["mask_id"],
                     maskable=case["maskable"], seed=case["seed"], offset=case["offset"], backend=backend)
    x_t, mask = ref.perturb(x0.reshape(case["shape"]), p=case["p"], num_masked=case["k"], graph=case["graph"],
                            vocab_size=case["vocab"], mask_id=case["oracle_mask"], maskable=case["takes_part"],
                            seed=case["seed"], offset=case["offset"])
    assert got.x_t.dtype == x0.dtype and got.x_t.shape == x0.shape and got.mask.shape == x0.shape
    assert torch.equal(got.x_t.reshape(x_t.shape), x_t), "x_t differs"
    assert torch.equal(got.mask.reshape(mask.shape), mask), "mask differs"


@given(perturb_cases())
@budget(100)
def test_perturb_is_bit_identical_to_the_oracle(case):
    check_perturb_case(case)


def test_perturb_takes_a_transposed_sigma():
    """Issue 11 item 11: a transposed sigma (and mask_ratio) is made contiguous, not refused."""
    x0 = torch.randint(0, 9, (4, 16))
    sigma = torch.rand(16, 4).T
    got = fb.perturb(x0, sigma=sigma, vocab_size=9, seed=3)
    x_t, mask = ref.perturb(x0, p=-torch.expm1(-sigma.double()), vocab_size=9, mask_id=9, seed=3)
    assert torch.equal(got.x_t, x_t) and torch.equal(got.mask, mask)


# ----------------------------------------------------------------------------- Triton (interpreter on CPU)


@pytest.mark.triton
@given(loss_cases(max_elements=120, cols=TINY_COLS))
@budget(8, interpreter=True)
def test_triton_losses_match_the_oracle(case):
    check_loss_case(case, backend="triton")


@pytest.mark.triton
@given(integrate_cases(max_elements=120, cols=TINY_COLS))
@budget(5, interpreter=True)
def test_triton_integrate_step_matches_the_oracle(case):
    check_integrate_case(case, backend="triton")


@pytest.mark.triton
@given(perturb_cases(max_length=12))
@budget(5, interpreter=True)
def test_triton_perturb_is_bit_identical_to_the_oracle(case):
    check_perturb_case(case, backend="triton")
