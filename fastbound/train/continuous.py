"""Continuous mode of the reference run: ``python -m fastbound.train continuous [flags]``.

Trains small MLP ε-denoisers (`Denoiser`) with fastbound's continuous kernels
(`fastbound.continuous.perturb`, `denoising_loss`), λ drawn from a truncated logistic proposal
refitted to the model at every checkpoint (`fastbound.continuous.fit_proposal`), each draw
weighted by 1 (a weighted ELBO, the default) or by 1/p(λ) (ITD's objective), and reports the
held-out warm-start bound of `fastbound.continuous.nll_bound` in bits/dim with its standard
error — estimated with antithetic ε pairs (``antithetic=True``, an unbiased estimate of the
same bound) — beside honest baselines computed in the same run:

* part a: a 2-D mixture of three Gaussians (`continuous_data.mixture_source`) with Gaussian warm-up;
  baselines: the true NLL E_u[−log q(x + σ0 u)] of the same test points and the entropy h(x̃)
  (Monte Carlo on the exact density), the bound of the exact denoiser, and the model's excess
  over it, ½∫E‖ε̂ − ε̂*‖²dλ (`continuous_estimate.denoiser_gap`).
* part b: 8-bit 8×8 digits (scikit-learn), one model per warm-up law at the variance of
  uniform dequantisation, σ0 = Δ/√12 (the paper's warm-noise ablation); baselines: uniform
  over 256 levels (8 bits/dim) and a full-covariance Gaussian scored by uniform dequantisation.
  The uniform row is a bound on the discrete −log P(x); the others are the dequantised
  numbers the paper reports (see `fastbound.continuous.bound`); every model is also scored
  by uniform dequantisation, a bound on −log P(x) for any denoiser.

Writes OUT/summary.json, OUT/ablation.md, OUT/training_curve.png and OUT/integrand.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time

import torch
from torch import nn

from fastbound.continuous import (WARM_LAWS, ContinuousNLLEstimate, LogisticProposal, denoising_loss, fit_proposal,
                                  from_8bit, nll_bound, perturb, uniform_dequantisation_std)

from . import continuous_data as data
from .continuous_estimate import denoiser_gap

PROG = "python -m fastbound.train continuous"
WEIGHTINGS = ("proposal", "bound")


class Denoiser(nn.Module):
    r"""ε̂(z, λ) = ε̂_G(z, λ) + c(λ) · MLP([z / √(α² w̄ + σ²), features(λ)]), c = ασ/√(σ² + α²ℓ²).

    ε̂_G is the optimal denoiser of the diagonal Gaussian fit N(μ, w) of x̃ (per dimension
    :math:`\sigma(z - \alpha\mu)/(\alpha^2 w + \sigma^2)`, as in ITD's Gaussian base), so the
    network learns only the non-Gaussian correction; λ enters through Fourier features.
    c(λ) follows the size of the exact correction :math:`\hat\varepsilon^* - \hat\varepsilon_G`
    (:math:`\hat\varepsilon^* = -\sigma\nabla_z\log p(z_\lambda)`), which vanishes at both ends:
    as λ → −∞ p(z_λ) tends to the Gaussian N(αμ, α²Σ + σ²I) and the correction is O(α²)
    (the diagonal w and the higher cumulants enter at orders α² and α³), c ≈ α; as λ → ∞ it is
    :math:`\sigma(\nabla\log N(\tilde x;\mu,w) - \nabla\log q(\tilde x))`, whose size is bounded
    through the Fisher information, :math:`\mathrm{tr}\,J(\tilde x) \le d J_{law}/\sigma_0^2`
    (Stam), so it is O(σ/σ0) once σ/α < σ0, and c ≈ σ/ℓ with ℓ = σ0 (the default; ℓ = 1 gives
    c = ασ). An unscaled output's error enters the bound at every λ up to λ_max, where training
    draws are rare and the bound's weight 1/p(λ) is large (measured on the 2-D mixture after
    2000 steps, ½∫E‖ε̂ − ε̂*‖²dλ: 0.72 bits/dim unscaled, most of it above λ = 12, against 0.014
    with c = ασ and 0.013 with ℓ = σ0). ℓ = σ0 rather than 1 for data like the 8-bit digits,
    whose levels are resolved only for σ/α between σ0 and the level spacing, where the exact
    correction is O(1) and ασ would be ~0.01–0.05 (measured, Gaussian law, before the base's
    variance floor: 6.578 against 6.627 bits/dim for ℓ = 1 on the same draws, each ± 0.16).
    """

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, width: int = 256, depth: int = 3, n_freq: int = 8,
                 length: float = 1.0):
        super().__init__()
        dims = mean.numel()
        self.length = float(length)
        self.register_buffer("mean", mean.float().flatten())
        self.register_buffer("var", var.float().flatten())
        self.register_buffer("freq", 2.0 ** torch.arange(n_freq, dtype=torch.float32) / 16)
        layers, size = [], dims + 1 + 2 * n_freq
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.SiLU()]
            size = width
        layers.append(nn.Linear(size, dims))
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        flat = z.reshape(z.shape[0], -1).float()
        lam = logsnr.float()[:, None]
        a2, s2 = torch.sigmoid(lam), torch.sigmoid(-lam)
        base = s2.sqrt() * (flat - a2.sqrt() * self.mean) / (a2 * self.var + s2)
        scaled = flat / (a2 * self.var.mean() + s2).sqrt()
        feats = torch.cat([scaled, lam / 10, torch.sin(lam * self.freq), torch.cos(lam * self.freq)], 1)
        scale = (a2 * s2).sqrt() / (s2 + a2 * self.length**2).sqrt()
        return (base + scale * self.net(feats)).reshape(z.shape).to(z.dtype)


def train_denoiser(model: Denoiser, opt: torch.optim.Optimizer, train_x: torch.Tensor, *, steps: int, total: int,
                   batch_size: int, lr: float, warm, warm_std: float, proposal: LogisticProposal, seed: int,
                   start: int = 0, weighting: str = "proposal", progress=None) -> list[float]:
    """``steps`` optimizer steps from step ``start`` of ``total`` (cosine decay of ``lr``); returns the losses.

    λ ~ ``proposal`` (p). ``weighting="bound"`` (ITD's objective) weighs each draw by 1/p(λ), so
    the loss ½ E[‖ε − ε̂‖²/p(λ)] estimates ½∫ m(λ) dλ, the bound's λ-dependent part;
    ``"proposal"`` (default) weighs every draw by 1: the loss ½ E_p‖ε − ε̂‖² is the bound's integrand
    reweighted by p(λ) (a weighted ELBO, Kingma & Gao 2023), with the same minimiser ε̂ = E[ε | z]
    at every λ but without the large 1/p(λ) weights of the tails (measured on the run's mixture,
    correction scaled by ασ, 2000 steps: ½∫E‖ε̂ − ε̂*‖²dλ = 0.014 bits/dim, against 0.026 with 1/p(λ)).
    The held-out bound always uses 1/p(λ).

    Batch rows are drawn with replacement by a generator seeded per step; the noise of step k
    uses perturb counters [k B d, (k+1) B d) and λ counters [k B, (k+1) B) of ``seed``.
    """
    d = train_x[0].numel()
    losses = []
    model.train()
    for k in range(start, start + steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * k / max(total, 1)))
        g = torch.Generator().manual_seed(seed * 1_000_003 + k)
        x = train_x[torch.randint(0, train_x.shape[0], (batch_size,), generator=g)]
        lam = proposal.sample(batch_size, seed=seed, offset=k * batch_size)
        noised = perturb(x, lam, warm=warm, warm_std=warm_std, seed=seed, offset=k * batch_size * d)
        weight = 1 / proposal.density(lam).float() if weighting == "bound" else None
        loss = denoising_loss(model(noised.z, lam.float()), noised.eps, weight=weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress.update(1)
    model.eval()
    return losses


def _stats(x: torch.Tensor, warm_std: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""(μ, w) of the Gaussian base: per-dimension mean and variance of x̃ = x + σ0 u from N samples.

    :math:`w = \widehat{\mathrm{Var}}(x) + \sigma_0^2 + \bar v/N`, :math:`\bar v` the mean variance: one
    pseudo-sample of average spread, so a dimension constant in training (three border pixels
    of the digits) does not give a held-out image that differs there a bound of ~100 bits/dim
    (measured: one of 297 test images, 0.4 bits/dim of the mean, before this floor).
    """
    flat = x.reshape(x.shape[0], -1).double()
    var = flat.var(0)
    return flat.mean(0), var + warm_std**2 + var.mean() / flat.shape[0]


def _evaluate(model, test_x, train_x, args, seed: int, bound: dict, n_samples: int,
              ) -> tuple[ContinuousNLLEstimate, LogisticProposal]:
    """The held-out antithetic `nll_bound` with the proposal `fit_proposal` fits to this model on training data.

    8192 denoiser rows per call: 4096 antithetic pairs.
    """
    proposal = fit_proposal(model, train_x, seed=seed + 3, n_pilot=args.pilot_samples, **bound)
    est = nll_bound(model, test_x, n_samples=n_samples, seed=seed + 1, proposal=proposal, antithetic=True,
                    batch_size=8192, **bound)
    return est, proposal


def _fit(name: str, train_x, test_x, args, *, warm, warm_std, data_kind, steps, seed, bar, reference=None):
    """Trains one model with periodic held-out bounds; returns its record and the model.

    At every checkpoint the proposal is refitted to the current model (`_evaluate`); it gives
    that checkpoint's held-out bound and the training λ of the next stretch, so training and
    evaluation draw λ from one law. The first one is fitted to the step-0 model, the Gaussian
    base ε̂_G exactly (the last layer is zero). With a ``reference`` (the exact denoiser), every
    checkpoint also records `denoiser_gap`, how far the model's bound lies above the exact one's.
    """
    cont_train = from_8bit(train_x) if data_kind == "8bit" else train_x.float()
    mean, var = _stats(cont_train, warm_std)
    torch.manual_seed(seed)
    model = Denoiser(mean, var, width=args.width, depth=args.depth, length=args.length_scale * warm_std)
    bound = dict(warm=warm, warm_std=warm_std, logsnr_min=args.logsnr_min, logsnr_max=args.logsnr_max, data=data_kind)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    curve, losses = [], []
    checkpoints = sorted({round(i * steps / args.n_evals) for i in range(args.n_evals + 1)})
    done = 0
    for target in checkpoints:
        if target > done:
            losses += train_denoiser(model, opt, cont_train, steps=target - done, total=steps,
                                     batch_size=args.batch_size, lr=args.lr, warm=warm, warm_std=warm_std,
                                     proposal=proposal, seed=seed, start=done, weighting=args.weighting, progress=bar)
        done = target
        draws = args.final_draws if done == steps else args.eval_draws
        est, proposal = _evaluate(model, test_x, train_x, args, seed, bound, draws)
        bpd, se = est.overall_bits_per_dim()
        curve.append({"step": done, "bits_per_dim": bpd, "stderr": se, "proposal": [proposal.loc, proposal.scale]})
        if reference is not None:
            curve[-1]["gap_to_exact"] = denoiser_gap(model, reference, test_x, warm=warm, warm_std=warm_std,
                                                     proposal=proposal, n_samples=draws, seed=seed + 5)
        bar.set_postfix_str(f"{name} step {done}: {bpd:.3f} ± {se:.3f} bits/dim")
    quad = nll_bound(model, test_x[: args.integrand_samples], method="quadrature", n_steps=48, n_samples=4,
                     seed=seed + 2, proposal=proposal, batch_size=4096, **bound)
    final = curve[-1]
    record = {
        "name": name, "warm": warm, "warm_std": warm_std, "data": data_kind, "bits_per_dim": final["bits_per_dim"],
        "stderr": final["stderr"], "curve": curve, "loss": losses, "discrete_exact": quad.discrete_exact,
        "per_sample_bits_per_dim": est.bits_per_dim.tolist(),
        "tail_bound_bits_per_dim": est.tail_bound / (est.dims * math.log(2)),
        "proposal": {"loc": proposal.loc, "scale": proposal.scale},
        "integrand": {"logsnr": quad.logsnr.tolist(), "per_dim": (quad.integrand.mean(0) / quad.dims).tolist()},
    }
    return record, model


def run_mixture(args, bar) -> dict:
    source = data.mixture_source()
    train_x = source.sample(args.train_size, seed=args.seed)
    test_x = source.sample(args.test_size, seed=args.seed + 1)
    h, h_se = source.entropy(args.warm_std_a, n=args.entropy_samples, seed=args.seed + 2)
    reference = source.eps_denoiser(args.warm_std_a)
    record, _ = _fit("2-D mixture", train_x.float(), test_x, args, warm="gaussian", warm_std=args.warm_std_a,
                     data_kind="continuous", steps=args.steps, seed=args.seed, bar=bar, reference=reference)
    exact, _ = _evaluate(reference, test_x, train_x, args, args.seed, dict(
        warm="gaussian", warm_std=args.warm_std_a, logsnr_min=args.logsnr_min, logsnr_max=args.logsnr_max,
        data="continuous"), args.final_draws)
    truth, truth_se = data.expected_nll_bits(source, test_x, args.warm_std_a, seed=args.seed + 4)
    record["exact_denoiser_bits_per_dim"] = list(exact.overall_bits_per_dim())
    record["true_entropy_bits_per_dim"] = [h / (2 * math.log(2)), h_se / (2 * math.log(2))]
    record["test_nll_bits_per_dim"] = [truth, truth_se]
    record["gap_bits_per_dim"] = [record["bits_per_dim"] - truth, math.hypot(record["stderr"], truth_se)]
    record["gap_to_exact_bits_per_dim"] = record["curve"][-1]["gap_to_exact"]
    return record


def run_digits(args, bar) -> dict:
    """One model per warm-up law; every model is also scored by the uniform-dequantisation bound.

    The uniform-dequantisation score of a model trained with another law is still a bound on
    the discrete −log P(x) (any denoiser gives one), so it compares the laws as training noise
    in one quantity. All scores use the same images and evaluation seed (the same u, ε
    counters), so the per-image differences are paired.
    """
    train8, test8 = data.load_digits_8bit(seed=args.seed)
    sigma0 = uniform_dequantisation_std()
    rows = []
    for law in args.laws:
        record, model = _fit(f"digits/{law}", train8, test8, args, warm=law, warm_std=sigma0, data_kind="8bit",
                             steps=args.digits_steps, seed=args.seed, bar=bar)
        if law == "uniform":
            record["per_sample_dequantised"] = record["per_sample_bits_per_dim"]
            record["dequantised_bits_per_dim"] = [record["bits_per_dim"], record["stderr"]]
        else:
            est, _ = _evaluate(model, test8, train8, args, args.seed, dict(
                warm="uniform", warm_std=sigma0, logsnr_min=args.logsnr_min, logsnr_max=args.logsnr_max, data="8bit"),
                args.final_draws)
            record["per_sample_dequantised"] = est.bits_per_dim.tolist()
            record["dequantised_bits_per_dim"] = list(est.overall_bits_per_dim())
        rows.append(record)
    return {"models": rows, "paired": _paired_differences(rows, "per_sample_bits_per_dim"),
            "paired_dequantised": _paired_differences(rows, "per_sample_dequantised"),
            "gaussian_fit_bits_per_dim": list(data.gaussian_baseline_bits(train8, test8)), "uniform_bits_per_dim": 8.0,
            "warm_std": sigma0, "n_train": len(train8), "n_test": len(test8)}


def _paired_differences(rows: list[dict], key: str) -> list[dict]:
    """Each law's bound (per-image values ``row[key]``) minus the first law's, paired over the held-out images.

    Every model is evaluated on the same images with the same evaluation seed (the same u and ε,
    and the same λ uniforms, which each model's fitted proposal maps to its own λ), so the
    per-image difference cancels what the images share. The s.e. of
    the mean difference is std(diff) / sqrt(n): it counts the Monte-Carlo noise and the spread
    of the difference over images (a sample of the data law), so it is the standard error of
    the expected difference, where each bound's own ± is its Monte-Carlo error on these images.
    """
    base = torch.tensor(rows[0][key], dtype=torch.float64)
    out = []
    for row in rows[1:]:
        diff = torch.tensor(row[key], dtype=torch.float64) - base
        se = diff.std().item() / math.sqrt(diff.numel()) if diff.numel() > 1 else float("nan")
        out.append({"law": row["warm"], "minus": rows[0]["warm"], "bits_per_dim": diff.mean().item(), "stderr": se})
    return out


def _ablation_table(digits: dict) -> str:
    lines = ["| model (8×8 digits, 8-bit) | warm-up (training) | bits/dim, own warm-up | ± s.e. | bounds −log P(x)? "
             "| bits/dim, uniform dequantisation | ± s.e. |", "|---|---|---|---|---|---|---|"]
    for row in digits["models"]:
        q, q_se = row["dequantised_bits_per_dim"]
        lines.append(f"| diffusion bound | {row['warm']} σ0 = Δ/√12 | {row['bits_per_dim']:.3f} | {row['stderr']:.3f} | "
                     f"{'yes (uniform dequantisation)' if row['discrete_exact'] else 'no (dequantised density)'} | "
                     f"{q:.3f} | {q_se:.3f} |")
    g, g_se = digits["gaussian_fit_bits_per_dim"]
    lines.append(f"| full-covariance Gaussian | uniform dequantisation | {g:.3f} | {g_se:.3f} | yes | {g:.3f} | {g_se:.3f} |")
    lines.append("| uniform over 256 levels | — | 8.000 | 0 | yes | 8.000 | 0 |")
    for d, q in zip(digits["paired"], digits["paired_dequantised"]):
        lines.append(f"| difference {d['law']} − {d['minus']} (paired: same images and draws) | — | "
                     f"{d['bits_per_dim']:+.3f} | {d['stderr']:.3f} | — | {q['bits_per_dim']:+.3f} | {q['stderr']:.3f} |")
    return "\n".join(lines) + "\n"


def _plots(summary: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = ([summary["mixture"]] if "mixture" in summary else []) + summary.get("digits", {}).get("models", [])
    n_panels = len(records) + ("mixture" in summary)
    fig, axes = plt.subplots(1, n_panels, figsize=(4.2 * n_panels, 3.4), squeeze=False)
    for ax, rec in zip(axes[0], records):
        steps = [c["step"] for c in rec["curve"]]
        bpd = [c["bits_per_dim"] for c in rec["curve"]]
        se = [c["stderr"] for c in rec["curve"]]
        ax.errorbar(steps, bpd, yerr=[2 * s for s in se], marker="o", label="held-out bound (±2 s.e.)")
        ax.set_title(rec["name"])
        if "true_entropy_bits_per_dim" in rec:
            truth = rec["test_nll_bits_per_dim"][0]
            ax.axhline(rec["true_entropy_bits_per_dim"][0], color="k", ls="--", label="true entropy h(x̃)")
            ax.axhline(truth, color="tab:green", ls=":", label="true NLL of the test points")
            ax.axhline(rec["exact_denoiser_bits_per_dim"][0], color="tab:red", ls="-.", lw=0.8,
                       label="bound of the exact denoiser")
            ax.set_ylim(truth - 0.04, max(bpd[1:] + [truth]) + 0.04)  # step 0 (the Gaussian base) is far above
            ax.set_title(f"{rec['name']} (step 0: {bpd[0]:.2f}, off scale)")
        elif "digits" in summary:
            ax.axhline(summary["digits"]["gaussian_fit_bits_per_dim"][0], color="gray", ls=":", label="Gaussian fit")
        ax.set_xlabel("step")
        ax.set_ylabel("bits/dim")
        ax.legend(fontsize=7)
    if "mixture" in summary:
        ax, curve = axes[0][-1], summary["mixture"]["curve"]
        ax.errorbar([c["step"] for c in curve], [c["gap_to_exact"][0] for c in curve],
                    yerr=[2 * c["gap_to_exact"][1] for c in curve], marker="o", color="tab:purple")
        ax.set_yscale("log")
        ax.set_title("2-D mixture: bound − exact denoiser's")
        ax.set_xlabel("step")
        ax.set_ylabel("½∫E‖ε̂ − ε̂*‖² dλ, bits/dim (±2 s.e.)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "training_curve.png"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for rec in records:
        ax.plot(rec["integrand"]["logsnr"], rec["integrand"]["per_dim"], marker=".", label=rec["name"])
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("log-SNR λ")
    ax.set_ylabel("(E‖ε − ε̂‖² − d·sigmoid(λ)) / d")
    ax.set_title("integrand of the bound (held-out, quadrature nodes)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "integrand.png"), dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train small ε-denoisers on continuous data (a 2-D Gaussian mixture with a known density; "
                    "8-bit 8x8 digits) and report the warm-start NLL bound in bits/dim beside baselines, with "
                    "the warm-noise ablation (Gaussian vs uniform).")
    p.add_argument("--part", choices=("a", "b", "both"), default="both", help="a: 2-D mixture, b: digits")
    p.add_argument("--steps", type=int, default=2000, help="training steps of the 2-D mixture model")
    p.add_argument("--digits-steps", type=int, default=1500, help="training steps of each digits model")
    p.add_argument("--laws", type=lambda s: s.split(","), default=["gaussian", "uniform"],
                   help=f"comma-separated warm-up laws of the digits ablation, from {WARM_LAWS}")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-2, help="peak AdamW learning rate (cosine decay)")
    p.add_argument("--weighting", choices=WEIGHTINGS, default="proposal",
                   help="training weight of a draw λ ~ p: 1 (proposal) or 1/p(λ) (bound: ITD's objective)")
    p.add_argument("--width", type=int, default=256, help="MLP width")
    p.add_argument("--length-scale", type=float, default=1.0,
                   help="ℓ/σ0, ℓ the length in the MLP correction's scale ασ/√(σ² + α²ℓ²) (see Denoiser)")
    p.add_argument("--depth", type=int, default=3, help="hidden layers")
    p.add_argument("--warm-std-a", type=float, default=0.05, help="σ0 of part a's Gaussian warm-up")
    p.add_argument("--logsnr-min", type=float, default=-10.0)
    p.add_argument("--logsnr-max", type=float, default=16.0)
    p.add_argument("--train-size", type=int, default=20000, help="part a training samples")
    p.add_argument("--test-size", type=int, default=1000, help="part a held-out samples")
    p.add_argument("--eval-draws", type=int, default=32,
                   help="antithetic (λ, u, ±ε) draws per held-out sample at the intermediate checkpoints "
                        "(each draw: two denoiser rows)")
    p.add_argument("--final-draws", type=int, default=128,
                   help="antithetic draws per held-out sample of the final bounds (and of the exact denoiser's)")
    p.add_argument("--pilot-samples", type=int, default=512,
                   help="training samples of the pilot that fits the log-SNR proposal (loc, scale)")
    p.add_argument("--n-evals", type=int, default=6, help="held-out evaluations per model")
    p.add_argument("--integrand-samples", type=int, default=128, help="held-out samples of the integrand plot")
    p.add_argument("--entropy-samples", type=int, default=200000, help="Monte-Carlo samples of h(x̃)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0: torch's choice); the models are small, so one thread avoids OpenMP overhead")
    p.add_argument("--out", default="runs/continuous", help="output directory")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tests)")
    return p


def _check(p: argparse.ArgumentParser, args) -> None:
    for name in ("steps", "digits_steps", "batch_size", "width", "depth", "train_size", "test_size", "eval_draws",
                 "n_evals", "integrand_samples", "entropy_samples", "pilot_samples", "final_draws"):
        if getattr(args, name) < (2 if name.endswith("_draws") else 1):
            p.error(f"--{name.replace('_', '-')} must be >= {2 if name.endswith('_draws') else 1}, "
                    f"got {getattr(args, name)}")
    if args.threads < 0:
        p.error(f"--threads must be >= 0, got {args.threads}")
    bad = [law for law in args.laws if law not in WARM_LAWS]
    if bad:
        p.error(f"--laws: unknown warm-up law {bad[0]!r}; choose from {WARM_LAWS}")
    if not args.logsnr_min < args.logsnr_max:
        p.error("--logsnr-min must be < --logsnr-max")
    if not (args.lr > 0 and args.warm_std_a > 0):
        p.error("--lr and --warm-std-a must be > 0")


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.steps = args.digits_steps = 20
        args.train_size, args.test_size, args.eval_draws, args.final_draws, args.n_evals = 512, 64, 4, 8, 2
        args.integrand_samples, args.entropy_samples, args.width, args.pilot_samples = 16, 4000, 32, 64
    _check(p, args)
    missing = [name for name in ("tqdm", "matplotlib", "sklearn") if importlib.util.find_spec(name) is None]
    if missing:
        p.error(f"the continuous run needs {', '.join(missing)}: pip install 'fastbound[train]'")
    from tqdm.auto import tqdm

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    total = (args.steps if args.part in ("a", "both") else 0) + \
        (args.digits_steps * len(args.laws) if args.part in ("b", "both") else 0)
    t0 = time.time()
    summary: dict = {"args": {k: v for k, v in vars(args).items()}}
    with tqdm(total=total, desc="continuous", disable=None, dynamic_ncols=True) as bar:
        if args.part in ("a", "both"):
            summary["mixture"] = run_mixture(args, bar)
        if args.part in ("b", "both"):
            summary["digits"] = run_digits(args, bar)
    summary["seconds"] = time.time() - t0
    if "mixture" in summary:
        r = summary["mixture"]
        print(f"[a] 2-D mixture, Gaussian warm-up σ0={args.warm_std_a}: bound {r['bits_per_dim']:.4f} ± "
              f"{r['stderr']:.4f} bits/dim | exact denoiser {r['exact_denoiser_bits_per_dim'][0]:.4f} ± "
              f"{r['exact_denoiser_bits_per_dim'][1]:.4f} | true NLL of the test points {r['test_nll_bits_per_dim'][0]:.4f} ± "
              f"{r['test_nll_bits_per_dim'][1]:.4f} (gap {r['gap_bits_per_dim'][0]:+.4f} ± {r['gap_bits_per_dim'][1]:.4f}) | "
              f"true entropy {r['true_entropy_bits_per_dim'][0]:.4f} ± {r['true_entropy_bits_per_dim'][1]:.4f} | "
              f"model − exact denoiser ½∫E‖ε̂ − ε̂*‖² {r['gap_to_exact_bits_per_dim'][0]:.4f} ± "
              f"{r['gap_to_exact_bits_per_dim'][1]:.4f}")
    if "digits" in summary:
        table = _ablation_table(summary["digits"])
        with open(os.path.join(args.out, "ablation.md"), "w") as f:
            f.write(table)
        print("[b] 8x8 digits (8-bit), held-out bits/dim:\n" + table, end="")
    print(f"{summary['seconds']:.0f} s; results in {args.out}")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if not args.no_plots:
        _plots(summary, args.out)
    return 0
