r"""The fused output-layer pass: contributing rows, chunk size, and one chunk's scores and row losses.

A model that ends in a linear layer computes its (N, V) scores as
:math:`s = h W^\top + b`. The fused losses and the fused integration step never form all
of them: they gather the rows that contribute (absorbing DSE and DCE: masked positions;
uniform DSE: every position; in both cases not those whose ``x0`` is ``ignore_index``),
and per chunk of those rows compute the chunk's scores with one matmul and hand them to
the row kernels of `fastbound.losses` (``dse_forward`` / ``dce_forward``), which return
the per-row losses and, when asked, overwrite the scores with their gradient.

The chunk GEMMs run in `gemm_dtype`: the inputs' dtype, except bf16/fp16 on a CPU without
half-precision matrix instructions, where they run in fp32 on upcast operands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import _backend, _names
from .. import _validate as v

LOSSES = ("dse", "dce")
SCORE_PARAMS = ("raw", "sedd")

CHUNK_BYTES_MAX = 256 * 2**20
MIN_CHUNK_ROWS = 64


def chunk_rows(hidden_size: int, vocab_size: int, dtype: torch.dtype) -> int:
    r"""Rows per chunk: the chunk's (rows, V) scores take the bytes of an fp32 (V, H) matrix.

    That is the size of the weight-gradient accumulator the backward holds anyway, so the
    scores never dominate the memory of the fused pass: ``rows = min(4 V H, 256 MiB) /
    (V * itemsize)`` with the itemsize of the scores (`gemm_dtype`), at least 64 rows (H fp32
    rows, 2H bf16 rows for H up to 2048 at V = 32768). The matmul of a chunk is then (rows × H) @ (H × V), large enough to run at
    the GEMM's full speed.
    """
    budget = min(4 * vocab_size * hidden_size, CHUNK_BYTES_MAX)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(MIN_CHUNK_ROWS, budget // max(1, vocab_size * itemsize))


def _cpu_has_half_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices natively (AVX512-BF16 / AMX); False when torch cannot tell."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported") if dtype == torch.bfloat16 else (
        "_is_amx_fp16_supported",)
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the chunk GEMMs (and of the chunk's scores) for inputs of ``dtype`` on ``device``.

    On a CPU without native half-precision GEMM instructions (AVX2 hosts) torch's bf16/fp16
    GEMMs convert panels on the fly and run 4-6x slower than fp32 (measured at
    (512 x 512) @ (512 x 32768)); there the weight is upcast once per call (one fp32 (V, H)
    copy, the size of the fp32 weight-gradient accumulator) and every chunk's hidden rows as
    they are gathered. The scores then keep fp32 precision instead of being rounded to
    bf16/fp16, which can only bring the result closer to the exact one. GPUs and CPUs with
    AVX512-BF16/AMX keep the inputs' dtype, with fp32 accumulation inside the GEMM.
    """
    if dtype in (torch.bfloat16, torch.float16) and device.type == "cpu" and not _cpu_has_half_gemm(dtype):
        return torch.float32
    return dtype


@dataclass(frozen=True)
class HeadSpec:
    """What one fused pass computes (the integer codes travel through the custom op's schema)."""

    loss: str  # "dse" or "dce"
    graph: int  # `fastbound._names.GRAPH_CODES`; absorb for DCE
    mask_id: int  # absorbing mask column (DSE: V - 1), DCE mask id (>= V: no mask column)
    ignore_index: int
    sedd: bool  # SEDD's score parametrisation (absorbing DSE)
    chunk: int  # rows per chunk
    backend: str

    def as_args(self) -> tuple:
        return (self.loss, self.graph, self.mask_id, self.ignore_index, self.sedd, self.chunk, self.backend)


