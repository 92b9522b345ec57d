"""Benchmarks of `fastbound.continuous`: perturb, denoising_loss (fwd+bwd) and integrate_step.

Image-like batches, 256 × 3×32×32 (CIFAR-10 sized), fp32 and bf16. The eager provider
is the continuous oracle (`fastbound.continuous.reference`: Philox in int64 torch
arithmetic, Box–Muller, dense tensors), ``compile`` is ``torch.compile`` of it, except
for the Philox words: inductor did not finish compiling the oracle's ten int64 rounds
in 15 minutes (even for 4 elements), so the cases that draw noise (perturb, the
regenerating loss) run `reference.words` eager under ``torch.compiler.disable`` and
compile the rest (Box–Muller, the laws, the combination, the loss), ``fullgraph=False``.
Their ``compile`` column is therefore "compiled transform + eager generator". A second
reference for the RNG-bound perturb: ``continuous_perturb_vs_randn``, whose ``eager`` and
``compile`` providers are two ``torch.randn_like`` calls (torch's generator, the same number of
normals, nothing else), so its ``vs eager`` is randn's time over perturb's. Floors:

* perturb reads x and writes z and ε: one ``clone()`` of x plus one ``fill_`` of an
  x-sized buffer (1 read + 2 writes);
* denoising_loss reads ε̂ and ε (the regenerating case: ε̂ only) and, with the backward, writes
  the gradient: forward ``sum()`` of each input read, forward+backward ``torch.sub(ε̂, ε)`` into
  a reused buffer (2 reads + 1 write; the regenerating case: one ``clone()`` of ε̂);
* integrate_step only reads: one ``sum()`` of ε̂ (and of ε when it is given).

``continuous_nll_bound`` is the estimator's own work (issue 12: at most 1.3× one read of the
denoiser output): `nll_bound` with ``DRAWS`` importance draws per image and a denoiser that
returns a stored ε̂ (`StoredOutput`, its time measured apart and subtracted by the report), so an
estimate's time is λ sampling, `perturb`, ‖ε‖², the integration step and the summary. Its
``eager`` is the same estimator on the oracle (`eager_bound`: the same λ and Philox counters,
so the same draws), ``compile`` compiles it (the Philox words eager, as above), and the floor
is ``DRAWS`` reads (``sum()``) of the stored output, one per denoiser call. Both return the
integral and its standard error (the closed-form terms are host arithmetic). The report puts
this row in the estimator table.

The image shape is carried by `ImageShape` as batch × channels × (height·width), which
the report prints as ``batch×channels`` and ``V = height·width``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastbound import continuous
from fastbound.continuous import bound, reference
from fastbound.continuous.schedules import LogisticProposal

from .harness import Case, Shape, clone_like_kernels, read_floor, reused_like
from .test_estimate_nll import StoredOutput, seconds_per_call

WARM, WARM_STD = "gaussian", 0.01
"""The warm start of the paper's best setting (Gaussian warm-up noise)."""


@dataclass(frozen=True)
class ImageShape(Shape):
    """A batch of images: ``length`` channels of ``vocab`` = height × width pixels."""

    side: int = 32

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.length}x{self.side}x{self.side}"

    @property
    def id(self) -> str:
        return self.label

    @property
    def dims(self) -> tuple[int, ...]:
        return (self.batch, self.length, self.side, self.side)


def image(side: int, batch: int = 256) -> ImageShape:
    return ImageShape(batch, 3, side * side, side)


SHAPES = {"default": (image(32),), "full": (image(32), image(64))}
SHAPES["smoke"] = SHAPES["default"]
SMOKE = ("fastbound", "eager", "floor")
"""The smoke grid skips ``compile`` (each graph takes longer to build than a smoke run should)."""


def working_set(shape: ImageShape) -> int:
    return 16 * 4 * shape.batch * shape.length * shape.vocab


