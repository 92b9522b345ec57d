r"""The likelihood integration step: one read of the denoiser output per timestep.

`integrate_step` is the inner step of the NLL estimators (`fastbound.estimators`).
For each sequence b of a batch of denoiser outputs (B, L, V) it computes

.. math:: S_b = w_b \sum_i \ell(\text{out}_{b,i}, \sigma_b, x_{t,b,i}, x_{0,b,i})

with :math:`\ell` the DCE (MDLM) or DSE (SEDD, absorbing or uniform graph) per-token
loss, exactly as `fastbound.dce_loss` / `fastbound.dse_loss` compute it, and adds
:math:`(S_b, S_b^2)` to a float64 accumulator in place (the second column gives the
standard error of a Monte-Carlo mean). No gradient and no per-token loss tensor.
The oracle is `fastbound.reference.integrate_step` (the reference loss, then a sum).
"""

from __future__ import annotations

from typing import Literal

import torch

from . import _backend, _names, _ops  # noqa: F401  (_ops loads the op schemas)
from . import _validate as v
from .losses import check_dce_ids, check_dse_ids, check_values_on_cpu, dce_mask_id, dse_mask_id

@torch.library.register_fake("fastbound::integrate_step")
def _integrate_step_fake(out, x_t, x0, sigma, weight, acc, index, loss, graph, mask_id, ignore_index):
    return None


