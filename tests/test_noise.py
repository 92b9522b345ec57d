"""Tests of fastbound.noise: the Philox contract, perturb, and the time samplers.

Statistical tests use fixed seeds (so they are deterministic) and loose bounds
(5-sigma binomial bounds, chi-square p-values above 1e-6) that a correct
sampler passes for any seed while a biased one fails.
"""

import itertools
import math

import pytest
import scipy.stats
import torch

from conftest import TRITON_DEVICE
from fastbound import noise, reference
from fastbound._validate import ValueChecks
from fastbound.noise import NoiseStream, perturb, philox_words, sample_num_masked, sample_times

# Random123's published known-answer vectors for philox4x32_10: (counter, key, words).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
MIN_P_VALUE = 1e-6


def _kat_inputs(device="cpu"):
    for counter, (k0, k1), words in PHILOX_KAT:
        seed = k0 | (k1 << 32)
        yield torch.tensor([counter], dtype=torch.int64, device=device), seed, list(words)


def _signed(seed: int) -> int:
    return seed - 2**64 if seed >= 2**63 else seed


def _threshold_p(sigma: torch.Tensor) -> torch.Tensor:
    """The corruption probability perturb compares against: 1 - e^{-sigma} in float64."""
    return -torch.expm1(-sigma.double())


def _assert_same(a, b):
    assert torch.equal(a[0], b[0]), "x_t differs"
    assert torch.equal(a[1], b[1]), "mask differs"


# -----------------------------------------------------------------------------
# Philox4x32-10
# -----------------------------------------------------------------------------


def test_philox_known_answers_cpu_kernel():
    for counter, seed, words in _kat_inputs():
        assert torch.ops.fastbound.philox4x32(counter, _signed(seed))[0].tolist() == words


def test_philox_known_answers_reference():
    for counter, seed, words in _kat_inputs():
        assert reference.philox4x32(counter, seed)[0].tolist() == words


@pytest.mark.triton
def test_philox_known_answers_triton():
    from fastbound.triton_kernels import perturb as _  # noqa: F401

    for counter, seed, words in _kat_inputs(TRITON_DEVICE):
        assert torch.ops.fastbound.philox4x32_triton(counter, _signed(seed))[0].tolist() == words


@pytest.mark.parametrize("seed,offset", [(0, 0), (7, 2**32 - 3), (2**64 - 1, 2**64 - 2), (0x0123456789ABCDEF, 5)])
def test_philox_words_follow_the_counter_contract(seed, offset):
    # counter (lo, hi, 0, 0) of offset + i (mod 2^64), key (lo, hi) of seed; crosses the 2^32 and 2^64 wraps.
    assert torch.equal(philox_words(6, seed=seed, offset=offset), reference.noise_words(6, seed, offset))


# -----------------------------------------------------------------------------
# perturb against the oracle
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8])
def test_perturb_sigma_matches_oracle(graph, dtype):
    vocab = 100
    x0 = torch.randint(0, vocab, (5, 1037), generator=torch.Generator().manual_seed(0)).to(dtype)
    sigma = torch.tensor([0.0, 0.05, 0.7, 2.0, 30.0])
    out = perturb(x0, sigma=sigma, graph=graph, vocab_size=vocab, seed=11, offset=3)
    mask_id = vocab if graph == "absorb" else None
    ref = reference.perturb(x0, p=_threshold_p(sigma)[:, None], graph=graph, vocab_size=vocab, mask_id=mask_id,
                            seed=11, offset=3)
    _assert_same(out, ref)
    assert out.x_t.dtype == dtype and out.mask.dtype == torch.bool


@pytest.mark.parametrize("name", ["sigma", "mask_ratio"])
def test_few_host_values_take_the_same_thresholds_as_many(name):
    # Up to noise.SMALL_HOST_VALUES host values are converted in Python, more by torch ops: the
    # same values give the same corruption either way, and the same errors.
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, 60, (6, 40), generator=gen)
    level = torch.rand(6, generator=gen, dtype=torch.float64) * (3.0 if name == "sigma" else 1.0)
    level[0] = 0.0
    few = perturb(x0, **{name: level}, vocab_size=60, seed=5)
    many = perturb(x0, **{name: level[:, None].expand(6, 40)}, vocab_size=60, seed=5)
    assert level.numel() <= noise.SMALL_HOST_VALUES < x0.numel()
    _assert_same(few, many)
    thresholds = [noise._threshold(name, t, 6, 40, False, x0.device, ValueChecks())
                  for t in (level, level[:, None].expand(6, 40))]
    assert thresholds[0].shape == (6, 1) and torch.equal(thresholds[0].expand(6, 40), thresholds[1])
    for bad in (-0.5, math.nan, math.inf if name == "sigma" else 1.5):
        with pytest.raises(ValueError, match=name):
            perturb(x0, **{name: torch.tensor([0.1, bad, 0.2, 0.3, 0.4, 0.5])}, vocab_size=60, seed=5)