def _logsnr(shape: ImageShape, generator: torch.Generator) -> torch.Tensor:
    """λ per image, uniform over VDM's range [-13.3, 5]."""
    u = torch.rand(shape.batch, generator=generator, device=generator.device)
    return -13.3 + 18.3 * u


def perturb_inputs(shape: ImageShape, dtype: torch.dtype, generator: torch.Generator) -> dict:
    x = torch.rand(shape.dims, generator=generator, device=generator.device) * 2 - 1
    return dict(x=x.to(dtype), logsnr=_logsnr(shape, generator))


_words = torch.compiler.disable(reference.words)
"""The oracle's Philox words, left out of the compiled graph (see the module docstring)."""


def fastbound_perturb(x, logsnr):
    out = continuous.perturb(x, logsnr, warm=WARM, warm_std=WARM_STD, seed=1)
    return out.z, out.eps


def eager_perturb(x, logsnr):
    w = _words(x.numel(), 1, 0, x.device)
    z, eps, _ = reference.perturb_with_words(x, w, logsnr, warm=WARM, warm_std=WARM_STD)
    return z, eps


def randn_pair(x, logsnr):
    """The RNG reference of `perturb`: torch's own generator drawing the two N(0, 1) fields that
    perturb draws (ε and the Gaussian warm-up u), with no Philox contract and no arithmetic."""
    return torch.randn_like(x), torch.randn_like(x)


def no_check(actual: dict, expected: dict, inputs: dict) -> None:
    """`randn_pair` draws other numbers than perturb by design: only the timing is compared."""


def perturb_floor(x, logsnr):
    """perturb's traffic: x read, z and eps written, into buffers got as the kernel gets them."""
    return clone_like_kernels(x), reused_like(x, slot=1).fill_(0)


def loss_inputs(shape: ImageShape, dtype: torch.dtype, generator: torch.Generator) -> dict:
    size = shape.dims
    eps = torch.randn(size, generator=generator, device=generator.device).to(dtype)
    eps_hat = (eps.float() + 0.3 * torch.randn(size, generator=generator, device=generator.device)).to(dtype)
    return dict(eps_hat=eps_hat, eps=eps)


def read_both(eps_hat, eps, **_):
    """The floor of an op that reads ε̂ and ε and writes a few numbers: one ``sum()`` of each."""
    return eps_hat.sum() + eps.sum()


def difference_floor(eps_hat, eps):
    """denoising_loss's forward+backward traffic: ε̂ and ε read, one ε̂-sized buffer written (got as
    the kernel gets its gradient)."""
    return torch.sub(eps_hat.detach(), eps, out=reused_like(eps_hat))


def weighted_inputs(shape: ImageShape, dtype: torch.dtype, generator: torch.Generator) -> dict:
    """The loss's inputs and a learned per-image weight (VDM's γ'(t) > 0), float32."""
    weight = torch.rand(shape.batch, generator=generator, device=generator.device) + 0.5
    return dict(**loss_inputs(shape, dtype, generator), weight=weight)


def fastbound_loss_weighted(eps_hat, eps, weight):
    return continuous.denoising_loss(eps_hat, eps, weight=weight)


def eager_loss_weighted(eps_hat, eps, weight):
    return reference.denoising_loss(eps_hat, eps, weight=weight)


def weighted_floor(eps_hat, eps, weight):
    return difference_floor(eps_hat, eps)


def fastbound_perturb_z(x, logsnr):
    """perturb's z with gradients to x and λ (a learned schedule): the kernel also writes x̃,
    the backward reads it and ε."""
    return continuous.perturb(x, logsnr, warm=WARM, warm_std=WARM_STD, seed=1).z


def eager_perturb_z(x, logsnr):
    return eager_perturb(x, logsnr)[0]


def regen_inputs(shape: ImageShape, dtype: torch.dtype, generator: torch.Generator) -> dict:
    return dict(eps_hat=loss_inputs(shape, dtype, generator)["eps_hat"])


