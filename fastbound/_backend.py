"""Chooses the kernel backend for a device.

Backends: "cpu" (the C++ kernels), "cuda" (the CUDA C++ kernels, when fastbound
was built against a CUDA torch) and "triton" (the Triton kernels; on CPU tensors
they run only under ``TRITON_INTERPRET=1``, which is how the tests check them).
``backend=None`` reads ``FASTBOUND_BACKEND``, else "auto": "cpu" on CPU, and on
GPU "cuda" when built, else "triton".

`select` runs inside every public entry point, so it must trace under
``torch.compile(fullgraph=True)``: Dynamo cannot trace the dispatcher query of
`has_cuda_kernels` ("torch.* op returned non-Tensor"), so `select` reads
`CUDA_KERNELS`, the answer computed once when this module is imported.
"""

from __future__ import annotations

import os

import torch

from . import _C  # noqa: F401  (loads the TORCH_LIBRARY registrations that has_cuda_kernels queries)
from ._validate import check_choice

BACKENDS = ("auto", "cpu", "cuda", "triton")


def has_cuda_kernels(op: str = "fastbound::dse_forward") -> bool:
    """Whether this build of fastbound has CUDA kernels (built against a CUDA torch)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")


CUDA_KERNELS = has_cuda_kernels()
"""`has_cuda_kernels` of this build, fixed at import (a constant to `torch.compile`)."""


def select(device: torch.device, backend: str | None) -> str:
    """Resolves ``backend`` (None, "auto", "cpu", "cuda" or "triton") for tensors on ``device``."""
    requested = backend if backend is not None else os.environ.get("FASTBOUND_BACKEND", "auto")
    check_choice("backend", requested, BACKENDS)
    if device.type == "cpu":
        if requested == "cuda":
            raise ValueError("backend='cuda' needs CUDA tensors; these are on the CPU")
        if requested == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' runs on CPU tensors only under TRITON_INTERPRET=1")
        return "triton" if requested == "triton" else "cpu"
    if device.type == "cuda":
        if requested == "cpu":
            raise ValueError("backend='cpu' needs CPU tensors; these are on CUDA")
        if requested == "auto":
            return "cuda" if CUDA_KERNELS else "triton"
        if requested == "cuda" and not CUDA_KERNELS:
            raise ValueError("this fastbound was built without CUDA kernels; use backend='triton' or rebuild")
        return requested
    raise ValueError(f"fastbound has no kernels for device type {device.type!r}")


_KERNELS: dict[tuple[str, str], object] = {}


def kernel(backend: str, name: str):
    """The op ``torch.ops.fastbound.<name>.default`` of a resolved ``backend``, looked up once.

    The overload itself, not the packet: calling a packet resolves the overload in Python on
    every call, a cost the size of a small kernel. Triton ops carry the suffix ``_triton``;
    the first lookup imports `fastbound.triton_kernels`, which registers every one of them.
    """
    key = (backend, name)
    op = _KERNELS.get(key)
    if op is None:
        if backend == "triton":
            from . import triton_kernels  # noqa: F401  (registers the *_triton ops)

            name += "_triton"
        op = _KERNELS[key] = getattr(torch.ops.fastbound, name).default
    return op


_ENVIRON = getattr(os.environ, "_data", None) if os.name == "posix" else None
"""CPython's os.environ on POSIX: encoded name -> encoded value (on Windows its keys are upper-cased str)."""


def _environ(name: str) -> str | bytes | None:
    """The variable ``name`` (str or bytes), without the KeyError that ``os.environ.get``
    raises and catches inside for an unset name (microseconds a call)."""
    return _ENVIRON.get(os.fsencode(name)) if isinstance(_ENVIRON, dict) else os.environ.get(name)


def environment_key() -> tuple:
    """What the environment adds to `select`'s choice, for the cache keys of checked calls:
    FASTBOUND_BACKEND and TRITON_INTERPRET (whether Triton may run on CPU tensors)."""
    return _environ("FASTBOUND_BACKEND"), _environ("TRITON_INTERPRET")
