"""The training loop of ``python -m fastbound.train``.

One step: take this process's rows of the step's global batch, compute the diffusion loss
(`objective.Objective`), back-propagate (DDP averages the gradients across processes), clip the
gradient norm to 1, and take an AdamW step at the step's learning rate (warm-up, then cosine).
Every random draw after the weights' initialisation is a function of (seed, step), so a
checkpoint needs only the model, the optimizer and the step to resume bit-exactly (the global
RNG states are saved and restored as well, so code that does draw from them stays exact).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

import fastbound

from . import checkpoint, cli, distributed, metrics
from .cli import UsageError
from .data import ByteText, DataError, EntropyTarget, MarkovSource
from .evaluate import Evaluation, evaluate, integrand_curve
from .lock import LockedError, RunLock
from .models import Denoiser, DenoiserConfig
from .objective import Objective

SUMMARY = "summary.json"
_EVAL_STREAM = 3
EXTRA_HINT = "pip install 'fastbound[train]'"
"""How to get the training script's own dependencies (tqdm, matplotlib)."""


def _check_extras(args) -> None:
    """tqdm (always) and matplotlib (unless --no-plots) come with the ``train`` extra."""
    needed = ["tqdm"] + ([] if args.no_plots else ["matplotlib"])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"the training script needs {' and '.join(missing)}: {EXTRA_HINT}"
                         + (" (or pass --no-plots)" if missing == ["matplotlib"] else ""))


