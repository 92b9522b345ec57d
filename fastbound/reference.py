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


def _ids(t: torch.Tensor) -> torch.Tensor:
    """Ids as int64, as the kernels read them: a uint8 156 is token 156, never ignore_index -100."""
    return t.long()


def _log_expm1(sigma: torch.Tensor) -> torch.Tensor:
    r""":math:`\log(e^\sigma - 1) = \sigma + \log(1 - e^{-\sigma})`, finite for every finite
    :math:`\sigma > 0`: ``expm1`` keeps the digits of a small σ, and nothing overflows when
    :math:`e^\sigma` does (σ > 88.7 in float32, > 709 in float64). The per-row constants
    below are formed from it, as the kernels form theirs
    (``log_expm1`` in ``csrc/include/fastbound/elementwise.h``), so a huge σ gives
    :math:`r \to 0` instead of :math:`0 \cdot \log 0` = NaN.
    """
    return sigma + torch.log(-torch.expm1(-sigma))


def dse_absorb(score: torch.Tensor, sigma, x_t: torch.Tensor, x0: torch.Tensor,
               mask_id: int | None = None) -> torch.Tensor:
    r"""Absorbing-graph score entropy per position (SEDD ``Absorbing.score_entropy``).

    With the mask at column ``mask_id`` (default V-1) and :math:`r = 1/(e^\sigma - 1)`,
    at positions where :math:`x_t` is the mask:

    .. math:: \ell = \sum_{y \ne \text{mask}} e^{s_y} - r\, s_{x_0} + r(\log r - 1),

    and 0 elsewhere; the mask column's score is not read. With
    :math:`\log a = \log(e^\sigma - 1)`: :math:`r = e^{-\log a}` and
    :math:`r(\log r - 1) = -r(\log a + 1)` (`_log_expm1`).
    """
    s = _acc(score)
    x_t, x0 = _ids(x_t), _ids(x0)
    mask_id = s.shape[-1] - 1 if mask_id is None else mask_id
    sigma = _like(sigma, s).expand(x_t.shape)
    log_a = _log_expm1(sigma)
    r = torch.exp(-log_a)
    masked = x_t == mask_id
    x0_safe = torch.where(masked, x0, torch.zeros_like(x0))
    real = torch.cat([s[..., :mask_id], s[..., mask_id + 1:]], -1)  # every column but the mask
    pos = real.exp().sum(-1)
    neg = r * s.gather(-1, x0_safe[..., None]).squeeze(-1)
    const = -r * (log_a + 1)
    return torch.where(masked, pos - neg + const, torch.zeros_like(pos))


