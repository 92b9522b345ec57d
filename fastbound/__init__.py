"""fastbound: fused kernels for likelihood-exact discrete diffusion.

Public API:
    dse_loss, dce_loss          fused score-entropy (SEDD) and cross-entropy (MDLM) losses
    fused_linear_dse_loss,      the same losses from hidden states and the output layer, never
    fused_linear_dce_loss       forming the (tokens x vocab) scores (estimate_nll(head=...) too)
    schedules                   noise schedules (LogLinear, Geometric, Cosine)
    perturb, sample_times,      fused noise sampling x0 -> x_t and time / mask-count samplers,
    sample_num_masked           reproducible on every backend (counter-based Philox4x32-10)
    estimate_nll,               likelihood estimators from the I-MDSE / I-MDCE identities,
    log_likelihood_ratio        with error bars (time-free, Monte Carlo, quadrature)
    integrate_step              the fused per-timestep NLL integration kernel
    testing                     exact denoisers (product source, Markov chain) to check pipelines
    reference                   the pure-PyTorch oracle every kernel is tested against
    NoiseStream, derive_seed    counter ranges and named sub-seeds of one run's seed
    select_backend              the kernel backend a device and a backend= argument resolve to
    value_checks,               the mode of the value checks on a GPU ("sync", "async", "off";
    value_check_mode            FASTBOUND_VALUE_CHECKS) and the mode in force
    GRAPHS, LOSSES, BACKENDS    the accepted graph=, loss= and backend= names
"""

from . import noise, reference, schedules, testing
from ._ops import cpu_buffer_cache, cpu_isa
from .estimators import NLLEstimate, RatioEstimate, estimate_nll, log_likelihood_ratio
from .fused_linear import fused_linear_dce_loss, fused_linear_dse_loss
from .integrate import integrate_step
from .losses import dce_loss, dse_loss
from ._backend import BACKENDS
from ._backend import select as select_backend
from ._names import GRAPHS, LOSSES
from ._validate import value_check_mode, value_checks
from .noise import NoiseStream, Perturbed, derive_seed, perturb, philox_words, sample_num_masked, sample_times

__all__ = [
    "dse_loss",
    "dce_loss",
    "fused_linear_dse_loss", "fused_linear_dce_loss",
    "perturb",
    "Perturbed",
    "sample_times",
    "sample_num_masked",
    "philox_words",
    "NoiseStream",
    "derive_seed",
    "estimate_nll",
    "log_likelihood_ratio",
    "NLLEstimate",
    "RatioEstimate",
    "integrate_step",
    "testing",
    "noise",
    "schedules",
    "reference",
    "cpu_buffer_cache",
    "cpu_isa",
    "select_backend",
    "value_checks",
    "value_check_mode",
    "GRAPHS",
    "LOSSES",
    "BACKENDS",
]
__version__ = "0.1.0"
