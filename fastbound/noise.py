r"""Fused noise sampling x0 -> x_t with a counter-based RNG, and the time samplers.

Every random number here is a pure function of ``(seed, offset)`` and the
element's index: Philox4x32-10 (Salmon et al., SC 2011; Random123) with
counter ``offset + i`` and key ``seed``. The same call therefore gives the
same bits on the C++ CPU kernel, the Triton kernel and the CUDA kernel, on any
machine and any number of threads. The full contract (how the 64-bit seed and
offset map to Philox's words, which word each decision reads, the uniform-float
rule) is written once, in ``csrc/include/fastbound/philox.h``; the plain-torch
oracle is `fastbound.reference.perturb`.

Counters. A call draws one counter per element: `perturb` uses
``offset .. offset + x0.numel() - 1``, `sample_times` and `sample_num_masked`
``offset .. offset + n - 1``, and `philox_words` ``offset .. offset + n - 1``.
To draw fresh noise with the same seed, pass ``offset + count`` next, or let a
`NoiseStream` hand the offsets out (its ``(seed, offset)`` is the whole state,
so a training run resumes bit-exactly from two integers). Reusing an offset
reuses the noise, on purpose: with the same (seed, offset), masks at a higher
noise level contain the masks at a lower one (the Bernoulli draws share u),
which couples estimators at different σ.

Value checks. `perturb` checks a tensor sigma / mask_ratio, num_masked and (off the
CPU kernel, which checks them itself) the ids of x0 together, in the mode of
`fastbound.value_checks` (one host read on a GPU by default; none with "async" or
"off"). The samplers have no NaN to give (their outputs are integers), so with the
checks off (or while a CUDA graph is captured in "sync" mode) bad values have these
defined effects instead: a position whose σ or λ is NaN or negative is never
corrupted (σ = ∞ always is; λ > 1 always is); k is in effect clamped to [0, the
row's maskable count]; an x0 outside [0, V) is copied to x_t where the position
stays clean, where the loss kernels' NaN policy gives its row NaN when they read
it (the score entropy reads every x_t; the cross-entropy only masked positions).

Fast path. At small sizes (4 x 512 tokens) the Python layer and its dozen small torch ops cost
as much as the kernel. So the common eager CPU call, a noise level sigma or mask_ratio in a call
signature that a call through the full path has validated (`_fast_key`), is one C++ op,
``perturb_level`` (csrc/cpu/perturb.cpp): it checks the level's values (the same ValueError),
forms the thresholds exactly as `_threshold` does, and runs the kernel, which checks the ids.
"""

from __future__ import annotations

import array
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from . import _backend, _harmonic, _names, _ops  # noqa: F401  (_ops loads the op schemas)
from . import _validate as v

TIME_METHODS = ("iid", "antithetic", "stratified")
NUM_MASKED_WEIGHTS = ("inverse", "uniform")

UINT64_RANGE = 2**64
UNIFORM_BITS = 24
"""u = (w0 >> 8) * 2^-24: the Bernoulli threshold is ceil(p * 2^24) (see philox.h)."""
MAX_VOCAB = 2**32 - 1
"""Uniform tokens are floor(w1 * V / 2^32), so V must fit 32 bits."""
MAX_INVERSE_LENGTH = 2**24
"""Longest L for `sample_num_masked(weights="inverse")`: its table of harmonic numbers has L entries."""


class Perturbed(NamedTuple):
    """The result of `perturb`."""

    x_t: torch.Tensor
    """Noisy ids: x0's shape and dtype."""
    mask: torch.Tensor
    """bool, x0's shape: True where the position was corrupted (absorbing: set to the mask id;
    uniform: resampled, possibly to the same token)."""


@dataclass
class NoiseStream:
    """Hands out disjoint counter ranges of one seed, so successive draws never share noise.

    ``stream.take(n)`` returns the offset to pass and advances by ``n``::

        stream = NoiseStream(seed=1234)
        t = sample_times(B, seed=stream.seed, offset=stream.take(B))
        x_t, mask = perturb(x0, sigma=sigma(t), vocab_size=V, seed=stream.seed, offset=stream.take(x0.numel()))

    Save ``(stream.seed, stream.offset)`` with a checkpoint to resume bit-exactly.
    """

    seed: int
    offset: int = 0

    def take(self, count: int) -> int:
        """Reserves ``count`` counters and returns the offset of the first."""
        count = v.as_int("count", count, minimum=0)
        start = self.offset
        self.offset = (self.offset + count) % UINT64_RANGE
        return start


