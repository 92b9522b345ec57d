"""Fused diffusion losses: denoising score entropy (SEDD) and denoising cross-entropy (MDLM).

Both read the model's (..., V) output once and, when it requires grad, write
the gradient in the same pass; the backward only rescales the contributing rows
in place (or nothing, for the usual ``loss.backward()``; see `fastbound._ops`).
See `fastbound.reference` for the formulas.

A call's fixed cost matters at small sizes (V = 5, 4x64 tokens: a few microseconds of
kernel): what reads no data is checked once per argument signature and cached, with the
row scale of ones; on CPU tensors the id and sigma checks are one pass of a C++ op
(``check_loss_ids``) instead of a dozen small torch ops. The common eager CPU call (the
only gradient is to the scores; no forward-mode AD, not in place) is one C++ op,
``fused_loss`` (csrc/cpu/fused_loss_autograd.cpp), whose backward is C++ too: a signature
takes it once a call through the full path has validated it (`_fast_key`). For a summed loss
it also predicts a power-of-two factor after the call (``/ B``, a GradScaler's scale, ``/ k``)
from the previous backwards of the signature and folds it into the gradient it writes, so
that backward is free too; the bits are the same whatever the prediction, but for subnormal
gradient values (see that file).
"""

from __future__ import annotations

from typing import Literal

import torch

from . import _backend, _names, _ops
from . import _validate as v

Reduction = Literal["none", "sum", "mean"]
REDUCTIONS = _names.REDUCTIONS

_MAX_CHECKED = 256
"""The bound of each table of checked signatures (and of the cached row scales of ones)."""
_CHECKED = v.SignatureTable(_MAX_CHECKED)
"""Argument signatures (types, dtypes, shapes, devices, options) already validated -> kernel backend."""


def _check_arguments(score, x_t, x0, reduction, ignore_index, backend, score_name) -> str:
    """The checks that read no data (types, shapes, dtypes, devices, sizes); returns the kernel backend."""
    score = v.check_float_tensor(score_name, score)
    if score.dim() < 1:
        raise ValueError(f"{score_name} must have shape (..., V), got a scalar")
    lead = score.shape[:-1]
    v.check_ids("x_t", x_t, lead)
    v.check_ids("x0", x0, lead)
    v.check_choice("reduction", reduction, REDUCTIONS)
    v.check_same_device(score.device, x_t=x_t, x0=x0)
    v.check_size(score_name, x_t.numel(), "positions")
    v.check_size(score_name, score.shape[-1], "columns")
    return _backend.select(score.device, backend)


def _signature(score, x_t, x0, reduction, ignore_index, backend) -> tuple | None:
    """What `_check_arguments` depends on, for plain eager tensors (None: check every time)."""
    if type(score) not in v.PLAIN or type(x_t) not in v.PLAIN or type(x0) not in v.PLAIN or v.tracing(score):
        return None
    if score.is_nested or x_t.is_nested or x0.is_nested or not isinstance(ignore_index, int):
        return None
    if not isinstance(reduction, str) or not (backend is None or isinstance(backend, str)):
        return None  # unhashable or odd options: let the checks name them
    return (score.dtype, score.shape, score.device, score.layout, x_t.dtype, x_t.shape, x_t.device, x_t.layout,
            x0.dtype, x0.shape, x0.device, x0.layout, reduction, ignore_index, type(ignore_index), backend,
            *_backend.environment_key())


_ONES: dict[tuple, torch.Tensor] = {}
"""(N, dtype, device) -> a row scale of ones, for eager calls without ``weight`` (never written)."""


def _ones(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (n, dtype, device)
    ones = _ONES.get(key)
    if ones is None:
        with torch.inference_mode(False):  # cached: must be usable by later calls that save it for backward
            ones = torch.ones(n, dtype=dtype, device=device)
        # Not while a CUDA graph captures: its fill would run only at replay; nor a tensor a
        # torch.func transform wrapped (under nested transforms a factory's result is one),
        # which must not outlive its level.
        if (len(_ONES) < _MAX_CHECKED and not torch._C._functorch.is_functorch_wrapped_tensor(ones)
                and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())):
            _ONES[key] = ones
    return ones