def _prepare_out(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file, not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create the directory ({e.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: the directory is not writable")


def learning_rate(step: int, args) -> float:
    """Linear warm-up to ``--lr`` over ``--warmup`` steps, then cosine decay to a tenth of it."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def open_source(args) -> ByteText | MarkovSource:
    """The ``--data`` file, else the Markov source (DataError for an unusable file)."""
    if args.data is not None:
        return ByteText(args.data, args.seq_len)
    return MarkovSource(args.markov_symbols, args.markov_order, args.markov_concentration, seed=args.markov_seed)


def _check_resumable(state: dict, args) -> None:
    saved = state["args"]
    for name in cli.TRAJECTORY_FLAGS:
        if saved.get(name) != getattr(args, name):
            flag = "--" + name.replace("_", "-")
            raise UsageError(
                f"--resume: the checkpoint was written with {flag} {saved.get(name)!r} but this run has "
                f"{flag} {getattr(args, name)!r}; rerun with the same flags or another --out"
            )


@dataclass
class Run:
    """Everything one training run holds."""

    args: object
    topo: distributed.Topology
    device: torch.device
    source: ByteText | MarkovSource
    target: EntropyTarget | None
    objective: Objective
    lock: RunLock | None  # held by rank 0 until the run ends
    config: DenoiserConfig
    model: Denoiser
    net: torch.nn.Module  # the model, wrapped in DDP when there are several processes
    optimizer: torch.optim.Optimizer
    autocast: torch.autocast | None
    heldout: torch.Tensor
    log: metrics.MetricsLog
    start: int  # steps already done (from the checkpoint)

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.args.out, checkpoint.FILENAME)

    def save(self, step: int) -> None:
        if self.topo.is_main:
            checkpoint.save_atomic(
                {"step": step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "rng": checkpoint.rng_state(), "args": vars(self.args), "model_config": self.config.to_dict()},
                self.ckpt_path,
            )
        distributed.barrier(self.topo)

    @property
    def fused_head(self) -> bool:
        """Whether the loss and the estimate run on the model's features and its linear head (not the oracle)."""
        return not (self.args.no_fused_head or self.args.oracle)

    def evaluate(self, step: int) -> Evaluation:
        result = evaluate(self.model, self.heldout, self.objective, n_samples=self.args.eval_samples,
                          seed=fastbound.derive_seed(self.args.seed, _EVAL_STREAM),
                          dtype=torch.bfloat16 if self.autocast is not None else None, fused_head=self.fused_head)
        self.log.write({"kind": "eval", "step": step, "bits": result.bits_per_token, "stderr": result.stderr})
        return result


def setup(args) -> Run:
    """Opens the data, takes the lock of ``--out``, builds the model and optimizer, and loads the
    checkpoint for ``--resume``."""
    _check_extras(args)
    topo = distributed.topology_from_env()
    try:
        device = distributed.resolve_device(args.device, topo)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"--device {args.device}: {e}") from None
    try:
        fastbound.select_backend(device, None if args.backend == "auto" else args.backend)
    except ValueError as e:
        raise UsageError(f"--backend {args.backend}: {e}") from None
    try:
        source = open_source(args)
    except DataError as e:
        raise UsageError(str(e)) from None
    if args.batch_size % topo.world_size:
        raise UsageError(f"--batch-size {args.batch_size} must be divisible by the number of processes "
                         f"({topo.world_size})")
    lock = None
    if topo.is_main:
        _prepare_out(args.out)
        lock = RunLock(args.out)
        try:
            lock.acquire()
        except LockedError as e:
            raise UsageError(f"--out {args.out}: {e}") from None
    try:
        return _build(args, topo, device, source, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _load_state(args, ckpt_path: str) -> dict:
    if not os.path.exists(ckpt_path):
        raise UsageError(f"--resume: no checkpoint at {ckpt_path}")
    try:
        state = checkpoint.load_run(ckpt_path)
    except checkpoint.CheckpointError as e:
        raise UsageError(f"--resume: {e}; delete it or choose another --out") from None
    _check_resumable(state, args)
    return state


def _build(args, topo: distributed.Topology, device: torch.device, source, lock: RunLock | None) -> Run:
    ckpt_path = os.path.join(args.out, checkpoint.FILENAME)
    state = _load_state(args, ckpt_path) if args.resume else None
    metrics_path = os.path.join(args.out, metrics.FILENAME)
    try:
        records = metrics.read(metrics_path, state["step"]) if state else []
    except metrics.MetricsError as e:
        raise UsageError(f"--resume: {e}") from None
    distributed.start(topo, device)

    objective = Objective(
        loss=args.loss, graph=args.graph, schedule=fastbound.schedules.SCHEDULES[args.schedule](),
        num_tokens=source.vocab_size, oracle=args.oracle, backend=None if args.backend == "auto" else args.backend,
    )
    config = DenoiserConfig(
        vocab_size=objective.model_vocab, seq_len=args.seq_len, d_model=args.d_model,
        n_layers=args.n_layers, n_heads=args.n_heads, time_conditioning=args.time_conditioning == "on",
    )
    torch.manual_seed(args.seed)
    model = Denoiser(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
    start = 0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            checkpoint.set_rng_state(state["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--resume: {ckpt_path} does not fit this model ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
        start = state["step"]
    return Run(
        args=args, topo=topo, device=device, source=source,
        target=source.target(args.seq_len) if isinstance(source, MarkovSource) else None,
        objective=objective, lock=lock, config=config, model=model,
        net=DistributedDataParallel(model) if topo.world_size > 1 else model,
        optimizer=optimizer,
        autocast=torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else None,
        heldout=source.heldout(args.seed, args.eval_sequences, args.seq_len).to(device),
        log=metrics.MetricsLog(metrics_path, records, topo.is_main),
        start=start,
    )


def train_step(run: Run, step: int) -> float:
    """One optimizer step; returns the loss of the global batch (nats per token)."""
    args, rows = run.args, run.topo.rows(run.args.batch_size)
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(step, args)
    x0 = run.source.train_batch(args.seed, step, args.batch_size, args.seq_len)[rows].to(run.device)
    loss = run.objective(run.net, x0, seed=args.seed, step=step, rows=rows, global_batch=args.batch_size,
                         autocast=run.autocast, head=run.model.head if run.fused_head else None)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
    run.optimizer.step()
    return distributed.mean(loss.detach(), run.topo).item()


def train(args) -> dict:
    """Runs training from ``args`` (see `cli`); returns the summary (rank 0; {} on other ranks)."""
    run = setup(args)
    try:
        return _train(run)
    finally:
        if run.lock is not None:
            run.lock.release()


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm  # the train extra (checked by setup)

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, file=sys.stderr, unit="step")


def _train(run: Run) -> dict:
    args, is_main = run.args, run.topo.is_main
    if is_main:
        print(f"data: {run.source.describe()}; model: {run.model.num_parameters():,} parameters, "
              f"V = {run.config.vocab_size}; {args.steps} steps of {args.batch_size} x {args.seq_len} tokens "
              f"on {run.topo.world_size} process(es), {run.device}"
              + ("" if run.target is None else f"\ntrue entropy rate: {run.target.rate:.4f} bits/token"), flush=True)
        if run.start:
            print(f"resumed from {run.ckpt_path} at step {run.start}", flush=True)

    tokens_per_step = args.batch_size * args.seq_len
    # The bar is drawn by rank 0 on a terminal only; evaluations and the summary are printed anyway.
    bar = _progress_bar(args.steps, run.start, is_main and sys.stderr.isatty())
    t_start, rate, last = time.perf_counter(), None, None
    for step in range(run.start, args.steps):
        t0 = time.perf_counter()
        loss = train_step(run, step)
        done = step + 1
        step_rate = tokens_per_step / (time.perf_counter() - t0)
        rate = step_rate if rate is None else 0.9 * rate + 0.1 * step_rate  # tokens/s, smoothed
        bits = loss / math.log(2)
        run.log.write({"kind": "train", "step": done, "loss": loss, "bits": bits, "lr": learning_rate(step, args)})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", bits=f"{bits:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss} at step {done}; try a smaller --lr")
        if done % args.ckpt_every == 0 or done == args.steps:
            run.save(done)
        if done % args.eval_every == 0 or done == args.steps:
            if is_main:
                last = run.evaluate(done)
                bar.write(f"step {done}: held-out bound {last.bits_per_token:.4f} ± {last.stderr:.4f} bits/token"
                          + ("" if run.target is None else f" (entropy rate {run.target.rate:.4f})"))
            distributed.barrier(run.topo)
        if args.crash_after is not None and done == args.crash_after:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    elapsed = time.perf_counter() - t_start
    summary = {}
    if is_main:
        if last is None:  # resumed a finished run: evaluate what it reached
            last = run.evaluate(args.steps)
        summary = _finish(run, last, elapsed, (args.steps - run.start) * tokens_per_step)
    run.log.close()
    distributed.barrier(run.topo)
    distributed.stop()
    return summary


def _finish(run: Run, last: Evaluation, elapsed: float, tokens: int) -> dict:
    """Writes ``summary.json`` and the plots, and prints the result beside the true entropy."""
    args, target = run.args, run.target
    summary = {
        "bits": last.bits_per_token, "stderr": last.stderr, "steps": args.steps, "seq_len": args.seq_len,
        "wall_time_s": elapsed, "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
        "entropy_rate": None if target is None else target.rate,
        "window_entropy": None if target is None else target.window,
        "gap": None if target is None else last.bits_per_token / target.rate - 1,
    }
    with open(os.path.join(args.out, SUMMARY), "w") as f:
        json.dump(summary, f, indent=2)
    text = f"held-out NLL bound: {last.bits_per_token:.4f} ± {last.stderr:.4f} bits/token"
    if target is not None:
        text += (f"\ntrue entropy rate:  {target.rate:.4f} bits/token "
                 f"(a window of {args.seq_len} tokens: {target.window:.4f})"
                 f"\ngap: {100 * summary['gap']:+.2f}% of the entropy rate")
    text += f"\nwall time: {elapsed:.1f} s for {args.steps - run.start} steps"
    if summary["tokens_per_s"]:
        text += f" ({summary['tokens_per_s']:,.0f} tokens/s)"
    print(text, flush=True)
    if not args.no_plots:
        from . import plots

        title = f"{args.loss.upper()} / {args.graph} / {args.schedule}" + (" (oracle)" if args.oracle else "")
        curve, integrand = os.path.join(args.out, "training_curve.png"), os.path.join(args.out, "integrand.png")
        plots.training_curve(run.log.of_kind("train"), run.log.of_kind("eval"), target, curve, title)
        plots.integrand(*integrand_curve(last.estimate), integrand, f"final estimate: {title}")
        print(f"plots: {curve}, {integrand}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m fastbound.train [flags]``: exit status 0, or 2 with a message for bad flags or data."""
    args = cli.parse_args(argv)
    try:
        train(args)
    except UsageError as e:
        cli.error(str(e))
    return 0
