"""Argument checks shared by `perturb`, `denoising_loss` and `integrate_step`.

Shape, dtype and device checks always run; value checks (finite x, finite
log-SNR) read the data once in eager mode and are skipped while tracing, as in
`fastbound._validate`.
"""

from __future__ import annotations

import math

import torch

from .. import _backend
from .. import _ops as _discrete_ops
from .. import _validate as v
from ..noise import _uint64 as uint64_bits  # an int in [0, 2^64) as the int64 bit pattern the ops take

WARM_LAWS = ("gaussian", "laplace", "logistic", "uniform")
"""The warm-up laws, each scaled to mean 0 and variance 1."""


def batch_tensor(name: str, value: object) -> torch.Tensor:
    """A floating tensor of shape (B, ...) with at most 2^31 - 1 elements."""
    t = v.check_float_tensor(name, value)
    if t.dim() < 1:
        raise ValueError(f"{name} must have shape (B, ...), got a scalar")
    v.check_size(name, t.numel(), "elements")
    return t


def check_finite(name: str, t: torch.Tensor, eager: bool | None = None) -> None:
    """Follows the value-check mode of ``t``'s device (`fastbound.value_checks`): one read in "sync".

    That read is a sum, finite exactly when every element is (a non-finite element makes the sum
    NaN or infinite) unless it overflows; only then does the elementwise check decide.
    """
    _discrete_ops.refuse_vmap(name, t, "call outside the vmap")
    if not t.numel() or not (v.eager(t) if eager is None else eager):
        return
    # Host tensors are always read at once (`v.mode_for`, whose mode lookup costs a microsecond).
    mode = "sync" if t.device.type in v.HOST_DEVICES else v.mode_for(t.device)
    if mode == "off" or (mode == "sync" and math.isfinite(t.sum().item())):
        return
    checks = v.ValueChecks()
    checks.add(~torch.isfinite(t), lambda: f"{name} must be finite everywhere (it holds NaN or infinity, or values "
               f"beyond {t.dtype}'s range)", name)
    checks.run()


def check_finite_rows(rows: dict[str, torch.Tensor], eager: bool) -> None:
    """`check_finite` of several (B,) float64 host tensors in one read: their elementwise product
    summed, which is finite only if every element of every tensor is (inf times x is inf or NaN,
    NaN stays NaN, and a non-finite term makes the sum so); when it is not (or overflows), each
    tensor is checked alone and the first non-finite one named."""
    for name, t in rows.items():
        _discrete_ops.refuse_vmap(name, t, "call outside the vmap")
    tensors = list(rows.values())
    if (eager and len(tensors) == 2 and all(t.device.type in v.HOST_DEVICES and t.dtype == torch.float64
                                            for t in tensors) and math.isfinite(torch.dot(*tensors).item())):
        return
    for name, t in rows.items():
        check_finite(name, t, eager)


def rows(t: torch.Tensor) -> torch.Tensor:
    """(B, ...) as a contiguous (B, d) view or copy."""
    if t.is_contiguous():
        return t if t.dim() == 2 else t.view(t.shape[0], -1) if t.shape[0] else t.view(0, math.prod(t.shape[1:]))
    return t.reshape(t.shape[0], -1).contiguous() if t.shape[0] else t.reshape(0, int(math.prod(t.shape[1:])))


_CONSTANTS: dict[tuple, torch.Tensor] = {}
"""(value, its sign, n, dtype, device) -> the (n,) tensor of a float argument, for eager calls (never written)."""
_MAX_CONSTANTS = 64


def _constant(value: float, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (value, math.copysign(1.0, value), n, dtype, device)  # the sign tells 0.0 from -0.0
    out = _CONSTANTS.get(key)
    if out is None:
        with torch.inference_mode(False):  # cached: must be usable by later calls that save it for backward
            out = torch.full((n,), value, dtype=dtype, device=device)
        # Not while a CUDA graph captures: its fill would run only at replay; nor a tensor a
        # torch.func transform wrapped (fastbound.losses._ones).
        if (len(_CONSTANTS) < _MAX_CONSTANTS and not torch._C._functorch.is_functorch_wrapped_tensor(out)
                and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())):
            _CONSTANTS[key] = out
    return out


