r"""The likelihood integration step straight from hidden states and the output layer.

`head_integrate_step` is `fastbound.integrate_step` for a denoiser that ends in a linear
layer: with :math:`s = hW^\top + b` it adds, per sequence b,

.. math:: S_b = w_b \sum_i \ell(s_{b,i}, \sigma_b, x_{t,b,i}, x_{0,b,i}), \qquad
          \text{acc}[\text{index}_b] \mathrel{+}= (S_b, S_b^2),

computing the scores chunk by chunk from the contributing rows only (masked positions for
the absorbing graph), so neither the (B, L, V) output nor a per-token loss tensor exists.
Same arguments and semantics as `fastbound.integrate_step` on ``hidden @ weight.T + bias``;
the row losses come from the same row kernels and are summed per sequence in float64.
"""

from __future__ import annotations

from typing import Literal

import torch

from .. import _backend, _names
from .. import _validate as v
from ..integrate import _per_sequence
from ..losses import check_dce_ids, check_dse_ids, dce_mask_id, dse_mask_id
from .head import (
    HeadSpec,
    check_chunk_size,
    check_head,
    check_score_param,
    chunk_scores,
    contributing_rows,
    gemm_dtype,
    row_losses,
)


def head_integrate_step(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    sigma: float | torch.Tensor | None,
    seq_weight: float | torch.Tensor | None,
    acc: torch.Tensor,
    *,
    loss: Literal["dce", "dse"] = "dce",
    graph: Literal["absorb", "uniform"] = "absorb",
    mask_id: int | None = None,
    ignore_index: int = -100,
    index: torch.Tensor | None = None,
    score_param: str = "raw",
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """`fastbound.integrate_step` on the scores ``hidden @ weight.T + bias``, without forming them.

    Args:
        hidden: (B, L, H) hidden states; weight (V, H) and bias (V,) or None: the output layer.
        x_t, x0, sigma, acc, loss, graph, mask_id, ignore_index, index, backend: as in
            `fastbound.integrate_step` (``seq_weight`` is its ``weight``, per sequence).
        score_param: ``"raw"`` or ``"sedd"`` (SEDD's absorbing parametrisation, as in
            `fastbound.fused_linear_dse_loss`; with ``loss="dse"``).
        chunk_size: rows per chunk (default `fastbound.fused_linear.chunk_rows`).

    Returns ``acc``, updated in place. Runs without autograd.
    """
    hidden = v.check_float_tensor("hidden", hidden)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape (B, L, H), got {tuple(hidden.shape)}")
    v.check_choice("loss", loss, _names.LOSS_CODES)
    v.check_choice("graph", graph, _names.GRAPH_CODES)
    sedd = check_score_param(score_param, loss, graph)
    flat, n_cols, n_hidden = check_head(hidden, weight, bias)
    n_seq, length = hidden.shape[:2]
    x_t = v.check_ids("x_t", x_t, hidden.shape[:2])
    x0 = v.check_ids("x0", x0, hidden.shape[:2])
    ignore_index = v.check_int64("ignore_index", ignore_index)
    acc = v.check_float_tensor("acc", acc, (torch.float64,))
    if acc.dim() != 2 or acc.shape[1] != 2 or not acc.is_contiguous():
        raise ValueError(f"acc must be a contiguous (S, 2) float64 tensor, got shape {tuple(acc.shape)}")
    for name, t in (("x_t", x_t), ("x0", x0), ("acc", acc), ("index", index)):
        if isinstance(t, torch.Tensor) and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}; move it to {hidden.device}")
    if index is None:
        if acc.shape[0] != n_seq:
            raise ValueError(
                f"acc must have one row per sequence ({n_seq}) when index is not given, got {acc.shape[0]}"
            )
        index = torch.arange(n_seq, device=hidden.device)
    else:
        index = v.check_ids("index", index, torch.Size([n_seq])).long().contiguous()
    chunk = check_chunk_size(chunk_size, n_hidden, n_cols, hidden)
    kernel_backend = _backend.select(hidden.device, backend)
    xt, x0l = x_t.reshape(-1).long().contiguous(), x0.reshape(-1).long().contiguous()
    row_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32

    checks = v.ValueChecks()
    checks.ids("index", index, 0, acc.shape[0])
    if loss == "dce":
        if graph != "absorb":
            raise ValueError("loss='dce' is the absorbing (masked) graph's loss; use loss='dse' for graph='uniform'")
        mask = dce_mask_id(mask_id, n_cols, "weight")
        check_dce_ids(checks, xt, x0l, n_cols, mask, ignore_index)
        sigma_rows = torch.empty(0, dtype=row_dtype, device=hidden.device)
    else:
        mask = dse_mask_id(mask_id, graph, n_cols, "weight")
        check_dse_ids(checks, graph, xt, x0l, n_cols, ignore_index, "weight", mask_id=mask if mask >= 0 else None)
        if sigma is None:
            raise ValueError("sigma is required for loss='dse'")
        sigma_seq = _per_sequence("sigma", sigma, n_seq, hidden.device)
        checks.positive_finite("sigma", sigma_seq)
        sigma_rows = sigma_seq.to(row_dtype).repeat_interleave(length)
    checks.run()
    weight_seq = _per_sequence("seq_weight", 1.0 if seq_weight is None else seq_weight, n_seq, hidden.device)

    spec = HeadSpec(loss, _names.GRAPH_CODES[graph], mask, ignore_index, sedd, chunk, kernel_backend)
    totals = torch.zeros(n_seq, dtype=torch.float64, device=hidden.device)
    ones = torch.ones(min(chunk, flat.shape[0]), dtype=row_dtype, device=hidden.device)
    with torch.no_grad():
        gemm = gemm_dtype(hidden.dtype, hidden.device)
        flat, weight = flat.detach(), weight.detach().to(gemm)
        bias = None if bias is None else bias.detach().to(gemm)
        rows = contributing_rows(spec, xt, x0l)
        for start in range(0, rows.numel(), chunk):
            r = rows[start:start + chunk]
            sig = sigma_rows[r] if loss == "dse" else sigma_rows
            _, s = chunk_scores(spec, flat, weight, bias, r, sig, xt[r])
            part = row_losses(spec, s, sig, xt[r], x0l[r], ones[: r.numel()], False)
            totals.index_add_(0, r // length, part.double())
            del s  # one chunk of scores at a time
        total = weight_seq * totals
        acc.index_add_(0, index, torch.stack([total, total * total], -1))
    return acc
