r"""The ``head=`` mode of the estimators: a denoiser that returns hidden states, plus its output layer.

With ``head=(weight, bias)`` the denoiser returns (B, L, H) hidden states :math:`h` and its
scores are :math:`s = hW^\top + b`. The estimate is the same as on the materialised scores,
but each chunk's integrand comes from `fastbound.fused_linear.head_integrate_step`, which
forms the scores of the contributing rows only (masked positions on the absorbing graph), a
chunk of rows at a time, so the (B, L, V) output never exists (issue 10).
"""

from __future__ import annotations

import torch

from .. import _validate as v
from ..fused_linear import head_integrate_step
from .loop import Step
from .options import Options


def check_head(head: object, options: Options, device: torch.device) -> tuple[Step, tuple[int, int]]:
    """The integration step and the allowed hidden width of ``head=(weight, bias)``.

    ``weight`` is (V, H) with V the width the denoiser output would have (`Options.output_width`),
    ``bias`` (V,) or None, both floating point of one dtype on the device of the sequences.
    """
    if not isinstance(head, (tuple, list)) or len(head) not in (1, 2):
        raise TypeError(f"head must be a tuple (weight, bias) or (weight,), got {type(head).__name__}"
                        + (f" of length {len(head)}" if isinstance(head, (tuple, list)) else ""))
    weight, bias = (head[0], None) if len(head) == 1 else head
    weight = v.check_float_tensor("head weight", weight)
    if weight.dim() != 2 or weight.shape[1] < 1:
        raise ValueError(f"head weight must have shape (V, H), got {tuple(weight.shape)}")
    n_cols = weight.shape[0]
    lo, hi = options.output_width()
    if not lo <= n_cols <= hi:
        expected = f"{lo}" if lo == hi else f">= {lo}"
        raise ValueError(f"head weight must have V = {expected} rows for loss={options.loss!r}, "
                         f"graph={options.graph!r}, vocab_size={options.vocab_size}, mask_id={options.mask_id} "
                         f"(the columns of the scores), got {n_cols}")
    if bias is not None:
        bias = v.check_float_tensor("head bias", bias)
        if bias.shape != (n_cols,):
            raise ValueError(f"head bias must have shape (V,) = ({n_cols},) or be None, got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"head bias has dtype {bias.dtype} but head weight has {weight.dtype}")
    for name, t in (("head weight", weight), ("head bias", bias)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but x0 is on {device}; move it to {device}")
    weight, bias = weight.detach(), None if bias is None else bias.detach()

    def step(hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return head_integrate_step(hidden, weight, bias, *args, **kwargs)

    return step, (weight.shape[1], weight.shape[1])