@pytest.mark.parametrize("level", ["sigma_per_token", "sigma_float", "sigma_column", "ratio_float", "ratio_rows"])
def test_perturb_noise_levels_match_oracle(level):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 50, (3, 70), generator=gen)
    per_token = torch.rand(3, 70, generator=gen) * 3
    cases = {
        "sigma_per_token": ({"sigma": per_token}, _threshold_p(per_token)),
        "sigma_float": ({"sigma": 0.5}, torch.tensor(-math.expm1(-0.5), dtype=torch.float64)),
        "sigma_column": ({"sigma": per_token[:, :1]}, _threshold_p(per_token[:, :1])),
        "ratio_float": ({"mask_ratio": 0.3}, torch.tensor(0.3, dtype=torch.float64)),
        "ratio_rows": ({"mask_ratio": torch.tensor([0.0, 0.25, 1.0])}, torch.tensor([[0.0], [0.25], [1.0]]).double()),
    }
    kwargs, p = cases[level]
    out = perturb(x0, **kwargs, vocab_size=50, seed=2**63 + 9, offset=123)
    _assert_same(out, reference.perturb(x0, p=p, vocab_size=50, mask_id=50, seed=2**63 + 9, offset=123))


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_perturb_num_masked_matches_oracle(graph):
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, 30, (6, 600), generator=gen)
    maskable = torch.rand(6, 600, generator=gen) < 0.7
    k = torch.minimum(torch.tensor([0, 1, 17, 300, 599, 600]), maskable.sum(1))
    out = perturb(x0, num_masked=k, graph=graph, vocab_size=30, maskable=maskable, seed=5, offset=2**40)
    ref = reference.perturb(x0, num_masked=k, graph=graph, vocab_size=30, mask_id=30 if graph == "absorb" else None,
                            maskable=maskable, seed=5, offset=2**40)
    _assert_same(out, ref)
    assert torch.equal(out.mask.sum(1), k)


def test_perturb_shapes_and_layouts():
    x0 = torch.randint(0, 9, (4, 33))
    full = perturb(x0, sigma=1.0, vocab_size=9, seed=1)
    # (L,) is one sequence; a row of a batch at offset row * L reproduces that row.
    row = perturb(x0[2], sigma=1.0, vocab_size=9, seed=1, offset=2 * 33)
    _assert_same(row, (full.x_t[2], full.mask[2]))
    # non-contiguous input gives the same as its contiguous copy
    wide = torch.randint(0, 9, (4, 66))
    _assert_same(perturb(wide[:, ::2], sigma=1.0, vocab_size=9, seed=1),
                 perturb(wide[:, ::2].contiguous(), sigma=1.0, vocab_size=9, seed=1))
    one = perturb(torch.tensor([[3]]), mask_ratio=1.0, vocab_size=9, seed=1)
    assert one.x_t.tolist() == [[9]] and one.mask.tolist() == [[True]]
    empty = perturb(torch.zeros(0, 5, dtype=torch.long), sigma=1.0, vocab_size=9, seed=1)
    assert empty.x_t.shape == (0, 5) and empty.mask.shape == (0, 5)
    assert perturb(torch.zeros(3, 0, dtype=torch.long), num_masked=0, vocab_size=9, seed=1).x_t.shape == (3, 0)


def test_perturb_same_call_same_bits_and_offsets_give_fresh_noise():
    x0 = torch.randint(0, 9, (8, 64))
    a = perturb(x0, sigma=1.0, vocab_size=9, seed=4, offset=0)
    _assert_same(a, perturb(x0, sigma=1.0, vocab_size=9, seed=4, offset=0))
    assert not torch.equal(a.mask, perturb(x0, sigma=1.0, vocab_size=9, seed=4, offset=x0.numel()).mask)
    assert not torch.equal(a.mask, perturb(x0, sigma=1.0, vocab_size=9, seed=5, offset=0).mask)


