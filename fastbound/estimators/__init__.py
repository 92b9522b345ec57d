r"""Likelihood estimators for discrete diffusion models, from the I-MDCE / I-MDSE identities.

Jeon et al. 2025 ("Information-Theoretic Discrete Diffusion", arXiv 2510.24088,
code: infodis) show that the denoising losses, integrated over the noise level,
equal the negative log-likelihood when the denoiser is optimal; for any other
denoiser the same integrals are the model's likelihood bound (the ELBO of SEDD /
MDLM). Every estimator here is unbiased for its integral, reports a standard
error, and is reproducible: the same ``seed`` names the same corruptions
(`fastbound.perturb`'s counter-based RNG) on every backend and every ``batch_size``.

Identities, for a sequence :math:`x_0` with M positions that may be corrupted:

* **I-MDCE** (absorbing graph, masked cross-entropy; MDLM's continuous-time bound
  with weight :math:`\sigma'/(e^\sigma-1)`, tight at the optimum by I-MDCE). With
  :math:`\lambda = 1 - e^{-\sigma}` the masking probability and
  :math:`L_\lambda = \sum_{i\ \text{masked}} -\log p(x_0^i \mid x_\lambda)`,

  .. math:: -\log p(x_0) = \int_0^1 \frac{1}{\lambda}\,\mathbb E[L_\lambda]\,d\lambda
            = \int_0^\infty \frac{\mathbb E[L_{\sigma}]}{e^\sigma - 1}\,d\sigma .

* **I-MDSE** (score entropy, absorbing or uniform graph; SEDD's denoising score
  entropy with weight :math:`d\sigma`, tight at the optimum by I-MDSE):

  .. math:: -\log p(x_0) = \int_0^\infty \mathbb E\Big[\sum_i \ell^{DSE}_i(\sigma)\Big]\,d\sigma
            + \mathrm{KL}\big(p_{\sigma_{max}|0}(\cdot \mid x_0) \,\|\, p_{\sigma_{max}}\big),

  the terminal term vanishing as :math:`\sigma_{max}\to\infty`. For a schedule that stops
  at a finite :math:`\sigma_{max}` on the uniform graph it is the KL between the per-token
  forward marginal and the uniform prior, :math:`M(\log V - H(q_{\sigma_{max}}))` (the
  prior's entropy :math:`M\log V` minus that of the noised data), added analytically.
  At the optimum the absorbing DSE is :math:`r\cdot` the DCE with
  :math:`r = 1/(e^\sigma-1)`, which is the DSE–DCE equivalence.

* **Time-free** (the :math:`\lambda` integral done in closed form per number of masked
  tokens, :math:`\int_0^1 \lambda^{-1}\binom Mk\lambda^k(1-\lambda)^{M-k}d\lambda = 1/k`;
  the any-order autoregressive form, cf. RADD, Ou et al. 2024, and infodis):

  .. math:: -\log p(x_0) = \sum_{k=1}^{M} \frac1k\,\mathbb E_{|I|=k}\Big[\sum_{i\in I}
            -\log p(x_0^i \mid x_0 \text{ with } I \text{ masked})\Big]
            = H_M\,\mathbb E_{k \sim 1/(k H_M)}\,\mathbb E_{|I|=k}\Big[\sum_{i\in I}\cdots\Big],

  :math:`H_M = \sum_{k\le M} 1/k`. With ``loss="dse"`` the per-token term is the DSE
  times :math:`e^\sigma - 1`.

Conditional likelihood (``maskable``): the same identities with only the maskable
positions corrupted and scored give :math:`-\log p(x_0[\text{maskable}] \mid
x_0[\lnot\text{maskable}])`, with M the number of maskable positions.

Sampling and error bars (measured on the exact Markov-chain denoisers of
`fastbound.testing`): each sequence gets its own stratified uniforms (one per
stratum of [0, 1), as MDLM's time sampler), which set k (time-free) or t (mc), and
the standard error is the successive-difference estimate of a systematic sample.
The mc times are :math:`t = u^2` (weight :math:`2u`): with uniform t the absorbing
estimator's variance diverges like :math:`\int dt/t` at t = 0 (a rare masked token
weighed by 1/t); quadrature uses the same substitution, under which Gauss–Legendre
also converges fast on the uniform graph's :math:`\log(1/t)` endpoint behaviour. On
the uniform graph such rare large draws remain (weight ~ log(1/t)/t): the standard
error is right on average but the per-sequence z-scores have heavier tails.

Modules: `api` (the public functions), `options` (argument checks), `head` (the ``head=`` mode: hidden
states and an output layer), `methods` (one object per
method: its draws, weights and error estimate), `loop` (the chunked pass over the denoiser),
`variance` (the standard-error formulas), `results` (the returned records).
"""

from .api import Denoiser, Method, estimate_nll, log_likelihood_ratio
from .results import NLLEstimate, RatioEstimate

__all__ = ["estimate_nll", "log_likelihood_ratio", "NLLEstimate", "RatioEstimate", "Denoiser", "Method"]