def derive_seed(seed: int, *streams: int) -> int:
    """A 62-bit seed for one named random stream of ``seed`` (SplitMix64 finaliser, Steele et al. 2014).

    ``derive_seed(seed, a)`` and ``derive_seed(seed, b)`` give unrelated seeds for a != b, so one
    run's seed can key several generators (times, corruption, data, evaluation) that never share
    random numbers; more streams nest: ``derive_seed(seed, a, b) == derive_seed(derive_seed(seed, a), b)``.
    """
    for stream in streams:
        z = (seed * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        seed = (z ^ (z >> 31)) >> 2
    return seed


# -----------------------------------------------------------------------------
# Op plumbing: fake implementations (torch.compile) and backend choice
# -----------------------------------------------------------------------------


@torch.library.register_fake("fastbound::perturb")
def _perturb_fake(x0, threshold, num_masked, maskable, vocab_size, mask_id, graph, seed, offset):
    return x0.new_empty(x0.shape), x0.new_empty(x0.shape, dtype=torch.bool)


@torch.library.register_fake("fastbound::perturb_level")
def _perturb_level_fake(x0, level, is_sigma, threshold, maskable, vocab_size, mask_id, graph, seed, offset):
    return x0.new_empty(x0.shape), x0.new_empty(x0.shape, dtype=torch.bool)


@torch.library.register_fake("fastbound::philox4x32")
def _philox4x32_fake(counter, seed):
    return counter.new_empty(counter.shape)


def _uint64(name: str, value: object) -> int:
    """Checks an int in [0, 2^64) and returns its int64 bit pattern (what the ops take)."""
    value = v.as_int(name, value)
    if not 0 <= value < UINT64_RANGE:
        raise ValueError(f"{name} must lie in [0, 2^64), got {value}")
    return value - UINT64_RANGE if value >= 2**63 else value


def _device(device: torch.device | str | None, *tensors: object) -> torch.device:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device(device) if device is not None else torch.device("cpu")


def philox_words(n: int, *, seed: int, offset: int = 0, device: torch.device | str | None = None,
                 backend: str | None = None) -> torch.Tensor:
    """The four Philox4x32-10 words of counters ``offset .. offset + n - 1`` under ``seed``.

    Returns int64 (n, 4), each entry in [0, 2^32): row i is
    Philox4x32-10(counter = (lo, hi, 0, 0) of offset + i, key = (lo, hi) of seed),
    the words element i of a `perturb` call with this seed and offset reads.
    """
    n = v.as_int("n", n, minimum=0)
    seed_bits, offset_bits = _uint64("seed", seed), _uint64("offset", offset)
    dev = _device(device)
    index = torch.arange(n, dtype=torch.int64, device=dev) + offset_bits  # wraps mod 2^64
    zeros = torch.zeros_like(index)
    counter = torch.stack([index & 0xFFFFFFFF, (index >> 32) & 0xFFFFFFFF, zeros, zeros], dim=1)
    return _backend.kernel(_backend.select(dev, backend), "philox4x32")(counter, seed_bits)


def _uniforms(n: int, seed: int, offset: int, device, backend) -> torch.Tensor:
    """u_i = (w0 >> 8) 2^-24 in float64, the documented uniform-float rule."""
    return (philox_words(n, seed=seed, offset=offset, device=device, backend=backend)[:, 0] >> 8).double() * 2.0**-24


# -----------------------------------------------------------------------------
# perturb
# -----------------------------------------------------------------------------


def _per_position(name: str, value: torch.Tensor, rows: int, cols: int, one_row: bool) -> torch.Tensor:
    """A per-sequence or per-token tensor as (rows or 1, cols or 1)."""
    if value.dim() == 0:
        return value.reshape(1, 1)
    if value.dim() == 1 and not one_row:
        if value.shape[0] not in (1, rows):
            raise ValueError(f"{name} of shape {tuple(value.shape)} must have one value per sequence ({rows},)")
        return value.reshape(-1, 1)
    if value.dim() == 1:  # x0 is one sequence (L,): a (1,) value per sequence, an (L,) value per token
        if value.shape[0] not in (1, cols):
            raise ValueError(f"{name} of shape {tuple(value.shape)} must be a float, (1,) or ({cols},)")
        return value.reshape(1, -1)
    if value.dim() == 2 and value.shape[0] in (1, rows) and value.shape[1] in (1, cols):
        return value
    raise ValueError(f"{name} of shape {tuple(value.shape)} does not broadcast to x0's shape {(rows, cols)}")


SMALL_HOST_VALUES = 64
"""Host σ / λ tensors of at most this many values are converted to thresholds in Python."""
_RANGE_MESSAGES = {"sigma": "sigma must be finite and >= 0 everywhere",
                   "mask_ratio": "mask_ratio must lie in [0, 1] everywhere"}


def _in_range(is_sigma: bool, value: float) -> bool:
    """σ finite and ≥ 0, or λ in [0, 1] (NaN is neither)."""
    return 0 <= value < math.inf if is_sigma else 0 <= value <= 1


def _float_threshold(is_sigma: bool, value: float) -> int:
    """ceil(p 2^24) for a checked value, p = 1 - e^{-σ} or λ, in float64."""
    return math.ceil((-math.expm1(-value) if is_sigma else value) * 2**UNIFORM_BITS)


def _checked_float_threshold(is_sigma: bool, value: int | float) -> int:
    """`_float_threshold` of a float σ or λ, after its range check."""
    value = float(value)
    if not _in_range(is_sigma, value):
        raise ValueError(f"sigma must be finite and >= 0, got {value}" if is_sigma
                         else f"mask_ratio must lie in [0, 1], got {value}")
    return _float_threshold(is_sigma, value)


def _threshold(name: str, value, rows: int, cols: int, one_row: bool, device: torch.device,
               checks: v.ValueChecks) -> torch.Tensor:
    """int32 T = ceil(p * 2^24) (the Bernoulli rule of philox.h), p = 1 - e^{-σ} or λ, as (B or 1, L or 1).

    p is formed in float64: from a Python float on the host, from a tensor on its device
    (whose range check joins ``checks``).
    """
    is_sigma = name == "sigma"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((1, 1), _checked_float_threshold(is_sigma, value), dtype=torch.int32, device=device)
    t = v.check_float_tensor(name, value)
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x0 is on {device}; move it to {device}")
    p = _per_position(name, t.detach(), rows, cols, one_row)
    if p.device.type in v.HOST_DEVICES and 0 < p.numel() <= SMALL_HOST_VALUES and v.eager(p):
        # A few host values (one σ per sequence): Python floats, exactly as a float σ; the
        # dozen torch ops of the general path would cost several times the kernel.
        values = p.flatten().tolist()
        if not all(_in_range(is_sigma, x) for x in values):
            raise ValueError(_RANGE_MESSAGES[name])  # host values are always checked (`v.mode_for`)
        thresholds = array.array("i", [_float_threshold(is_sigma, x) for x in values])
        return torch.frombuffer(thresholds, dtype=torch.int32).view(p.shape)  # keeps the array alive
    # Contiguous: the kernels read the threshold with a unit column stride (a transposed sigma is not).
    p = p.to(torch.float64, memory_format=torch.contiguous_format, copy=True)
    if p.numel() and checks.active(p):
        # NaN fails both comparisons.
        bad = ~((p >= 0) & (p < math.inf)) if is_sigma else ~((p >= 0) & (p <= 1))
        checks.add(bad, lambda: _RANGE_MESSAGES[name], name)
    if is_sigma:
        p.neg_().expm1_().neg_()  # p = 1 - e^{-sigma}
    # Unchecked values (checks off, capture, tracing) get a defined threshold: a NaN would convert
    # to a device-dependent int, a negative one wraps to "always" in the kernels' unsigned compare.
    p.nan_to_num_(nan=0.0).clamp_(0.0, 1.0)
    return p.mul_(float(2**UNIFORM_BITS)).ceil_().to(torch.int32)


def _int_or_tensor(name: str, value: object) -> int:
    """An int argument that may also be an integer tensor (`fastbound._validate.as_int`'s rules)."""
    try:
        return v.as_int(name, value)
    except TypeError:
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(value).__name__}") from None