def test_perturb_does_not_depend_on_the_thread_count():
    x0 = torch.randint(0, 9, (64, 1024))
    k = torch.arange(64) * 16
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [perturb(x0, sigma=1.0, vocab_size=9, seed=8), perturb(x0, num_masked=k, vocab_size=9, seed=8)]
    finally:
        torch.set_num_threads(threads)
    _assert_same(one[0], perturb(x0, sigma=1.0, vocab_size=9, seed=8))
    _assert_same(one[1], perturb(x0, num_masked=k, vocab_size=9, seed=8))


def test_perturb_masks_are_nested_across_noise_levels():
    x0 = torch.randint(0, 9, (16, 128))
    masks = [perturb(x0, sigma=s, vocab_size=9, seed=6).mask for s in (0.1, 0.5, 2.0)]
    assert bool((masks[0] <= masks[1]).all()) and bool((masks[1] <= masks[2]).all())


def test_noise_stream_hands_out_disjoint_ranges():
    stream = NoiseStream(seed=3)
    assert [stream.take(10), stream.take(5), stream.take(0), stream.take(1)] == [0, 10, 15, 15]
    assert stream.offset == 16
    wrapping = NoiseStream(seed=3, offset=2**64 - 2)
    assert wrapping.take(3) == 2**64 - 2 and wrapping.offset == 1


# Seed 24 gives two equal selection words in a row of 2^14: columns 2683 and 3281,
# ranks 14419 and 14420 of the row (found by search; checked below).
TIE_SEED, TIE_COLS, TIE_RANK, TIE_LEN = 24, (2683, 3281), 14419, 2**14


def _boundary_ratio(seed: int, column: int) -> float:
    """The mask ratio whose threshold equals the 24-bit uniform of ``column``: u < p must be false there."""
    return int(reference.noise_words(column + 1, seed)[column, 0] >> 8) / 2**24


def _check_bernoulli_boundary(backend, device):
    x0 = torch.zeros(1, 8, dtype=torch.long, device=device)
    ratio = _boundary_ratio(31, 3)
    at = perturb(x0, mask_ratio=ratio, vocab_size=2, seed=31, backend=backend).mask[0, 3].item()
    above = perturb(x0, mask_ratio=ratio + 2**-24, vocab_size=2, seed=31, backend=backend).mask[0, 3].item()
    assert (at, above) == (False, True)


def test_bernoulli_comparison_is_strict():
    _check_bernoulli_boundary("cpu", "cpu")


def test_exact_k_breaks_word_ties_by_column():
    words = philox_words(TIE_LEN, seed=TIE_SEED)[:, 0]
    assert words[TIE_COLS[0]] == words[TIE_COLS[1]]
    assert int((words < words[TIE_COLS[0]]).sum()) == TIE_RANK
    x0 = torch.zeros(1, TIE_LEN, dtype=torch.long)
    picked = []
    for k in (TIE_RANK, TIE_RANK + 1, TIE_RANK + 2):
        mask = perturb(x0, num_masked=k, vocab_size=2, seed=TIE_SEED).mask
        picked.append(mask[0, list(TIE_COLS)].tolist())
    assert picked == [[False, False], [True, False], [True, True]]
    ref = reference.perturb(x0, num_masked=[TIE_RANK + 1], vocab_size=2, mask_id=2, seed=TIE_SEED)
    _assert_same(perturb(x0, num_masked=TIE_RANK + 1, vocab_size=2, seed=TIE_SEED), ref)


# -----------------------------------------------------------------------------
# Statistics
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.01, 0.2, 1.0, 3.0])
def test_masked_fraction_matches_one_minus_exp_minus_sigma(sigma):
    x0 = torch.zeros(64, 1024, dtype=torch.long)
    n = x0.numel()
    frac = perturb(x0, sigma=torch.full((64,), sigma), vocab_size=2, seed=100, offset=0).mask.double().mean().item()
    p = -math.expm1(-sigma)
    assert abs(frac - p) <= 5 * math.sqrt(p * (1 - p) / n)


def test_mask_ratio_fraction_and_extremes():
    x0 = torch.zeros(32, 1024, dtype=torch.long)
    n = x0.numel()
    for ratio in (0.05, 0.5, 0.9):
        frac = perturb(x0, mask_ratio=ratio, vocab_size=2, seed=7).mask.double().mean().item()
        assert abs(frac - ratio) <= 5 * math.sqrt(ratio * (1 - ratio) / n)
    assert not perturb(x0, mask_ratio=0.0, vocab_size=2, seed=7).mask.any()
    assert perturb(x0, mask_ratio=1.0, vocab_size=2, seed=7).mask.all()
    assert not perturb(x0, sigma=0.0, vocab_size=2, seed=7).mask.any()


