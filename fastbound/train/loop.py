"""The training loop of ``python -m fastbound.train``.

One step: take this process's rows of the global batch of the step, compute the diffusion loss
(`objective.Objective`), back-propagate (DDP averages the gradients across processes), clip,
take an AdamW step with the warm-up + cosine learning rate of the step. All randomness after
the weights' initialisation is a function of (seed, step), so the state to resume from is the
model, the optimizer and the step (the global RNG states are saved too, for completeness).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from fastbound import schedules

from . import checkpoint, cli, distributed
from .evaluate import evaluate, integrand_curve
from .objective import Objective, derive_seed
from ..data import ByteText, DataError, MarkovSource
from ..models import Denoiser, DenoiserConfig

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
_EVAL_STREAM = 3


class UsageError(ValueError):
    """A problem with the flags or files the user gave (reported without a traceback)."""


def learning_rate(step: int, args) -> float:
    """Linear warm-up to ``--lr`` over ``--warmup`` steps, then cosine decay to a tenth of it."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def open_source(args):
    if args.data is not None:
        return ByteText(args.data, args.seq_len)
    return MarkovSource(args.markov_symbols, args.markov_order, args.markov_concentration, seed=args.markov_seed)


def _read_metrics(path: str, upto: int) -> list[dict]:
    """Records of a previous run up to step ``upto`` (later ones were lost with the crash)."""
    if not os.path.exists(path):
        return []
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if rec["step"] <= upto:
                keep.append(rec)
    return keep


class MetricsLog:
    """Append-only JSON lines, flushed per record so that a crash loses at most the last one."""

    def __init__(self, path: str, records: list[dict], enabled: bool):
        self.records, self.enabled = list(records), enabled
        self._file = None
        if enabled:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            os.replace(tmp, path)
            self._file = open(path, "a")

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _check_resumable(state: dict, args) -> None:
    saved = state["args"]
    for name in cli.TRAJECTORY_FLAGS:
        if saved.get(name) != getattr(args, name):
            flag = "--" + name.replace("_", "-")
            raise UsageError(
                f"--resume: the checkpoint was written with {flag} {saved.get(name)!r} but this run has "
                f"{flag} {getattr(args, name)!r}; rerun with the same flags or another --out"
            )


def _summary_line(result: dict) -> str:
    text = f"held-out NLL bound: {result['bits']:.4f} ± {result['stderr']:.4f} bits/token"
    if result.get("entropy_rate") is not None:
        text += (
            f"\ntrue entropy rate:  {result['entropy_rate']:.4f} bits/token "
            f"(window of {result['seq_len']} tokens: {result['window_entropy']:.4f})"
            f"\ngap: {100 * result['gap']:+.2f}% of the entropy rate"
        )
    return text


