"""Argument checks shared by the public API.

Shape, dtype and device checks read no data and always run. Value checks
(ids in range, sigma > 0) read the small per-position tensors, never the
(..., V) scores; they run in eager mode and are skipped while `torch.compile`
traces (a data-dependent check would break the graph). The kernels still
refuse out-of-range ids themselves, so a traced call never reads out of bounds.
"""

from __future__ import annotations

from typing import Iterable

import torch

INT32_MAX = 2**31 - 1
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def eager() -> bool:
    """True when value checks may read data (not while torch.compile traces)."""
    return not torch.compiler.is_compiling()


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float_tensor(name: str, value: object, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    t = check_tensor(name, value)
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    return t


def check_ids(name: str, value: object, shape: torch.Size | None = None) -> torch.Tensor:
    t = check_tensor(name, value)
    if t.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must hold integer token ids (e.g. torch.int64), got {t.dtype}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    return t


def check_same_device(device: torch.device, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the scores are on {device}; move it to {device}")


def check_size(name: str, n: int, what: str) -> None:
    """Refuses sizes the kernels' 32-bit grid and index arithmetic cannot address."""
    if n > INT32_MAX:
        raise ValueError(f"{name} has {n} {what}; fastbound's kernels support at most {INT32_MAX}")


def check_id_range(name: str, ids: torch.Tensor, lo: int, hi: int, *, skip: int | None = None,
                   allow: int | None = None) -> None:
    """Ids must lie in [lo, hi); ``skip`` (ignore_index) and ``allow`` (a mask id) are exempt."""
    if not eager() or ids.numel() == 0:
        return
    bad = (ids < lo) | (ids >= hi)
    if skip is not None:
        bad &= ids != skip
    if allow is not None:
        bad &= ids != allow
    if bool(bad.any()):
        first = ids[bad].flatten()[0].item()
        raise ValueError(f"{name} contains id {first} outside [{lo}, {hi})")


def as_rows(name: str, value: float | torch.Tensor | None, shape: torch.Size, dtype: torch.dtype,
            device: torch.device, default: float | None = None) -> torch.Tensor:
    """Broadcasts a scalar or tensor to ``shape`` and flattens it to (N,) of ``dtype``."""
    if value is None:
        if default is None:
            raise ValueError(f"{name} is required")
        value = default
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.dtype in INT_DTYPES):
            raise TypeError(f"{name} must be a real number or tensor, got {value.dtype}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the scores are on {device}; move it to {device}")
        if value.requires_grad:
            raise ValueError(f"fastbound differentiates the loss with respect to the scores only; pass {name}.detach()")
        try:
            value = torch.broadcast_to(value, shape)
        except RuntimeError:
            raise ValueError(f"{name} of shape {tuple(value.shape)} does not broadcast to {tuple(shape)}") from None
        return value.reshape(-1).to(dtype).contiguous()
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    return torch.full((int(torch.Size(shape).numel()),), float(value), dtype=dtype, device=device)


def check_positive_finite(name: str, value: torch.Tensor) -> None:
    if eager() and value.numel() and not bool(((value > 0) & torch.isfinite(value)).all()):
        raise ValueError(f"{name} must be positive and finite everywhere")