def test_uniform_replacements_are_uniform():
    vocab = 37
    x0 = torch.zeros(64, 1024, dtype=torch.long)
    out = perturb(x0, mask_ratio=1.0, graph="uniform", vocab_size=vocab, seed=8)
    assert out.mask.all()
    counts = torch.bincount(out.x_t.flatten(), minlength=vocab)
    assert counts.numel() == vocab
    assert scipy.stats.chisquare(counts.numpy()).pvalue > MIN_P_VALUE


def test_uniform_graph_keeps_unselected_tokens_and_may_resample_the_same():
    x0 = torch.randint(0, 5, (16, 256))
    out = perturb(x0, sigma=0.7, graph="uniform", vocab_size=5, seed=9)
    assert torch.equal(out.x_t[~out.mask], x0[~out.mask])
    same = (out.x_t == x0) & out.mask
    assert same.any()  # about 1/5 of the resampled tokens
    assert abs(same.sum().item() / out.mask.sum().item() - 0.2) < 0.03


def test_maskable_false_positions_never_change():
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, 11, (8, 300), generator=gen)
    maskable = torch.rand(8, 300, generator=gen) < 0.5
    for kwargs in ({"sigma": 50.0}, {"mask_ratio": 1.0}, {"num_masked": maskable.sum(1)}):
        for graph in ("absorb", "uniform"):
            out = perturb(x0, **kwargs, graph=graph, vocab_size=11, maskable=maskable, seed=10)
            assert torch.equal(out.x_t[~maskable], x0[~maskable])
            assert not out.mask[~maskable].any()
            assert out.mask[maskable].all()
    # a prompt-response mask given per position, broadcast over the batch
    prompt = torch.arange(300) >= 100
    out = perturb(x0, sigma=50.0, vocab_size=11, maskable=prompt, seed=10)
    assert torch.equal(out.x_t[:, :100], x0[:, :100]) and out.mask[:, 100:].all()


def test_exactly_k_positions_each_equally_likely():
    rows, cols, k = 8000, 20, 5
    x0 = torch.zeros(rows, cols, dtype=torch.long)
    mask = perturb(x0, num_masked=k, vocab_size=2, seed=11).mask
    assert bool((mask.sum(1) == k).all())
    assert scipy.stats.chisquare(mask.sum(0).numpy()).pvalue > MIN_P_VALUE
    # with a maskable pattern: only maskable positions, all equally likely
    maskable = (torch.arange(cols) % 3 != 0).expand(rows, cols)
    mask = perturb(x0, num_masked=k, vocab_size=2, maskable=maskable, seed=12).mask
    assert bool((mask.sum(1) == k).all()) and not mask[~maskable].any()
    assert scipy.stats.chisquare(mask.sum(0)[maskable[0]].numpy()).pvalue > MIN_P_VALUE


def test_exactly_k_subsets_are_uniform():
    rows, cols, k = 12000, 6, 3
    mask = perturb(torch.zeros(rows, cols, dtype=torch.long), num_masked=k, vocab_size=2, seed=13).mask
    code = (mask.long() << torch.arange(cols)).sum(1)
    subsets = [sum(1 << i for i in c) for c in itertools.combinations(range(cols), k)]
    counts = torch.stack([(code == s).sum() for s in subsets])
    assert counts.sum().item() == rows
    assert scipy.stats.chisquare(counts.numpy()).pvalue > MIN_P_VALUE


# -----------------------------------------------------------------------------
# Time samplers
# -----------------------------------------------------------------------------


def test_sample_times_iid_is_uniform_on_eps_one():
    eps = 1e-3
    t = sample_times(20000, seed=14, eps=eps)
    assert t.dtype == torch.float32 and t.shape == (20000,)
    assert bool(((t >= eps) & (t <= 1)).all())
    assert scipy.stats.kstest(((t.double() - eps) / (1 - eps)).numpy(), "uniform").pvalue > MIN_P_VALUE


def test_sample_times_antithetic_is_an_evenly_spaced_grid():
    n, eps = 64, 1e-3
    t = sample_times(n, method="antithetic", eps=eps, seed=15, offset=99).double()
    u0 = reference.uniform_from_word(reference.noise_words(1, 15, 99)[:, 0])
    expected = (1 - eps) * torch.remainder(u0 + torch.arange(n) / n, 1.0) + eps
    assert torch.equal(t, expected.float().double())
    gaps = torch.diff(t.sort().values)
    assert torch.allclose(gaps, torch.full_like(gaps, (1 - eps) / n), atol=1e-6)
    assert bool(((t >= eps) & (t <= 1)).all())


