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


KEYS = ("step", "model", "optimizer", "rng", "args", "model_config")
"""What a training checkpoint holds."""


class CheckpointError(ValueError):
    """The file is not a complete training checkpoint."""


def load(path: str) -> object:
    """Reads a file written by `save_atomic` (onto the CPU); CheckpointError if it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, empty, garbage, a directory: whatever torch.load raises
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None


def load_run(path: str) -> dict:
    """A training checkpoint (every key of `KEYS`); CheckpointError if the file is not one."""
    state = load(path)
    missing = [key for key in KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a complete checkpoint (missing {', '.join(missing)})")
    if not isinstance(state["step"], int) or not isinstance(state["args"], dict):
        raise CheckpointError(f"{path} is not a training checkpoint (bad step or args)")
    return state


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