def dse_uniform(score: torch.Tensor, sigma, x_t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    r"""Uniform-graph score entropy per position (SEDD ``Uniform.score_entropy``).

    N = V states, :math:`a = e^\sigma - 1`, :math:`\rho = a / (a + N)`:

    * pos :math:`= \frac1N \sum_y e^{s_y} - \frac1N e^{s_{x_t}}`
    * neg :math:`= \rho(\bar s - s_{x_t}/N)` if :math:`x_t = x_0`, else
      :math:`s_{x_0}/a + \bar s - s_{x_t}/N`
    * const :math:`= \frac{N-1}{N}\rho(\log\rho - 1)` if :math:`x_t = x_0`, else
      :math:`((-\log\rho - 1)/\rho - (N - 2))/N`

    and :math:`\ell` = pos - neg + const at every position. The constants are formed
    from :math:`1/a = e^{-\log a}` (`_log_expm1`) as :math:`\rho = 1/(1 + N/a)` and
    :math:`\log\rho = -\operatorname{log1p}(N/a)`, finite for every σ. pos and neg
    follow SEDD's code (a mean over all N columns minus the :math:`x_t` term), so a NaN or
    infinite :math:`s_{x_t}` gives NaN here; the kernels sum over :math:`y \ne x_t` instead
    (README, "Where the kernels and the oracle differ on purpose").
    """
    s = _acc(score)
    x_t, x0 = _ids(x_t), _ids(x0)
    n = s.shape[-1]
    sigma = _like(sigma, s).expand(x_t.shape)
    inv_a = torch.exp(-_log_expm1(sigma))
    rho = 1 / (1 + n * inv_a)
    log_rho = -torch.log1p(n * inv_a)
    same = x_t == x0
    s_xt = s.gather(-1, x_t[..., None]).squeeze(-1)
    s_x0 = s.gather(-1, x0.clamp(0, n - 1)[..., None]).squeeze(-1)
    neg_base = s.mean(-1) - s_xt / n
    neg = torch.where(same, rho * neg_base, s_x0 * inv_a + neg_base)
    const = torch.where(
        same,
        (n - 1) / n * rho * (log_rho - 1),
        ((-log_rho - 1) / rho - (n - 2)) / n,
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


def dse_loss(score, sigma, x_t, x0, *, graph="absorb", mask_id=None, weight=None, reduction="none",
             ignore_index=-100):
    """Oracle for `fastbound.dse_loss` (same arguments, no kernels); ``mask_id`` (default V-1)
    is the absorbing graph's mask column and is ignored by the uniform graph.

    Ids of any integer dtype are read as int64, as the kernels read them.
    """
    x_t, x0 = _ids(x_t), _ids(x0)
    keep = x0 != ignore_index
    x0_safe = torch.where(keep, x0, torch.zeros_like(x0))
    if graph == "absorb":
        loss = dse_absorb(score, sigma, x_t, x0_safe, mask_id)
    else:
        loss = dse_uniform(score, sigma, x_t, x0_safe)
    return _weigh_and_reduce(loss, x0, weight, reduction, ignore_index)


def dce(logits: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, mask_id: int | None = None) -> torch.Tensor:
    r"""Masked cross-entropy per position (MDLM): :math:`-\log \mathrm{softmax}(z)_{x_0}` where
    :math:`x_t` is the mask, 0 elsewhere; the mask column (when ``mask_id < V``) is excluded
    from the softmax, as MDLM's SUBS parameterisation does.
    """
    z = _acc(logits)
    x_t, x0 = _ids(x_t), _ids(x0)
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
    """Oracle for `fastbound.dce_loss` (same arguments, no kernels); ids of any integer dtype
    are read as int64, as the kernels read them."""
    x_t, x0 = _ids(x_t), _ids(x0)
    keep = x0 != ignore_index
    x0_safe = torch.where(keep, x0, torch.zeros_like(x0))
    return _weigh_and_reduce(dce(logits, x_t, x0_safe, mask_id), x0, weight, reduction, ignore_index)


# =============================================================================
# Noise sampling (`fastbound.noise`): the oracle of the counter-based RNG
# =============================================================================
#
# Philox4x32-10 (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy
# as 1, 2, 3", SC 2011; the Random123 library) in plain int64 torch arithmetic,
# and the rules of `csrc/include/fastbound/philox.h` that turn its words into
# noise: element i of a call with (seed, offset) reads the words of counter
# (lo, hi, 0, 0) of offset + i under key (lo, hi) of seed; u = (w0 >> 8) 2^-24;
# selected iff u < p; uniform replacement floor(w1 V / 2^32); exact-k takes the
# k smallest (w0, column) pairs of a row.

PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)
_LOW32 = 0xFFFFFFFF


def _mulhilo32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for 32-bit values, in int64 without overflow (16-bit limbs)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    low = a_lo * b_lo
    mid = a_hi * b_lo + a_lo * b_hi + (low >> 16)  # < 2^34
    lo = ((mid & 0xFFFF) << 16) | (low & 0xFFFF)
    hi = a_hi * b_hi + (mid >> 16)
    return hi, lo


def philox4x32(counter: torch.Tensor, seed: int) -> torch.Tensor:
    """Philox4x32-10 words (N, 4) of int64 counters (N, 4) (low 32 bits each), key (lo, hi) of ``seed``."""
    c = [counter[:, j] & _LOW32 for j in range(4)]
    seed &= 2**64 - 1
    k0, k1 = seed & _LOW32, seed >> 32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(c[0], PHILOX_MUL[0])
        hi1, lo1 = _mulhilo32(c[2], PHILOX_MUL[1])
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0, k1 = (k0 + PHILOX_WEYL[0]) & _LOW32, (k1 + PHILOX_WEYL[1]) & _LOW32
    return torch.stack(c, dim=1)


def noise_words(n: int, seed: int, offset: int = 0, device=None) -> torch.Tensor:
    """Words (n, 4) of the elements 0 .. n-1 of a call with this seed and offset."""
    index = [(offset + i) % 2**64 for i in range(n)]
    counter = torch.tensor([[i & _LOW32, i >> 32, 0, 0] for i in index], dtype=torch.int64, device=device)
    return philox4x32(counter.reshape(n, 4), seed)


def uniform_from_word(w: torch.Tensor) -> torch.Tensor:
    """u = (w >> 8) * 2^-24 in float64: a multiple of 2^-24 in [0, 1)."""
    return (w >> 8).double() * 2.0**-24


def uniform_token_from_word(w: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """floor(w * V / 2^32): a token in [0, V)."""
    hi, _ = _mulhilo32(w, vocab_size)
    return hi


def perturb_from_uniforms(x0: torch.Tensor, u: torch.Tensor, p, *, replacement, maskable=None):
    """The corruption rule given the uniforms: mask = (u < p) & maskable, x_t = where(mask, replacement, x0).

    ``p`` is the corruption probability (1 - e^{-σ} for total noise σ; λ for a
    mask ratio), broadcastable to x0; ``replacement`` the mask id (absorbing) or
    a tensor of tokens (uniform graph).
    """
    mask = u < torch.as_tensor(p, dtype=torch.float64, device=x0.device)
    if maskable is not None:
        mask = mask & maskable
    x_t = torch.where(mask, torch.as_tensor(replacement, dtype=x0.dtype, device=x0.device), x0)
    return x_t, mask


def perturb(x0: torch.Tensor, *, p=None, num_masked=None, graph: str = "absorb", vocab_size: int,
            mask_id: int | None = None, maskable=None, seed: int, offset: int = 0):
    """Oracle for `fastbound.perturb` on (B, L) ids: the contract evaluated element by element.

    Exactly one of ``p`` (corruption probability, broadcastable to x0, float64
    as the kernels compare it) and ``num_masked`` ((B,) ints: the k maskable
    positions with the smallest (w0, column) keys, by a full sort).
    """
    rows, cols = x0.shape
    words = noise_words(rows * cols, seed, offset, x0.device).reshape(rows, cols, 4)
    w0, w1 = words[..., 0], words[..., 1]
    replacement = uniform_token_from_word(w1, vocab_size) if graph == "uniform" else mask_id
    takes_part = torch.ones_like(x0, dtype=torch.bool) if maskable is None else maskable
    if p is not None:
        return perturb_from_uniforms(x0, uniform_from_word(w0), p, replacement=replacement, maskable=takes_part)
    column = torch.arange(cols, device=x0.device)
    key = torch.where(takes_part, w0 * cols + column, torch.iinfo(torch.int64).max)  # (w0, column) order
    rank = key.argsort(dim=1).argsort(dim=1)
    mask = rank < torch.as_tensor(num_masked, device=x0.device).reshape(-1, 1)
    x_t = torch.where(mask, torch.as_tensor(replacement, dtype=x0.dtype, device=x0.device), x0)
    return x_t, mask


# =============================================================================
# Likelihood integration (I-MDCE / I-MDSE): the oracle of `fastbound.integrate`.
# The estimators themselves are tested against exact likelihoods
# (`fastbound.testing`); their eager-step speed baseline is `benchmarks.eager_estimator`.
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
        per_token = dse_loss(out, sig, x_t, x0, graph=graph, mask_id=mask_id, ignore_index=ignore_index)
    w = torch.as_tensor(1.0 if weight is None else weight, dtype=torch.float64, device=out.device)
    total = per_token.double().sum(-1) * w.expand(n_seq)
    rows = torch.arange(n_seq, device=out.device) if index is None else index.long()
    return acc.index_add(0, rows, torch.stack([total, total * total], -1))