_F32_POSITIVE, _F32_FINITE = 2.0**-150, (2 - 2.0**-24) * 2.0**127
"""A float rounds to a positive float32 iff it exceeds the first bound (half the smallest
subnormal), to a finite one iff it is below the second (float32's max plus half an ulp)."""


def _check_float_sigma(sigma: float, acc: torch.dtype) -> None:
    """A float sigma must stay positive and finite in the accumulation dtype (1e-50 is 0 in float32)."""
    lo, hi = (_F32_POSITIVE, _F32_FINITE) if acc == torch.float32 else (0.0, float("inf"))
    if not lo < sigma < hi:
        detail = f" (not in {acc})" if 0 < sigma < float("inf") else ""
        raise ValueError(f"sigma must be positive and finite, got {sigma!r}{detail}")


def _flat_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """``ids`` as contiguous (N,) int64 (a view when they already are)."""
    if ids.dtype == torch.int64 and ids.is_contiguous():
        return ids.view(n)
    return ids.reshape(n).long().contiguous()


def _prepare(score, x_t, x0, weight, reduction, ignore_index, backend, inplace, score_name):
    """Validates the shared arguments; returns (scores as (N, V), (x_t, x0) as (N,) int64, row scale,
    backend, eager) where eager says whether value checks may read the data.

    The data-free checks run once per argument signature (then cached: they cost more than a
    small kernel); what depends on values (weight, ids, sigma) is checked on every call.
    """
    key = _signature(score, x_t, x0, reduction, ignore_index, backend)
    kernel_backend = _CHECKED.get(key)
    if kernel_backend is None:
        kernel_backend = _check_arguments(score, x_t, x0, reduction, ignore_index, backend, score_name)
        _CHECKED.remember(key, kernel_backend)
    eager = key is not None or not v.tracing(score)
    n, n_cols = x_t.numel(), score.shape[-1]
    flat = score.reshape(n, n_cols)
    if n_cols > 1 and flat.stride(1) != 1:
        flat = flat.contiguous()
    v.check_flag("inplace", inplace)
    if inplace:
        _check_inplace(score, flat, score_name)
    ids = (_flat_ids(x_t, n), _flat_ids(x0, n))
    acc = torch.float64 if score.dtype == torch.float64 else torch.float32
    if weight is None and key is not None:
        row_scale = _ones(n, acc, score.device)
    else:
        row_scale = v.as_rows("weight", weight, score.shape[:-1], acc, score.device, default=1.0,
                              differentiable=True)
    if reduction == "mean":
        count = (ids[1] != ignore_index).sum().clamp_min(1)
        row_scale = row_scale / count.to(acc)
    return flat, ids, row_scale, kernel_backend, eager


def _check_inplace(score: torch.Tensor, flat: torch.Tensor, score_name: str) -> None:
    """``inplace=True`` writes the gradient over the scores: refuse a leaf that requires grad
    and rows that share memory (from sizes and strides only, so it traces under torch.compile)."""
    if score.requires_grad and score.is_leaf:
        raise ValueError(
            f"inplace=True would overwrite {score_name}, a leaf tensor that requires grad (e.g. an nn.Parameter); "
            "pass the output of an op (the model's scores) or use inplace=False"
        )
    n, n_cols = flat.shape
    if n > 1 and n_cols > 0 and flat.stride(0) < n_cols:
        raise ValueError(
            f"inplace=True needs {score_name} rows that do not share memory (it is expanded or overlapping); "
            "pass a materialised tensor or use inplace=False"
        )


def dse_mask_id(mask_id: int | None, graph: str, n_cols: int, score_name: str = "score") -> int:
    """The absorbing graph's mask column: default V - 1, any column in [0, V); -1 for the uniform graph."""
    if graph != "absorb":
        return -1
    if n_cols < 2:
        raise ValueError(f"{score_name} needs V >= 2 columns for the absorbing graph (tokens + the mask column)")
    if mask_id is None:
        return n_cols - 1
    mask_id = v.as_int("mask_id", mask_id)
    if not 0 <= mask_id < n_cols:
        raise ValueError(f"mask_id must be a column of {score_name}, in [0, {n_cols}), got {mask_id}")
    return mask_id