def test_sample_times_stratified_puts_one_time_in_each_stratum():
    n, eps = 50, 0.01
    t = sample_times(n, method="stratified", eps=eps, seed=16).double()
    s = (t - eps) / (1 - eps)
    i = torch.arange(n)
    assert bool(((s >= i / n - 1e-6) & (s <= (i + 1) / n + 1e-6)).all())
    words = reference.noise_words(n, 16, 0)[:, 0]
    expected = (1 - eps) * (reference.uniform_from_word(words) + i) / n + eps
    assert torch.equal(t.float(), expected.float())


def test_sample_times_importance_makes_log_t_uniform():
    eps = 1e-3
    t = sample_times(20000, seed=17, eps=eps, importance=True).double()
    assert bool(((t >= eps) & (t <= 1)).all())
    assert scipy.stats.kstest((t.log() / math.log(eps)).numpy(), "uniform").pvalue > MIN_P_VALUE


def test_sample_times_offsets():
    a = sample_times(10, seed=18, offset=0)
    b = sample_times(10, seed=18, offset=5)
    assert torch.equal(a[5:], b[:5]) and not torch.equal(a[:5], b[:5])


@pytest.mark.parametrize("weights", ["inverse", "uniform"])
def test_sample_num_masked_law(weights):
    length, n = 12, 60000
    k = sample_num_masked(n, length, weights=weights, seed=19)
    assert k.dtype == torch.int64 and int(k.min()) >= 1 and int(k.max()) <= length
    counts = torch.bincount(k, minlength=length + 1)[1:].double()
    prob = 1 / torch.arange(1, length + 1, dtype=torch.float64) if weights == "inverse" else torch.ones(length)
    expected = n * prob / prob.sum()
    assert scipy.stats.chisquare(counts.numpy(), expected.numpy()).pvalue > MIN_P_VALUE


def test_sample_num_masked_per_sequence_lengths_feed_perturb():
    lengths = torch.tensor([1, 2, 5, 40, 40, 7])
    k = sample_num_masked(6, lengths, seed=20)
    assert bool(((k >= 1) & (k <= lengths)).all())
    maskable = torch.arange(40) < lengths[:, None]
    out = perturb(torch.zeros(6, 40, dtype=torch.long), num_masked=k, vocab_size=2, maskable=maskable, seed=21)
    assert torch.equal(out.mask.sum(1), k)
    assert torch.equal(sample_num_masked(6, lengths, seed=20), k)


def test_sample_num_masked_inverse_matches_its_rule():
    length, n = 30, 200
    k = sample_num_masked(n, length, seed=22, offset=7)
    words = reference.noise_words(n, 22, 7)[:, 0].double()
    harmonic = torch.cumsum(1 / torch.arange(1, length + 1, dtype=torch.float64), 0)
    target = (words + 0.5) * 2.0**-32 * harmonic[-1]
    assert torch.equal(k, (harmonic[None, :] < target[:, None]).sum(1) + 1)


# -----------------------------------------------------------------------------
# Bad input
# -----------------------------------------------------------------------------


def _x0():
    return torch.randint(0, 10, (2, 8))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"sigma": -0.1}, ValueError, "sigma"),
        ({"sigma": float("nan")}, ValueError, "sigma"),
        ({"sigma": torch.tensor([0.5, float("inf")])}, ValueError, "sigma"),
        ({"sigma": torch.tensor([0.5, -1.0])}, ValueError, "sigma"),
        ({"sigma": torch.ones(3)}, ValueError, "sigma"),
        ({"sigma": torch.ones(2, dtype=torch.long)}, TypeError, "sigma"),
        ({"mask_ratio": 1.5}, ValueError, "mask_ratio"),
        ({"mask_ratio": torch.tensor([0.2, -0.1])}, ValueError, "mask_ratio"),
        ({"mask_ratio": torch.tensor([0.2, float("nan")])}, ValueError, "mask_ratio"),
        ({"num_masked": 9}, ValueError, "num_masked"),
        ({"num_masked": torch.tensor([1, -1])}, ValueError, "num_masked"),
        ({"num_masked": 3, "maskable": torch.tensor([True, True] + [False] * 6)}, ValueError, "num_masked"),
        ({"num_masked": torch.tensor([1.0, 2.0])}, TypeError, "num_masked"),
        ({"sigma": 1.0, "mask_ratio": 0.5}, ValueError, "exactly one of sigma, mask_ratio and num_masked"),
        ({}, ValueError, "exactly one of sigma"),
        ({"sigma": 1.0, "mask_id": 3}, ValueError, "mask_id"),
        ({"sigma": 1.0, "mask_id": 10, "graph": "uniform"}, ValueError, "mask_id"),
        ({"sigma": 1.0, "graph": "star"}, ValueError, "graph"),
        ({"sigma": 1.0, "seed": -1}, ValueError, "seed"),
        ({"sigma": 1.0, "seed": 2**64}, ValueError, "seed"),
        ({"sigma": 1.0, "offset": 1.5}, TypeError, "offset"),
        ({"sigma": 1.0, "maskable": torch.ones(2, 8)}, TypeError, "maskable"),
        ({"sigma": 1.0, "maskable": torch.ones(3, 8, dtype=torch.bool)}, ValueError, "maskable"),
        ({"sigma": 1.0, "vocab_size": 0}, ValueError, "vocab_size"),
        ({"sigma": torch.ones(2, device="meta")}, ValueError, "sigma"),
    ],
)
def test_perturb_rejects_bad_arguments(kwargs, error, match):
    kwargs = {"vocab_size": 10, "seed": 1, **kwargs}
    with pytest.raises(error, match=match):
        perturb(_x0(), **kwargs)


