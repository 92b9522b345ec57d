"""Atomic checkpoints: the whole training state in one file that is either complete or absent.

The state is written to a temporary file in the same directory, flushed to disk, and renamed
over the old checkpoint with `os.replace` (atomic on POSIX and Windows), so a run killed at
any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch

FILENAME = "checkpoint.pt"


def save_atomic(state: dict, path: str) -> None:
    """Writes ``state`` with `torch.save` to ``path`` through a temporary file and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load(path: str) -> dict:
    """Reads a checkpoint written by `save_atomic` (onto the CPU)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict:
    """Every global random generator the process may touch."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