def fastbound_loss(eps_hat, eps):
    return continuous.denoising_loss(eps_hat, eps)


def eager_loss(eps_hat, eps):
    return reference.denoising_loss(eps_hat, eps)


def fastbound_loss_regen(eps_hat):
    return continuous.denoising_loss(eps_hat, seed=1)


def eager_loss_regen(eps_hat):
    w = _words(eps_hat.numel(), 1, 0, eps_hat.device)
    eps = reference.gaussian_pair(w, torch.float32)[0].reshape(eps_hat.shape).to(eps_hat.dtype)  # fp32 / bf16 cases
    return reference.denoising_loss(eps_hat, eps)


def integrate_inputs(shape: ImageShape, dtype: torch.dtype, generator: torch.Generator) -> dict:
    inputs = loss_inputs(shape, dtype, generator)
    lam = _logsnr(shape, generator).double()
    d = shape.length * shape.vocab
    return dict(**inputs, acc=torch.zeros(shape.batch, 2, dtype=torch.float64, device=generator.device),
                weight=torch.rand(shape.batch, generator=generator, device=generator.device).double() + 0.5,
                baseline=d * torch.sigmoid(lam))


def fastbound_integrate(eps_hat, eps, acc, weight, baseline):
    acc = acc.clone()
    continuous.integrate_step(eps_hat, eps, acc, weight=weight, baseline=baseline)
    return acc


def eager_integrate(eps_hat, eps, acc, weight, baseline):
    return reference.integrate_step(eps_hat, eps, acc.clone(), weight=weight, baseline=baseline)


def check_integrate(actual: dict, expected: dict, inputs: dict) -> None:
    """Both sum exact float64 squares of the same differences: the accumulators agree to 1e-9."""
    got, want = actual["output0"], expected["output0"]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * want.abs().max().item())


DRAWS = 4
"""Importance draws (λ, u, ε) per image, hence denoiser calls per estimate."""
LOGSNR_RANGE = (-10.0, 15.0)
"""[λ_min, λ_max] of `nll_bound`'s default."""


def bound_inputs(shape: ImageShape, dtype: torch.dtype, generator: torch.Generator) -> dict:
    """Images in [-1, 1) and a stored ε̂ of their shape and dtype."""
    x = perturb_inputs(shape, dtype, generator)["x"]
    eps_hat = torch.randn(shape.dims, generator=generator, device=generator.device).to(dtype)
    return dict(denoiser=StoredOutput(eps_hat), x=x, eps_hat=eps_hat)


def fastbound_bound(denoiser, x, eps_hat):
    estimate = continuous.nll_bound(denoiser, x, warm=WARM, warm_std=WARM_STD, logsnr_min=LOGSNR_RANGE[0],
                                    logsnr_max=LOGSNR_RANGE[1], n_samples=DRAWS, seed=0)
    return estimate.integral, estimate.stderr


def eager_bound(denoiser, x, eps_hat):
    """`nll_bound`'s importance estimate of the integral on the oracle: the same λ (the same
    `LogisticProposal` draws), the same Philox counters for (u, ε), the same control variate."""
    n, d = x.shape[0], x[0].numel()
    proposal = LogisticProposal(*LOGSNR_RANGE)
    acc = torch.zeros(n, 2, dtype=torch.float64, device=x.device)
    for k in range(DRAWS):
        lam = proposal.sample(n, seed=0, offset=bound._LOGSNR_STREAM + k * n, device=x.device)
        z, eps, _ = reference.perturb_with_words(x, _words(x.numel(), 0, k * n * d, x.device), lam, warm=WARM,
                                                 warm_std=WARM_STD)
        out = denoiser(z, lam.float())
        eps_sq = eps.double().square().reshape(n, d).sum(1)
        reference.integrate_step(out, eps, acc, weight=0.5 / proposal.density(lam),
                                 baseline=torch.sigmoid(lam) * eps_sq)
    mean = acc[:, 0] / DRAWS
    var = (acc[:, 1] / DRAWS - mean**2).clamp_min(0) * (DRAWS / (DRAWS - 1))
    return mean, (var / DRAWS).sqrt()


