r"""Training data for `fastbound.train`: a Markov source with a known entropy and byte-level text.

Both sources hand out batches as a pure function of ``(seed, step)``: batch ``step`` is the same
whatever happened before it, so a resumed run sees the data an uninterrupted run would, and the
ranks of a multi-process run can each take their rows of one global batch.

The Markov source is a random order-``k`` chain over ``K`` symbols. Its entropy rate is exact:
with :math:`\pi` the stationary distribution over contexts (the last ``k`` symbols) and
:math:`P(\cdot\mid c)` the next-symbol distribution (Cover & Thomas, *Elements of Information
Theory*, thm. 4.2.4),

.. math:: h = \sum_c \pi(c)\, H(P(\cdot\mid c)),

and a window of ``L`` symbols started from :math:`\pi` has entropy
:math:`H(X_1^L) = H(\pi) + (L - k)\,h`, so :math:`H(X_1^L)/L` is the best bits/token any model
can reach on those windows (it tends to :math:`h` as ``L`` grows).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

# Seeds of the generators that pick training batches and the held-out set; they keep the
# streams apart from each other and from the noise, which is keyed by the run's seed directly.
_TRAIN_STREAM = 0x5EED_0001
_HELDOUT_STREAM = 0x5EED_0002
_CHAIN_STREAM = 0x5EED_0003


class DataError(ValueError):
    """The data cannot be used for training (missing file, too short for one sequence...)."""


def _generator(seed: int, stream: int, step: int = 0) -> torch.Generator:
    """A CPU generator seeded by ``(seed, stream, step)``."""
    mixed = (seed * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB) % 2**63
    return torch.Generator().manual_seed(mixed)


@dataclass(frozen=True)
class EntropyTarget:
    """What a perfect model reaches on this source, in bits per token."""

    rate: float  # entropy rate h of the source
    window: float  # H(X_1^L)/L for the windows the model is trained and evaluated on


class MarkovSource:
    r"""A random stationary order-``order`` Markov chain over ``num_symbols`` symbols.

    Each of the ``num_symbols**order`` contexts gets a next-symbol distribution drawn from a
    symmetric Dirichlet(``concentration``) (smaller concentration: more predictable chain,
    lower entropy). All probabilities are positive, so the chain over contexts is irreducible
    and aperiodic and has a unique stationary distribution.
    """

    def __init__(self, num_symbols: int = 8, order: int = 2, concentration: float = 0.25, seed: int = 0):
        if num_symbols < 2:
            raise ValueError(f"num_symbols must be >= 2, got {num_symbols}")
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        if not concentration > 0:
            raise ValueError(f"concentration must be > 0, got {concentration}")
        self.num_symbols, self.order = num_symbols, order
        self.vocab_size = num_symbols
        rng = np.random.default_rng([seed, _CHAIN_STREAM])
        n_ctx = num_symbols**order
        # Floor the probabilities so that no symbol is (numerically) impossible in any context.
        probs = rng.dirichlet(np.full(num_symbols, concentration), size=n_ctx) + 1e-6
        self.transition = probs / probs.sum(1, keepdims=True)  # (contexts, K) float64
        self.stationary = self._stationary()
        self._cdf = torch.from_numpy(np.cumsum(self.transition, 1))
        self._stationary_cdf = torch.from_numpy(np.cumsum(self.stationary))

    def _next_context(self) -> np.ndarray:
        """(contexts, K): the context reached from context c after emitting symbol y."""
        k, n_ctx = self.num_symbols, self.num_symbols**self.order
        return (np.arange(n_ctx)[:, None] * k) % n_ctx + np.arange(k)[None, :]

    def _stationary(self) -> np.ndarray:
        """Stationary distribution over contexts, by power iteration in float64."""
        n_ctx = self.transition.shape[0]
        nxt = self._next_context()
        pi = np.full(n_ctx, 1.0 / n_ctx)
        for _ in range(100_000):
            new = np.zeros(n_ctx)
            np.add.at(new, nxt.ravel(), (pi[:, None] * self.transition).ravel())
            if np.abs(new - pi).sum() < 1e-15:
                return new / new.sum()
            pi = new
        return pi / pi.sum()

    def entropy_rate(self) -> float:
        r""":math:`h = \sum_c \pi(c) H(P(\cdot\mid c))` in bits per symbol."""
        p = self.transition
        return float(-(self.stationary * (p * np.log2(p)).sum(1)).sum())

    def target(self, seq_len: int) -> EntropyTarget:
        """The entropy rate and the per-token entropy of a stationary window of ``seq_len`` symbols."""
        h = self.entropy_rate()
        if seq_len < self.order:
            # A window shorter than the context: the entropy of its marginal under pi.
            k = self.num_symbols
            marg = self.stationary.reshape(k**seq_len, -1).sum(1)
            return EntropyTarget(h, float(-(marg * np.log2(marg)).sum()) / seq_len)
        h_start = float(-(self.stationary * np.log2(self.stationary)).sum())
        return EntropyTarget(h, (h_start + (seq_len - self.order) * h) / seq_len)

    def sample(self, n: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        """(n, seq_len) int64 windows of the chain started from its stationary distribution."""
        u = torch.rand(seq_len + 1, n, 1, generator=generator, dtype=torch.float64)
        k, n_ctx = self.num_symbols, len(self.stationary)
        ctx = torch.searchsorted(self._stationary_cdf, u[0, :, 0]).clamp_max(n_ctx - 1)
        out = torch.empty(n, max(seq_len, self.order), dtype=torch.int64)
        for j in range(self.order):  # the first `order` symbols are the digits of the start context
            out[:, j] = (ctx // k ** (self.order - 1 - j)) % k
        for j in range(self.order, seq_len):
            sym = torch.searchsorted(self._cdf[ctx], u[j - self.order + 1]).squeeze(1).clamp_max(k - 1)
            out[:, j] = sym
            ctx = (ctx * k) % n_ctx + sym
        return out[:, :seq_len]

    def train_batch(self, seed: int, step: int, batch_size: int, seq_len: int) -> torch.Tensor:
        """The global training batch of ``step``: fresh samples, never seen before."""
        return self.sample(batch_size, seq_len, _generator(seed, _TRAIN_STREAM, step))

    def heldout(self, seed: int, n: int, seq_len: int) -> torch.Tensor:
        """``n`` held-out windows (a stream disjoint from the training batches)."""
        return self.sample(n, seq_len, _generator(seed, _HELDOUT_STREAM))

    def describe(self) -> str:
        return f"order-{self.order} Markov chain over {self.num_symbols} symbols"


class ByteText:
    """A text file read as bytes (V = 256 real tokens; the model adds the mask).

    The last tenth of the file (at least one sequence) is held out for evaluation when the file
    holds at least two sequences; a shorter file is used for both, with a warning.
    Training batches are random windows of the training part.
    """

    vocab_size = 256

    def __init__(self, path: str, seq_len: int):
        if not os.path.isfile(path):
            raise DataError(f"--data: no such file: {path}")
        with open(path, "rb") as f:
            data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()
        if data.numel() < seq_len:
            raise DataError(
                f"--data: {path} has {data.numel()} bytes (tokens), fewer than one sequence of "
                f"--seq-len {seq_len}; use a longer file or a smaller --seq-len"
            )
        self.path = path
        self.shared_heldout = data.numel() < 2 * seq_len
        if self.shared_heldout:
            self.train_tokens = self.heldout_tokens = data
        else:
            n_held = max(seq_len, data.numel() // 10)
            self.train_tokens, self.heldout_tokens = data[:-n_held], data[-n_held:]

    @staticmethod
    def _windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
        return tokens[starts[:, None] + torch.arange(seq_len)[None, :]]

    def train_batch(self, seed: int, step: int, batch_size: int, seq_len: int) -> torch.Tensor:
        high = self.train_tokens.numel() - seq_len + 1
        starts = torch.randint(high, (batch_size,), generator=_generator(seed, _TRAIN_STREAM, step))
        return self._windows(self.train_tokens, starts, seq_len)

    def heldout(self, seed: int, n: int, seq_len: int) -> torch.Tensor:
        """Up to ``n`` non-overlapping windows of the held-out part, evenly spread."""
        n_windows = self.heldout_tokens.numel() // seq_len
        picks = torch.linspace(0, n_windows - 1, min(n, n_windows)).round().long()
        return self._windows(self.heldout_tokens, picks * seq_len, seq_len)

    def describe(self) -> str:
        return f"bytes of {self.path} ({self.train_tokens.numel()} training tokens)"


def bits(nats: float) -> float:
    return nats / math.log(2)
