"""fastbound's benchmark suite: speed and peak memory of every op against the eager oracle.

Run it from the repository root (after ``python setup.py build_ext --inplace``)::

    pytest benchmarks                                   # default grid, < 10 min on 2 CPU cores
    pytest benchmarks --full                            # the big grid (LM vocabularies, more tokens)
    pytest benchmarks --smoke --benchmark-disable       # CI: smallest shape, every case runs once
    pytest benchmarks --benchmark-json=bench.json && python -m benchmarks.report bench.json

Each benchmark is one (op, mode, dtype, shape, provider); providers are ``fastbound``, the
eager oracle (``eager``, `fastbound.reference`), ``compile`` (``torch.compile`` of the oracle,
compiled before timing) and ``floor`` (``clone()`` of the largest input: the memory-traffic
floor). Every benchmark first checks its provider against the oracle. See `benchmarks.harness`.
"""