@pytest.mark.parametrize("bad", [10, 12, -1])
def test_perturb_rejects_ids_outside_the_vocabulary(bad):
    x0 = _x0()
    x0[1, 5] = bad
    with pytest.raises(ValueError, match=f"x0 contains id {bad} outside"):
        perturb(x0, sigma=1.0, vocab_size=10, seed=1)
    with pytest.raises(ValueError, match=f"x0 contains id {bad} outside"):
        perturb(x0, num_masked=2, vocab_size=10, seed=1)


def test_perturb_rejects_bad_x0_and_dtypes():
    with pytest.raises(TypeError, match="x0"):
        perturb(torch.zeros(2, 3), sigma=1.0, vocab_size=10, seed=1)
    with pytest.raises(ValueError, match="x0"):
        perturb(torch.zeros(2, 3, 4, dtype=torch.long), sigma=1.0, vocab_size=10, seed=1)
    with pytest.raises(ValueError, match="mask_id"):  # the default mask id 256 does not fit uint8
        perturb(torch.zeros(2, 3, dtype=torch.uint8), sigma=1.0, vocab_size=256, seed=1)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: sample_times(4, method="sobol", seed=1), ValueError, "method"),
        (lambda: sample_times(4, eps=1.0, seed=1), ValueError, "eps"),
        (lambda: sample_times(4, eps=0.0, importance=True, seed=1), ValueError, "eps"),
        (lambda: sample_times(-1, seed=1), ValueError, "n"),
        (lambda: sample_times(4, seed=-3), ValueError, "seed"),
        (lambda: sample_num_masked(3, 0, seed=1), ValueError, "length"),
        (lambda: sample_num_masked(3, torch.tensor([4, 0, 2]), seed=1), ValueError, "length"),
        (lambda: sample_num_masked(3, torch.tensor([4, 2]), seed=1), ValueError, "length"),
        (lambda: sample_num_masked(3, torch.tensor([4.0, 2.0, 1.0]), seed=1), TypeError, "length"),
        (lambda: sample_num_masked(3, 5, weights="zipf", seed=1), ValueError, "weights"),
        (lambda: NoiseStream(1).take(-2), ValueError, "count"),
    ],
)
def test_samplers_reject_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


# -----------------------------------------------------------------------------
# torch.compile and the op contract
# -----------------------------------------------------------------------------


def test_perturb_op_passes_opcheck():
    x0 = torch.randint(0, 10, (3, 17))
    threshold = torch.full((3, 1), 2**23, dtype=torch.int32)
    torch.library.opcheck(torch.ops.fastbound.perturb.default, (x0, threshold, None, None, 10, 10, 0, 5, 0))
    k = torch.tensor([0, 4, 17])
    torch.library.opcheck(torch.ops.fastbound.perturb.default, (x0, None, k, None, 10, 10, 1, 5, 0))
    torch.library.opcheck(torch.ops.fastbound.philox4x32.default, (torch.zeros(3, 4, dtype=torch.long), 3))


def test_perturb_compiles_fullgraph():
    x0 = torch.randint(0, 10, (4, 16))
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0])

    def corrupt(x0, sigma):
        return perturb(x0, sigma=sigma, vocab_size=10, seed=3, offset=64)

    compiled = torch.compile(corrupt, fullgraph=True, backend="aot_eager")
    _assert_same(compiled(x0, sigma), corrupt(x0, sigma))


