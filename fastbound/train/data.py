r"""Training data of `fastbound.train`: a Markov source with a known entropy, and byte-level text.

Both sources hand out batches as a pure function of ``(seed, step)``: batch ``step`` is the same
whatever happened before it, so a resumed run sees the data an uninterrupted run would, and the
ranks of a multi-process run can each take their rows of one global batch.

The Markov source is a random order-``k`` chain over ``K`` symbols, a
`fastbound.testing.MarkovChain` over its contexts. Its entropy rate is exact:
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
import stat
import warnings
from dataclasses import dataclass

import numpy as np
import torch

import fastbound
from fastbound.testing import MarkovChain

# Streams of the run's seed (`fastbound.derive_seed`) that pick training batches and the
# held-out set, and of the chain's own seed; the noise uses other streams of the run's seed.
_TRAIN_STREAM = 0x5EED_0001
_HELDOUT_STREAM = 0x5EED_0002
_CHAIN_STREAM = 0x5EED_0003
MAX_CONTEXTS = 1024
"""Most contexts (symbols ** order) of the Markov source: its chain over contexts is a dense
(contexts, contexts) float64 matrix (8 MiB at this size)."""


class DataError(ValueError):
    """The data cannot be used for training (missing file, too short for one sequence...)."""


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
    and aperiodic and has a unique stationary distribution, from which every window starts.
    """

    def __init__(self, num_symbols: int = 8, order: int = 2, concentration: float = 0.25, seed: int = 0):
        if num_symbols < 2:
            raise ValueError(f"num_symbols must be >= 2, got {num_symbols}")
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        if not concentration > 0:
            raise ValueError(f"concentration must be > 0, got {concentration}")
        check_contexts(num_symbols, order)
        self.num_symbols, self.order = num_symbols, order
        self.vocab_size = num_symbols
        rng = np.random.default_rng([seed, _CHAIN_STREAM])
        # Floor the probabilities so that no symbol is (numerically) impossible in any context.
        probs = rng.dirichlet(np.full(num_symbols, concentration), size=num_symbols**order) + 1e-6
        self.transition = probs / probs.sum(1, keepdims=True)  # (contexts, K) float64
        self.chain = MarkovChain.of_contexts(torch.from_numpy(self.transition))
        self.stationary = self.chain.log_initial.exp().numpy()

    def entropy_rate(self) -> float:
        r""":math:`h = \sum_c \pi(c) H(P(\cdot\mid c))` in bits per symbol."""
        return self.chain.entropy_rate() / math.log(2)

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

    def sample(self, n: int, seq_len: int, seed: int) -> torch.Tensor:
        """(n, seq_len) int64 windows: the digits of a stationary first context, then each new symbol."""
        k = self.num_symbols
        contexts = self.chain.sample(n, max(seq_len - self.order + 1, 1), seed=seed)
        first = contexts[:, :1] // k ** torch.arange(self.order - 1, -1, -1) % k
        return torch.cat([first, contexts[:, 1:] % k], 1)[:, :seq_len]

    def train_batch(self, seed: int, step: int, batch_size: int, seq_len: int) -> torch.Tensor:
        """The global training batch of ``step``: fresh samples, never seen before."""
        return self.sample(batch_size, seq_len, fastbound.derive_seed(seed, _TRAIN_STREAM, step))

    def heldout(self, seed: int, n: int, seq_len: int) -> torch.Tensor:
        """``n`` held-out windows (a stream disjoint from the training batches)."""
        return self.sample(n, seq_len, fastbound.derive_seed(seed, _HELDOUT_STREAM))

    def describe(self) -> str:
        return f"order-{self.order} Markov chain over {self.num_symbols} symbols"


def check_contexts(num_symbols: int, order: int) -> None:
    """Refuses sources whose table over contexts would exceed `MAX_CONTEXTS`."""
    if num_symbols**order > MAX_CONTEXTS:
        raise ValueError(
            f"{num_symbols} symbols of order {order} make {num_symbols**order:,} contexts; the Markov source "
            f"keeps a dense table over its contexts and allows at most {MAX_CONTEXTS} (symbols ** order)"
        )


def _read_regular_file(path: str) -> bytes:
    """The bytes of ``path``, refusing what is not a readable regular file (a directory, a device, a FIFO)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError(f"--data: no such file: {path}") from None
    except OSError as e:
        raise DataError(f"--data: cannot read {path}: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        raise DataError(f"--data: {path} is a directory, not a text file")
    if not stat.S_ISREG(mode):
        raise DataError(f"--data: {path} is not a regular file (a device, FIFO or socket cannot be trained on)")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"--data: cannot read {path}: {e.strerror}") from None


class ByteText:
    """A text file read as bytes (V = 256 real tokens; the model adds the mask).

    The last tenth of the file (at least one sequence) is held out for evaluation when the file
    holds at least two sequences; a shorter file is used for both, with a `UserWarning`.
    Training batches are random windows of the training part.
    """

    vocab_size = 256

    def __init__(self, path: str, seq_len: int):
        raw = _read_regular_file(path)
        if len(raw) < seq_len:
            raise DataError(
                f"--data: {path} has {len(raw)} bytes (tokens), fewer than one sequence of "
                f"--seq-len {seq_len}; use a longer file or a smaller --seq-len"
            )
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
        self.path = path
        self.shared_heldout = data.numel() < 2 * seq_len
        if self.shared_heldout:
            warnings.warn(f"--data: {path} has {data.numel()} bytes, fewer than two sequences of --seq-len "
                          f"{seq_len}: the held-out NLL is measured on the training data", stacklevel=2)
            self.train_tokens = self.heldout_tokens = data
        else:
            n_held = max(seq_len, data.numel() // 10)
            self.train_tokens, self.heldout_tokens = data[:-n_held], data[-n_held:]

    @staticmethod
    def _windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
        return tokens[starts[:, None] + torch.arange(seq_len)[None, :]]

    def train_batch(self, seed: int, step: int, batch_size: int, seq_len: int) -> torch.Tensor:
        high = self.train_tokens.numel() - seq_len + 1
        generator = torch.Generator().manual_seed(fastbound.derive_seed(seed, _TRAIN_STREAM, step))
        starts = torch.randint(high, (batch_size,), generator=generator)
        return self._windows(self.train_tokens, starts, seq_len)

    def heldout(self, seed: int, n: int, seq_len: int) -> torch.Tensor:
        """Up to ``n`` non-overlapping windows of the held-out part, evenly spread."""
        n_windows = self.heldout_tokens.numel() // seq_len
        picks = torch.linspace(0, n_windows - 1, min(n, n_windows)).round().long()
        return self._windows(self.heldout_tokens, picks * seq_len, seq_len)

    def describe(self) -> str:
        return f"bytes of {self.path} ({self.train_tokens.numel()} training tokens)"