def check_head(hidden: object, weight: object, bias: object) -> tuple[torch.Tensor, int, int]:
    """Shape, dtype and device checks of (hidden, weight, bias); returns (hidden as (N, H), V, H)."""
    hidden = v.check_float_tensor("hidden", hidden)
    weight = v.check_float_tensor("weight", weight)
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., H), got a scalar")
    n_hidden = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != n_hidden:
        raise ValueError(
            f"weight must have shape (V, H) with H = hidden.shape[-1] = {n_hidden}, got {tuple(weight.shape)}"
        )
    n_cols = weight.shape[0]
    if bias is not None:
        bias = v.check_float_tensor("bias", bias)
        if bias.shape != (n_cols,):
            raise ValueError(f"bias must have shape (V,) = ({n_cols},) or be None, got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but hidden has {hidden.dtype}; cast them to one dtype")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}; move it to {hidden.device}")
    if n_cols < 1:
        raise ValueError("weight must have at least one row (V >= 1)")
    n = math.prod(hidden.shape[:-1])
    v.check_size("hidden", n, "positions")
    v.check_size("weight", n_cols, "rows (vocabulary columns)")
    return hidden.reshape(n, n_hidden), n_cols, n_hidden


def check_chunk_size(chunk_size: object, n_hidden: int, n_cols: int, hidden: torch.Tensor) -> int:
    """``chunk_size`` (rows per chunk) or the automatic rule `chunk_rows` for the scores' dtype."""
    if chunk_size is None:
        return chunk_rows(n_hidden, n_cols, gemm_dtype(hidden.dtype, hidden.device))
    return v.as_int("chunk_size", chunk_size, minimum=1)


def check_score_param(score_param: str, loss: str, graph: str) -> bool:
    """True for SEDD's parametrisation, which its model defines for the absorbing graph only."""
    v.check_choice("score_param", score_param, SCORE_PARAMS)
    if score_param == "sedd" and (loss != "dse" or graph != "absorb"):
        raise ValueError(
            "score_param='sedd' is SEDD's absorbing-graph parametrisation (its model asserts graph=absorb "
            "when scaling by sigma); use score_param='raw' here"
        )
    return score_param == "sedd"


def contributing_rows(spec: HeadSpec, x_t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Indices of the rows whose loss can be non-zero: masked (absorbing) or all, and not ignored."""
    keep = x0 != spec.ignore_index
    if spec.graph == _names.GRAPH_CODES["absorb"]:
        keep &= x_t == spec.mask_id
    return keep.nonzero().squeeze(1)


def sedd_shift(sigma: torch.Tensor, n_cols: int, dtype: torch.dtype) -> torch.Tensor:
    r"""SEDD's per-row offset :math:`\log(e^\sigma - 1)` in the scores' dtype (add :math:`\log(V-1)`).

    SEDD's absorbing model (``scale_by_sigma``; Lou et al. 2024, ``model/transformer.py``)
    outputs :math:`s - \log(e^\sigma - 1) - \log(V - 1)` with the column of :math:`x_t`
    set to 0. We take :math:`e^\sigma - 1` with ``expm1`` everywhere (SEDD switches to
    ``exp(σ) - 1`` above σ = 0.5; both are accurate there).
    """
    return torch.expm1(sigma).log().to(dtype)


def chunk_scores(spec: HeadSpec, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 rows: torch.Tensor, sigma: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, s): the chunk's hidden rows (c, H) and scores h W^T + b (c, V), parametrised as asked.

    ``weight`` and ``bias`` are in the GEMM dtype (`gemm_dtype`); the rows are cast to it.
    """
    h = hidden.index_select(0, rows).to(weight.dtype)
    s = torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())
    if spec.sedd:
        s.sub_(sedd_shift(sigma, s.shape[1], s.dtype)[:, None]).sub_(math.log(s.shape[1] - 1))
        s.scatter_(1, x_t[:, None], 0.0)
    return h, s


def row_losses(spec: HeadSpec, scores: torch.Tensor, sigma: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor,
               row_scale: torch.Tensor, need_grad: bool) -> torch.Tensor:
    """Per-row losses (times ``row_scale``) of a chunk; with ``need_grad`` ``scores`` becomes their gradient."""
    if spec.loss == "dse":
        name, ids, codes = "dse_forward", (sigma, x_t, x0, row_scale), (spec.graph, spec.mask_id, spec.ignore_index)
    else:
        name, ids, codes = "dce_forward", (x_t, x0, row_scale), (spec.mask_id, spec.ignore_index)
    if need_grad:
        return _backend.kernel(spec.backend, name + "_inplace")(scores, *ids, *codes)
    return _backend.kernel(spec.backend, name)(scores, *ids, *codes, False)[0]
