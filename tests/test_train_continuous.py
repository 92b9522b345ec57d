"""The continuous reference run: python -m fastbound.train continuous."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")

from fastbound.train import continuous  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_through_the_dispatch():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "fastbound.train", "continuous", "--help"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    for flag in ("--quick", "--laws", "--part", "--weighting", "--warm-std-a"):
        assert flag in out.stdout


def test_quick_run(tmp_path, capsys):
    assert continuous.main(["--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "true entropy" in printed and "uniform dequantisation" in printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    mixture = summary["mixture"]
    assert mixture["bits_per_dim"] > 0 and mixture["stderr"] > 0 and len(mixture["true_entropy_bits_per_dim"]) == 2
    assert len(mixture["test_nll_bits_per_dim"]) == 2 and mixture["test_nll_bits_per_dim"][1] > 0
    # the model's excess over the exact denoiser's bound is a sum of squares: never negative
    assert all(c["gap_to_exact"][0] > 0 for c in mixture["curve"])
    assert mixture["curve"][0]["gap_to_exact"][0] > mixture["curve"][-1]["gap_to_exact"][0]
    for c in mixture["curve"]:
        loc, scale = c["proposal"]
        assert -10 <= loc <= 16 and 1 <= scale <= 4
    laws = [m["warm"] for m in summary["digits"]["models"]]
    assert laws == ["gaussian", "uniform"]
    assert [m["discrete_exact"] for m in summary["digits"]["models"]] == [False, True]
    for model in summary["digits"]["models"]:
        assert model["curve"][-1]["step"] == 20 and len(model["loss"]) == 20
        assert 0 < model["bits_per_dim"] < 12
    gauss, unif = summary["digits"]["models"]
    (paired,) = summary["digits"]["paired"]
    assert (paired["law"], paired["minus"]) == ("uniform", "gaussian") and paired["stderr"] > 0
    # the mean of the per-image differences is the difference of the two bounds
    assert abs(paired["bits_per_dim"] - (unif["bits_per_dim"] - gauss["bits_per_dim"])) < 1e-9
    assert "paired" in (tmp_path / "ablation.md").read_text()
    # the uniform model's uniform-dequantisation score is its own bound; the Gaussian model gets one too
    assert unif["dequantised_bits_per_dim"] == [unif["bits_per_dim"], unif["stderr"]]
    assert 0 < gauss["dequantised_bits_per_dim"][0] < 12
    (paired_q,) = summary["digits"]["paired_dequantised"]
    assert abs(paired_q["bits_per_dim"] - (unif["bits_per_dim"] - gauss["dequantised_bits_per_dim"][0])) < 1e-9
    for name in ("training_curve.png", "integrand.png", "ablation.md"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.parametrize("argv,match", [
    (["--laws", "cauchy"], "cauchy"),
    (["--steps", "0"], "--steps"),
    (["--eval-draws", "1"], "--eval-draws"),
    (["--logsnr-min", "3", "--logsnr-max", "2"], "--logsnr-min"),
    (["--part", "c"], "--part"),
])
def test_bad_flags(argv, match, capsys):
    with pytest.raises(SystemExit) as info:
        continuous.main(argv + ["--out", "/nonexistent/never-written"])
    assert info.value.code == 2
    assert match in capsys.readouterr().err