def test_a_new_seed_or_offset_does_not_recompile():
    """seed and offset are SymInt in the ops' schemas: a training loop that draws with a new offset
    each step compiles twice (the first call specialises, the second makes them dynamic), not once
    per step until dynamo's recompile limit sends it back to eager."""
    from torch._dynamo.testing import CompileCounter

    x0, sigma, counter = torch.randint(0, 10, (4, 16)), torch.ones(4), CompileCounter()

    def corrupt(x0, sigma, seed, offset):
        return perturb(x0, sigma=sigma, vocab_size=10, seed=seed, offset=offset)

    compiled = torch.compile(corrupt, fullgraph=True, backend=counter)
    for step in range(10):
        _assert_same(compiled(x0, sigma, 7 + step, 64 * step), corrupt(x0, sigma, 7 + step, 64 * step))
    assert counter.frame_count == 2


# -----------------------------------------------------------------------------
# Cross-backend bit identity
# -----------------------------------------------------------------------------


def _cross_backend_cases():
    gen = torch.Generator().manual_seed(23)
    x0 = torch.randint(0, 40, (3, 45), generator=gen)
    maskable = torch.rand(3, 45, generator=gen) < 0.8
    sigma_tok = torch.rand(3, 45, generator=gen) * 2
    yield x0, {"sigma": torch.tensor([0.2, 1.0, 4.0])}
    yield x0, {"sigma": sigma_tok, "graph": "uniform", "maskable": maskable}
    yield x0.to(torch.int32), {"mask_ratio": 0.4, "seed": 2**64 - 1, "offset": 2**64 - 50}
    yield x0[0].to(torch.uint8), {"mask_ratio": torch.tensor([0.6])}
    yield x0, {"num_masked": torch.tensor([0, 7, 45])}
    yield x0, {"num_masked": torch.tensor([3, 1, 20]), "graph": "uniform", "maskable": maskable, "offset": 2**33}


def _run_cases(device, backend):
    for x0, kwargs in _cross_backend_cases():
        kwargs = {"vocab_size": 40, "seed": 24, **kwargs}
        kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        yield perturb(x0.to(device), backend=backend, **kwargs)


def _compare_backends(device, backend):
    cpu = list(_run_cases("cpu", "cpu"))
    other = list(_run_cases(device, backend))
    for a, b in zip(cpu, other):
        _assert_same(a, (b.x_t.cpu(), b.mask.cpu()))
    words = philox_words(9, seed=2**63 + 1, offset=2**32 - 4, device=device, backend=backend).cpu()
    assert torch.equal(words, philox_words(9, seed=2**63 + 1, offset=2**32 - 4))
    for method in ("iid", "antithetic", "stratified"):
        t = sample_times(7, method=method, seed=25, device=device, backend=backend).cpu()
        assert torch.equal(t, sample_times(7, method=method, seed=25))
    k = sample_num_masked(7, torch.arange(1, 8, device=device), seed=26, backend=backend).cpu()
    assert torch.equal(k, sample_num_masked(7, torch.arange(1, 8), seed=26))


@pytest.mark.triton
def test_triton_matches_cpu_bit_for_bit():
    _compare_backends(TRITON_DEVICE, "triton")


@pytest.mark.triton
def test_triton_bernoulli_boundary_and_ties_match_cpu():
    _check_bernoulli_boundary("triton", TRITON_DEVICE)
    x0 = torch.zeros(1, TIE_LEN, dtype=torch.long)
    cpu = perturb(x0, num_masked=TIE_RANK + 1, vocab_size=2, seed=TIE_SEED)
    out = perturb(x0.to(TRITON_DEVICE), num_masked=TIE_RANK + 1, vocab_size=2, seed=TIE_SEED, backend="triton")
    _assert_same(cpu, (out.x_t.cpu(), out.mask.cpu()))


@pytest.mark.triton
def test_triton_rejects_ids_outside_the_vocabulary():
    x0 = _x0().to(TRITON_DEVICE)
    x0[0, 3] = 10
    with pytest.raises(ValueError, match="x0 contains id 10 outside"):
        perturb(x0, sigma=1.0, vocab_size=10, seed=1, backend="triton")


