"""Reference training script: ``python -m fastbound.train --help``.

A small bidirectional transformer (`fastbound.train.models`) trained as a discrete diffusion model with
fastbound's fused losses on data whose entropy is known (`fastbound.train.data`), reporting the NLL
bound it reaches next to the true entropy rate. Modules: `cli` (flags), `objective` (corruption
and loss), `loop` (the training loop), `evaluate` (held-out NLL), `checkpoint` (atomic save and
resume), `metrics` (the per-step record), `lock` (one run per --out), `distributed` (DDP under torchrun),
`plots` (PNG figures), `data` (the sources), `models` (the denoiser). It uses fastbound's public
API only; tqdm and matplotlib come with the ``train`` extra (``pip install 'fastbound[train]'``).
"""

from .loop import main, train

__all__ = ["main", "train"]
