"""The chunked pass of an estimate: corrupt each row, run the denoiser, add the row's loss into its slot.

Rows are taken ``batch_size`` at a time in the method's order, so the denoiser output of one
chunk is all the (rows, L, V) memory an estimate holds. Row g of a call with noise offset o
reads the Philox counters ``o + g L ...``: the same draws for every ``batch_size``.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import _backend
from .. import _validate as v
from ..integrate import _launch, integrate_step
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


def _checked_step(out: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, weight: torch.Tensor,
                  acc: torch.Tensor, *, loss: str, graph: str, mask_id: int, ignore_index: int, index: torch.Tensor,
                  backend: str | None) -> torch.Tensor:
    """`integrate_step` on the arguments `accumulate` builds, with the checks of ``out`` only.

    The rest is checked by construction: x0 by `check_x0` (ids in [0, V), so never the mask,
    and V ≤ the output width), x_t by `perturb` (x0 or the mask), the (rows,) float64 weight,
    float64 sigma and int64 slots in range by the method, acc by `accumulate`, loss, graph and
    mask_id by `Options`. Only the score entropy reads sigma: its positivity is checked as the
    public step checks it off the host. The same kernel launch as `integrate_step`'s
    (`fastbound.integrate._launch`), so the same sums.
    """
    out = v.check_float_tensor("out", out)
    n_seq, length, n_cols = out.shape
    v.check_size("out", n_seq * length, "positions")
    v.check_size("out", n_cols, "columns")
    if loss == "dce":
        sigma = torch.zeros(n_seq, dtype=torch.float64, device=out.device)
    else:
        checks = v.ValueChecks()
        checks.positive_finite("sigma", sigma)
        checks.run()
    with torch.no_grad():
        _launch(_backend.select(out.device, backend), out, x_t.long().contiguous(), x0.long().contiguous(), sigma,
                weight.contiguous(), acc, index.long().contiguous(), loss, graph, mask_id, ignore_index)
    return acc


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
    if step is integrate_step:
        step = _checked_step
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