@pytest.mark.cuda
def test_cuda_matches_cpu_bit_for_bit():
    for counter, seed, words in _kat_inputs("cuda"):
        assert torch.ops.fastbound.philox4x32(counter, _signed(seed))[0].tolist() == words
    _compare_backends("cuda", "cuda")
    _check_bernoulli_boundary("cuda", "cuda")
    x0 = torch.zeros(1, TIE_LEN, dtype=torch.long)
    cpu = perturb(x0, num_masked=TIE_RANK + 1, vocab_size=2, seed=TIE_SEED)
    out = perturb(x0.cuda(), num_masked=TIE_RANK + 1, vocab_size=2, seed=TIE_SEED, backend="cuda")
    _assert_same(cpu, (out.x_t.cpu(), out.mask.cpu()))


@pytest.mark.cuda
def test_cuda_statistics_at_scale():
    x0 = torch.zeros(256, 4096, dtype=torch.long, device="cuda")
    out = perturb(x0, num_masked=torch.arange(256, device="cuda") * 16, vocab_size=2, seed=27)
    assert torch.equal(out.mask.sum(1).cpu(), torch.arange(256) * 16)
    cpu = perturb(x0.cpu(), num_masked=torch.arange(256) * 16, vocab_size=2, seed=27)
    _assert_same(cpu, (out.x_t.cpu(), out.mask.cpu()))


# -----------------------------------------------------------------------------
# float64 times: the same bits on every device (issue 13, item 6)
# -----------------------------------------------------------------------------


TIME_METHODS = ["iid", "antithetic", "stratified"]


def _times_and_counts(device: str, backend: str | None):
    """Every sampler whose float64 arithmetic could differ between devices."""
    lengths = torch.tensor([1, 7, 64, 1000, 4099], device=device)
    return [sample_times(1001, method=m, seed=11, offset=5, device=device, backend=backend) for m in TIME_METHODS] + [
        sample_num_masked(5, lengths, seed=3, backend=backend),
        sample_num_masked(2000, 4099, seed=4, device=device, backend=backend),
    ]


def test_times_are_correctly_rounded_quotients():
    """(u + i) / n and u_0 + i / n are the correctly rounded float64 quotients (not u * (1/n))."""
    n = 1001
    u = (reference.noise_words(n, 11, 5)[:, 0] >> 8).double() * 2.0**-24
    i = torch.arange(n, dtype=torch.float64)
    want = [(float(a) + k) / n for k, a in enumerate(u.tolist())]
    got = sample_times(n, method="stratified", eps=0.0, seed=11, offset=5)
    assert got.tolist() == torch.tensor(want, dtype=torch.float64).float().tolist()
    assert not torch.equal((u + i) * (1.0 / n), (u + i) / n)  # the reciprocal would differ: the test can fail


@pytest.mark.triton
def test_float64_samplers_cpu_equal_triton():
    for cpu, tri in zip(_times_and_counts("cpu", None), _times_and_counts(TRITON_DEVICE, "triton")):
        assert torch.equal(cpu, tri.cpu())


@pytest.mark.cuda
def test_float64_samplers_cpu_equal_cuda():
    for cpu, gpu in zip(_times_and_counts("cpu", None), _times_and_counts("cuda", None)):
        assert torch.equal(cpu, gpu.cpu())


def test_harmonic_table_is_built_on_the_host_once():
    from fastbound import _harmonic

    table = _harmonic.harmonic_numbers(50)
    assert table[0] == 0 and table.dtype == torch.float64 and table.shape == (51,)
    assert torch.equal(table[1:], torch.cumsum(1 / torch.arange(1, 51, dtype=torch.float64), 0))
    assert _harmonic.harmonic_numbers(50).data_ptr() == table.data_ptr()  # cached, not recomputed
    assert torch.equal(_harmonic.smallest_k(table[1:], 50), torch.arange(1, 51))


@pytest.mark.triton
def test_triton_perturb_checks_narrow_ids_in_int64():
    """uint8 ids with vocab_size 256 are all valid: the bound 256 must not wrap to 0 in uint8."""
    x0 = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    cpu = perturb(x0, sigma=1.0, graph="uniform", vocab_size=256, seed=2)
    tri = perturb(x0.to(TRITON_DEVICE), sigma=1.0, graph="uniform", vocab_size=256, seed=2, backend="triton")
    _assert_same(cpu, (tri.x_t.cpu(), tri.mask.cpu()))
    bad = torch.tensor([[1, 2, 200]], dtype=torch.uint8)
    with pytest.raises(ValueError, match="x0 contains id 200 outside"):
        perturb(bad.to(TRITON_DEVICE), sigma=1.0, graph="uniform", vocab_size=100, seed=2, backend="triton")
