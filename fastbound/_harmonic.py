r"""Harmonic numbers :math:`H_k = \sum_{j \le k} 1/j` and the law :math:`P(k) = 1/(k H_M)`.

The time-free estimator (Jeon et al. 2025, infodis) draws the number of masked tokens k with
probability :math:`1/(k H_M)`. Its table of harmonic numbers is built once per size on the
host, summed in order in float64, and copied to the device: a table summed on a GPU in
another order could differ in the last bit and flip a k that sits on a table boundary, so this
is the table of every device.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=8)
def _host_table(top: int) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, top + 1, dtype=np.float64))]))


def harmonic_numbers(top: int, device: torch.device | str | None = None) -> torch.Tensor:
    """H_0 = 0, H_1, ..., H_top as a float64 (top + 1,) tensor on ``device``."""
    return _host_table(int(top)).to(device)


def smallest_k(target: torch.Tensor, top: int) -> torch.Tensor:
    r"""The smallest k in {1, ..., top} with :math:`H_k \ge` ``target`` (int64; top + 1 past H_top)."""
    return torch.searchsorted(harmonic_numbers(top, target.device)[1:], target) + 1