def _per_sequence(name: str, value: float | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """A float or a (B,) / (B, 1) tensor as a contiguous float64 (B,) tensor."""
    if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == 1:
        value = value[:, 0]
    if isinstance(value, torch.Tensor) and value.dim() > 1:
        raise ValueError(f"{name} must be a float or a (B,) tensor (one value per sequence), got shape {tuple(value.shape)}")
    return v.as_rows(name, value, torch.Size([n]), torch.float64, device)


def _launch(kernel_backend: str, out: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor,
            weight: torch.Tensor, acc: torch.Tensor, index: torch.Tensor | None, loss: str, graph: str, mask_id: int,
            ignore_index: int) -> None:
    """The integration kernel on checked arguments (int64 contiguous ids and slots, (B,) float64
    sigma and weight, the resolved mask_id), ``out`` given a unit-stride last dimension here;
    `integrate_step` and the estimators' loop (`fastbound.estimators.loop`) call it."""
    if out.shape[2] > 1 and out.stride(2) != 1:
        out = out.contiguous()
    _backend.kernel(kernel_backend, "integrate_step")(
        out.detach(), x_t, x0, sigma, weight, acc, index, _names.LOSS_CODES[loss], _names.GRAPH_CODES[graph],
        mask_id, ignore_index,
    )


def integrate_step(
    out: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    sigma: float | torch.Tensor | None,
    weight: float | torch.Tensor | None,
    acc: torch.Tensor,
    *,
    loss: Literal["dce", "dse"] = "dce",
    graph: Literal["absorb", "uniform"] = "absorb",
    mask_id: int | None = None,
    ignore_index: int = -100,
    index: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    r"""Adds each sequence's weighted loss sum and its square to ``acc``, in place.

    Args:
        out: (B, L, V) denoiser output: logits / log-probabilities for ``loss="dce"``,
            log-scores for ``loss="dse"`` (fp32, bf16, fp16 or fp64; any strides with a
            unit-stride last dimension).
        x_t, x0: (B, L) noisy and clean ids. Positions whose ``x0`` is ``ignore_index``
            contribute nothing (e.g. the prompt of a conditional likelihood).
        sigma: total noise per sequence, a float or (B,) (used by ``loss="dse"``; may be
            ``None`` for DCE).
        weight: per-sequence weight :math:`w_b` (a float or (B,); default 1).
        acc: (S, 2) float64 accumulator, contiguous, not requiring grad (outside no_grad):
            ``acc[index[b]] += (S_b, S_b**2)``.
        loss: ``"dce"`` (masked cross-entropy, absorbing graph; see `fastbound.dce_loss`
            for ``mask_id``) or ``"dse"`` (score entropy; see `fastbound.dse_loss`:
            absorbing mask = column V-1).
        graph: ``"absorb"`` or ``"uniform"`` (``"uniform"`` only with ``loss="dse"``).
        index: (B,) accumulator row of each sequence (default ``arange(B)``, then S = B);
            sequences may share a row.
        backend: ``None``/``"auto"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns ``acc``. Runs without autograd.

    The value checks (ids, ``index``, sigma) follow `fastbound.value_checks`: on a GPU one
    host read by default, none with ``"async"`` or ``"off"``. Unchecked (``"off"``, tracing,
    CUDA-graph capture in ``"sync"`` mode), a bad id or sigma makes its sequence's sums NaN
    (the loss kernels' NaN policy) and an ``index`` out of range fills all of ``acc`` with NaN.
    """
    out = v.check_float_tensor("out", out)
    if out.dim() != 3:
        raise ValueError(f"out must have shape (B, L, V), got {tuple(out.shape)}")
    n_seq, length, n_cols = out.shape
    x_t = v.check_ids("x_t", x_t, out.shape[:2])
    x0 = v.check_ids("x0", x0, out.shape[:2])
    v.check_choice("loss", loss, _names.LOSS_CODES)
    v.check_choice("graph", graph, _names.GRAPH_CODES)
    ignore_index = v.check_int64("ignore_index", ignore_index)
    acc = v.check_float_tensor("acc", acc, (torch.float64,))
    if acc.dim() != 2 or acc.shape[1] != 2 or not acc.is_contiguous():
        raise ValueError(f"acc must be a contiguous (S, 2) float64 tensor, got shape {tuple(acc.shape)}")
    v.check_accumulator("acc", acc)
    v.check_same_device(out.device, x_t=x_t, x0=x0, acc=acc, index=index)
    v.check_size("out", n_seq * length, "positions")
    v.check_size("out", n_cols, "columns")
    if index is None:
        if acc.shape[0] != n_seq:
            raise ValueError(f"acc must have one row per sequence ({n_seq}) when index is not given, got {acc.shape[0]}")
    else:
        index = v.check_ids("index", index, torch.Size([n_seq])).long().contiguous()
    kernel_backend = _backend.select(out.device, backend)
    xt = x_t.long().contiguous()
    x0l = x0.long().contiguous()

    checks = v.ValueChecks()
    if index is not None:
        checks.ids("index", index, 0, acc.shape[0])
    # On the host the id and sigma checks are one pass of the C++ op (as the losses'); elsewhere
    # torch ops under `fastbound.value_checks`.
    on_host = out.device.type in v.HOST_DEVICES and v.eager(out)
    if loss == "dce":
        if graph != "absorb":
            raise ValueError("loss='dce' is the absorbing (masked) graph's loss; use loss='dse' for graph='uniform'")
        mask_id = dce_mask_id(mask_id, n_cols, "out")
        if not on_host:
            check_dce_ids(checks, xt, x0l, n_cols, mask_id, ignore_index)
        sigma_rows = torch.zeros(n_seq, dtype=torch.float64, device=out.device)
        sigma_check = None
    else:
        mask_id = dse_mask_id(mask_id, graph, n_cols, "out")
        if sigma is None:
            raise ValueError("sigma is required for loss='dse'")
        sigma_rows = sigma_check = _per_sequence("sigma", sigma, n_seq, out.device)
        if not on_host:
            check_dse_ids(checks, graph, xt, x0l, n_cols, ignore_index, "out",
                          mask_id=mask_id if mask_id >= 0 else None)
            checks.positive_finite("sigma", sigma_rows)
    if on_host:
        checks.run()  # index first, as the torch checks order it
        check_values_on_cpu(xt.view(-1), x0l.view(-1), sigma_check, n_cols, loss, _names.GRAPH_CODES[graph], mask_id,
                            ignore_index)
    else:
        checks.run()
    weight_rows = _per_sequence("weight", 1.0 if weight is None else weight, n_seq, out.device)
    with torch.no_grad():
        _launch(kernel_backend, out, xt, x0l, sigma_rows, weight_rows, acc, index, loss, graph, mask_id, ignore_index)
        if index is not None and out.device.type not in v.HOST_DEVICES and (
            v.tracing(index) or v.mode_for(out.device) == "off"
        ):
            # The device kernels skip a sequence whose slot is out of range; unchecked, that
            # would be a silent wrong sum, so the whole accumulator becomes NaN instead.
            acc.masked_fill_(((index < 0) | (index >= acc.shape[0])).any(), float("nan"))
    return acc