def check_dse_ids(checks: v.ValueChecks, graph: str, x_t: torch.Tensor, x0: torch.Tensor, n_cols: int,
                  ignore_index: int, score_name: str = "score", mask_id: int | None = None) -> None:
    """Id checks of the score entropy: x_t in [0, V); x0 a real token ([0, V), never the mask when absorbing)."""
    mask_id = dse_mask_id(mask_id, graph, n_cols, score_name)
    checks.ids("x_t", x_t, 0, n_cols)
    checks.ids("x0", x0, 0, n_cols, skip=ignore_index)
    if mask_id >= 0 and mask_id != ignore_index:  # ignored positions are skipped, whatever their id
        checks.add(x0 == mask_id, lambda: f"x0 contains the mask id {mask_id}; clean tokens cannot be masked")


def dce_mask_id(mask_id: int | None, n_cols: int, score_name: str = "logits") -> int:
    """The DCE mask id: default V - 1 (the last column); any id >= V means the logits hold real tokens only."""
    if mask_id is None:
        if n_cols < 2:
            raise ValueError(f"{score_name} need at least one real token column besides the mask column (V >= 2)")
        return n_cols - 1
    mask_id = v.as_int("mask_id", mask_id)
    if not 0 <= mask_id < 2**63:
        raise ValueError(f"mask_id must be a non-negative int64, got {mask_id!r}")
    if mask_id < n_cols and n_cols < 2:
        raise ValueError(f"{score_name} need at least one real token column besides the mask column")
    return mask_id


def check_dce_ids(checks: v.ValueChecks, x_t: torch.Tensor, x0: torch.Tensor, n_cols: int, mask_id: int,
                  ignore_index: int) -> None:
    """Id checks of the masked cross-entropy: x_t a token or the mask; x0 a token, never the mask."""
    checks.ids("x_t", x_t, 0, n_cols, allow=mask_id)
    checks.ids("x0", x0, 0, n_cols, skip=ignore_index)
    if mask_id != ignore_index:  # ignored positions are skipped, whatever their id
        checks.add(x0 == mask_id, lambda: f"x0 contains the mask id {mask_id}; clean tokens cannot be masked")


def _sigma_detail(sigma_dtype: torch.dtype, score_dtype: torch.dtype) -> str:
    """The end of the message for a sigma that is not positive and finite (it may have overflowed)."""
    return f" (in {sigma_dtype}, the accumulation dtype of {score_dtype} scores)"


def check_values_on_cpu(x_t: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor | None, n_cols: int, loss: str,
                         graph: int, mask_id: int, ignore_index: int, score_dtype: torch.dtype | None = None) -> None:
    """`check_dse_ids` / `check_dce_ids` of contiguous (N,) int64 CPU ids, and sigma > 0 (when given;
    per row or per sequence), in one pass of the C++ op ``check_loss_ids``: the same rules and
    messages, no torch ops of their own."""
    for name, t in (("x_t", x_t), ("x0", x0), ("sigma", sigma)) if torch._C._are_functorch_transforms_active() else ():
        if t is not None:
            _ops.refuse_vmap(name, t, "map over the scores only")
    try:
        _backend.kernel("cpu", "check_loss_ids")(x_t, x0, sigma, n_cols, _names.LOSS_CODES[loss], graph, mask_id,
                                                 ignore_index)
    except ValueError as error:
        if str(error).startswith("sigma") and score_dtype is not None:
            raise ValueError(f"{error}{_sigma_detail(sigma.dtype, score_dtype)}") from None
        raise


def _log_expm1(sigma: torch.Tensor) -> torch.Tensor:
    """log(e^sigma - 1), finite for every positive finite sigma (as `fastbound/elementwise.h`)."""
    big = sigma >= 20
    small = torch.where(big, torch.ones_like(sigma), sigma)
    return torch.where(big, sigma + torch.log1p(-torch.exp(-sigma)), torch.log(torch.expm1(small)))


