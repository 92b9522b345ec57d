r"""The training objective: corrupt a batch, run the denoiser, and score it with a diffusion loss.

For a batch of clean sequences :math:`x_0` (B, L), one step draws times :math:`t_b` (antithetic,
`fastbound.sample_times`), noise levels :math:`\sigma(t_b)` from the schedule, a corruption
:math:`x_t \sim q(x_t \mid x_0)` (`fastbound.perturb`), and returns

.. math:: \mathcal{L} = \frac{1}{B L} \sum_{b, i} w(t_b)\, \ell(x_t, x_0)_{b,i},

a Monte-Carlo estimate of the diffusion bound on :math:`-\log p(x_0)` in nats per token:

* ``loss="dce"`` (absorbing graph only): :math:`\ell` is the masked cross-entropy and
  :math:`w = \sigma'/(e^\sigma - 1)` (MDLM, Sahoo et al. 2024; I-MDCE of Jeon et al. 2025).
* ``loss="dse"``: :math:`\ell` is the score entropy and :math:`w = \sigma'` (SEDD, Lou et al. 2024).
  On the absorbing graph the log-score of unmasking to ``y`` is the denoiser's logit minus
  :math:`\log(e^\sigma - 1)` and :math:`\log(K)` (SEDD's ``scale_by_sigma``), so the same
  logits serve as a denoiser for the DCE-based NLL estimate; on the uniform graph the outputs are
  the log-scores themselves.

Every random draw is keyed by ``(seed, step)`` and a counter, never by a stateful generator:
step ``s`` corrupts exactly the same way whether the run was resumed or not, and a rank that
holds rows ``[r0, r1)`` of the global batch draws exactly those rows' noise (the counter of
`fastbound.perturb` is the flat element index plus ``offset``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch

import fastbound
from fastbound import reference, schedules

TIME_EPS = 1e-3

# Sub-streams of the run's seed (`fastbound.derive_seed`): the times and the corruption must
# not share random numbers.
_TIMES_STREAM = 1
_NOISE_STREAM = 2


@dataclass(frozen=True)
class Objective:
    """A diffusion loss over ``num_tokens`` real tokens (plus the mask, on the absorbing graph).

    ``oracle=True`` computes the same loss with `fastbound.reference` instead of the fused kernels.
    """

    loss: str
    graph: str
    schedule: schedules.Schedule
    num_tokens: int
    oracle: bool = False
    backend: str | None = None

    def __post_init__(self):
        if self.loss not in fastbound.LOSSES:
            raise ValueError(f"loss must be one of {fastbound.LOSSES}, got {self.loss!r}")
        if self.graph not in fastbound.GRAPHS:
            raise ValueError(f"graph must be one of {fastbound.GRAPHS}, got {self.graph!r}")
        if self.loss == "dce" and self.graph != "absorb":
            raise ValueError("the DCE loss is defined for the absorbing graph only; use --loss dse with --graph uniform")

    @property
    def mask_id(self) -> int | None:
        return self.num_tokens if self.graph == "absorb" else None

    @property
    def model_vocab(self) -> int:
        """Columns of the denoiser's output: the real tokens, plus the mask on the absorbing graph."""
        return self.num_tokens + (self.graph == "absorb")

    def times(self, seed: int, step: int, global_batch: int, device: torch.device) -> torch.Tensor:
        """(global_batch,) antithetic times of ``step`` in [eps, 1] (VDM; infodis)."""
        stream = fastbound.NoiseStream(fastbound.derive_seed(seed, _TIMES_STREAM), offset=step * global_batch)
        return fastbound.sample_times(global_batch, method="antithetic", eps=TIME_EPS, seed=stream.seed,
                                      offset=stream.take(global_batch), device=device, backend=self._noise_backend)

    def corrupt(self, x0: torch.Tensor, sigma: torch.Tensor, seed: int, counter: int) -> torch.Tensor:
        """x_t for rows of ``x0`` whose first element has flat index ``counter`` in this step's noise."""
        stream = fastbound.NoiseStream(fastbound.derive_seed(seed, _NOISE_STREAM), offset=counter)
        return fastbound.perturb(
            x0, sigma=sigma[:, None], graph=self.graph, vocab_size=self.num_tokens, mask_id=self.mask_id,
            seed=stream.seed, offset=stream.take(x0.numel()), backend=self._noise_backend,
        ).x_t

    @property
    def _noise_backend(self) -> str | None:
        """The noise is the same bits on every backend; the oracle run draws it with the default one."""
        return None if self.oracle else self.backend

    def __call__(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x0: torch.Tensor,
        *,
        seed: int,
        step: int,
        rows: slice,
        global_batch: int,
        autocast: torch.autocast | None = None,
        head: torch.nn.Linear | None = None,
    ) -> torch.Tensor:
        """Mean loss (nats/token) of this process's ``rows`` of the global batch of ``step``.

        ``x0`` holds only those rows. With DDP averaging the gradients of equal-size shards, the
        update equals that of one process on the whole batch. With ``head`` (the model's final
        linear layer) the model is called with ``features=True`` and the loss is the fused
        output-layer loss on its hidden states (`fastbound.fused_linear_dce_loss` /
        `fastbound.fused_linear_dse_loss`): the same loss, without the (B, L, V) logits.
        """
        b, seq_len = x0.shape
        t = self.times(seed, step, global_batch, x0.device)[rows]
        sigma = self.schedule.total(t)
        # Step s uses counters [s*B*L, (s+1)*B*L); this shard starts at row rows.start.
        counter = (step * global_batch + rows.start) * seq_len
        x_t = self.corrupt(x0, sigma, seed, counter)
        with autocast if autocast is not None else contextlib.nullcontext():
            out = model(x_t, sigma) if head is None else model(x_t, sigma, features=True)
        if head is None:
            total = self._loss(out, t, sigma, x_t, x0)
        else:
            total = self._fused_loss(out, head, autocast, t, sigma, x_t, x0)
        return total / (b * seq_len)

    def _fused_loss(self, hidden, head, autocast, t, sigma, x_t, x0) -> torch.Tensor:
        """`_loss` of ``head(hidden)``, from the hidden states and the head's parameters.

        Under autocast the head's matmul runs in the autocast dtype, as ``head(hidden)`` would
        (the fused pass accumulates its gradients in fp32).
        """
        if self.oracle:
            raise ValueError("the fused head is a fastbound kernel; the oracle run uses the unfused losses")
        dtype = autocast.fast_dtype if autocast is not None else hidden.dtype
        hidden, weight = hidden.to(dtype), head.weight.to(dtype)
        bias = None if head.bias is None else head.bias.to(dtype)
        if self.loss == "dce":
            return fastbound.fused_linear_dce_loss(
                hidden, weight, bias, x_t, x0, mask_id=self.mask_id, loss_weight=self.schedule.dce_weight(t)[:, None],
                reduction="sum", backend=self.backend,
            )
        # SEDD's shift on the absorbing graph (see `_loss`), applied inside the fused pass.
        return fastbound.fused_linear_dse_loss(
            hidden, weight, bias, sigma[:, None], x_t, x0, graph=self.graph, mask_id=self.mask_id,
            loss_weight=self.schedule.dse_weight(t)[:, None], reduction="sum",
            score_param="sedd" if self.graph == "absorb" else "raw", backend=self.backend,
        )

    def _loss(self, out, t, sigma, x_t, x0) -> torch.Tensor:
        """Summed weighted loss of one batch."""
        lib = reference if self.oracle else fastbound
        kernel = {} if self.oracle else {"backend": self.backend}
        if self.loss == "dce":
            w = self.schedule.dce_weight(t)[:, None]
            return lib.dce_loss(out, x_t, x0, mask_id=self.mask_id, weight=w, reduction="sum", **kernel)
        if self.graph == "absorb":
            shift = torch.log(torch.expm1(sigma)) + math.log(self.num_tokens)
            out = out.float() - shift[:, None, None]  # in fp32: the shift is large next to bf16's ulp
        return lib.dse_loss(
            out, sigma[:, None], x_t, x0, graph=self.graph, weight=self.schedule.dse_weight(t)[:, None],
            reduction="sum", **kernel
        )
