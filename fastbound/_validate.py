"""Argument checks shared by the public API, and the mode of the value checks.

Shape, dtype and device checks read no data and always run. Value checks
(ids in range, sigma > 0) read the small per-position tensors, never the
(..., V) scores; a call gathers them in a `ValueChecks` and runs them together.
They run in eager mode and are skipped while `torch.compile`, AOTAutograd or
make_fx trace (a data-dependent check would break the graph).

Reading a check's verdict on the host costs nothing for CPU tensors, but on a GPU
it blocks the host until the queue drains and cannot be captured in a CUDA
graph. So on an accelerator the value checks follow a mode, set by
`value_checks` (a global setter and a context manager) or the environment
variable ``FASTBOUND_VALUE_CHECKS``:

* ``"sync"`` (default): one host synchronisation per call, and a ValueError
  naming the argument. The default because it is the only mode whose failure is
  an ordinary, catchable error at the call that caused it, and it never leaves a
  bad value unchecked in eager code; its cost is that the host waits at each call
  for the GPU to finish what is queued, so launches stop overlapping kernels (not
  measured here: no GPU has run this code).
* ``"async"``: the verdicts are combined on the device and handed to
  ``torch._assert_async``: no host synchronisation. A failure surfaces at a
  later synchronisation as a CUDA device-side assert, which does not name the
  argument and poisons the CUDA context (the process must restart). For
  tensors on the host it raises a RuntimeError at once.
* ``"off"``: no value check; the kernels' NaN policy is what is left. The CUDA
  and Triton loss kernels never read out of bounds: a row whose ids are bad, or
  (score entropy) whose sigma is not positive and finite, gets a NaN loss and a
  NaN gradient row, so a bad batch shows up as a NaN loss. A bad value that no
  row reads (x0 at an unmasked position, the sigma of an ignored row) changes
  nothing; `integrate_step` fills the whole accumulator with NaN for an index
  out of range; `perturb` and the samplers have no NaN to give (ids are
  integers): see `fastbound.noise`.

While the current CUDA stream is capturing a graph, a host read is impossible,
so ``"sync"`` falls back to the kernels' NaN policy (as under tracing) and
``"async"`` stays async (its assert is captured into the graph and runs at every
replay). Tensors on the host (`HOST_DEVICES`) are always checked synchronously,
whatever the mode: the read is free there.
"""

from __future__ import annotations

import operator
import os
from typing import Callable, Iterable

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.fx.experimental.proxy_tensor import get_proxy_mode

INT32_MAX = 2**31 - 1
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def tracing(*tensors: torch.Tensor) -> bool:
    """True while dynamo, AOTAutograd or make_fx trace: there is no data to branch on."""
    if torch.compiler.is_compiling() or get_proxy_mode() is not None:
        return True
    for t in tensors:  # a loop, not any(generator): this runs on every call of the losses
        if torch._is_functional_tensor(t) or type(t) not in PLAIN and is_fake(t):
            return True
    return False


PLAIN = (torch.Tensor, torch.nn.Parameter)
"""Tensor types that are never fake (checked by type first: `is_fake` costs microseconds)."""


def eager(*tensors: torch.Tensor) -> bool:
    """True when value checks may read the data of ``tensors``."""
    return not tracing(*tensors)


VALUE_CHECK_MODES = ("sync", "async", "off")
VALUE_CHECKS_ENV = "FASTBOUND_VALUE_CHECKS"
HOST_DEVICES = frozenset({"cpu"})
"""Device types whose values the host reads without a synchronisation: always checked synchronously."""

_mode: str | None = None
"""The mode set by `value_checks`; None: ``FASTBOUND_VALUE_CHECKS``, else "sync"."""


def _parse_mode(mode: object, name: str) -> str:
    if mode not in VALUE_CHECK_MODES:
        raise ValueError(f"{name} must be one of {VALUE_CHECK_MODES}, got {mode!r}")
    return mode


def value_check_mode() -> str:
    """The mode in force: the one set by `value_checks`, else ``FASTBOUND_VALUE_CHECKS``, else "sync"."""
    if _mode is not None:
        return _mode
    env = os.environ.get(VALUE_CHECKS_ENV)
    return "sync" if not env else _parse_mode(env, VALUE_CHECKS_ENV)


