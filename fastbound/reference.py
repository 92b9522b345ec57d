r"""The oracle: plain PyTorch versions of every fastbound op, written for clarity.

Every kernel is tested against these functions. They compute in float32 (float64
for float64 inputs), use dense (..., V) tensors and autograd, and follow the
papers' formulas term by term:

* SEDD — Lou, Meng & Ermon, "Discrete Diffusion Modeling by Estimating the Ratios
  of the Data Distribution", ICML 2024 (score entropy, absorbing and uniform graphs;
  `graph_lib.py` of the authors' code).
* MDLM — Sahoo et al., "Simple and Effective Masked Diffusion Language Models",
  NeurIPS 2024 (cross-entropy with the SUBS parameterisation).
* infodis — Jeon et al., "Information-Theoretic Discrete Diffusion", 2025
  (I-MDSE / I-MDCE: these losses integrated over the noise level equal -log p(x0)).
"""

from __future__ import annotations

import torch


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.dtype == torch.float64 else t.float()


def _like(value, ref: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=ref.dtype, device=ref.device)


def dse_absorb(score: torch.Tensor, sigma, x_t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    r"""Absorbing-graph score entropy per position (SEDD ``Absorbing.score_entropy``).

    With the mask at column V-1 and :math:`r = 1/(e^\sigma - 1)`, at positions where
    :math:`x_t` is the mask:

    .. math:: \ell = \sum_{y \ne \text{mask}} e^{s_y} - r\, s_{x_0} + r(\log r - 1),

    and 0 elsewhere.
    """
    s = _acc(score)
    sigma = _like(sigma, s).expand(x_t.shape)
    r = 1.0 / torch.expm1(sigma)
    masked = x_t == s.shape[-1] - 1
    x0_safe = torch.where(masked, x0, torch.zeros_like(x0))
    pos = s[..., :-1].exp().sum(-1)
    neg = r * s.gather(-1, x0_safe[..., None]).squeeze(-1)
    const = r * (r.log() - 1)
    return torch.where(masked, pos - neg + const, torch.zeros_like(pos))


def dse_uniform(score: torch.Tensor, sigma, x_t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    r"""Uniform-graph score entropy per position (SEDD ``Uniform.score_entropy``).

    N = V states, :math:`a = e^\sigma - 1`, :math:`\rho = a / (a + N)`:

    * pos :math:`= \frac1N \sum_y e^{s_y} - \frac1N e^{s_{x_t}}`
    * neg :math:`= \rho(\bar s - s_{x_t}/N)` if :math:`x_t = x_0`, else
      :math:`s_{x_0}/a + \bar s - s_{x_t}/N`
    * const :math:`= \frac{N-1}{N}\rho(\log\rho - 1)` if :math:`x_t = x_0`, else
      :math:`((-\log\rho - 1)/\rho - (N - 2))/N`

    and :math:`\ell` = pos - neg + const at every position.
    """
    s = _acc(score)
    n = s.shape[-1]
    sigma = _like(sigma, s).expand(x_t.shape)
    a = torch.expm1(sigma)
    rho = a / (a + n)
    same = x_t == x0
    s_xt = s.gather(-1, x_t[..., None]).squeeze(-1)
    s_x0 = s.gather(-1, x0.clamp(0, n - 1)[..., None]).squeeze(-1)
    neg_base = s.mean(-1) - s_xt / n
    neg = torch.where(same, rho * neg_base, s_x0 / a + neg_base)
    const = torch.where(
        same,
        (n - 1) / n * rho * (rho.log() - 1),
        ((-rho.log() - 1) / rho - (n - 2)) / n,
    )
    sexp = s.exp()
    pos = sexp.mean(-1) - sexp.gather(-1, x_t[..., None]).squeeze(-1) / n
    return pos - neg + const


def _weigh_and_reduce(loss, x0, weight, reduction, ignore_index):
    keep = x0 != ignore_index
    if weight is not None:
        loss = loss * _like(weight, loss)
    loss = torch.where(keep, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / keep.sum().clamp_min(1)


def dse_loss(score, sigma, x_t, x0, *, graph="absorb", weight=None, reduction="none", ignore_index=-100):
    """Oracle for `fastbound.dse_loss` (same arguments, no kernels)."""
    fn = dse_absorb if graph == "absorb" else dse_uniform
    keep = x0 != ignore_index
    x0_safe = torch.where(keep, x0, torch.zeros_like(x0))
    return _weigh_and_reduce(fn(score, sigma, x_t, x0_safe), x0, weight, reduction, ignore_index)


def dce(logits: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, mask_id: int | None = None) -> torch.Tensor:
    r"""Masked cross-entropy per position (MDLM): :math:`-\log \mathrm{softmax}(z)_{x_0}` where
    :math:`x_t` is the mask, 0 elsewhere; the mask column (when ``mask_id < V``) is excluded
    from the softmax, as MDLM's SUBS parameterisation does.
    """
    z = _acc(logits)
    n = z.shape[-1]
    mask_id = n - 1 if mask_id is None else mask_id
    if mask_id < n:
        z = z.index_fill(-1, torch.tensor([mask_id], device=z.device), float("-inf"))
    logp = z.log_softmax(-1)
    masked = x_t == mask_id
    x0_safe = torch.where(masked, x0, torch.zeros_like(x0))
    nll = -logp.gather(-1, x0_safe[..., None]).squeeze(-1)
    return torch.where(masked, nll, torch.zeros_like(nll))


def dce_loss(logits, x_t, x0, *, mask_id=None, weight=None, reduction="none", ignore_index=-100):
    """Oracle for `fastbound.dce_loss` (same arguments, no kernels)."""
    keep = x0 != ignore_index
    x0_safe = torch.where(keep, x0, torch.zeros_like(x0))
    return _weigh_and_reduce(dce(logits, x_t, x0_safe, mask_id), x0, weight, reduction, ignore_index)


# =============================================================================
# Likelihood estimators (I-MDCE / I-MDSE): oracles of the integration step and
# of the estimators. Everything below belongs to `fastbound.integrate` and
# `fastbound.estimators`.
# =============================================================================


def integrate_step(out, x_t, x0, sigma, weight, acc, *, loss="dce", graph="absorb", mask_id=None,
                   ignore_index=-100, index=None):
    r"""Oracle for `fastbound.integrate_step`: the reference loss, summed per sequence.

    :math:`S_b = w_b \sum_i \ell_{b,i}` with :math:`\ell` from `dce_loss` or `dse_loss`
    (per-sequence ``sigma``), then ``acc[index[b]] += (S_b, S_b^2)``. Returns a new
    tensor (``acc`` itself is left unchanged).
    """
    n_seq = out.shape[0]
    if loss == "dce":
        per_token = dce_loss(out, x_t, x0, mask_id=mask_id, ignore_index=ignore_index)
    else:
        sig = torch.as_tensor(sigma, dtype=torch.float64, device=out.device).expand(n_seq)
        sig = sig.to(_acc(out).dtype)[:, None]
        per_token = dse_loss(out, sig, x_t, x0, graph=graph, ignore_index=ignore_index)
    w = torch.as_tensor(1.0 if weight is None else weight, dtype=torch.float64, device=out.device)
    total = per_token.double().sum(-1) * w.expand(n_seq)
    rows = torch.arange(n_seq, device=out.device) if index is None else index.long()
    return acc.index_add(0, rows, torch.stack([total, total * total], -1))


def estimate_nll(denoiser, x0, **kwargs):
    """`fastbound.estimate_nll` with the integration step replaced by the eager oracle.

    Same arguments, same draws (seed for seed), same result up to float rounding; the
    denoiser output goes through the dense reference loss and a sum instead of the
    fused kernel. The speed baseline of the estimator benchmarks.
    """
    from .estimators import _estimate_nll

    return _estimate_nll(denoiser, x0, step=_reference_step, **kwargs)


def log_likelihood_ratio(denoiser, x_a, x_b, **kwargs):
    """`fastbound.log_likelihood_ratio` with the eager-oracle integration step."""
    from .estimators import _log_likelihood_ratio

    return _log_likelihood_ratio(denoiser, x_a, x_b, step=_reference_step, **kwargs)


def _reference_step(out, x_t, x0, sigma, weight, acc, *, loss, graph, mask_id, ignore_index, index,
                    backend=None):
    acc.copy_(integrate_step(out, x_t, x0, sigma, weight, acc, loss=loss, graph=graph, mask_id=mask_id,
                             ignore_index=ignore_index, index=index))
    return acc
