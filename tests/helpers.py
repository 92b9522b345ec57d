"""Helpers shared by the loss tests (C++, Triton and CUDA kernels against the oracle).

``KINDS`` is the axis the loss tests run over: a loss together with its graph. "absorb" and
"uniform" are the score entropy (`fastbound.dse_loss`) on that graph, "dce" the masked
cross-entropy (`fastbound.dce_loss`, absorbing graph).
"""

import torch

KINDS = ["absorb", "uniform", "dce"]
"""Loss kinds: DSE on the absorbing graph, DSE on the uniform graph, DCE."""

TOL = {  # (loss rtol, atol), (grad rtol, atol) against the float64 oracle
    torch.float64: ((1e-10, 1e-10), (1e-10, 1e-12)),
    torch.float32: ((1e-5, 1e-5), (1e-5, 1e-6)),
    torch.bfloat16: ((1e-5, 1e-5), (1.6e-2, 1e-3)),
    torch.float16: ((1e-5, 1e-5), (2e-3, 1e-4)),
}


def make_case(kind, shape, n_cols, dtype, *, seed=0, mask_frac=0.6, scale=1.0, device="cpu"):
    """Random scores, sigma and ids of a loss kind; for "absorb" and "dce" the mask is column V-1."""
    g = torch.Generator().manual_seed(seed)
    score = (scale * torch.randn(*shape, n_cols, generator=g)).to(dtype)
    n_real = n_cols - 1 if kind in ("absorb", "dce") else n_cols
    x0 = torch.randint(0, n_real, shape, generator=g)
    if kind == "uniform":
        x_t = torch.where(torch.rand(shape, generator=g) < 0.5, x0, torch.randint(0, n_cols, shape, generator=g))
    else:
        x_t = torch.where(torch.rand(shape, generator=g) < mask_frac, torch.full_like(x0, n_cols - 1), x0)
    sigma = torch.rand(shape[:1] + (1,) * (len(shape) - 1), generator=g) * 3 + 0.05
    return score.to(device), sigma.to(device), x_t.to(device), x0.to(device)


def magnitude(t):
    """The scale of an absolute tolerance: the largest |entry|, at least 1."""
    return max(1.0, t.abs().max().item()) if t.numel() else 1.0


def outcome(fn):
    """``fn()``'s result, or the (type, message) of what it raised: what a fast path must match."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001  (whatever the full path does, the fast one must do)
        return type(error), str(error)


def assert_same_outcome(fast, full):
    """Two `outcome`s agree: the same error, or the same values bit for bit."""
    if isinstance(full, tuple):
        assert fast == full
    else:
        torch.testing.assert_close(fast, full, rtol=0, atol=0)
