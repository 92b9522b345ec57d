"""PNG plots written at the end of a run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _smooth(y: np.ndarray, span: int) -> np.ndarray:
    """Exponential moving average with an effective window of ``span`` points, bias-corrected."""
    alpha, out, avg = 2 / (span + 1), np.empty_like(y), 0.0
    for i, v in enumerate(y):
        avg = alpha * v + (1 - alpha) * avg
        out[i] = avg / (1 - (1 - alpha) ** (i + 1))
    return out


def training_curve(train: list[dict], evals: list[dict], target, path: str, title: str) -> None:
    """Training loss (bits/token of the bound, raw and smoothed), held-out estimates with
    1.96-sigma error bars, and the true entropy when the source knows it."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        steps = np.array([r["step"] for r in train])
        loss = np.array([r["bits"] for r in train])
        ax.plot(steps, loss, color="tab:blue", alpha=0.25, lw=0.8, label="training batch bound")
        ax.plot(steps, _smooth(loss, max(5, len(loss) // 30)), color="tab:blue", lw=1.5, label="smoothed")
    if evals:
        ax.errorbar([r["step"] for r in evals], [r["bits"] for r in evals],
                    yerr=[1.96 * r["stderr"] for r in evals], fmt="o", color="tab:red", capsize=3,
                    label="held-out NLL bound (estimate_nll, ±1.96 s.e.)")
    if target is not None:
        ax.axhline(target.rate, color="black", ls="--", lw=1, label=f"true entropy rate {target.rate:.3f}")
        ax.axhline(target.window, color="black", ls=":", lw=1,
                   label=f"entropy of a training window {target.window:.3f} (the floor at this length)")
        ax.axhline(1.1 * target.rate, color="gray", ls="-.", lw=1, label="entropy rate +10%")
    finals = [r["bits"] for r in evals] or [r["bits"] for r in train[-50:]]
    if finals and train:
        lo = min(finals + ([target.rate] if target is not None else []))
        ax.set_ylim(0.9 * lo, max(loss[: max(1, len(loss) // 20)].mean(), 1.2 * max(finals)))
    ax.set_xlabel("step")
    ax.set_ylabel("bits / token")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def integrand(xs: np.ndarray, ys: np.ndarray, xlabel: str, path: str, title: str) -> None:
    """The per-timestep integrand of the final NLL estimate (its area is the bound)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, ys, marker=".", color="tab:purple")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("integrand (bits / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
