"""perturb's fast path (`fastbound.noise._fast_key`: the one C++ op ``perturb_level``) against the
full path and the oracle: the same bits, the same errors, and when it is taken.

A signature takes the fast path once a call through the full path has validated it, so every
check here calls twice (`warm`) and compares with the full path forced by ``_fast_key -> None``.
"""

import math

import numpy
import pytest
import torch

from fastbound import noise, reference
from fastbound.noise import perturb
from helpers import assert_same_outcome, outcome

VOCAB = 50
FAST_OP = "fastbound::perturb_level"


def ops_run(call):
    """The call's result and the names of the ops it ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = call()
    return out, {event.key for event in prof.key_averages()}


def warm(x0, **kw):
    """The call's signature validated (a first call), then the call itself: (result, fast path taken)."""
    perturb(x0, **kw)
    out, ops = ops_run(lambda: perturb(x0, **kw))
    return out, FAST_OP in ops


def full_path(monkeypatch):
    monkeypatch.setattr(noise, "_fast_key", lambda *args: None)


def _p(kw) -> torch.Tensor:
    """The oracle's corruption probability: 1 - e^{-σ} or λ in float64."""
    if "sigma" in kw:
        sigma = torch.as_tensor(kw["sigma"], dtype=torch.float64)
        return -torch.expm1(-sigma)
    return torch.as_tensor(kw["mask_ratio"], dtype=torch.float64)


def oracle(x0, kw):
    """`reference.perturb` of a (B, L) or (L,) call; per-sequence levels (B,) as (B, 1)."""
    rows = x0.reshape(1, -1) if x0.dim() == 1 else x0
    p = _p(kw)
    if x0.dim() == 2 and p.dim() == 1:
        p = p[:, None]
    graph = kw.get("graph", "absorb")
    mask_id = kw.get("mask_id", VOCAB) if graph == "absorb" else None
    maskable = kw.get("maskable")
    maskable = None if maskable is None else maskable.expand(x0.shape).reshape(rows.shape)
    x_t, mask = reference.perturb(rows, p=p.reshape(p.shape if x0.dim() == 2 else (1, -1)), graph=graph,
                                  vocab_size=VOCAB, mask_id=mask_id, maskable=maskable, seed=kw["seed"],
                                  offset=kw.get("offset", 0))
    return x_t.view(x0.shape), mask.view(x0.shape)


def _assert_same(a, b):
    assert torch.equal(a[0], b[0]), "x_t differs"
    assert torch.equal(a[1], b[1]), "mask differs"
    assert a[0].dtype == b[0].dtype and a[1].dtype == b[1].dtype


GEN = torch.Generator().manual_seed(7)
X0 = torch.randint(0, VOCAB, (3, 70), generator=GEN)
WIDE = torch.randint(0, VOCAB, (70, 6), generator=GEN)
TOKENS = torch.rand(3, 70, generator=GEN) * 3
ROWS = torch.tensor([0.0, 0.4, 2.5])
FEW = torch.rand(2, 20, generator=GEN) * 3  # per token, at most SMALL_HOST_VALUES values
MASKABLE = torch.rand(3, 70, generator=GEN) < 0.7