class DseKernel:
    """Runs the score entropy op for fixed ids, and its per-row d loss / d sigma.

    Absorbing graph (l as in `dse_loss`, L = log(e^sigma - 1), r = e^-L):
    dl/dsigma = -r(1 + r)(log r - s_x0) = e^(sigma - 2L) (s_x0 + L) at masked positions.
    Uniform graph (a = e^sigma - 1, rho = a/(a + N), SEDD's ``Uniform.score_entropy``):
    x_t != x0: dl/dsigma = (1 + a)/a^2 (s_x0 + log rho);
    x_t == x0: dl/dsigma = rho(1 - rho)(1 + 1/a) ((N-1)/N log rho - (sum_y s_y - s_x_t)/N).
    """

    def __init__(self, backend, graph, mask_id, n_cols, x_t, x0, ignore_index, eager):
        self.eager = eager  # whether the ops may be called below the Autograd key (`fastbound._ops.below_autograd`)
        self.op, self.op_inplace = _backend.kernel(backend, "dse_forward"), _backend.kernel(backend, "dse_forward_inplace")
        self.code, self.mask_id, self.n_cols = graph, mask_id, n_cols
        self.x_t, self.x0, self.ignore_index = x_t, x0, ignore_index
        self.ints = (graph, mask_id, ignore_index)
        # The rows the op writes as zeros, which the backward's rescale skips (`fastbound._ops.chain_rows`):
        # x0 == ignore_index, and x_t != mask_id on the absorbing graph.
        absorb = graph == _names.GRAPH_CODES["absorb"]
        self.zero_ids, self.zero_ints = (x_t if absorb else None, x0), (mask_id if absorb else -1, ignore_index)
        self.scale = _backend.kernel(backend, "scale_rows_")

    def run(self, score, sigma, row_scale, need_grad):
        return self.op(score, sigma, self.x_t, self.x0, row_scale, *self.ints, need_grad)

    def run_inplace(self, score, sigma, row_scale):
        return self.op_inplace(score, sigma, self.x_t, self.x0, row_scale, *self.ints)

    def sigma_terms(self, score):
        acc = torch.float64 if score.dtype == torch.float64 else torch.float32
        live = self.x0 != self.ignore_index
        x0 = torch.where(live, self.x0, 0).clamp(0, max(score.shape[1] - 1, 0))[:, None]
        s_x0 = score.gather(1, x0)[:, 0].to(acc)
        if self.code == _names.GRAPH_CODES["absorb"]:
            return live & (self.x_t == self.mask_id), s_x0, None
        s_xt = score.gather(1, self.x_t[:, None])[:, 0].to(acc)
        return live, s_x0, score.sum(1, dtype=acc) - s_xt

    def dloss_dsigma(self, terms, sigma):
        live, s_x0, rest = terms
        log_a = _log_expm1(sigma)
        if rest is None:
            d = torch.exp(sigma - 2 * log_a) * (s_x0 + log_a)
        else:
            n = float(self.n_cols)
            inv_a = torch.exp(-log_a)
            log_rho = -torch.log1p(n * inv_a)
            rho = torch.exp(log_rho)
            same = self.x_t == self.x0
            d_same = rho * -torch.expm1(log_rho) * (1 + inv_a) * ((n - 1) / n * log_rho - rest / n)
            d_other = inv_a * (1 + inv_a) * (s_x0 + log_rho)
            d = torch.where(same, d_same, d_other)
        return torch.where(live, d, torch.zeros_like(d))


class DceKernel:
    """Runs the masked cross-entropy op for fixed ids (no sigma)."""

    def __init__(self, backend, mask_id, x_t, x0, ignore_index, eager):
        self.eager = eager  # as in `DseKernel`
        self.op, self.op_inplace = _backend.kernel(backend, "dce_forward"), _backend.kernel(backend, "dce_forward_inplace")
        self.x_t, self.x0, self.ints = x_t, x0, (mask_id, ignore_index)
        self.zero_ids, self.zero_ints = (x_t, x0), self.ints  # as in `DseKernel`
        self.scale = _backend.kernel(backend, "scale_rows_")

    def run(self, score, sigma, row_scale, need_grad):
        return self.op(score, self.x_t, self.x0, row_scale, *self.ints, need_grad)

    def run_inplace(self, score, sigma, row_scale):
        return self.op_inplace(score, self.x_t, self.x0, row_scale, *self.ints)