def per_sample(name: str, value: float | torch.Tensor | None, n: int, dtype: torch.dtype, device: torch.device,
               default: float | None = None, finite: bool = True, factor: float = 1.0,
               eager: bool | None = None, differentiable: bool = False) -> torch.Tensor:
    """A float or a (B,) / (1,) / 0-dim tensor, times ``factor``, as a contiguous (B,) tensor of ``dtype``.

    A float is checked on the host (no tensor pass) and its tensor cached in eager mode; a
    tensor's finiteness is read once (`check_finite`). ``eager``: `fastbound._validate.eager`
    of the call's tensors, when the caller knows it. ``differentiable``: a tensor that requires
    grad keeps its graph (else it is refused).
    """
    if isinstance(value, torch.Tensor):
        if value.dim() > 1:
            raise ValueError(f"{name} must be a float or a ({n},) tensor (one value per sample), got shape "
                             f"{tuple(value.shape)}")
        if value.dim() == 1 and value.shape[0] not in (1, n):
            raise ValueError(f"{name} must have one value per sample ({n},), got shape {tuple(value.shape)}")
        if (value.dim() == 1 and value.shape[0] == n and value.dtype == dtype and value.device == device
                and not value.requires_grad and value.is_contiguous()):
            out = value  # already what the kernels take
        else:
            out = v.as_rows(name, value, torch.Size([n]), dtype, device, default=default,
                            differentiable=differentiable)
        if finite:
            check_finite(name, out, eager)
        return out if factor == 1.0 else out * factor
    value = default if value is None else value
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # else as_rows raises the TypeError
        if finite and not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        value = float(value) * factor
        if abs(value) <= torch.finfo(dtype).max and (v.eager() if eager is None else eager):
            return _constant(value, n, dtype, device)
    return v.as_rows(name, value, torch.Size([n]), dtype, device, default=default)


def check_index(index: torch.Tensor, n_slots: int, eager: bool) -> None:
    """Slots in [0, n_slots) (`fastbound._validate.check_id_range`); on the host one min/max pass first."""
    if eager and index.numel() and index.device.type in v.HOST_DEVICES:
        lo, hi = torch.aminmax(index)
        if lo.item() >= 0 and hi.item() < n_slots:
            return
    v.check_id_range("index", index, 0, n_slots)


def check_warm(warm: object, warm_std: object) -> None:
    """A warm-up law (or None) and its standard deviation σ0 >= 0 (0 without a law)."""
    if warm is not None:
        v.check_choice("warm", warm, WARM_LAWS)
    if not isinstance(warm_std, (int, float)) or isinstance(warm_std, bool):
        raise TypeError(f"warm_std must be a float, got {type(warm_std).__name__}")
    if not (math.isfinite(warm_std) and warm_std >= 0):
        raise ValueError(f"warm_std must be finite and >= 0, got {warm_std}")
    if warm is None and warm_std != 0:
        raise ValueError(f"warm_std={warm_std} needs a warm-up law: pass warm='gaussian' (or another of {WARM_LAWS})")


def seed_offset(seed: object, offset: object) -> tuple[int, int]:
    return uint64_bits("seed", seed), uint64_bits("offset", offset)