CASES = {
    "float_sigma": (X0, dict(sigma=0.8)),
    "int_sigma": (X0, dict(sigma=2)),
    "zero_dim_sigma": (X0, dict(sigma=torch.tensor(0.3))),
    "rows": (X0, dict(sigma=ROWS)),
    "rows_column": (X0, dict(sigma=ROWS[:, None])),
    "rows_bf16": (X0, dict(sigma=ROWS.to(torch.bfloat16))),
    "rows_fp16_uniform": (X0, dict(sigma=ROWS.half(), graph="uniform")),
    "rows_fp64": (X0, dict(sigma=ROWS.double() + 1e-9)),
    "rows_strided": (X0, dict(sigma=torch.stack([ROWS, ROWS + 1], 1)[:, 1])),
    "per_token": (X0, dict(sigma=TOKENS)),
    "per_token_transposed": (X0, dict(sigma=TOKENS.t().contiguous().t())),
    "per_token_few": (X0[:2, :20], dict(sigma=FEW)),
    "per_token_few_transposed": (X0[:2, :20], dict(sigma=FEW.t().contiguous().t())),
    "one_column": (X0, dict(sigma=TOKENS[:1])),
    "ratio_float": (X0, dict(mask_ratio=0.35)),
    "ratio_extremes": (X0, dict(mask_ratio=torch.tensor([0.0, 1.0, 0.5]))),
    "ratio_per_token": (X0, dict(mask_ratio=TOKENS / 3, graph="uniform")),
    "uniform": (X0, dict(sigma=ROWS, graph="uniform")),
    "maskable": (X0, dict(sigma=ROWS, maskable=MASKABLE)),
    "maskable_broadcast": (X0, dict(sigma=1.0, maskable=MASKABLE[0], graph="uniform")),
    "mask_id": (X0, dict(sigma=ROWS, mask_id=VOCAB + 7)),
    "one_sequence": (X0[1], dict(sigma=torch.tensor([0.9]))),
    "one_sequence_per_token": (X0[1], dict(sigma=TOKENS[1], maskable=MASKABLE[1])),
    "one_sequence_float": (X0[1], dict(mask_ratio=0.5)),
    "int32": (X0.int(), dict(sigma=ROWS)),
    "uint8_uniform": (X0.to(torch.uint8), dict(sigma=ROWS, graph="uniform")),
    "x0_transposed": (WIDE.t(), dict(sigma=torch.rand(6, generator=GEN))),
    "x0_strided": (X0[:, ::3], dict(sigma=ROWS)),
    "one_row": (X0[:1], dict(sigma=ROWS[2:])),
    "one_token": (X0[:1, :1], dict(mask_ratio=1.0)),
    "empty_rows": (X0[:0], dict(sigma=ROWS[:0])),
    "empty_cols": (X0[:, :0], dict(sigma=0.5)),
    "low_word_carry": (X0, dict(sigma=ROWS, graph="uniform", offset=2**32 - 21)),
    "top_counters": (X0, dict(sigma=ROWS, seed=2**64 - 1, offset=2**64 - 100)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fast_path_equals_the_full_path_and_the_oracle(monkeypatch, case):
    x0, kw = CASES[case]
    kw = dict(vocab_size=VOCAB, **{"seed": 11, "offset": 5, **kw})
    fast, taken = warm(x0, **kw)
    with monkeypatch.context() as m:
        full_path(m)
        full, full_taken = warm(x0, **kw)
    assert taken and not full_taken
    _assert_same(fast, full)
    _assert_same(fast, oracle(x0, kw))
    assert fast.x_t.shape == x0.shape and fast.mask.shape == x0.shape


def test_thresholds_are_formed_as_the_full_path_forms_them(monkeypatch):
    """torch's vectorised expm1 and libm's (Python's math.expm1) differ in the last bit of some
    values. The full path forms p with libm for up to SMALL_HOST_VALUES values and with torch's ops
    for more; so must the fast path. Each σ_i here puts element i's threshold at its own word
    u_i = w0 >> 8, where the two expm1 roundings can fall on either side of u_i."""
    n, seed, offset = 4096, 6, 321
    u = noise.philox_words(n, seed=seed, offset=offset)[:, 0] >> 8
    sigma = -torch.log1p(-(u.double() * 2**-24))
    torch_mask = u < torch.ceil(-torch.expm1(-sigma) * 2**24)
    libm_mask = u < torch.tensor([math.ceil(-math.expm1(-s) * 2**24) for s in sigma.tolist()])
    differ = (torch_mask != libm_mask).nonzero()[:, 0]
    assert differ.numel() > 0  # the premise: a fast path with the other expm1 would fail here
    x0 = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(4))
    kw = dict(sigma=sigma[None], vocab_size=VOCAB, seed=seed, offset=offset)
    fast, taken = warm(x0, **kw)
    assert taken and torch.equal(fast.mask[0], torch_mask)
    for i in differ[:4].tolist():
        kw = dict(sigma=sigma[i:i + 1], vocab_size=VOCAB, seed=seed, offset=offset + i)
        fast, taken = warm(x0[:, i:i + 1], **kw)
        assert taken and fast.mask.item() == libm_mask[i]
    full_path(monkeypatch)
    assert torch.equal(perturb(x0, sigma=sigma[None], vocab_size=VOCAB, seed=seed, offset=offset).mask[0], torch_mask)
    for i in differ[:4].tolist():
        full = perturb(x0[:, i:i + 1], sigma=sigma[i:i + 1], vocab_size=VOCAB, seed=seed, offset=offset + i)
        assert full.mask.item() == libm_mask[i]


def test_bad_values_on_a_fast_signature_raise_the_full_paths_errors(monkeypatch):
    """Each bad call after a good call of the same signature: the message of the full path."""
    x0 = X0.clone()
    bad_x0 = x0.clone()
    bad_x0[2, 9] = VOCAB
    cases = [  # (x0, good keyword arguments, bad ones)
        (x0, dict(sigma=ROWS), dict(sigma=torch.tensor([0.1, math.nan, 0.2]))),
        (x0, dict(sigma=ROWS), dict(sigma=torch.tensor([0.1, -1e-30, 0.2]))),
        (x0, dict(sigma=ROWS), dict(sigma=torch.tensor([0.1, math.inf, 0.2]))),
        (x0, dict(sigma=TOKENS), dict(sigma=torch.where(MASKABLE, TOKENS, -TOKENS))),
        (x0, dict(sigma=TOKENS.double()), dict(sigma=TOKENS.double().masked_fill(~MASKABLE, math.nan))),
        (x0, dict(sigma=0.5), dict(sigma=-0.5)),
        (x0, dict(sigma=0.5), dict(sigma=math.nan)),
        (x0, dict(sigma=0.5), dict(sigma=math.inf)),
        (x0, dict(mask_ratio=0.5), dict(mask_ratio=1.0000001)),
        (x0, dict(mask_ratio=ROWS / 3), dict(mask_ratio=ROWS)),
        (x0, dict(mask_ratio=TOKENS / 3), dict(mask_ratio=TOKENS - 0.1)),
        (x0, dict(sigma=ROWS), dict(sigma=ROWS, seed=2**64)),
        (x0, dict(sigma=ROWS), dict(sigma=ROWS, offset=-1)),
        (x0, dict(sigma=ROWS), dict(sigma=-ROWS - 1, offset=2**64)),  # the offset's error comes first
        (x0, dict(sigma=0.5), dict(sigma=0.5, seed=1.0)),
        (x0, dict(sigma=ROWS), dict(x0=bad_x0, sigma=ROWS)),
        (x0, dict(sigma=ROWS), dict(x0=-bad_x0, sigma=ROWS)),
        (x0, dict(sigma=ROWS), dict(x0=bad_x0, sigma=-ROWS - 1)),  # sigma's error comes first
        (x0[1], dict(sigma=0.5), dict(x0=bad_x0[2], sigma=0.5)),
        (x0.int(), dict(sigma=0.5, graph="uniform"), dict(x0=bad_x0.int(), sigma=0.5, graph="uniform")),
    ]

    def outcomes(fast: bool):
        out = []
        for x, good, bad in cases:
            assert warm(x, vocab_size=VOCAB, seed=3, **good)[1] == fast
            call = {"vocab_size": VOCAB, "seed": 3, **bad}
            with pytest.raises((ValueError, TypeError)) as error:
                perturb(call.pop("x0", x), **call)
            out.append((type(error.value), str(error.value)))
        return out

    fast = outcomes(True)
    full_path(monkeypatch)
    assert fast == outcomes(False)


def test_grad_modes_do_not_matter():
    """The outputs are integers: sigma requiring grad, no_grad and inference mode give the same bits,
    all on the fast path, and nothing that records autograd."""
    x0, sigma = X0, (ROWS + 0.1).requires_grad_()
    want, taken = warm(x0, sigma=sigma.detach(), vocab_size=VOCAB, seed=4)
    assert taken
    for mode in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        with mode():
            got, taken = warm(x0, sigma=sigma, vocab_size=VOCAB, seed=4)
        assert taken and not got.x_t.requires_grad and not got.mask.requires_grad
        _assert_same(got, want)
    with torch.inference_mode():
        inference_x0 = x0.clone()
    got, taken = warm(inference_x0, sigma=sigma, vocab_size=VOCAB, seed=4)
    assert taken
    _assert_same(got, want)


def test_what_takes_the_full_path():
    """num_masked, odd option types and tracing never take the fast path; a new signature takes it
    only after the full path has validated it."""
    x0 = X0[:, :11]
    assert not warm(x0, num_masked=3, vocab_size=VOCAB, seed=1)[1]
    assert not warm(x0, sigma=ROWS, vocab_size=VOCAB, mask_id=numpy.int64(VOCAB), seed=1)[1]
    warmed = perturb(x0, sigma=ROWS, vocab_size=VOCAB, seed=1)
    compiled = torch.compile(lambda x, s: perturb(x, sigma=s, vocab_size=VOCAB, seed=1), fullgraph=True,
                             backend="aot_eager")
    _assert_same(compiled(x0, ROWS), warmed)  # traced: the full path, which the graph captures
    _, ops = ops_run(lambda: perturb(x0[:, :7], sigma=0.25, vocab_size=VOCAB, seed=1, offset=99))
    assert FAST_OP not in ops  # first call of this signature
    _, ops = ops_run(lambda: perturb(x0[:, :7], sigma=0.75, vocab_size=VOCAB, seed=8, offset=1))
    assert FAST_OP in ops  # the values and counters are not part of the signature
    _, ops = ops_run(lambda: perturb(x0[:, :7], sigma=0.75, vocab_size=VOCAB + 1, seed=8))
    assert FAST_OP not in ops  # vocab_size is


def test_many_signatures_keep_the_fast_path(monkeypatch):
    """The signature table is bounded; a full one starts again instead of refusing new shapes."""
    monkeypatch.setattr(noise._FAST, "limit", 4)
    for n in range(1, 12):
        assert warm(X0[:, :n], sigma=ROWS, vocab_size=VOCAB, seed=1)[1]
    assert len(noise._FAST) <= 4


def test_torch_func_transforms_take_the_full_path(monkeypatch):
    """torch.func's wrapper tensors have no storage: a warmed signature must not send them to the C++
    op; they get the full path's behaviour."""
    warm(X0, sigma=ROWS, vocab_size=VOCAB, seed=1)

    def mapped():
        return torch.func.vmap(lambda s: perturb(X0, sigma=s, vocab_size=VOCAB, seed=1).mask)(ROWS[None])

    warmed = outcome(mapped)
    full_path(monkeypatch)
    assert_same_outcome(warmed, outcome(mapped))


def test_perturb_level_op_passes_opcheck():
    x0 = torch.randint(0, 10, (3, 17))
    op = torch.ops.fastbound.perturb_level.default
    cases = [(x0, torch.rand(3, 1), True, 0, None, 10, 10, 0, 5, 0),
             (x0, torch.rand(3, 17, dtype=torch.float64), False, 0, torch.rand(17) < 0.5, 10, 0, 1, 5, 7),
             (x0[0], None, True, 2**23, None, 10, 12, 0, 5, 0),
             (x0, torch.rand(3).requires_grad_(), True, 0, None, 10, 10, 0, 5, 0)]
    for args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_perturb_level_op_refuses_bad_raw_arguments():
    x0 = torch.randint(0, 10, (3, 17))
    op = torch.ops.fastbound.perturb_level.default
    with pytest.raises(RuntimeError, match="level must broadcast"):
        op(x0, torch.rand(2), True, 0, None, 10, 10, 0, 5, 0)
    with pytest.raises(RuntimeError, match="float tensor"):
        op(x0, torch.ones(3, dtype=torch.long), True, 0, None, 10, 10, 0, 5, 0)
    with pytest.raises(RuntimeError, match="threshold"):
        op(x0, None, True, 2**24 + 1, None, 10, 10, 0, 5, 0)
    with pytest.raises(RuntimeError, match="x0 must be"):
        op(x0[None], None, True, 1, None, 10, 10, 0, 5, 0)
    with pytest.raises(RuntimeError, match="graph"):
        op(x0, None, True, 1, None, 10, 10, 2, 5, 0)


def test_a_negative_view_of_the_level():
    """A level stored negated with the neg bit set (``conj().imag``) takes the full path, which
    reads its logical values (found by review: the C++ op read the stored ones and refused them)."""
    level = ROWS.to(torch.float64)
    view = torch.complex(torch.zeros_like(level), -level).conj().imag
    assert view.is_neg() and torch.equal(view, level)
    warm(X0, sigma=view, vocab_size=VOCAB, seed=1)
    for _ in range(2):
        got = perturb(X0, sigma=view, vocab_size=VOCAB, seed=1)
        want = perturb(X0, sigma=level, vocab_size=VOCAB, seed=1)
        assert torch.equal(got.x_t, want.x_t) and torch.equal(got.mask, want.mask)