def _run(flat, sigma, row_scale, kernel, inplace: bool) -> torch.Tensor:
    """Calls the fused op through `fastbound._ops.FusedLoss` and returns per-row losses.

    Without any gradient to compute (no_grad, inference, detached inputs) the op is called
    directly, below the Autograd key (no autograd.Function, no Python autograd wrapper).
    """
    grad_on = torch.is_grad_enabled()
    if _ops.forward_mode():
        tangents = [t is not None and _ops.has_tangent(t) for t in (flat, sigma, row_scale)]
    else:
        tangents = [False, False, False]
    need_grad = (grad_on and flat.requires_grad) or tangents[0]
    need_sigma = sigma is not None and ((grad_on and sigma.requires_grad) or tangents[1])
    need_scale = (grad_on and row_scale.requires_grad) or tangents[2]
    if not (need_grad or need_scale or need_sigma or torch._C._are_functorch_transforms_active()):
        with _ops.below_autograd(kernel.eager):
            return kernel.run(flat, sigma, row_scale, False)[0]
    function = _ops.function(any(tangents))
    return function.apply(flat, sigma, row_scale, kernel, need_grad, inplace and need_grad, need_sigma, need_scale)[0]


def _reduce(rows: torch.Tensor, shape: torch.Size, reduction: str) -> torch.Tensor:
    return rows.view(shape) if reduction == "none" else rows.sum()


_FAST = v.SignatureTable(_MAX_CHECKED)
"""`_fast_key` signatures already validated by a call through the full path -> whether they take
`_fast_loss` (the CPU kernels ran)."""
_REDUCTION_CODES = {name: code for code, name in enumerate(REDUCTIONS)}
_FLOAT_MAX = {torch.float32: torch.finfo(torch.float32).max, torch.float64: torch.finfo(torch.float64).max}


def _rows_meta(value: object) -> object:
    """What `v.as_rows` checks of a weight or sigma without reading it; False: not a fast-path argument."""
    if value is None:
        return None
    kind = type(value)
    if kind is float or kind is int:
        return kind
    if kind not in v.PLAIN or value.requires_grad and torch.is_grad_enabled() or value.is_neg():
        return False  # a negative view (`conj().imag`): the C++ op reads the stored bits
    return value.dtype, value.shape, value.device, value.layout


def _fast_key(loss: str, score, x_t, x0, weight, sigma, reduction, ignore_index, backend, inplace) -> tuple | None:
    """The signature of a call `_fast_loss` may run (None: the full path, always): eager CPU tensors,
    gradients to the scores only, no forward-mode AD, not in place. Reads no data."""
    if inplace is not False or _ops.forward_mode() or torch._C._are_functorch_transforms_active():
        return None  # torch.func's wrapper tensors have no storage: the full path handles (or refuses) them
    key = _signature(score, x_t, x0, reduction, ignore_index, backend)
    if key is None or score.device.type != "cpu" or score.dtype == torch.float16:
        return None  # fp16: the full path, whose backward recomputes a rescaled gradient (`fastbound._ops`)
    weight_meta, sigma_meta = _rows_meta(weight), _rows_meta(sigma)
    if weight_meta is False or sigma_meta is False:
        return None
    return loss, key, weight_meta, sigma_meta


def _remember(key: tuple | None) -> None:
    """After a call through the full path: its signature is valid, and fast if it ran on the CPU kernels."""
    if key is not None:
        _FAST.remember(key, _CHECKED.get(key[1]) == "cpu")


def _acc(score: torch.Tensor) -> torch.dtype:
    return torch.float64 if score.dtype == torch.float64 else torch.float32


def _fast_weight(weight: float | torch.Tensor | None, acc: torch.dtype) -> tuple | None:
    """(weight tensor or None, float for every row) as ``fused_loss`` takes them; None: a float
    that overflows ``acc`` (the full path names it)."""
    if weight is None or isinstance(weight, torch.Tensor):
        return weight, 1.0
    weight = float(weight)
    return None if abs(weight) > _FLOAT_MAX[acc] else (None, weight)