def _num_masked(value, rows: int, cols: int, maskable: torch.Tensor | None, device: torch.device,
                checks: v.ValueChecks) -> torch.Tensor:
    """Per-row k as int64 (B,), checked (in ``checks``) against the number of maskable positions of each row."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"num_masked must hold integers, got {value.dtype}")
        if value.device != device:
            raise ValueError(f"num_masked is on {value.device} but x0 is on {device}; move it to {device}")
        if value.numel() not in (1, rows) or value.dim() > 2:
            raise ValueError(f"num_masked of shape {tuple(value.shape)} must have one value per sequence ({rows},)")
        k = value.reshape(-1).to(torch.int64).expand(rows).contiguous()
    else:
        k = torch.full((rows,), _int_or_tensor("num_masked", value), dtype=torch.int64, device=device)
    if rows and checks.active(k):
        available = maskable.sum(1) if maskable is not None else torch.full_like(k, cols)
        bad = (k < 0) | (k > available)

        def message() -> str:
            row = int(bad.nonzero()[0, 0])
            return (f"num_masked[{row}] = {int(k[row])} is outside [0, {int(available[row])}], "
                    f"the number of maskable positions of sequence {row}")

        checks.add(bad, message, "num_masked")
    return k


def _mask_id(mask_id, graph: str, vocab_size: int, dtype: torch.dtype) -> int:
    id_max = torch.iinfo(dtype).max
    if graph == "uniform":
        if mask_id is not None:
            raise ValueError("mask_id applies to graph='absorb' only; the uniform graph has no mask token")
        if vocab_size - 1 > id_max:
            raise ValueError(f"vocab_size {vocab_size} has tokens that x0's dtype {dtype} cannot hold")
        return 0
    mask_id = v.check_extra_mask_id(mask_id, vocab_size)
    if mask_id > id_max:
        raise ValueError(f"mask_id {mask_id} does not fit x0's dtype {dtype}")
    return mask_id


_FAST = v.SignatureTable()
"""`_fast_key` signatures that a call through the full path validated and ran on the CPU kernel ->
the mask id it resolved."""


def _meta(value: object) -> object:
    """What the full path checks of a noise level or of maskable without reading it; False: not a
    fast-path argument."""
    kind = type(value)
    if value is None or kind is float or kind is int:
        return kind
    if kind not in v.PLAIN or value.is_nested or value.is_neg():
        return False  # a negative view (`conj().imag`): the C++ op reads the stored bits
    return value.dtype, value.shape, value.device, value.layout


def _fast_key(x0, sigma, mask_ratio, num_masked, graph, vocab_size, mask_id, maskable, backend) -> tuple | None:
    """The signature of a call `_fast_perturb` may run (None: the full path, always): eager plain
    tensors, a noise level sigma or mask_ratio, options of plain types. Reads no data."""
    if type(x0) not in v.PLAIN or num_masked is not None or x0.is_nested or not x0.is_cpu:
        return None
    if v.tracing(x0):
        return None
    if torch._C._are_functorch_transforms_active():
        return None  # torch.func's wrapper tensors have no storage: the full path handles (or refuses) them
    if type(graph) is not str or type(vocab_size) is not int or not (mask_id is None or type(mask_id) is int):
        return None  # unhashable or odd options: let the checks name them
    if not (backend is None or type(backend) is str):
        return None
    sigma_meta, ratio_meta, maskable_meta = _meta(sigma), _meta(mask_ratio), _meta(maskable)
    if sigma_meta is False or ratio_meta is False or maskable_meta is False:
        return None
    return (x0.dtype, x0.shape, x0.layout, sigma_meta, ratio_meta, maskable_meta, graph, vocab_size, mask_id, backend,
            *_backend.environment_key())


def _fast_perturb(x0, sigma, mask_ratio, maskable, graph: str, vocab_size: int, mask_id: int, seed,
                  offset) -> Perturbed:
    """`perturb` of a signature in `_FAST`: the one C++ op ``perturb_level``, which checks the level's
    values and the ids, forms the thresholds as `_threshold` does and runs the CPU kernel."""
    seed_bits, offset_bits = _uint64("seed", seed), _uint64("offset", offset)
    is_sigma = sigma is not None
    level = sigma if is_sigma else mask_ratio
    if isinstance(level, torch.Tensor):
        tensor, threshold = level, 0
    else:
        tensor, threshold = None, _checked_float_threshold(is_sigma, level)
    return Perturbed._make(_backend.kernel("cpu", "perturb_level")(
        x0, tensor, is_sigma, threshold, maskable, vocab_size, mask_id, _names.GRAPH_CODES[graph], seed_bits,
        offset_bits))


def perturb(
    x0: torch.Tensor,
    *,
    sigma: float | torch.Tensor | None = None,
    mask_ratio: float | torch.Tensor | None = None,
    num_masked: int | torch.Tensor | None = None,
    graph: Literal["absorb", "uniform"] = "absorb",
    vocab_size: int,
    mask_id: int | None = None,
    maskable: torch.Tensor | None = None,
    seed: int,
    offset: int = 0,
    backend: str | None = None,
) -> Perturbed:
    r"""Corrupts clean ids x0 into x_t in one fused pass, reproducibly on every backend.

    Give exactly one noise level:

    * ``sigma`` — total noise σ ≥ 0 (a float, per sequence (B,)/(B, 1), or per token
      (B, L)): each maskable token is corrupted with probability :math:`1 - e^{-\sigma}`
      (SEDD, Lou et al. 2024; MDLM, Sahoo et al. 2024).
    * ``mask_ratio`` — λ ∈ [0, 1] (float, per sequence or per token): corrupted with
      probability λ (the λ-time of infodis, Jeon et al. 2025).
    * ``num_masked`` — k (int or (B,) ints): exactly k maskable positions per sequence, a
      uniformly random subset (the time-free estimator's sampler), chosen as the k
      smallest Philox keys of the row (selection, not a sort).

    A corrupted token becomes ``mask_id`` (``graph="absorb"``; default ``vocab_size``, an
    extra id) or a token drawn uniformly from [0, vocab_size) (``graph="uniform"``; it may
    equal the original, SEDD's convention).

    Args:
        x0: clean ids (B, L) or (L,), any integer dtype, in [0, vocab_size).
        maskable: bool, broadcastable to x0: only True positions may be corrupted (e.g. the
            response of a prompt–response pair); the others are copied unchanged.
        seed, offset: ints in [0, 2^64) naming the noise; the call uses the counters
            ``offset .. offset + x0.numel() - 1`` (see the module docstring and `NoiseStream`).
        backend: None/"auto", "cpu", "cuda" or "triton" (`fastbound._backend.select`).

    Returns:
        ``Perturbed(x_t, mask)``: x_t of x0's shape and dtype; mask bool, True where the
        position was corrupted (resampled, for the uniform graph).

    Rule (``csrc/include/fastbound/philox.h``): element i reads words (w0, w1) of
    Philox4x32-10 at counter offset + i; it is corrupted iff u = (w0 >> 8)·2^-24 < p, with p
    formed in float64 (bit-identical across backends on one device; across devices, σ given
    as a tensor relies on both devices' float64 expm1 agreeing at the 2^-24 grid, and a float
    σ or any λ always agrees); the uniform replacement is floor(w1·V / 2^32).
    """
    key = _fast_key(x0, sigma, mask_ratio, num_masked, graph, vocab_size, mask_id, maskable, backend)
    fast_mask_id = _FAST.get(key)
    if fast_mask_id is not None:
        return _fast_perturb(x0, sigma, mask_ratio, maskable, graph, vocab_size, fast_mask_id, seed, offset)
    x0 = v.check_ids("x0", x0)
    if x0.dim() not in (1, 2):
        raise ValueError(f"x0 must have shape (B, L) or (L,), got {tuple(x0.shape)}")
    v.check_choice("graph", graph, _names.GRAPHS)
    vocab_size = v.as_int("vocab_size", vocab_size)
    if not 1 <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size must lie in [1, 2^32 - 1], got {vocab_size}")
    mask_id = _mask_id(mask_id, graph, vocab_size, x0.dtype)
    given = [name for name, val in (("sigma", sigma), ("mask_ratio", mask_ratio), ("num_masked", num_masked))
             if val is not None]
    if len(given) != 1:
        raise ValueError(f"pass exactly one of sigma, mask_ratio and num_masked (got {given or 'none'})")
    seed_bits, offset_bits = _uint64("seed", seed), _uint64("offset", offset)
    device = x0.device
    one_row = x0.dim() == 1
    flat = x0.reshape(1, -1) if one_row else x0
    rows, cols = flat.shape
    v.check_size("x0", flat.numel(), "positions")
    kernel_backend = _backend.select(device, backend)

    if maskable is not None:
        maskable = v.check_maskable(maskable, x0).view(rows, cols)
    checks = v.ValueChecks()
    if sigma is not None or mask_ratio is not None:
        name = "sigma" if sigma is not None else "mask_ratio"
        threshold = _threshold(name, sigma if sigma is not None else mask_ratio, rows, cols, one_row, device, checks)
        k = None
    else:
        threshold, k = None, _num_masked(num_masked, rows, cols, maskable, device, checks)
    if kernel_backend != "cpu":  # the C++ CPU kernel checks the ids itself, in the same pass
        checks.ids("x0", flat, 0, vocab_size)
    checks.run()
    if kernel_backend == "cpu":
        _FAST.remember(key, mask_id)
    if flat.numel() == 0:
        return Perturbed(x0.clone(), torch.zeros(x0.shape, dtype=torch.bool, device=device))
    op = _backend.kernel(kernel_backend, "perturb")
    x_t, mask = op(flat.contiguous(), threshold, k, maskable, vocab_size, mask_id, _names.GRAPH_CODES[graph],
                   seed_bits, offset_bits)
    if one_row:
        x_t, mask = x_t.view(x0.shape), mask.view(x0.shape)
    return Perturbed(x_t, mask)


# -----------------------------------------------------------------------------
# Time samplers
# -----------------------------------------------------------------------------


def sample_times(
    n: int,
    *,
    method: Literal["iid", "antithetic", "stratified"] = "iid",
    eps: float = 1e-3,
    seed: int,
    offset: int = 0,
    device: torch.device | str | None = None,
    importance: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    r"""n diffusion times in [eps, 1] from the counter-based RNG (float32 (n,)).

    With :math:`u_i = (w_0 \gg 8)\,2^{-24}` the uniforms of counters offset + i:

    * ``"iid"``: :math:`s_i = u_i`.
    * ``"antithetic"``: one shared :math:`u_0`, :math:`s_i = (u_0 + i/n) \bmod 1`
      (low-discrepancy times of VDM, Kingma et al. 2021, as used by infodis).
    * ``"stratified"``: :math:`s_i = (u_i + i)/n`, one time per stratum (MDLM's
      "antithetic" sampler, Sahoo et al. 2024).

    then :math:`t_i = (1 - \epsilon) s_i + \epsilon`. Every method uses the counters
    ``offset .. offset + n - 1`` (antithetic reads only the first), so offsets advance by n.

    ``importance=True`` replaces the last step by :math:`t_i = \epsilon^{1 - s_i}`: log t is
    uniform on [log ε, 0], density :math:`p(t) = 1/(t \log(1/\epsilon))` on [ε, 1]. Under the
    log-linear schedule (:math:`1 - e^{-\sigma(t)} = (1-\epsilon)t`, `schedules.LogLinear`) this
    makes :math:`\log(1 - e^{-\sigma})` uniform — MDLM's importance-sampling transform
    (``importance_sampling_transformation``), written in t. Keep an estimate of
    :math:`\int_\epsilon^1 f(t)\,dt` unbiased by weighting each sample with
    :math:`1/p(t) = t \log(1/\epsilon)` (for the MDLM loss, whose weight is 1/t, the product
    is the constant log(1/ε)).

    All arithmetic is float64 IEEE (+, ×, /, mod), rounded once to float32, so the times
    are bit-identical on every device; with ``importance=True`` they go through ``pow``,
    whose last float64 bit may differ between devices (rarely visible after rounding).
    """
    n = v.as_int("n", n, minimum=0)
    v.check_choice("method", method, TIME_METHODS)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 <= eps < 1:
        raise ValueError(f"eps must lie in [0, 1), got {eps!r}")
    if importance and eps <= 0:
        raise ValueError("eps must be > 0 with importance=True (t = eps^(1-s) needs log eps)")
    u = _uniforms(n, seed, offset, device, backend)
    i = torch.arange(n, dtype=torch.float64, device=u.device)
    # Divide by a tensor on u's device: with a Python divisor a GPU multiplies by its
    # reciprocal, which is not the correctly rounded quotient the CPU computes.
    count = torch.full((), n, dtype=torch.float64, device=u.device)
    if method == "iid":
        s = u
    elif method == "antithetic":
        s = torch.remainder(u[:1] + i / count, 1.0)
    else:
        s = (u + i) / count
    if importance:
        t = torch.pow(float(eps), 1.0 - s)
    else:
        t = (1.0 - eps) * s + eps
    return t.float()


def sample_num_masked(
    n: int,
    length: int | torch.Tensor,
    *,
    weights: Literal["inverse", "uniform"] = "inverse",
    seed: int,
    offset: int = 0,
    device: torch.device | str | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    r"""n numbers of masked positions k ∈ {1, ..., L}, for `perturb(num_masked=k)`.

    * ``"inverse"``: :math:`P(k) = \frac{1/k}{H_L}`, :math:`H_L = \sum_{j \le L} 1/j` — the
      time-free (exact) estimator's law of k (infodis, Jeon et al. 2025).
    * ``"uniform"``: :math:`P(k) = 1/L`.

    ``length`` is L, an int or a (n,) integer tensor (per-sequence number of maskable
    positions, each ≥ 1). Returns int64 (n,) on ``length``'s device (else ``device``).
    Sample i reads word w0 of counter offset + i (offsets advance by n):
    uniform: :math:`k = 1 + \lfloor w_0 L / 2^{32} \rfloor`; inverse: the smallest k with
    :math:`H_k \ge (w_0 + \tfrac12)\,2^{-32} H_L`, against a float64 table of harmonic
    numbers built on the host, so every device returns the same k. Each P(k) is exact up
    to the 2^-32 resolution of the word.

    Host reads: none for an int ``length``; a tensor ``length`` is read once for
    ``"inverse"`` (the table's size depends on it) and checked in the mode of
    `fastbound.value_checks` for ``"uniform"``.
    """
    n = v.as_int("n", n, minimum=0)
    v.check_choice("weights", weights, NUM_MASKED_WEIGHTS)
    dev = _device(device, length)
    if device is not None and isinstance(length, torch.Tensor):
        asked = torch.device(device)
        if asked.type != dev.type or asked.index not in (None, dev.index):
            raise ValueError(f"length is on {dev} but device={device!r} was asked for")
    if not isinstance(length, torch.Tensor):
        length = _int_or_tensor("length", length)
        lengths = torch.full((n,), length, dtype=torch.int64, device=dev)
        bounds = (length, length)
    else:
        if length.is_floating_point() or length.is_complex() or length.dtype == torch.bool:
            raise TypeError(f"length must hold integers, got {length.dtype}")
        if length.shape != (n,):
            raise ValueError(f"length must be an int or have shape ({n},), got {tuple(length.shape)}")
        lengths = length.to(torch.int64)
        bounds = None
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=dev)
    limit = MAX_INVERSE_LENGTH if weights == "inverse" else v.INT32_MAX

    def out_of_range() -> str:
        lo, hi = bounds if bounds is not None else (int(lengths.min()), int(lengths.max()))
        return f"length must lie in [1, {limit}] for weights={weights!r}, got values in [{lo}, {hi}]"

    if bounds is None and weights == "inverse":
        # One read whatever the value-check mode: the size of the harmonic table depends on the data.
        bounds = int(lengths.min()), int(lengths.max())
    if bounds is not None:
        if bounds[0] < 1 or bounds[1] > limit:
            raise ValueError(out_of_range())
    else:
        checks = v.ValueChecks()
        checks.add((lengths < 1) | (lengths > limit), out_of_range, "length")
        checks.run()
        lengths = lengths.clamp(1, limit)  # a defined k in [1, length] where the checks are off
    w0 = philox_words(n, seed=seed, offset=offset, device=dev, backend=backend)[:, 0]
    if weights == "uniform":
        return 1 + ((w0 * lengths) >> 32)
    hi = bounds[1]
    target = (w0.double() + 0.5) * 2.0**-32 * _harmonic.harmonic_numbers(hi, dev)[lengths]
    return _harmonic.smallest_k(target, hi)