def read_each_draw(denoiser, x, eps_hat):
    """The floor: one read of the denoiser output per denoiser call."""
    return torch.stack([eps_hat.sum() for _ in range(DRAWS)])


def check_bound(actual: dict, expected: dict, inputs: dict) -> None:
    """Integral (output0) and standard error (output1) agree with the oracle estimator's: the same
    draws, ε a few ulp apart (16-bit: rounded to the dtype, a few elements one unit apart)."""
    rtol = 1e-4 if inputs["x"].dtype == torch.float32 else 2e-3
    for key in ("output0", "output1"):
        want = expected[key]
        torch.testing.assert_close(actual[key], want, rtol=rtol, atol=rtol * want.abs().max().item())


COMMON = dict(shapes=SHAPES, working_set=working_set, smoke_providers=SMOKE)

CASES = [
    Case("continuous_perturb", perturb_inputs, fastbound_perturb, eager_perturb, floor="x",
         floor_call=perturb_floor, floor_op="clone+fill", fullgraph=False,
         **COMMON),
    Case("continuous_perturb_vs_randn", perturb_inputs, fastbound_perturb, randn_pair, floor="x",
         floor_call=perturb_floor, floor_op="clone+fill", check=no_check, **COMMON),
    Case("continuous_denoising_loss", loss_inputs, fastbound_loss, eager_loss, floor="eps_hat",
         floor_call=read_both, floor_op="sum", grad_inputs=("eps_hat",), mode_only="fwd", **COMMON),
    Case("continuous_denoising_loss", loss_inputs, fastbound_loss, eager_loss, floor="eps_hat",
         floor_call=difference_floor, floor_op="sub", grad_inputs=("eps_hat",), mode_only="fwd_bwd", **COMMON),
    Case("continuous_perturb_logsnr_grad", perturb_inputs, fastbound_perturb_z, eager_perturb_z, floor="x",
         floor_call=perturb_floor, floor_op="clone+fill", grad_inputs=("x", "logsnr"), mode_only="fwd_bwd",
         fullgraph=False, **COMMON),
    Case("continuous_denoising_loss_weight_grad", weighted_inputs, fastbound_loss_weighted, eager_loss_weighted,
         floor="eps_hat", floor_call=weighted_floor, floor_op="sub", grad_inputs=("eps_hat", "weight"),
         mode_only="fwd_bwd", **COMMON),
    Case("continuous_denoising_loss_regen", regen_inputs, fastbound_loss_regen, eager_loss_regen, floor="eps_hat",
         floor_call=read_floor("eps_hat"), floor_op="sum", grad_inputs=("eps_hat",), mode_only="fwd",
         fullgraph=False, **COMMON),
    Case("continuous_denoising_loss_regen", regen_inputs, fastbound_loss_regen, eager_loss_regen, floor="eps_hat",
         grad_inputs=("eps_hat",), mode_only="fwd_bwd", fullgraph=False, **COMMON),
    Case("continuous_integrate_step", integrate_inputs, fastbound_integrate, eager_integrate, floor="eps_hat",
         floor_call=read_both, floor_op="sum", check=check_integrate,
         **COMMON),
    Case("continuous_nll_bound", bound_inputs, fastbound_bound, eager_bound, floor="eps_hat",
         floor_call=read_each_draw, floor_op=f"{DRAWS}×sum", check=check_bound, fullgraph=False,
         info=dict(draws=DRAWS, method="importance", denoiser_seconds=DRAWS * seconds_per_call()), **COMMON),
]  # fmt: skip


def test_continuous(spec, measure):
    measure(spec)