class value_checks:
    """Sets the mode of the value checks on accelerators: "sync", "async" or "off" (see this module).

    ``fastbound.value_checks("async")`` sets it for the process (it overrides
    ``FASTBOUND_VALUE_CHECKS``); as a context manager, ``with fastbound.value_checks("off"):``,
    it restores the previous mode on exit. ``value_checks(None)`` returns to the environment
    variable. The mode is global, not per thread.
    """

    def __init__(self, mode: str | None) -> None:
        global _mode
        if mode is not None:
            _parse_mode(mode, "mode")
        self._previous, _mode = _mode, mode

    def __enter__(self) -> "value_checks":
        return self

    def __exit__(self, *exc: object) -> None:
        global _mode
        _mode = self._previous


def mode_for(device: torch.device) -> str:
    """What the value checks of tensors on ``device`` do now: "sync", "async" or "off"."""
    mode = value_check_mode()
    if device.type in HOST_DEVICES:
        return "sync"
    if mode == "sync" and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return "off"  # no host read while capturing: the kernels' NaN policy, as under tracing
    return mode


class SignatureTable:
    """Signatures of calls whose data-free argument checks passed -> what the checks resolved
    (e.g. the kernel backend), so later calls of the same signature skip them. Bounded: a full
    table starts again, so a process that sees many shapes keeps the recent ones cached. A
    None key (a call that checks every time) is neither looked up nor stored."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._table: dict[tuple, object] = {}

    def get(self, key: tuple | None) -> object:
        return None if key is None else self._table.get(key)

    def remember(self, key: tuple | None, value: object) -> None:
        if key is None:
            return
        if len(self._table) >= self.limit:
            self._table.clear()
        self._table[key] = value

    def __len__(self) -> int:
        return len(self._table)


class ValueChecks:
    """Data-dependent checks gathered during argument parsing and run together (see the module docstring).

    Each check is a boolean tensor marking bad elements, a function that writes the
    error message (called only on a synchronous failure, where extra reads are fine)
    and the argument's name (for the asynchronous assert's message). ``"sync"``:
    one host read, a ValueError for the first failed check; ``"async"``: one
    ``torch._assert_async`` on the combined verdict; ``"off"``: nothing is computed.
    """

    def __init__(self) -> None:
        self._checks: list[tuple[torch.Tensor, Callable[[], str], str]] = []
        self._mode: str | None = None

    def active(self, t: torch.Tensor) -> bool:
        """Whether checks of ``t`` run: eager, and the mode for its device is not "off"."""
        if not eager(t):
            return False
        if self._mode is None:
            self._mode = mode_for(t.device)
        return self._mode != "off"

    def add(self, bad: torch.Tensor, message: Callable[[], str], name: str = "") -> None:
        if bad.numel() and self.active(bad):
            self._checks.append((bad, message, name))

    def ids(self, name: str, ids: torch.Tensor, lo: int, hi: int, *, skip: int | None = None,
            allow: int | None = None) -> None:
        """Ids must lie in [lo, hi); ``skip`` (ignore_index) and ``allow`` (a mask id) are exempt.

        Compared in int64: a bound beyond a narrow id dtype (uint8, int8) must not wrap.
        """
        if not ids.numel() or not self.active(ids):
            return
        ids = ids.long()
        bad = (ids < lo) | (ids >= hi)
        if skip is not None:
            bad &= ids != skip
        if allow is not None:
            bad &= ids != allow
        self.add(bad, lambda: f"{name} contains id {ids[bad].flatten()[0].item()} outside [{lo}, {hi})", name)

    def positive_finite(self, name: str, value: torch.Tensor, detail: str = "") -> None:
        """``detail`` ends the message (e.g. the dtype in which a value overflowed)."""
        if value.numel() and self.active(value):
            self.add(~((value > 0) & torch.isfinite(value)),
                     lambda: f"{name} must be positive and finite everywhere{detail}", name)

    def run(self) -> None:
        if not self._checks:
            return
        flags = torch.stack([bad.any() for bad, _, _ in self._checks])
        if self._mode == "async":
            names = ", ".join(dict.fromkeys(name for _, _, name in self._checks if name)) or "argument values"
            torch._assert_async(~flags.any(), f"fastbound: a value check failed ({names}); "
                                f"{VALUE_CHECKS_ENV}=sync raises a ValueError naming the argument")
            return
        if bool(flags.any()):
            first = int(flags.to(torch.uint8).argmax())
            raise ValueError(self._checks[first][1]())


def check_flag(name: str, value: object) -> None:
    """A Python bool (a truthy string such as "no" must not switch a write over the scores on)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_tensor(name: str, value: object) -> torch.Tensor:
    """A dense (strided, not nested) torch.Tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.is_nested:
        raise TypeError(f"{name} must be a dense tensor, got a nested tensor; pad it (e.g. .to_padded_tensor(0))")
    if value.layout != torch.strided:
        raise TypeError(f"{name} must be a dense tensor, got layout {value.layout}; call .to_dense()")
    return value


def check_accumulator(name: str, t: torch.Tensor) -> None:
    """An accumulator the integration steps add into in place, below autograd: one that requires
    grad (under grad mode) would get no gradient, where PyTorch refuses an in-place op on a leaf
    that requires grad, so it is refused too."""
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad: the step adds into it in place, outside autograd, so no "
                         f"gradient would reach it; pass a tensor that does not require grad (e.g. {name}.detach())")


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
            raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}; move it to {device}")


def check_size(name: str, n: int, what: str) -> None:
    """Refuses sizes the kernels' 32-bit grid and index arithmetic cannot address."""
    if n > INT32_MAX:
        raise ValueError(f"{name} has {n} {what}; fastbound's kernels support at most {INT32_MAX}")


