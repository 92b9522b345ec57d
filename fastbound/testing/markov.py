r"""A first-order Markov chain with exact likelihoods and exact denoisers.

The chain has an initial distribution :math:`\pi_0` and a transition matrix
:math:`T` over V tokens; :math:`\log p(x) = \log\pi_0(x_1) + \sum_i \log T(x_{i-1}, x_i)`.
A product source (i.i.d. tokens with marginal :math:`\pi`) is the chain with
:math:`\pi_0 = \pi` and every row of T equal to :math:`\pi`. An order-k chain over K
symbols is the first-order chain over its :math:`K^k` contexts (the last k symbols,
`MarkovChain.of_contexts`), which emits the newest symbol of each context. Its entropy rate
is :math:`h = \sum_c \pi(c) H(T(c, \cdot))` with :math:`\pi` the stationary distribution
(Cover & Thomas, *Elements of Information Theory*, thm. 4.2.4).

Noisy sequences are observations of a hidden chain (a hidden Markov model): each
position emits :math:`x_t^i` with a likelihood :math:`e_i(x) = q(x_t^i \mid x_0^i = x)`.
Absorbing noise: a masked position says nothing (:math:`e_i = 1`), a clean one pins
the token. Uniform noise (SEDD): :math:`q(z \mid x) = e^{-\sigma}[z = x] + (1-e^{-\sigma})/V`.
The forward-backward algorithm gives, for every position, the posterior of its
clean token given all the *other* observations,
:math:`p(x_0^i \mid x_t^{-i}) \propto f_i(x)\, g_i(x)` (forward message before position i
times backward message after it), from which the exact denoisers follow:

* DCE (absorbing): :math:`\log p(x_0^i = y \mid \text{unmasked tokens})`.
* DSE, absorbing: the concrete score :math:`e^{s_y} = p(y \mid \text{unmasked})/(e^\sigma - 1)`.
* DSE, uniform: :math:`e^{s_y} = \sum_x p(x \mid x_t^{-i})\, q(y \mid x) \big/ \sum_x p(x \mid x_t^{-i})\, q(x_t^i \mid x)`,
  the ratio :math:`p_t(x_t \text{ with } y \text{ at } i) / p_t(x_t)` (Lou et al. 2024, SEDD).

Everything is vectorised over the batch and computed in float64 log space.
"""

from __future__ import annotations