def _fast_sigma(sigma: float | torch.Tensor, acc: torch.dtype) -> tuple:
    """(sigma tensor or None, float) as ``fused_loss`` takes them; a float is checked here."""
    if isinstance(sigma, torch.Tensor):
        return sigma, 0.0
    _check_float_sigma(sigma, acc)
    return None, float(sigma)


def _fast_loss(score, sigma_args: tuple, x_t, x0, weight_args: tuple, loss: str, graph: int, mask_id: int,
               ignore_index: int, reduction: str) -> torch.Tensor:
    """The loss through the one C++ op ``fused_loss`` (arguments from `_fast_sigma`, `_fast_weight`)."""
    try:
        return _backend.kernel("cpu", "fused_loss")(score, *sigma_args, x_t, x0, *weight_args, _names.LOSS_CODES[loss],
                                                   graph, mask_id, ignore_index, _REDUCTION_CODES[reduction])
    except ValueError as error:
        if str(error).startswith("sigma"):
            raise ValueError(f"{error}{_sigma_detail(_acc(score), score.dtype)}") from None
        raise


def dse_loss(
    score: torch.Tensor,
    sigma: float | torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    *,
    graph: Literal["absorb", "uniform"] = "absorb",
    mask_id: int | None = None,
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
            (SEDD passes ``sigma[:, None]``); positive and finite. May require grad
            (learnable schedules): its gradient is per row, no (N, V) pass.
        x_t: noisy ids, ``score.shape[:-1]``.
        x0: clean ids, ``score.shape[:-1]``; positions equal to ``ignore_index`` contribute nothing.
        graph: ``"absorb"`` (only positions with ``x_t == mask_id`` contribute) or
            ``"uniform"`` (N = V states; every position contributes).
        mask_id: the absorbing graph's mask column, any column of ``score``; default ``V - 1``
            (SEDD's layout). Its score is ignored (gradient 0). Unused by the uniform graph.
        weight: multiplies the per-position loss (e.g. SEDD's ``dsigma``); broadcastable to ``x_t``.
            Passing the per-position factors here keeps the backward free; may require grad.
        reduction: ``"none"`` (``x_t``'s shape), ``"sum"``, or ``"mean"`` (sum divided by the
            number of positions whose ``x0`` is not ``ignore_index``).
        inplace: overwrite ``score`` with the gradient (saves one (N, V) buffer; ``score``
            is clobbered and marked modified, so autograd raises if it was saved for another
            op's backward; refused for a leaf that requires grad). For fp16 the backward
            then rescales the fp16 gradient by its upstream, which loses the values that were
            subnormal before it (pass a GradScaler's scale in ``weight=`` instead); without
            ``inplace`` an fp16 backward recomputes the gradient with the upstream in.
        backend: ``None``/``"auto"``, ``"cpu"``, ``"cuda"`` or ``"triton"`` (see `fastbound._backend`).

    Absorbing graph with mask column m, :math:`r = 1/(e^\sigma - 1)` (Lou et al. 2024, SEDD, the
    absorbing score entropy), at positions with :math:`x_t = m`:

    .. math:: \ell = \sum_{y \ne m} e^{s_y} - r\, s_{x_0} + r(\log r - 1)

    Uniform graph: SEDD's ``Uniform.score_entropy`` with :math:`\rho = a/(a+N)`, :math:`a = e^\sigma-1`
    (see `fastbound.reference.dse_uniform`). Returns float32 (float64 for float64 scores).
    """
    if not isinstance(graph, str) or graph not in _names.GRAPH_CODES:  # a list is unhashable
        v.check_choice("graph", graph, _names.GRAPH_CODES)
    key = _fast_key("dse", score, x_t, x0, weight, sigma, reduction, ignore_index, backend, inplace)
    if _FAST.get(key):
        acc = _acc(score)
        weight_args = _fast_weight(weight, acc)
        if weight_args is not None:
            mask = dse_mask_id(mask_id, graph, score.shape[-1])
            return _fast_loss(score, _fast_sigma(sigma, acc), x_t, x0, weight_args, "dse", _names.GRAPH_CODES[graph],
                              mask, ignore_index, reduction)
    ignore_index = v.check_int64("ignore_index", ignore_index)
    flat, (xt, x0f), row_scale, kernel_backend, eager = _prepare(
        score, x_t, x0, weight, reduction, ignore_index, backend, inplace, "score"
    )
    n_cols = flat.shape[1]
    mask = dse_mask_id(mask_id, graph, n_cols)
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
        _check_float_sigma(sigma, row_scale.dtype)
    sigma_rows = v.as_rows("sigma", sigma, x_t.shape, row_scale.dtype, flat.device, differentiable=True)
    code = _names.GRAPH_CODES[graph]
    if eager:
        if flat.device.type in v.HOST_DEVICES:
            sigma_check = None  # a float sigma was checked above
            if isinstance(sigma, torch.Tensor):
                sigma_check = sigma_rows.detach() if sigma_rows.requires_grad else sigma_rows
            check_values_on_cpu(xt, x0f, sigma_check, n_cols, "dse", code, mask, ignore_index, flat.dtype)
        else:
            checks = v.ValueChecks()
            check_dse_ids(checks, graph, xt, x0f, n_cols, ignore_index, mask_id=mask if mask >= 0 else None)
            checks.positive_finite("sigma", sigma_rows.detach(), _sigma_detail(sigma_rows.dtype, flat.dtype))
            checks.run()
    kernel = DseKernel(kernel_backend, code, mask, n_cols, xt, x0f, ignore_index, eager)
    out = _reduce(_run(flat, sigma_rows, row_scale, kernel, inplace), x_t.shape, reduction)
    _remember(key)
    return out


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

    .. math:: \ell = -\log \mathrm{softmax}(\text{logits}_{y \ne \text{mask}})_{x_0}

    times ``weight`` (e.g. :math:`\sigma'/(e^\sigma - 1)`, which is 1/t for the log-linear
    schedule; see `fastbound.schedules`), and 0 elsewhere (Sahoo et al. 2024, MDLM's SUBS
    parameterisation).

    Args:
        logits: (..., V) logits or log-probabilities (fp32, bf16, fp16 or fp64).
        x_t, x0: noisy and clean ids, ``logits.shape[:-1]``.
        mask_id: the mask token. Default ``V - 1``, the last column. When ``mask_id < V``
            only that column is left out of the softmax: every other column, before or after
            it, enters the softmax (MDLM's SUBS, infodis's RADD); when ``mask_id >= V`` the
            logits cover the real tokens only. A NumPy integer is accepted.
        weight, reduction, ignore_index, inplace, backend: as in `dse_loss`.

    Returns float32 (float64 for float64 logits); gradients flow to ``logits`` and ``weight``.
    """
    key = _fast_key("dce", logits, x_t, x0, weight, None, reduction, ignore_index, backend, inplace)
    if _FAST.get(key):
        weight_args = _fast_weight(weight, _acc(logits))
        if weight_args is not None:
            mask = dce_mask_id(mask_id, logits.shape[-1])
            return _fast_loss(logits, (None, 0.0), x_t, x0, weight_args, "dce", _names.GRAPH_CODES["absorb"], mask,
                              ignore_index, reduction)
    ignore_index = v.check_int64("ignore_index", ignore_index)
    flat, (xt, x0f), row_scale, kernel_backend, eager = _prepare(
        logits, x_t, x0, weight, reduction, ignore_index, backend, inplace, "logits"
    )
    n_cols = flat.shape[1]
    mask_id = dce_mask_id(mask_id, n_cols)
    if eager and flat.device.type in v.HOST_DEVICES:
        check_values_on_cpu(xt, x0f, None, n_cols, "dce", _names.GRAPH_CODES["absorb"], mask_id, ignore_index)
    elif eager:
        checks = v.ValueChecks()
        check_dce_ids(checks, xt, x0f, n_cols, mask_id, ignore_index)
        checks.run()
    kernel = DceKernel(kernel_backend, mask_id, xt, x0f, ignore_index, eager)
    out = _reduce(_run(flat, None, row_scale, kernel, inplace), x_t.shape, reduction)
    _remember(key)
    return out
