"""Fused diffusion losses: denoising score entropy (SEDD) and denoising cross-entropy (MDLM).

Both read the model's (..., V) output once and, when it requires grad, write
the gradient in the same pass; the backward only rescales it (or nothing, for
the usual ``loss.backward()``). See `fastbound.reference` for the formulas.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

from . import _backend, _names, _ops
from . import _validate as v

Reduction = Literal["none", "sum", "mean"]
REDUCTIONS = _names.REDUCTIONS


def _kernel(backend: str, name: str) -> Callable:
    if backend == "triton":
        from . import triton_kernels  # noqa: F401  (registers the *_triton ops)

        name += "_triton"
    return getattr(torch.ops.fastbound, name)


def _prepare(score, x_t, x0, weight, reduction, ignore_index, backend, inplace, score_name):
    """Validates the shared arguments; returns (scores as (N, V), (x_t, x0) as (N,) int64, row scale, backend)."""
    score = v.check_float_tensor(score_name, score)
    if score.dim() < 1:
        raise ValueError(f"{score_name} must have shape (..., V), got a scalar")
    lead = score.shape[:-1]
    x_t = v.check_ids("x_t", x_t, lead)
    x0 = v.check_ids("x0", x0, lead)
    v.check_choice("reduction", reduction, REDUCTIONS)
    v.check_int64("ignore_index", ignore_index)
    v.check_same_device(score.device, x_t=x_t, x0=x0)
    n, n_cols = x_t.numel(), score.shape[-1]
    v.check_size(score_name, n, "positions")
    v.check_size(score_name, n_cols, "columns")
    kernel_backend = _backend.select(score.device, backend)

    flat = score.reshape(n, n_cols)
    if n_cols > 1 and flat.stride(1) != 1:
        flat = flat.contiguous()
    if inplace and torch._debug_has_internal_overlap(flat) != 0:
        raise ValueError(
            f"inplace=True needs {score_name} rows that do not share memory (it is expanded or overlapping); "
            "pass a materialised tensor or use inplace=False"
        )
    ids = (x_t.reshape(n).long().contiguous(), x0.reshape(n).long().contiguous())
    acc = torch.float64 if score.dtype == torch.float64 else torch.float32
    row_scale = v.as_rows("weight", weight, lead, acc, score.device, default=1.0)
    if reduction == "mean":
        count = (ids[1] != ignore_index).sum().clamp_min(1)
        row_scale = row_scale / count.to(acc)
    return flat, ids, row_scale, kernel_backend


def check_dse_ids(checks: v.ValueChecks, graph: str, x_t: torch.Tensor, x0: torch.Tensor, n_cols: int,
                  ignore_index: int, score_name: str = "score") -> None:
    """Id checks of the score entropy: x_t in [0, V); x0 a real token ([0, V-1) when absorbing)."""
    if graph == "absorb" and n_cols < 2:
        raise ValueError(f"{score_name} needs V >= 2 columns for the absorbing graph (tokens + the mask column)")
    checks.ids("x_t", x_t, 0, n_cols)
    checks.ids("x0", x0, 0, n_cols - 1 if graph == "absorb" else n_cols, skip=ignore_index)


def dce_mask_id(mask_id: int | None, n_cols: int, score_name: str = "logits") -> int:
    """The DCE mask id: default V - 1 (the last column); any id >= V means the logits hold real tokens only."""
    if mask_id is None:
        mask_id = n_cols - 1
    if not isinstance(mask_id, int) or isinstance(mask_id, bool) or not 0 <= mask_id < 2**63:
        raise ValueError(f"mask_id must be a non-negative int64, got {mask_id!r}")
    if mask_id < n_cols and n_cols < 2:
        raise ValueError(f"{score_name} need at least one real token column besides the mask column")
    return mask_id


def check_dce_ids(checks: v.ValueChecks, x_t: torch.Tensor, x0: torch.Tensor, n_cols: int, mask_id: int,
                  ignore_index: int) -> None:
    """Id checks of the masked cross-entropy: x_t a token or the mask; x0 a token, never the mask."""
    checks.ids("x_t", x_t, 0, n_cols, allow=mask_id)
    checks.ids("x0", x0, 0, n_cols, skip=ignore_index)
    checks.add(x0 == mask_id, lambda: f"x0 contains the mask id {mask_id}; clean tokens cannot be masked")


def _run(flat: torch.Tensor, inplace: bool, fused: Callable, fused_inplace: Callable) -> torch.Tensor:
    """Calls the fused op (functional, or in place with its own autograd) and returns per-row losses."""
    need_grad = torch.is_grad_enabled() and flat.requires_grad
    if inplace and need_grad:
        return _ops.InplaceFusedLoss.apply(flat, fused_inplace)
    loss, _ = fused(flat, need_grad)
    return loss


def _reduce(rows: torch.Tensor, shape: torch.Size, reduction: str) -> torch.Tensor:
    return rows.view(shape) if reduction == "none" else rows.sum()


def dse_loss(
    score: torch.Tensor,
    sigma: float | torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    *,
    graph: Literal["absorb", "uniform"] = "absorb",
    weight: float | torch.Tensor | None = None,
    reduction: Reduction = "none",
    ignore_index: int = -100,
    inplace: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    r"""Denoising score entropy, a drop-in for SEDD's ``Graph.score_entropy(score, sigma, x, x0)``.

    Args:
        score: (..., V) log-scores :math:`s_\theta(x_t)` (fp32, bf16, fp16 or fp64).
        sigma: total noise :math:`\sigma`, a float or a tensor broadcastable to ``x_t``
            (SEDD passes ``sigma[:, None]``); positive and finite.
        x_t: noisy ids, ``score.shape[:-1]``.
        x0: clean ids, ``score.shape[:-1]``; positions equal to ``ignore_index`` contribute nothing.
        graph: ``"absorb"`` (the mask is column V-1; only positions with ``x_t == V-1``
            contribute) or ``"uniform"`` (N = V states; every position contributes).
        weight: multiplies the per-position loss (e.g. SEDD's ``dsigma``); broadcastable to ``x_t``.
        reduction: ``"none"`` (``x_t``'s shape), ``"sum"``, or ``"mean"`` (sum divided by the
            number of positions whose ``x0`` is not ``ignore_index``).
        inplace: overwrite ``score`` with the gradient (saves one (N, V) buffer; ``score``
            is clobbered and must not be used afterwards).
        backend: ``None``/``"auto"``, ``"cpu"``, ``"cuda"`` or ``"triton"`` (see `fastbound._backend`).

    Absorbing graph, with :math:`r = 1/(e^\sigma - 1)` (Lou et al. 2024, SEDD, eq. for the
    absorbing score entropy):

    .. math:: \ell = \sum_{y < V-1} e^{s_y} - r\, s_{x_0} + r(\log r - 1)

    Uniform graph: SEDD's ``Uniform.score_entropy`` with :math:`\rho = a/(a+N)`, :math:`a = e^\sigma-1`
    (see `fastbound.reference.dse_uniform`). Returns float32 (float64 for float64 scores);
    gradients flow to ``score`` only.
    """
    v.check_choice("graph", graph, _names.GRAPH_CODES)
    flat, (xt, x0f), row_scale, kernel_backend = _prepare(
        score, x_t, x0, weight, reduction, ignore_index, backend, inplace, "score"
    )
    checks = v.ValueChecks()
    check_dse_ids(checks, graph, xt, x0f, flat.shape[1], ignore_index)
    sigma_rows = v.as_rows("sigma", sigma, x_t.shape, row_scale.dtype, flat.device)
    checks.positive_finite("sigma", sigma_rows)
    checks.run()
    code = _names.GRAPH_CODES[graph]
    op, op_inplace = _kernel(kernel_backend, "dse_forward"), _kernel(kernel_backend, "dse_forward_inplace")
    # The C++ ops take the absorbing graph's mask column (CONTRACTS.md 1); the Triton ops follow.
    mask = () if kernel_backend == "triton" else (flat.shape[1] - 1 if graph == "absorb" else -1,)
    rows = _run(
        flat,
        inplace,
        lambda s, need_grad: op(s, sigma_rows, xt, x0f, row_scale, code, *mask, ignore_index, need_grad),
        lambda s: op_inplace(s, sigma_rows, xt, x0f, row_scale, code, *mask, ignore_index),
    )
    return _reduce(rows, x_t.shape, reduction)


def dce_loss(
    logits: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    *,
    mask_id: int | None = None,
    weight: float | torch.Tensor | None = None,
    reduction: Reduction = "none",
    ignore_index: int = -100,
    inplace: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    r"""Denoising cross-entropy (MDLM's loss; the I-MDCE integrand of Jeon et al. 2025).

    At positions where ``x_t == mask_id``:

    .. math:: \ell = -\log \mathrm{softmax}(\text{logits})_{x_0}

    times ``weight`` (e.g. :math:`\sigma'/(e^\sigma - 1)`, which is 1/t for the log-linear
    schedule; see `fastbound.schedules`), and 0 elsewhere (Sahoo et al. 2024, MDLM's SUBS
    parameterisation).

    Args:
        logits: (..., V) logits or log-probabilities (fp32, bf16, fp16 or fp64).
        x_t, x0: noisy and clean ids, ``logits.shape[:-1]``.
        mask_id: the mask token. Default ``V - 1``, the last column. When ``mask_id < V``
            that column is left out of the softmax (MDLM's SUBS, infodis's RADD); when
            ``mask_id >= V`` the logits cover the real tokens only.
        weight, reduction, ignore_index, inplace, backend: as in `dse_loss`.

    Returns float32 (float64 for float64 logits); gradients flow to ``logits`` only.
    """
    flat, (xt, x0f), row_scale, kernel_backend = _prepare(
        logits, x_t, x0, weight, reduction, ignore_index, backend, inplace, "logits"
    )
    mask_id = dce_mask_id(mask_id, flat.shape[1])
    checks = v.ValueChecks()
    check_dce_ids(checks, xt, x0f, flat.shape[1], mask_id, ignore_index)
    checks.run()
    op, op_inplace = _kernel(kernel_backend, "dce_forward"), _kernel(kernel_backend, "dce_forward_inplace")
    rows = _run(
        flat,
        inplace,
        lambda s, need_grad: op(s, xt, x0f, row_scale, mask_id, ignore_index, need_grad),
        lambda s: op_inplace(s, xt, x0f, row_scale, mask_id, ignore_index),
    )
    return _reduce(rows, x_t.shape, reduction)