from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class MarkovChain:
    """A first-order Markov chain over ``vocab_size`` tokens (ids 0..V-1)."""

    def __init__(self, initial: torch.Tensor, transition: torch.Tensor):
        initial = torch.as_tensor(initial, dtype=torch.float64)
        transition = torch.as_tensor(transition, dtype=torch.float64)
        n = initial.shape[0]
        if initial.dim() != 1 or transition.shape != (n, n):
            raise ValueError(f"need initial (V,) and transition (V, V), got {tuple(initial.shape)} and {tuple(transition.shape)}")
        if bool((initial < 0).any() | (transition < 0).any()):
            raise ValueError("probabilities must be non-negative")
        self.log_initial = (initial / initial.sum()).log()
        self.log_transition = (transition / transition.sum(1, keepdim=True)).log()
        self.vocab_size = n

    # -- construction -------------------------------------------------------------

    @classmethod
    def product(cls, marginal: torch.Tensor) -> "MarkovChain":
        """I.i.d. tokens with the given marginal (a chain whose every row is the marginal)."""
        marginal = torch.as_tensor(marginal, dtype=torch.float64)
        return cls(marginal, marginal.expand(marginal.shape[0], -1))

    @classmethod
    def random(cls, vocab_size: int, *, seed: int, sharpness: float = 1.0) -> "MarkovChain":
        """A random chain: each row is the softmax of ``sharpness`` times Gaussian logits."""
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randn(vocab_size + 1, vocab_size, generator=gen, dtype=torch.float64) * sharpness
        probs = logits.softmax(-1)
        return cls(probs[0], probs[1:])

    @classmethod
    def of_contexts(cls, next_symbol: torch.Tensor, initial: torch.Tensor | None = None) -> "MarkovChain":
        r"""The order-k chain with next-symbol probabilities ``next_symbol`` (K^k, K), as a chain over contexts.

        Context c is the base-K number of the last k symbols (oldest first); after symbol y it
        becomes :math:`(cK \bmod K^k) + y`. ``initial`` (K^k,) is the law of the first context,
        i.e. of the first k symbols; default: the stationary distribution. Tokens of the
        returned chain are contexts: ``context % K`` is the symbol a position emits.
        """
        next_symbol = torch.as_tensor(next_symbol, dtype=torch.float64)
        n_ctx, k = next_symbol.shape
        if n_ctx % k or k < 1:
            raise ValueError(f"next_symbol must be (K^k, K), got {tuple(next_symbol.shape)}")
        following = (torch.arange(n_ctx)[:, None] * k) % n_ctx + torch.arange(k)[None, :]
        transition = torch.zeros(n_ctx, n_ctx, dtype=torch.float64).scatter_(1, following, next_symbol)
        chain = cls(torch.full((n_ctx,), 1.0 / n_ctx, dtype=torch.float64) if initial is None else initial, transition)
        if initial is None:
            chain.log_initial = chain.stationary().log()
        return chain

    def stationary(self, tol: float = 1e-15, max_iter: int = 100_000) -> torch.Tensor:
        r"""The stationary distribution :math:`\pi = \pi T` (V,) float64, by power iteration from uniform."""
        transition = self.log_transition.exp()
        pi = torch.full((self.vocab_size,), 1.0 / self.vocab_size, dtype=torch.float64)
        for _ in range(max_iter):
            new = pi @ transition
            if float((new - pi).abs().sum()) < tol:
                return new / new.sum()
            pi = new
        return pi / pi.sum()

    def entropy_rate(self) -> float:
        r""":math:`h = \sum_x \pi(x) H(T(x, \cdot))` in nats per token."""
        transition = self.log_transition.exp()
        plogp = torch.where(transition > 0, transition * self.log_transition, 0.0)
        return float(-(self.stationary() * plogp.sum(1)).sum())

    # -- data and exact likelihoods -------------------------------------------------

    def sample(self, n: int, length: int, *, seed: int) -> torch.Tensor:
        """(n, length) int64 sequences drawn from the chain."""
        gen = torch.Generator().manual_seed(seed)
        out = torch.empty(n, length, dtype=torch.int64)
        if length == 0:
            return out
        out[:, 0] = torch.multinomial(self.log_initial.exp().expand(n, -1), 1, generator=gen)[:, 0]
        rows = self.log_transition.exp()
        for i in range(1, length):
            out[:, i] = torch.multinomial(rows[out[:, i - 1]], 1, generator=gen)[:, 0]
        return out

    def nll(self, x0: torch.Tensor, maskable: torch.Tensor | None = None) -> torch.Tensor:
        r"""Exact :math:`-\log p(x_0)` (B,), or :math:`-\log p(x_0[\text{maskable}] \mid x_0[\lnot\text{maskable}])`.

        The conditional is :math:`-\log p(x_0) + \log p(x_0[\lnot\text{maskable}])`, the prompt's
        marginal from the forward algorithm with the maskable positions unobserved.
        """
        x0 = x0.cpu().long()
        clean = self.log_initial[x0[:, 0]] + self.log_transition[x0[:, :-1], x0[:, 1:]].sum(-1)
        if maskable is None:
            return -clean
        maskable = torch.broadcast_to(maskable.cpu().bool(), x0.shape)
        return -clean + self.log_evidence(self._clean_loglik(x0, ~maskable))

    def log_evidence(self, loglik: torch.Tensor) -> torch.Tensor:
        r""":math:`\log \sum_x p(x) \prod_i e_i(x_i)` (B,) for emission log-likelihoods (B, L, V)."""
        f = self.log_initial + loglik[:, 0]
        for i in range(1, loglik.shape[1]):
            f = torch.logsumexp(f[:, :, None] + self.log_transition, 1) + loglik[:, i]
        return torch.logsumexp(f, -1)

    def leave_one_out(self, loglik: torch.Tensor) -> torch.Tensor:
        r"""(B, L, V) :math:`\log p(x_0^i = x \mid \text{observations at the other positions})`."""
        n, length, v = loglik.shape
        forward = torch.empty(n, length, v, dtype=torch.float64)
        backward = torch.zeros(n, length, v, dtype=torch.float64)
        if length == 0:
            return forward
        forward[:, 0] = self.log_initial
        for i in range(1, length):
            forward[:, i] = torch.logsumexp((forward[:, i - 1] + loglik[:, i - 1])[:, :, None] + self.log_transition, 1)
        for i in range(length - 2, -1, -1):
            backward[:, i] = torch.logsumexp(self.log_transition + (loglik[:, i + 1] + backward[:, i + 1])[:, None, :], 2)
        return (forward + backward).log_softmax(-1)

    # -- emissions ------------------------------------------------------------------

    def _clean_loglik(self, tokens: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """Emissions that pin ``tokens`` where ``observed`` and say nothing elsewhere."""
        onehot = torch.nn.functional.one_hot(tokens.clamp(0, self.vocab_size - 1), self.vocab_size).bool()
        pinned = torch.where(onehot, 0.0, float("-inf")).double()
        return torch.where(observed[..., None], pinned, torch.zeros_like(pinned))

    def _uniform_kernel(self, sigma: torch.Tensor) -> torch.Tensor:
        r"""(B, V, V) :math:`\log q(z \mid x)` of the uniform graph, [b, x, z]."""
        v = self.vocab_size
        keep = torch.exp(-sigma.double())[:, None, None]
        eye = torch.eye(v, dtype=torch.float64)
        return (keep * eye + (1 - keep) / v).log()

    # -- exact denoisers ------------------------------------------------------------

    def dce_denoiser(self, *, mask_id: int | None = None, mask_column: bool = False,
                     dtype: torch.dtype = torch.float32) -> Denoiser:
        """Exact absorbing denoiser for ``loss="dce"``: (B, L, V) log p(x_0^i | unmasked tokens).

        ``mask_id`` defaults to V; with ``mask_column=True`` the output has V+1 columns,
        the last (the mask's, probability 0) at -inf. ``dtype``: of the output.
        """
        mask_id = self.vocab_size if mask_id is None else mask_id

        def denoise(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            x = x_t.cpu().long()
            logp = self.leave_one_out(self._clean_loglik(x, x != mask_id))
            if mask_column:
                logp = torch.cat([logp, torch.full_like(logp[..., :1], float("-inf"))], -1)
            return logp.to(dtype=dtype, device=x_t.device)

        return denoise

    def dse_denoiser(self, *, graph: str = "absorb", dtype: torch.dtype = torch.float32) -> Denoiser:
        """Exact concrete score for ``loss="dse"``: (B, L, V+1) (absorbing, mask = V) or (B, L, V) (uniform).

        ``dtype``: of the output."""
        if graph not in ("absorb", "uniform"):
            raise ValueError(f"graph must be 'absorb' or 'uniform', got {graph!r}")
        v = self.vocab_size

        def denoise(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            x, sig = x_t.cpu().long(), sigma.cpu().double()
            if graph == "absorb":
                logp = self.leave_one_out(self._clean_loglik(x, x != v))
                score = logp - torch.log(torch.expm1(sig))[:, None, None]
                score = torch.cat([score, torch.zeros_like(score[..., :1])], -1)
                return score.to(dtype=dtype, device=x_t.device)
            log_q = self._uniform_kernel(sig)  # [b, x, z]
            loglik = torch.gather(log_q[:, None].expand(-1, x.shape[1], -1, -1), 3,
                                  x[:, :, None, None].expand(-1, -1, v, 1))[..., 0]
            post = self.leave_one_out(loglik)  # (B, L, V) over the clean token
            mix = torch.logsumexp(post[..., :, None] + log_q[:, None], 2)  # (B, L, V) log sum_x p(x) q(z|x)
            score = mix - mix.gather(-1, x[..., None])
            return score.to(dtype=dtype, device=x_t.device)

        return denoise
