"""The names fastbound's API accepts and the integer codes its kernels take, defined once.

Every module that checks a ``graph=``, ``loss=`` or ``reduction=`` argument, or
passes a graph or loss to a kernel, reads these tables. The codes are part of the kernels'
contract: the graph codes are read by ``csrc/include/fastbound/elementwise.h`` and the Triton
kernels, the loss codes by ``csrc/include/fastbound/integrate.h``.
"""

from __future__ import annotations

GRAPH_CODES = {"absorb": 0, "uniform": 1}
"""Corruption graphs (SEDD's absorbing and uniform graphs) and their kernel codes."""
GRAPHS = tuple(GRAPH_CODES)

LOSS_CODES = {"dse": 0, "dce": 1}
"""Diffusion losses (score entropy, SEDD; masked cross-entropy, MDLM) and their kernel codes."""
LOSSES = ("dce", "dse")

REDUCTIONS = ("none", "sum", "mean")