def train(args) -> dict:
    topo = distributed.topology_from_env()
    try:
        device = distributed.resolve_device(args.device, topo)
    except (ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from None
    if args.batch_size % topo.world_size:
        raise UsageError(f"--batch-size {args.batch_size} must be divisible by the number of processes ({topo.world_size})")
    try:
        source = open_source(args)
    except DataError as e:
        raise UsageError(str(e)) from None
    distributed.start(topo, device)
    main = topo.is_main
    out = args.out
    ckpt_path = os.path.join(out, checkpoint.FILENAME)
    state = None
    if args.resume:
        if not os.path.exists(ckpt_path):
            raise UsageError(f"--resume: no checkpoint at {ckpt_path}")
        state = checkpoint.load(ckpt_path)
        _check_resumable(state, args)
    if main:
        os.makedirs(out, exist_ok=True)

    schedule = schedules.SCHEDULES[args.schedule]()
    objective = Objective(
        loss=args.loss, graph=args.graph, schedule=schedule, num_tokens=source.vocab_size,
        oracle=args.oracle, backend=None if args.backend == "auto" else args.backend,
    )
    torch.manual_seed(args.seed)
    config = DenoiserConfig(
        vocab_size=objective.model_vocab, seq_len=args.seq_len, d_model=args.d_model,
        n_layers=args.n_layers, n_heads=args.n_heads, time_conditioning=args.time_conditioning == "on",
    )
    model = Denoiser(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        checkpoint.set_rng_state(state["rng"])
        start = state["step"]
    net = DistributedDataParallel(model) if topo.world_size > 1 else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else None
    rows = topo.rows(args.batch_size)
    target = source.target(args.seq_len) if isinstance(source, MarkovSource) else None
    heldout = source.heldout(args.seed, args.eval_sequences, args.seq_len).to(device)
    eval_seed = derive_seed(args.seed, _EVAL_STREAM)

    log = MetricsLog(os.path.join(out, METRICS), _read_metrics(os.path.join(out, METRICS), start) if state else [], main)
    if main:
        print(f"data: {source.describe()}; model: {model.num_parameters():,} parameters, V = {config.vocab_size}; "
              f"{args.steps} steps of {args.batch_size} x {args.seq_len} tokens on {topo.world_size} process(es), {device}"
              + ("" if target is None else f"\ntrue entropy rate: {target.rate:.4f} bits/token"),
              flush=True)
        if start:
            print(f"resumed from {ckpt_path} at step {start}", flush=True)

    def save(step: int) -> None:
        if main:
            checkpoint.save_atomic(
                {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "rng": checkpoint.rng_state(), "args": vars(args), "model_config": config.to_dict()},
                ckpt_path,
            )
        distributed.barrier(topo)

    def run_eval(step: int):
        result = evaluate(model, heldout, objective, n_samples=args.eval_samples, seed=eval_seed,
                          dtype=torch.bfloat16 if autocast is not None else None)
        log.write({"kind": "eval", "step": step, "bits": result.bits_per_token, "stderr": result.stderr})
        return result

    tokens_per_step = args.batch_size * args.seq_len
    bar = tqdm(total=args.steps, initial=start, disable=not main or None, dynamic_ncols=True, file=sys.stderr)
    t_start, rate, last = time.perf_counter(), None, None
    model.train()
    for step in range(start, args.steps):
        t0 = time.perf_counter()
        lr = learning_rate(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x0 = source.train_batch(args.seed, step, args.batch_size, args.seq_len)[rows].to(device)
        loss = objective(net, x0, seed=args.seed, step=step, rows=rows, global_batch=args.batch_size,
                         autocast=autocast)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        global_loss = distributed.mean(loss.detach(), topo).item()
        done = step + 1
        dt = time.perf_counter() - t0
        rate = tokens_per_step / dt if rate is None else 0.9 * rate + 0.1 * tokens_per_step / dt
        bits = global_loss / math.log(2)
        log.write({"kind": "train", "step": done, "loss": global_loss, "bits": bits, "lr": lr})
        bar.update(1)
        bar.set_postfix(loss=f"{global_loss:.4f}", bits=f"{bits:.3f}", tok_s=f"{rate:,.0f}")
        if not math.isfinite(global_loss):
            raise FloatingPointError(f"the loss is {global_loss} at step {done}; try a smaller --lr")
        if done % args.ckpt_every == 0 or done == args.steps:
            save(done)
        if done % args.eval_every == 0 or done == args.steps:
            if main:
                last = run_eval(done)
                bar.write(f"step {done}: held-out bound {last.bits_per_token:.4f} ± {last.stderr:.4f} bits/token"
                          + ("" if target is None else f" (entropy rate {target.rate:.4f})"))
            distributed.barrier(topo)
        if args.crash_after is not None and done == args.crash_after:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    elapsed = time.perf_counter() - t_start
    if main and last is None:  # resumed a finished run: evaluate what it reached
        last = run_eval(args.steps)
    result = {}
    if main:
        result = {"bits": last.bits_per_token, "stderr": last.stderr, "steps": args.steps, "seq_len": args.seq_len,
                  "wall_time_s": elapsed, "entropy_rate": None if target is None else target.rate,
                  "window_entropy": None if target is None else target.window,
                  "gap": None if target is None else last.bits_per_token / target.rate - 1}
        with open(os.path.join(out, SUMMARY), "w") as f:
            json.dump(result, f, indent=2)
        print(_summary_line(result) + f"\nwall time: {elapsed:.1f} s (this invocation)", flush=True)
        if not args.no_plots:
            _plot(log.records, last, target, args, out)
    log.close()
    distributed.barrier(topo)
    distributed.stop()
    return result


def _plot(records, last, target, args, out) -> None:
    from . import plots

    train_recs = [r for r in records if r["kind"] == "train"]
    eval_recs = [r for r in records if r["kind"] == "eval"]
    title = f"{args.loss.upper()} / {args.graph} / {args.schedule}" + (" (oracle)" if args.oracle else "")
    plots.training_curve(train_recs, eval_recs, target, os.path.join(out, "training_curve.png"), title)
    xs, ys, xlabel = integrand_curve(last.estimate)
    plots.integrand(xs, ys, xlabel, os.path.join(out, "integrand.png"), f"final estimate: {title}")
    print(f"plots: {os.path.join(out, 'training_curve.png')}, {os.path.join(out, 'integrand.png')}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = cli.parse_args(argv)
    try:
        train(args)
    except UsageError as e:
        cli.error(str(e))
    return 0
