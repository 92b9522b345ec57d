"""The reference training script, ``python -m fastbound.train``, on tiny runs (tens of steps).

Runs that must be compared bit for bit, or that must be killed, run as subprocesses with one
thread each; the others call `fastbound.train.main` in-process.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from fastbound.train import checkpoint, main
from fastbound.train.loop import learning_rate
from fastbound.train.models import Denoiser, DenoiserConfig
from fastbound.train.objective import Objective
from fastbound import derive_seed
from fastbound import schedules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--markov-symbols", "4", "--seq-len", "16", "--batch-size", "8", "--d-model", "16", "--n-layers", "1",
    "--n-heads", "2", "--eval-sequences", "8", "--eval-samples", "2", "--warmup", "2", "--no-plots",
]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def _run(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastbound.train", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300, **kw)


def _records(out, kind="train") -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def _losses(out) -> list[float]:
    recs = _records(out)
    assert [r["step"] for r in recs] == list(range(1, len(recs) + 1))
    return [r["loss"] for r in recs]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_loss_decreases_and_writes_plots(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = [*TINY, "--steps", "60", "--lr", "1e-2", "--eval-every", "30", "--out", out]
    args.remove("--no-plots")
    assert main(args) == 0
    bits = [r["bits"] for r in _records(out)]
    first, last = sum(bits[:15]) / 15, sum(bits[-15:]) / 15
    assert last < first - 0.2, (first, last)
    evals = _records(out, "eval")
    assert [r["step"] for r in evals] == [30, 60]
    assert all(r["stderr"] > 0 for r in evals)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["bits"] == evals[-1]["bits"]
    assert summary["entropy_rate"] < summary["bits"] < 2.2  # above the entropy, below ~uniform guessing
    for name in ("training_curve.png", "integrand.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "true entropy rate" in printed and "held-out NLL bound" in printed


@pytest.mark.parametrize("loss,graph", [("dce", "absorb"), ("dse", "absorb"), ("dse", "uniform")])
def test_fused_matches_oracle(tmp_path, loss, graph):
    """The same loop with fastbound.reference losses gives the same losses for the first steps."""
    runs = {}
    for name, extra in (("fused", []), ("oracle", ["--oracle"])):
        out = str(tmp_path / name)
        main([*TINY, "--steps", "6", "--loss", loss, "--graph", graph, "--eval-every", "100", "--out", out, *extra])
        runs[name] = _losses(out)
    torch.testing.assert_close(torch.tensor(runs["fused"]), torch.tensor(runs["oracle"]), rtol=1e-5, atol=1e-7)
    assert len(set(runs["fused"])) == 6  # the losses do change from step to step


def test_resume_after_kill_is_bit_exact(tmp_path):
    common = [*TINY, "--steps", "12", "--ckpt-every", "4", "--eval-every", "100"]
    whole, broken = str(tmp_path / "whole"), str(tmp_path / "broken")
    done = _run([*common, "--out", whole])
    assert done.returncode == 0, done.stderr
    killed = _run([*common, "--out", broken, "--crash-after", "10"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert checkpoint.load(os.path.join(broken, checkpoint.FILENAME))["step"] == 8
    assert len(_records(broken)) == 10  # steps 9 and 10 ran but were not checkpointed
    resumed = _run([*common, "--out", broken, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert _losses(broken) == _losses(whole)  # bit-identical floats, steps 1..12
    a = checkpoint.load(os.path.join(whole, checkpoint.FILENAME))
    b = checkpoint.load(os.path.join(broken, checkpoint.FILENAME))
    assert a["step"] == b["step"] == 12
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert not [f for f in os.listdir(broken) if f.endswith(".tmp")]


def test_ddp_two_processes_match_one(tmp_path):
    """torchrun with 2 gloo processes (4 sequences each) follows the single-process run (8 sequences)."""
    common = [*TINY, "--steps", "6", "--eval-every", "100"]
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    one = _run([*common, "--out", single])
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
         "-m", "fastbound.train", *common, "--out", ddp],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "on 2 process(es)" in two.stdout
    torch.testing.assert_close(torch.tensor(_losses(ddp)), torch.tensor(_losses(single)), rtol=1e-5, atol=1e-6)
    a = checkpoint.load(os.path.join(single, checkpoint.FILENAME))["model"]
    b = checkpoint.load(os.path.join(ddp, checkpoint.FILENAME))["model"]
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)


def test_text_file_and_bf16(tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text("a small text file, read as bytes, to train on. " * 20)
    out = str(tmp_path / "run")
    assert main([*TINY, "--data", str(data), "--steps", "3", "--dtype", "bf16", "--out", out]) == 0
    assert len(_losses(out)) == 3 and all(math.isfinite(x) for x in _losses(out))
    cfg = checkpoint.load(os.path.join(out, checkpoint.FILENAME))["model_config"]
    assert cfg["vocab_size"] == 257  # 256 bytes + the mask
    assert "bytes of" in capsys.readouterr().out


BAD_FLAGS = [
    (["--loss", "mse"], "invalid choice: 'mse'"),
    (["--seq-len", "0"], "--seq-len: must be a positive integer, got 0"),
    (["--steps", "ten"], "--steps: expected a positive integer"),
    (["--lr", "-1"], "--lr: must be a positive finite number"),
    (["--loss", "dce", "--graph", "uniform"], "--loss dce needs --graph absorb"),
    (["--d-model", "30", "--n-heads", "4"], "--d-model (30) must be a multiple of 2 x --n-heads"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--data", "/no/such/file.txt"], "--data: no such file: /no/such/file.txt"),
    (["--markov-symbols", "1"], "--markov-symbols must be >= 2"),
] + ([] if torch.cuda.is_available() else [
    (["--device", "cuda"], "--device cuda: this torch has no CUDA device"),
    (["--backend", "cuda"], "--backend cuda: backend='cuda' needs CUDA tensors"),
])


@pytest.mark.parametrize("argv,message", BAD_FLAGS, ids=[a[0] + "=" + "".join(a[1:2]) for a, _ in BAD_FLAGS])
def test_bad_flags_exit_with_a_message(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage:" in err


def test_data_file_shorter_than_a_sequence(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_bytes(b"x" * 15)
    with pytest.raises(SystemExit) as exc:
        main(["--data", str(short), "--seq-len", "16", "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    assert "has 15 bytes (tokens), fewer than one sequence of --seq-len 16" in capsys.readouterr().err


def test_resume_errors(tmp_path, capsys):
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit):
        main([*TINY, "--steps", "2", "--out", out, "--resume"])
    assert "--resume: no checkpoint at" in capsys.readouterr().err
    main([*TINY, "--steps", "2", "--eval-every", "100", "--out", out])
    with pytest.raises(SystemExit):
        main([*TINY, "--steps", "2", "--lr", "0.5", "--out", out, "--resume"])
    assert "the checkpoint was written with --lr 0.003" in capsys.readouterr().err


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "--eval-every" in printed and "--no-fused-head" in printed


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("loss,graph", [("dce", "absorb"), ("dse", "absorb"), ("dse", "uniform")])
def test_fused_head_matches_unfused_step(loss, graph, dtype):
    """One objective evaluation on the features and the head equals the one on the logits, loss and gradients."""
    obj = Objective(loss, graph, schedules.LogLinear(), num_tokens=7)
    torch.manual_seed(0)
    model = Denoiser(DenoiserConfig(vocab_size=obj.model_vocab, seq_len=12, d_model=16, n_layers=1, n_heads=2,
                                    time_conditioning=graph == "uniform"))
    with torch.no_grad():  # a head whose scores are not all near 0, so the gradients are of size
        model.head.weight.mul_(20)
        model.head.bias.normal_()
    x0 = torch.randint(0, 7, (6, 12), generator=torch.Generator().manual_seed(1))
    autocast = torch.autocast("cpu", dtype=dtype) if dtype is not None else None
    results = []
    for head in (None, model.head):
        model.zero_grad(set_to_none=True)
        value = obj(model, x0, seed=2, step=3, rows=slice(0, 6), global_batch=6, autocast=autocast, head=head)
        value.backward()
        results.append((value.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (unfused, grads_unfused), (fused, grads_fused) = results
    tol = dict(rtol=1e-5, atol=1e-6) if dtype is None else dict(rtol=2e-2, atol=2e-2)  # bf16: ulp 4e-3
    assert float(unfused) > 0
    torch.testing.assert_close(fused, unfused, **tol)
    for name, grad in grads_unfused.items():
        assert grad.abs().max() > 0, name
        scale = float(grad.abs().max())
        torch.testing.assert_close(grads_fused[name], grad, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=name)
    with pytest.raises(ValueError, match="oracle"):
        Objective(loss, graph, schedules.LogLinear(), num_tokens=7, oracle=True)(
            model, x0, seed=2, step=3, rows=slice(0, 6), global_batch=6, head=model.head)


def test_no_fused_head_flag_trains_on_the_logits(tmp_path):
    """--no-fused-head runs the unfused losses and the estimate on logits; the two runs agree closely."""
    runs = {}
    for name, extra in (("fused", []), ("unfused", ["--no-fused-head"])):
        out = str(tmp_path / name)
        main([*TINY, "--steps", "4", "--eval-every", "4", "--out", out, *extra])
        runs[name] = (_losses(out), _records(out, "eval")[-1]["bits"])
    torch.testing.assert_close(torch.tensor(runs["fused"][0]), torch.tensor(runs["unfused"][0]), rtol=1e-5, atol=1e-7)
    assert math.isclose(runs["fused"][1], runs["unfused"][1], rel_tol=1e-5)


@pytest.mark.parametrize("argv", [["--seq-len", "0"], ["--data", "/no/such/file.txt"]])
def test_cli_errors_have_no_traceback(tmp_path, argv):
    result = _run([*argv, "--out", str(tmp_path / "run")])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("python -m fastbound.train: error: ")


def test_objective_noise_is_sharded_exactly():
    """The rows [r0, r1) of a global batch get exactly the noise of those rows of the whole batch."""
    obj = Objective("dce", "absorb", schedules.LogLinear(), num_tokens=5)
    x0 = torch.randint(0, 5, (8, 10))
    sigma = torch.full((8,), 1.0)
    whole = obj.corrupt(x0, sigma, seed=3, counter=7 * 80)
    part = obj.corrupt(x0[4:], sigma[4:], seed=3, counter=7 * 80 + 4 * 10)
    assert torch.equal(whole[4:], part)
    assert not torch.equal(whole, obj.corrupt(x0, sigma, seed=4, counter=7 * 80))
    t = obj.times(seed=3, step=2, global_batch=8, device=torch.device("cpu"))
    assert t.shape == (8,) and float(t.min()) >= 1e-3 and float(t.max()) <= 1.0
    spacing = torch.sort(t).values.diff()
    torch.testing.assert_close(spacing, torch.full((7,), (1 - 1e-3) / 8), atol=1e-6, rtol=0)  # antithetic
    assert derive_seed(0, 1) != derive_seed(0, 2) and 0 <= derive_seed(2**40, 3) < 2**62


def test_learning_rate_schedule():
    class Args:
        lr, warmup, steps = 1.0, 10, 110

    lrs = [learning_rate(s, Args) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_checkpoint_save_is_atomic(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_atomic({"step": 1, "w": torch.ones(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        checkpoint.save_atomic({"step": 2, "bad": Unpicklable()}, path)
    assert checkpoint.load(path)["step"] == 1  # the previous checkpoint is intact
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # and the temporary file is gone


def test_markov_flags_are_bounded(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--markov-symbols", "200", "--markov-order", "3", "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "8,000,000 contexts" in err and "at most 1024" in err


def test_data_file_shorter_than_two_sequences_warns(tmp_path):
    short = tmp_path / "short.txt"
    short.write_bytes(b"x" * 20)
    with pytest.warns(UserWarning, match="fewer than two sequences of --seq-len 16: the held-out NLL is measured"):
        assert main([*TINY, "--data", str(short), "--steps", "1", "--eval-every", "100",
                     "--out", str(tmp_path / "run")]) == 0


def test_second_run_in_one_out_is_refused_and_stale_locks_are_taken(tmp_path, capsys):
    from fastbound.train import lock

    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / lock.FILENAME).write_text(f"{socket.gethostname()} {sleeper.pid}\n")
        with pytest.raises(SystemExit) as exc:
            main([*TINY, "--steps", "1", "--eval-every", "100", "--out", str(out)])
        assert exc.value.code == 2
        assert f"another training run (pid {sleeper.pid} on" in capsys.readouterr().err
        assert not (out / "metrics.jsonl").exists()  # the live run's directory is untouched
    finally:
        sleeper.kill()
        sleeper.wait()
    # Its process is gone: the lock is stale, the next run takes it over and releases it at the end.
    assert main([*TINY, "--steps", "1", "--eval-every", "100", "--out", str(out)]) == 0
    assert not (out / lock.FILENAME).exists()


def _bad_checkpoints(out: str) -> dict:
    ckpt = os.path.join(out, checkpoint.FILENAME)
    good = open(ckpt, "rb").read()
    state = checkpoint.load(ckpt)
    return {
        "truncated": lambda: open(ckpt, "wb").write(good[: len(good) // 2]),
        "empty": lambda: open(ckpt, "wb").close(),
        "garbage": lambda: open(ckpt, "wb").write(b"not a checkpoint at all"),
        "incomplete": lambda: torch.save({k: v for k, v in state.items() if k != "optimizer"}, ckpt),
        "directory": lambda: (os.remove(ckpt), os.mkdir(ckpt)),
    }


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "incomplete", "directory", "metrics"])
def test_resume_from_a_damaged_run_exits_2_with_one_line(tmp_path, damage):
    out = str(tmp_path / "run")
    common = [*TINY, "--steps", "2", "--eval-every", "100", "--out", out]
    assert main(common) == 0
    if damage == "metrics":
        with open(os.path.join(out, "metrics.jsonl"), "r+") as f:
            lines = f.readlines()
            f.seek(0)
            f.writelines(["{broken\n"] + lines)
    else:
        _bad_checkpoints(out)[damage]()
    result = _run([*common, "--resume"])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m fastbound.train: error: --resume: ")
    assert ("metrics.jsonl line 1 is not a metrics record" if damage == "metrics" else "checkpoint") in last


def test_bad_paths_and_seeds_exit_2_with_one_line(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x" * 100)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    cases = [
        (["--out", str(a_file)], f"--out {a_file} is a file, not a directory"),
        (["--out", str(a_file / "run")], "cannot create the directory"),
        (["--seed", str(2**70)], "--seed: must be an integer in [0, 2^63)"),
        (["--data", str(empty)], "has 0 bytes (tokens), fewer than one sequence"),
        (["--data", str(tmp_path)], "is a directory, not a text file"),
        (["--data", "/dev/zero"], "is not a regular file"),
        (["--data", fifo], "is not a regular file"),
    ]
    for argv, message in cases:
        full = [*TINY, "--steps", "1", *argv]
        if "--out" not in argv:
            full += ["--out", str(tmp_path / "run")]
        result = _run(full)
        assert result.returncode == 2, (argv, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, argv
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("python -m fastbound.train: error: ") and message in last, (argv, last)


def test_train_extra_is_imported_lazily_and_named_when_missing(tmp_path, capsys, monkeypatch):
    # (torch.hub itself imports tqdm when it is installed, so only matplotlib can be checked here.)
    probe = "import sys, fastbound, fastbound.train; print('matplotlib' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert loaded.stdout.strip() == "False", loaded.stderr  # the kernels and estimators never need it
    from fastbound.train import loop

    real = loop.importlib.util.find_spec
    monkeypatch.setattr(loop.importlib.util, "find_spec", lambda name: None if name == "matplotlib" else real(name))
    with pytest.raises(SystemExit) as exc:
        main([a for a in TINY if a != "--no-plots"] + ["--steps", "1", "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "needs matplotlib: pip install 'fastbound[train]' (or pass --no-plots)" in err
    assert main([*TINY, "--steps", "1", "--eval-every", "100", "--out", str(tmp_path / "run")]) == 0  # --no-plots


@pytest.mark.parametrize("flag", [[], ["--no-fused-head"]], ids=["default", "no-fused-head"])
def test_fused_head_is_the_default(tmp_path, monkeypatch, flag):
    """By default training runs the fused output-layer loss and the held-out estimate passes head=;
    --no-fused-head runs neither."""
    import fastbound

    calls = {"fused": 0, "head": []}
    fused_dce, estimate = fastbound.fused_linear_dce_loss, fastbound.estimate_nll

    def counted_fused(*args, **kwargs):
        calls["fused"] += 1
        return fused_dce(*args, **kwargs)

    def recorded_estimate(*args, **kwargs):
        calls["head"].append(kwargs.get("head"))
        return estimate(*args, **kwargs)

    monkeypatch.setattr(fastbound, "fused_linear_dce_loss", counted_fused)
    monkeypatch.setattr(fastbound, "estimate_nll", recorded_estimate)
    main([*TINY, "--steps", "2", "--eval-every", "2", "--out", str(tmp_path / "run"), *flag])
    assert calls["head"], "no held-out estimate ran"
    if flag:
        assert calls["fused"] == 0 and all(head is None for head in calls["head"])
    else:
        assert calls["fused"] > 0 and all(head is not None for head in calls["head"])