def check_id_range(name: str, ids: torch.Tensor, lo: int, hi: int, *, skip: int | None = None,
                   allow: int | None = None) -> None:
    """Ids must lie in [lo, hi) (see `ValueChecks.ids`); checked at once."""
    checks = ValueChecks()
    checks.ids(name, ids, lo, hi, skip=skip, allow=allow)
    checks.run()


def as_int(name: str, value: object, minimum: int | None = None) -> int:
    """An integer argument as a Python int: an int or a NumPy integer (what `operator.index` takes),
    never a bool or a tensor; at least ``minimum`` where it is given."""
    if isinstance(value, (bool, torch.Tensor)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if type(value) is not int and not isinstance(value, torch.SymInt):  # a dynamic int of torch.compile stays symbolic
        try:
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_int64(name: str, value: object) -> int:
    """An int (`as_int`) that fits the kernels' int64 arguments."""
    value = as_int(name, value)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{name} must fit in int64, got {value}")
    return value


def as_rows(name: str, value: float | torch.Tensor | None, shape: torch.Size, dtype: torch.dtype,
            device: torch.device, default: float | None = None, differentiable: bool = False) -> torch.Tensor:
    """Broadcasts a scalar or tensor to ``shape`` and flattens it to (N,) of ``dtype``.

    ``differentiable``: a tensor that requires grad keeps its graph (else it is refused).
    """
    if value is None:
        if default is None:
            raise ValueError(f"{name} is required")
        value = default
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.dtype in INT_DTYPES):
            raise TypeError(f"{name} must be a real number or tensor, got {value.dtype}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the other inputs are on {device}; move it to {device}")
        if value.requires_grad and not differentiable:
            raise ValueError(f"{name} requires grad, but this fastbound call does not differentiate it; "
                             f"pass {name}.detach()")
        try:
            value = torch.broadcast_to(value, shape)
        except RuntimeError:
            raise ValueError(f"{name} of shape {tuple(value.shape)} does not broadcast to {tuple(shape)}") from None
        return value.reshape(-1).to(dtype).contiguous()
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if abs(float(value)) > torch.finfo(dtype).max:
        raise ValueError(f"{name} = {value!r} overflows {dtype}, the dtype it is computed in here")
    return torch.full((int(torch.Size(shape).numel()),), float(value), dtype=dtype, device=device)


def check_extra_mask_id(mask_id: object, vocab_size: int) -> int:
    """The absorbing mask as an extra id after the real tokens [0, vocab_size); default vocab_size."""
    if mask_id is None:
        return vocab_size
    mask_id = as_int("mask_id", mask_id, minimum=0)
    if mask_id < vocab_size:
        raise ValueError(f"mask_id {mask_id} is a real token (ids in [0, vocab_size={vocab_size})); "
                         "the mask must be an extra id >= vocab_size")
    return mask_id


def check_maskable(maskable: object, x0: torch.Tensor) -> torch.Tensor:
    """A bool tensor broadcastable to ``x0``, returned contiguous with x0's shape."""
    if not isinstance(maskable, torch.Tensor) or maskable.dtype != torch.bool:
        got = maskable.dtype if isinstance(maskable, torch.Tensor) else type(maskable).__name__
        raise TypeError(f"maskable must be a bool tensor, got {got}")
    if maskable.device != x0.device:
        raise ValueError(f"maskable is on {maskable.device} but x0 is on {x0.device}; move it to {x0.device}")
    try:
        return torch.broadcast_to(maskable, x0.shape).contiguous()
    except RuntimeError:
        raise ValueError(f"maskable of shape {tuple(maskable.shape)} does not broadcast to x0's "
                         f"shape {tuple(x0.shape)}") from None
