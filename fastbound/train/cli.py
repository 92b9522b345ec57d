"""Command-line flags of ``python -m fastbound.train``.

Every flag is checked here or when the data is opened; a bad value ends the program with a
one-line message and exit status 2 (argparse's convention), never a traceback.
"""

from __future__ import annotations

import argparse
import math

import fastbound

from .data import MAX_CONTEXTS

PROG = "python -m fastbound.train"
SCHEDULES = tuple(fastbound.schedules.SCHEDULES)
DTYPES = ("fp32", "bf16")
SEED_LIMIT = 2**63
"""Seeds are keys of torch's generators (at most 64 bits); larger ones are refused."""

# Flags that change what is trained: a checkpoint resumes only a run that agrees on all of them.
TRAJECTORY_FLAGS = (
    "steps", "batch_size", "seq_len", "lr", "warmup", "loss", "graph", "schedule", "dtype", "seed",
    "oracle", "data", "markov_symbols", "markov_order", "markov_concentration", "markov_seed",
    "d_model", "n_layers", "n_heads", "time_conditioning", "no_fused_head",
)


class UsageError(ValueError):
    """A problem with the flags or files the user gave (reported without a traceback)."""


def _number(kind: type, what: str, minimum: float, *, strict: bool = False, limit: float = math.inf):
    """An argparse type: ``kind`` (int or float) in [minimum, limit) (or (minimum, limit) when ``strict``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value > minimum if strict else value >= minimum) or not value < limit:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


_positive_int = _number(int, "a positive integer", 1)
_non_negative_int = _number(int, "a non-negative integer", 0)
_seed = _number(int, "an integer in [0, 2^63)", 0, limit=SEED_LIMIT)
_positive_float = _number(float, "a positive finite number", 0, strict=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Train a small masked (absorbing) or uniform discrete diffusion language model with "
            "fastbound's fused losses and report the NLL bound it reaches in bits per token. "
            "The default data is a random Markov chain whose entropy rate is known exactly. "
            "'python -m fastbound.train continuous --help': the continuous-data reference run "
            "(warm-start Gaussian-channel NLL bound, fastbound.continuous)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run = p.add_argument_group("run")
    run.add_argument("--steps", type=_positive_int, default=1000, help="optimizer steps")
    run.add_argument("--batch-size", type=_positive_int, default=64,
                     help="global batch (sequences per step, split evenly across processes)")
    run.add_argument("--seq-len", type=_positive_int, default=64, help="tokens per sequence")
    run.add_argument("--lr", type=_positive_float, default=3e-3, help="peak AdamW learning rate")
    run.add_argument("--warmup", type=_non_negative_int, default=50, help="linear warm-up steps")
    run.add_argument("--seed", type=_seed, default=0, help="seed of the weights, batches and noise")
    run.add_argument("--out", default="runs/train", help="directory for checkpoints, metrics and plots")
    run.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    run.add_argument("--ckpt-every", type=_positive_int, default=250, help="checkpoint every N steps")
    run.add_argument("--crash-after", type=_positive_int, default=None, metavar="N",
                     help="testing: SIGKILL this process right after step N (simulates a crash)")
    run.add_argument("--no-plots", action="store_true", help="skip the PNG plots at the end")

    diff = p.add_argument_group("diffusion")
    diff.add_argument("--loss", choices=fastbound.LOSSES, default="dce",
                      help="dce: masked cross-entropy (MDLM); dse: score entropy (SEDD)")
    diff.add_argument("--graph", choices=fastbound.GRAPHS, default="absorb", help="corruption graph")
    diff.add_argument("--schedule", choices=SCHEDULES, default="loglinear", help="noise schedule")
    diff.add_argument("--oracle", action="store_true",
                      help="use the pure-PyTorch losses of fastbound.reference instead of the fused kernels")
    diff.add_argument("--no-fused-head", action="store_true",
                      help="compute the loss and the held-out estimate from the (B, L, V) logits instead of "
                           "the fused output layer (fastbound.fused_linear_*_loss, estimate_nll(head=...))")
    diff.add_argument("--backend", choices=fastbound.BACKENDS, default="auto", help="fastbound kernel backend")

    model = p.add_argument_group("model")
    model.add_argument("--d-model", type=_positive_int, default=64, help="transformer width")
    model.add_argument("--n-layers", type=_positive_int, default=3, help="transformer blocks")
    model.add_argument("--n-heads", type=_positive_int, default=4, help="attention heads")
    model.add_argument("--time-conditioning", choices=("auto", "on", "off"), default="auto",
                       help="feed log(sigma) to the denoiser (auto: on for the uniform graph only)")
    model.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    model.add_argument("--dtype", choices=DTYPES, default="fp32", help="autocast dtype of the denoiser")

    data = p.add_argument_group("data")
    data.add_argument("--data", metavar="FILE", default=None,
                      help="train on the bytes of a text file (V = 256 + mask) instead of the Markov source")
    data.add_argument("--markov-symbols", type=_positive_int, default=4, help=f"alphabet of the Markov source (symbols ** order <= {MAX_CONTEXTS})")
    data.add_argument("--markov-order", type=_positive_int, default=2, help="order of the Markov source")
    data.add_argument("--markov-concentration", type=_positive_float, default=0.25,
                      help="Dirichlet concentration of its transition probabilities (lower: less entropy)")
    data.add_argument("--markov-seed", type=_seed, default=0, help="seed of the chain itself")

    ev = p.add_argument_group("evaluation")
    ev.add_argument("--eval-every", type=_positive_int, default=250, help="evaluate every N steps (and at the end)")
    ev.add_argument("--eval-sequences", type=_positive_int, default=256, help="held-out sequences")
    ev.add_argument("--eval-samples", type=_positive_int, default=16,
                    help="Monte-Carlo samples per sequence of the NLL estimate")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and cross-checks the flags; exits with status 2 and a message on a bad value."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.loss == "dce" and args.graph != "absorb":
        parser.error("--loss dce needs --graph absorb (the masked cross-entropy has no uniform-graph form); "
                     "use --loss dse for --graph uniform")
    if args.markov_symbols < 2:
        parser.error(f"--markov-symbols must be >= 2, got {args.markov_symbols}")
    if args.data is None and args.markov_symbols**args.markov_order > MAX_CONTEXTS:
        parser.error(f"--markov-symbols {args.markov_symbols} --markov-order {args.markov_order} make "
                     f"{args.markov_symbols**args.markov_order:,} contexts; the Markov source keeps a dense table "
                     f"over its contexts and allows at most {MAX_CONTEXTS} (symbols ** order)")
    if args.d_model % (2 * args.n_heads):
        parser.error(f"--d-model ({args.d_model}) must be a multiple of 2 x --n-heads ({args.n_heads}): "
                     "rotary embeddings need an even head size")
    if args.time_conditioning == "auto":
        args.time_conditioning = "on" if args.graph == "uniform" else "off"
    return args


def error(message: str) -> None:
    """Ends the program as argparse does for a bad flag: usage, the message, exit status 2."""
    build_parser().error(message)
