"""The chunked pass of an estimate: corrupt each row, run the denoiser, add the row's loss into its slot.

Rows are taken ``batch_size`` at a time in the method's order, so the denoiser output of one
chunk is all the (rows, L, V) memory an estimate holds. Row g of a call with noise offset o
reads the Philox counters ``o + g L ...``: the same draws for every ``batch_size``.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..integrate import integrate_step
from ..noise import perturb
from .methods import Draws, Method
from .options import Batch

Step = Callable[..., torch.Tensor]
"""The integration step (`fastbound.integrate_step` or a stand-in with its signature)."""
IGNORE = -100


def _corrupt(x0: torch.Tensor, maskable: torch.Tensor | None, draws: Draws, method: Method, offset: int) -> torch.Tensor:
    options = method.options
    if draws.mask is not None:
        return torch.where(draws.mask, options.mask_id, x0[draws.seq])
    noise = dict(num_masked=draws.num_masked) if draws.num_masked is not None else dict(sigma=draws.sigma)
    return perturb(
        x0[draws.seq], **noise, graph=options.graph, vocab_size=options.vocab_size, mask_id=options.noise_mask_id,
        maskable=None if maskable is None else maskable[draws.seq], seed=options.seed, offset=offset,
        backend=options.backend,
    ).x_t


def _denoise(denoiser, x_t: torch.Tensor, sigma: torch.Tensor, width: tuple[int, int]) -> torch.Tensor:
    out = denoiser(x_t, sigma)
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        raise TypeError(f"the denoiser must return a float tensor, got {type(out).__name__}"
                        + (f" of {out.dtype}" if isinstance(out, torch.Tensor) else ""))
    lo, hi = width
    expected = f"{lo}" if lo == hi else f">= {lo}"
    if out.dim() != 3 or out.shape[:2] != x_t.shape or not lo <= out.shape[2] <= hi:
        raise ValueError(f"the denoiser output must have shape ({x_t.shape[0]}, {x_t.shape[1]}, {expected}) "
                         f"for these inputs, got {tuple(out.shape)}")
    if out.device != x_t.device:
        raise ValueError(f"the denoiser output is on {out.device} but x0 is on {x_t.device}")
    return out


def accumulate(denoiser, batch: Batch, method: Method, step: Step = integrate_step,
               width: tuple[int, int] | None = None) -> torch.Tensor:
    """Runs every row of ``method`` through the denoiser in chunks; returns the (slots, 2) accumulator.

    ``width`` is the allowed last dimension of the denoiser output (default
    `Options.output_width`; the hidden size H in ``head=`` mode).
    """
    options = method.options
    x0, maskable = batch.x0, batch.maskable
    n_seq, length = x0.shape
    acc = torch.zeros(method.n_slots, 2, dtype=torch.float64, device=x0.device)
    chunk = options.batch_size or max(n_seq, 1)
    width = options.output_width() if width is None else width
    x0_scored = x0 if maskable is None else torch.where(maskable, x0, IGNORE)
    for g0 in range(0, method.n_rows, chunk):
        g = torch.arange(g0, min(method.n_rows, g0 + chunk), device=x0.device)
        draws = method.draws(g)
        x_t = _corrupt(x0, maskable, draws, method, method.noise_offset + g0 * length)
        out = _denoise(denoiser, x_t, draws.sigma, width)
        step(out, x_t, x0_scored[draws.seq], draws.sigma.double(), draws.weight, acc, loss=options.loss,
             graph=options.graph, mask_id=options.mask_id, ignore_index=IGNORE, index=draws.slot,
             backend=options.backend)
    if bool(torch.isnan(acc).any()):
        bad = int(torch.isnan(acc[:, 0]).nonzero()[0])
        raise ValueError(f"the denoiser output contains NaN where the loss reads it (accumulator row {bad})")
    return acc
