"""Argument checks of the estimators: the validated `Options` of one estimate and the input tensors."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .. import _names
from .. import _validate as v
from ..schedules import LogLinear, Schedule
from .methods import METHODS

DEFAULT_N_STEPS = 16
MAX_EXACT_POSITIONS = 20
BYTES_PER_DRAW = 160
"""Memory an estimate holds per kept draw (its uniform, accumulator row, per-draw outputs and
the temporaries of the error estimate): 88 bytes of peak RSS measured for ``"mc"`` and
``"time_free"`` (50 sequences x 20000 draws, CPU), with margin."""


@dataclass(frozen=True)
class Options:
    """The options of one estimate (the keyword arguments of `estimate_nll`), checked and completed.

    After construction ``n_steps``, ``vocab_size``, ``mask_id`` and ``schedule`` hold their
    resolved values and ``kind`` the method's class (`methods.METHODS`).
    """

    method: str = "time_free"
    loss: str = "dce"
    graph: str = "absorb"
    schedule: Schedule | None = None
    n_samples: int = 64
    n_steps: int | None = None
    mask_id: int | None = None
    vocab_size: int | None = None
    batch_size: int | None = None
    seed: int = 0
    backend: str | None = None

    def __post_init__(self):
        v.check_choice("method", self.method, METHODS)
        v.check_choice("loss", self.loss, _names.LOSSES)
        v.check_choice("graph", self.graph, _names.GRAPHS)
        kind = METHODS[self.method]
        if self.graph == "uniform" and self.loss == "dce":
            raise ValueError("loss='dce' is the absorbing graph's loss; use loss='dse' with graph='uniform'")
        if self.graph == "uniform" and kind.counts_masked_tokens:
            raise ValueError(f"method={self.method!r} counts masked tokens and needs graph='absorb'")
        n_samples = v.as_int("n_samples", self.n_samples, minimum=1)
        if self.n_steps is not None and not kind.has_nodes:
            raise ValueError(f"n_steps is the number of quadrature nodes; method={self.method!r} does not take it")
        n_steps = DEFAULT_N_STEPS if self.n_steps is None else v.as_int("n_steps", self.n_steps, minimum=1)
        vocab_size = self.vocab_size
        if vocab_size is None:
            if self.graph == "absorb" and self.mask_id is not None:
                vocab_size = self.mask_id
            else:
                raise ValueError("vocab_size (the number of real tokens) is required")
        vocab_size = v.as_int("vocab_size", vocab_size, minimum=1)
        mask_id = vocab_size if self.mask_id is None else v.as_int("mask_id", self.mask_id, minimum=0)
        if self.graph == "absorb" and mask_id < vocab_size:
            raise ValueError(f"mask_id {mask_id} is a real token (< vocab_size={vocab_size})")
        if self.batch_size is not None:
            v.as_int("batch_size", self.batch_size, minimum=1)
        seed = v.as_int("seed", self.seed, minimum=0)
        schedule = LogLinear(eps=0.0) if self.schedule is None else self.schedule
        if not (callable(getattr(schedule, "total", None)) and callable(getattr(schedule, "rate", None))):
            raise TypeError(f"schedule must be a fastbound.schedules.Schedule, got {type(schedule).__name__}")
        resolved = dict(n_samples=n_samples, n_steps=n_steps, vocab_size=vocab_size, mask_id=mask_id,
                        batch_size=None if self.batch_size is None else int(self.batch_size), seed=seed,
                        schedule=schedule, kind=kind)
        for name, value in resolved.items():
            object.__setattr__(self, name, value)

    @property
    def noise_mask_id(self) -> int | None:
        """The ``mask_id`` to pass to `fastbound.perturb` (the uniform graph has none)."""
        return self.mask_id if self.graph == "absorb" else None

    def output_width(self) -> tuple[int, int]:
        """Allowed number of columns of the denoiser output (min, max)."""
        if self.loss == "dce":
            return self.vocab_size, 1 << 62  # extra columns (a mask column, padding) take part only if < mask_id
        if self.graph == "absorb":
            return self.mask_id + 1, self.mask_id + 1  # SEDD's absorbing score: the mask is the last column
        return self.vocab_size, self.vocab_size


class Batch(NamedTuple):
    """The checked sequences of one estimate: ids (B, L) int64, maskable (B, L) or None, M per sequence."""

    x0: torch.Tensor
    maskable: torch.Tensor | None
    n_tokens: torch.Tensor


def check_denoiser(denoiser: object) -> None:
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable (x_t, sigma) -> (B, L, V), got {type(denoiser).__name__}")


def check_x0(name: str, x0: object, options: Options) -> torch.Tensor:
    """(B, L) clean ids in [0, vocab_size), as int64 (compared in int64 whatever the id dtype)."""
    x0 = v.check_tensor(name, x0)
    if x0.dtype not in v.INT_DTYPES:
        raise TypeError(f"{name} must hold integer token ids, got {x0.dtype}")
    if x0.dim() != 2:
        raise ValueError(f"{name} must have shape (B, L), got {tuple(x0.shape)}")
    x0 = x0.long()
    if x0.numel():
        if options.graph == "absorb" and bool((x0 == options.mask_id).any()):
            raise ValueError(f"{name} contains the mask id {options.mask_id}; clean tokens cannot be masked")
        v.check_id_range(name, x0, 0, options.vocab_size)
    return x0


def batch(x0: torch.Tensor, maskable: object, options: Options) -> Batch:
    """Checks ``maskable`` against the checked ``x0`` and counts the scored positions."""
    if maskable is None:
        if x0.shape[1] == 0 and x0.shape[0] > 0:
            raise ValueError("x0 has no positions: nothing to score")
        n_tokens = torch.full((x0.shape[0],), x0.shape[1], dtype=torch.int64, device=x0.device)
    else:
        maskable = v.check_maskable(maskable, x0)
        empty = (~maskable.any(1)).nonzero()
        if empty.numel():
            raise ValueError(f"maskable has no maskable position in sequence {int(empty[0])}")
        n_tokens = maskable.sum(1)
    if options.kind.counts_subsets and n_tokens.numel() and int(n_tokens.max()) > MAX_EXACT_POSITIONS:
        raise ValueError(f"method={options.method!r} enumerates 2^M - 1 subsets; M = {int(n_tokens.max())} "
                         f"maskable positions is more than {MAX_EXACT_POSITIONS}: use method='time_free'")
    return Batch(x0, maskable, n_tokens)


def _free_bytes(device: torch.device) -> int | None:
    """Memory available for new tensors on ``device`` (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(kept_draws: int, options: Options, n_seq: int, device: torch.device) -> None:
    """Refuses an estimate whose per-draw record would not fit in half the free memory."""
    need = kept_draws * BYTES_PER_DRAW
    free = _free_bytes(device)
    if free is not None and need > free // 2:
        raise ValueError(
            f"n_samples={options.n_samples} is too large for {n_seq} sequences: method={options.method!r} keeps "
            f"every draw ({BYTES_PER_DRAW} bytes each, for its standard error and its times / integrand), "
            f"{need / 2**30:.1f} GiB here, more than half of the {free / 2**30:.1f} GiB free on {device}; "
            "lower n_samples or estimate fewer sequences per call"
        )
