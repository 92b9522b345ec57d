r"""The continuous likelihood integration step: one read of ε̂ per log-SNR sample.

Per sample b of a batch,

.. math:: S_b = w_b \left(\lVert \varepsilon_b - \hat\varepsilon_b \rVert^2 - c_b\right),

and ``acc[index_b] += (S_b, S_b^2)`` in float64 in place: the inner step of the
I-MMSE estimate of −log p(x̃) (Kong et al., "Information-Theoretic Diffusion",
2023), where w_b is the importance (or quadrature) weight of λ_b and c_b the
reference term (e.g. d·sigmoid(λ_b)), so the integrand is the MMSE gap. The
squared errors are summed in float64 (each difference is exact in float64),
with no (B, d) temporary, in a fixed order (deterministic). The oracle
is `fastbound.continuous.reference.integrate_step`. An eager CPU call whose signature an
earlier call checked, with float or (B,) float64 weight and baseline, is the one C++ op
``continuous_integrate`` (value checks, kernel, version bump).
"""

from __future__ import annotations

import torch

from .. import _backend
from .. import _validate as v
from . import _args, _ops


def integrate_step(
    eps_hat: torch.Tensor,
    eps: torch.Tensor | None,
    acc: torch.Tensor,
    *,
    weight: float | torch.Tensor,
    baseline: float | torch.Tensor | None = None,
    index: torch.Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    backend: str | None = None,
) -> None:
    r"""Adds (S_b, S_b²) to ``acc[index_b]`` in place, S_b = w_b (‖ε_b − ε̂_b‖² − baseline_b).

    Args:
        eps_hat: (B, ...) noise prediction (float32, bfloat16, float16 or float64; any strides).
        eps: the noise, same shape, or None to regenerate it from ``(seed, offset)`` as
            `perturb` drew it (rounded to eps_hat's dtype, see `denoising_loss`).
        acc: contiguous (n_slots, 2) float64 accumulator, not requiring grad (outside no_grad).
        weight: w_b, a float or (B,). baseline: c_b, a float or (B,) (default 0).
        index: (B,) integer slot of each sample (default ``arange(B)``, then n_slots = B);
            samples may share a slot.
        backend: ``None``/``"auto"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Runs without autograd; bumps ``acc``'s version.
    """
    key = None
    if (type(acc) in v.PLAIN and not acc.is_nested and index is None and weight is not None
            and not v.tracing(acc)):  # acc: what its checks read
        key = _args.signature("integrate_step", eps_hat, eps, seed, offset, backend, acc.dtype, acc.shape,
                              acc.device, acc.layout, acc.is_contiguous())
    kernel_backend = _args.checked_backend(key)
    if kernel_backend is not None:  # an eager CPU call like one already checked: the value checks only
        if kernel_backend == "cpu" and _cpu_step(eps_hat, eps, acc, weight, baseline, seed, offset):
            return
        flat, eps_rows, seed_bits, offset_bits = _args.checked_pair(eps_hat, eps, seed, offset)
        device, n, eager = flat.device, flat.shape[0], True
    else:
        flat, eps_rows, seed_bits, offset_bits = _args.eps_pair(eps_hat, eps, seed, offset, "integrate_step")
        acc = v.check_float_tensor("acc", acc, (torch.float64,))
        if acc.dim() != 2 or acc.shape[1] != 2 or not acc.is_contiguous():
            raise ValueError(f"acc must be a contiguous (n_slots, 2) float64 tensor, got shape {tuple(acc.shape)}")
        device, n = flat.device, flat.shape[0]
        v.check_same_device(device, acc=acc, index=index)
        eager = v.eager(flat, acc)
        if index is None:
            if acc.shape[0] != n:
                raise ValueError(f"acc must have one row per sample ({n}) when index is not given, got {acc.shape[0]}")
        else:
            index = v.check_ids("index", index, torch.Size([n])).long().contiguous()
            _args.check_index(index, acc.shape[0], eager)
        kernel_backend = _backend.select(device, backend)
        if weight is None:
            raise ValueError("weight is required (pass 1.0 for an unweighted sum)")
        _args.remember(key, kernel_backend)
    # Tensors' finiteness is read once for both (`_args.check_finite_rows`); floats are checked on the host.
    w = _args.per_sample("weight", weight, n, torch.float64, device, eager=eager,
                         finite=not isinstance(weight, torch.Tensor))
    c = None if baseline is None else _args.per_sample("baseline", baseline, n, torch.float64, device, eager=eager,
                                                       finite=not isinstance(baseline, torch.Tensor))
    rows = {"weight": w} if isinstance(weight, torch.Tensor) else {}
    if isinstance(baseline, torch.Tensor):
        rows["baseline"] = c
    if rows:
        _args.check_finite_rows(rows, eager)
    run(kernel_backend, flat, eps_rows, acc, w, c, index, seed_bits, offset_bits, eager)


def _cpu_step(eps_hat: torch.Tensor, eps: torch.Tensor | None, acc: torch.Tensor, weight: float | torch.Tensor,
              baseline: float | torch.Tensor | None, seed: int | None, offset: int) -> bool:
    """A checked eager CPU call through the one C++ op (`_ops.cpu_integrate`), when the weight and
    baseline are floats or (B,) float64 tensors; False (nothing done): take the Python path."""
    n = eps_hat.shape[0]
    w, c = _args.host_row(weight, n), _args.host_row(0.0 if baseline is None else baseline, n)
    if w is None or c is None:
        return False
    check_writable(acc)
    seed_bits, offset_bits = _args.checked_seed_offset(eps, seed, offset)
    _ops.cpu_integrate(eps_hat, eps, acc, *w, *c, seed_bits, offset_bits)
    return True


def check_writable(acc: torch.Tensor) -> None:
    """PyTorch's rule for in-place updates of inference tensors (the op runs below autograd), and
    no accumulator that requires grad (`fastbound._validate.check_accumulator`)."""
    v.check_accumulator("acc", acc)
    if acc.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError("acc is an inference tensor: update it inside torch.inference_mode() (PyTorch forbids "
                           "in-place updates to inference tensors outside it), or pass a normal tensor")


def run(backend: str, eps_hat: torch.Tensor, eps: torch.Tensor | None, acc: torch.Tensor, weight: torch.Tensor,
        baseline: torch.Tensor | None, index: torch.Tensor | None, seed: int, offset: int, eager: bool) -> None:
    """The op on checked arguments (contiguous (B, d) rows, (B,) float64 weight and baseline, int64
    index in range), below autograd; bumps ``acc``'s version in eager mode."""
    if eager:
        check_writable(acc)
        with torch._C._AutoDispatchBelowAutograd():  # no autograd: eps_hat may require grad
            _ops.integrate_step(backend, eps_hat, eps, acc, weight, baseline, index, seed, offset)
        # A custom op's in-place write below autograd does not bump the version counter by itself.
        torch.autograd.graph.increment_version(acc)
    else:
        with torch.no_grad():
            _ops.integrate_step(backend, eps_hat.detach(), eps, acc, weight, baseline, index, seed, offset)
