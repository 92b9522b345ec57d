"""Test configuration.

Triton kernels run on CPU tensors only in Triton's interpreter, which must be
switched on before triton is imported; on a machine with a GPU the Triton
tests run on the GPU instead.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


HAS_TRITON = _has_triton()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs Triton kernels (interpreter on CPU)")
    config.addinivalue_line("markers", "cuda: needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    skip_triton = pytest.mark.skip(reason="triton is not installed")
    skip_cuda = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "triton" in item.keywords and not HAS_TRITON:
            item.add_marker(skip_triton)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
