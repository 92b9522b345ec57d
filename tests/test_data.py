"""Training data sources: the Markov chain's exact entropy, reproducible batches, the byte loader."""

import itertools
import math

import numpy as np
import pytest
import torch

from fastbound.train.data import ByteText, DataError, MarkovSource


def _log2_prob(source: MarkovSource, seq: tuple[int, ...]) -> float:
    """log2 p(seq) under the stationary chain, by the chain rule."""
    k, o = source.num_symbols, source.order
    ctx = 0
    for s in seq[:o]:
        ctx = ctx * k + s
    logp = math.log2(source.stationary[ctx])
    for s in seq[o:]:
        logp += math.log2(source.transition[ctx, s])
        ctx = (ctx * k) % k**o + s
    return logp


@pytest.mark.parametrize("symbols,order,seq_len", [(2, 2, 7), (3, 1, 5), (3, 3, 6)])
def test_window_entropy_equals_enumeration(symbols, order, seq_len):
    """H(X_1^L)/L from the formula equals -sum p log p over all K^L windows."""
    source = MarkovSource(symbols, order, concentration=0.7, seed=3)
    probs = [2 ** _log2_prob(source, seq) for seq in itertools.product(range(symbols), repeat=seq_len)]
    assert math.isclose(sum(probs), 1.0, rel_tol=1e-9)
    exact = -sum(p * math.log2(p) for p in probs) / seq_len
    assert math.isclose(source.target(seq_len).window, exact, rel_tol=1e-9)


def test_stationary_distribution_is_stationary():
    source = MarkovSource(5, 2, seed=1)
    pi, k = source.stationary, source.num_symbols
    moved = np.zeros_like(pi)
    for ctx in range(k**2):
        for s in range(k):
            moved[(ctx * k) % k**2 + s] += pi[ctx] * source.transition[ctx, s]
    np.testing.assert_allclose(moved, pi, atol=1e-12)


def test_samples_follow_the_chain():
    """The empirical conditional entropy of sampled windows matches the entropy rate."""
    source = MarkovSource(4, 2, concentration=0.3, seed=0)
    x = source.train_batch(seed=0, step=0, batch_size=400, seq_len=200).numpy()
    ctx = x[:, :-2] * 4 + x[:, 1:-1]
    counts = np.zeros((16, 4))
    np.add.at(counts, (ctx.ravel(), x[:, 2:].ravel()), 1)
    p = counts / counts.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.nansum(counts.sum(1) / counts.sum() * np.nansum(p * np.log2(p), 1))
    assert abs(h - source.entropy_rate()) < 0.02
    assert source.entropy_rate() < source.target(200).window < math.log2(4)


def test_batches_are_a_function_of_seed_and_step():
    source = MarkovSource(seed=0)
    a = source.train_batch(seed=1, step=5, batch_size=6, seq_len=9)
    assert torch.equal(a, source.train_batch(seed=1, step=5, batch_size=6, seq_len=9))
    assert not torch.equal(a, source.train_batch(seed=1, step=6, batch_size=6, seq_len=9))
    assert not torch.equal(a, source.train_batch(seed=2, step=5, batch_size=6, seq_len=9))
    assert not torch.equal(a, source.heldout(seed=1, n=6, seq_len=9))
    assert a.dtype == torch.int64 and a.shape == (6, 9) and int(a.max()) < source.vocab_size


def test_chain_depends_on_its_own_seed_only():
    assert np.array_equal(MarkovSource(seed=4).transition, MarkovSource(seed=4).transition)
    assert not np.array_equal(MarkovSource(seed=4).transition, MarkovSource(seed=5).transition)


def test_bad_markov_parameters():
    with pytest.raises(ValueError, match="num_symbols"):
        MarkovSource(num_symbols=1)
    with pytest.raises(ValueError, match="order"):
        MarkovSource(order=0)
    with pytest.raises(ValueError, match="concentration"):
        MarkovSource(concentration=0.0)


def test_byte_text(tmp_path):
    path = tmp_path / "t.txt"
    text = "the quick brown fox jumps over the lazy dog. " * 10
    path.write_text(text)
    data = ByteText(str(path), seq_len=16)
    assert data.vocab_size == 256
    batch = data.train_batch(seed=0, step=3, batch_size=5, seq_len=16)
    assert batch.shape == (5, 16)
    for row in batch.tolist():  # every window is a piece of the training part of the file
        assert bytes(row).decode() in text[: data.train_tokens.numel()]
    held = data.heldout(seed=0, n=100, seq_len=16)
    assert held.shape == (data.heldout_tokens.numel() // 16, 16)
    assert data.train_tokens.numel() + data.heldout_tokens.numel() == len(text)


def test_byte_text_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        ByteText(str(tmp_path / "missing.txt"), 8)
    short = tmp_path / "short.txt"
    short.write_bytes(b"abc")
    with pytest.raises(DataError, match="fewer than one sequence"):
        ByteText(str(short), 8)
    one = tmp_path / "one.txt"
    one.write_bytes(b"0123456789")
    with pytest.warns(UserWarning, match="fewer than two sequences"):
        data = ByteText(str(one), 8)  # shorter than two sequences: the file is also the held-out set
    assert data.shared_heldout and data.heldout(0, 4, 8).shape == (1, 8)


def test_source_is_a_markov_chain_over_contexts():
    """The source's chain (fastbound.testing.MarkovChain over contexts) gives the exact window likelihood."""
    source = MarkovSource(3, 2, concentration=0.7, seed=3)
    x = source.sample(50, 9, seed=1)
    k = source.num_symbols
    contexts = torch.stack([x[:, j] * k + x[:, j + 1] for j in range(8)], 1)
    direct = torch.tensor([_log2_prob(source, tuple(row)) for row in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(-source.chain.nll(contexts) / math.log(2), direct)
    assert math.isclose(source.chain.entropy_rate() / math.log(2), source.entropy_rate())
    np.testing.assert_allclose(source.chain.stationary().numpy(), source.stationary, atol=1e-12)


def test_source_size_is_bounded():
    from fastbound.train.data import MAX_CONTEXTS

    with pytest.raises(ValueError, match=f"8,000,000 contexts.*at most {MAX_CONTEXTS}"):
        MarkovSource(200, 3)


def test_byte_text_refuses_what_is_not_a_regular_file(tmp_path):
    import os

    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="has 0 bytes"):
        ByteText(str(empty), 8)
    with pytest.raises(DataError, match="is a directory"):
        ByteText(str(tmp_path), 8)
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero"):
        with pytest.raises(DataError, match="not a regular file"):
            ByteText(path, 8)
