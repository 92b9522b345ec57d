"""Sources with an exactly known likelihood, and their exact denoisers.

Use them to check a likelihood pipeline end to end: with the exact denoiser,
every estimator of `fastbound.estimators` must return the exact -log p(x0)
(within its standard error), for the absorbing and the uniform graph, with the
DCE or the DSE, unconditionally and conditionally.

    chain = MarkovChain.random(vocab_size=5, seed=0)
    x0 = chain.sample(64, length=12, seed=1)
    est = fastbound.estimate_nll(chain.dce_denoiser(), x0, vocab_size=5)
    est.nll  vs  chain.nll(x0)
"""

from .markov import MarkovChain

__all__ = ["MarkovChain"]