def eps_pair(eps_hat: object, eps: object, seed: object, offset: object, what: str):
    """Checks (ε̂, ε or None): returns (ε̂ as (B, d), ε as (B, d) or None, seed bits, offset bits)."""
    eps_hat = batch_tensor("eps_hat", eps_hat)
    if eps is None:
        if seed is None:
            raise ValueError(f"{what} needs eps, or seed (and offset) to regenerate it as perturb drew it")
        seed_bits, offset_bits = seed_offset(seed, offset)
        eps_rows = None
    else:
        eps = v.check_float_tensor("eps", eps)
        if eps.shape != eps_hat.shape:
            raise ValueError(f"eps has shape {tuple(eps.shape)} but eps_hat has {tuple(eps_hat.shape)}")
        if eps.dtype != eps_hat.dtype:
            raise TypeError(f"eps has dtype {eps.dtype} but eps_hat has {eps_hat.dtype}; pass eps.to(eps_hat.dtype) "
                            "or eps=None with the seed and offset of perturb")
        if eps.device != eps_hat.device:
            raise ValueError(f"eps is on {eps.device} but eps_hat is on {eps_hat.device}; move it to {eps_hat.device}")
        if seed is not None:
            raise ValueError("pass either eps or seed (to regenerate eps), not both")
        if offset != 0:
            raise ValueError("offset applies only when eps is regenerated (eps=None)")
        if eps.requires_grad:
            raise ValueError("fastbound differentiates the loss with respect to eps_hat only; pass eps.detach()")
        seed_bits, offset_bits = 0, 0
        eps_rows = rows(eps)
    return rows(eps_hat), eps_rows, seed_bits, offset_bits


_CHECKED = v.SignatureTable()
"""`signature`s of calls whose argument checks passed -> the kernel backend they resolved to."""


def signature(what: str, eps_hat: object, eps: object, seed: object, offset: object, backend: object,
              *options: object) -> tuple | None:
    """What `eps_pair` and `fastbound._backend.select` depend on, for plain eager CPU tensors (None:
    check every time); ``options``: hashable facts of the call's other checks. Reads no data.

    The value checks (finite weights, seed and offset in range) are not in it: they run every call.
    """
    if type(eps_hat) not in v.PLAIN or eps_hat.is_nested or eps_hat.device.type != "cpu" or v.tracing(eps_hat):
        return None
    if torch._C._are_functorch_transforms_active() or not (backend is None or isinstance(backend, str)):
        return None  # torch.func's wrapper tensors have no storage; odd options: let the checks name them
    if eps is None:
        eps_meta = None if seed is None else "regenerated"  # no seed: the full path raises
    elif type(eps) not in v.PLAIN or eps.is_nested or seed is not None or type(offset) is not int or offset:
        return None
    else:
        eps_meta = (eps.dtype, eps.shape, eps.device, eps.layout, eps.requires_grad)
    return (what, eps_hat.dtype, eps_hat.shape, eps_hat.layout, eps_meta, backend, *_backend.environment_key(),
            *options)


def checked_backend(key: tuple | None) -> str | None:
    """The backend of a `signature` already checked, else None (check now, then `remember`)."""
    return _CHECKED.get(key)


def remember(key: tuple | None, backend: str) -> None:
    """After a call's checks passed (`fastbound._validate.SignatureTable`)."""
    _CHECKED.remember(key, backend)


def host_row(value: object, n: int) -> tuple[torch.Tensor | None, float] | None:
    """(tensor or None, float) as the C++ CPU ops take a weight or baseline: a finite float, or a
    (B,) float64 CPU tensor that needs no gradient (its finiteness the op checks); None: any other
    form, for `per_sample` (which names what is wrong)."""
    kind = type(value)
    if kind is float or kind is int:
        return (None, float(value)) if math.isfinite(value) else None
    if (kind in v.PLAIN and value.dtype == torch.float64 and value.shape == (n,) and value.device.type == "cpu"
            and not value.requires_grad and value.is_contiguous()):
        return value, 0.0
    return None


def checked_seed_offset(eps: torch.Tensor | None, seed: object, offset: object) -> tuple[int, int]:
    """The seed and offset bits of a call whose `signature` is checked: their values checked when
    ε is regenerated, else (0, 0) (a stored ε: the kernels read no seed)."""
    return seed_offset(seed, offset) if eps is None else (0, 0)


def checked_pair(eps_hat: torch.Tensor, eps: torch.Tensor | None, seed: object, offset: object):
    """`eps_pair`'s result for a call whose `signature` is checked: only the seed and offset values."""
    return (rows(eps_hat), None if eps is None else rows(eps), *checked_seed_offset(eps, seed, offset))
