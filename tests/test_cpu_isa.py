"""The CPU row loops' 16-lane (AVX-512) path against the 8-lane one forced by FASTBOUND_CPU_ISA=avx2.

Both widths evaluate the same formulas per element and add into 16-lane sums in the same order
(csrc/cpu/vectorize.h, `ColumnSums`), so losses, gradients and integration sums must agree bit
for bit. Each path runs in its own process (the variable is read once), on the same inputs:
every dtype, odd vocabularies around the lane widths, the DCE's 2048-column chunks, in place
and not, and scores out of the exp's normal range (±100, ±inf, NaN); and the continuous loss and
integration step (their 16-lane loops follow the same switch); and the continuous noise, whose
Philox words come from 16-counter AVX-512 groups or 8-counter AVX2 ones, and whose transforms
run on 64 or 32 lanes, by the same switch (perturb under every law and the regenerating loss,
at counters that carry), as the discrete perturb's words are (both graphs, Bernoulli and
exact-k). On a CPU without AVX-512
both processes run the 8-lane path and the comparison still checks that the override is harmless.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

ENV = "FASTBOUND_CPU_ISA"

# Runs in a child process: evaluates every case and saves {name: tensor} to argv[1].
WORKER = textwrap.dedent(
    """
    import sys
    import torch
    import fastbound as fb
    sys.path.insert(0, sys.argv[2])
    from helpers import make_case

    out = {"isa": fb.cpu_isa()}
    DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
    VOCABS = [1, 7, 15, 17, 31, 33, 257, 2049 + 5, 4096 + 16 + 8 + 3]

    def spike(score, seed):
        # Scores out of the exp's normal range in some rows: the 256-score blocks' full-exp redo.
        g = torch.Generator().manual_seed(seed)
        flat = score.view(-1, score.shape[-1])
        v = flat.shape[1]
        for row, value in zip(range(1, flat.shape[0], 2), [100.0, -100.0, float("inf"), float("-inf"), float("nan")]):
            flat[row, torch.randint(0, v, (max(1, v // 64),), generator=g)] = value

    def loss_fn(kind, score, sigma, x_t, x0, **kw):
        if kind == "dce":
            return fb.dce_loss(score, x_t, x0, **kw)
        return fb.dse_loss(score, sigma, x_t, x0, graph=kind, **kw)

    for kind in ("absorb", "uniform", "dce"):
        for dname, dtype in DTYPES.items():
            for v in VOCABS:
                if v < 2 and kind != "uniform":
                    continue  # the absorbing graph needs a real token besides the mask
                for spiked in (False, True):
                    score, sigma, x_t, x0 = make_case(kind, (4, 6), v, dtype, seed=v, scale=3.0)
                    if spiked:
                        spike(score, v)
                    key = f"{kind}/{dname}/V{v}/{'spiked' if spiked else 'plain'}"
                    leaf = score.clone().requires_grad_()
                    loss = loss_fn(kind, leaf, sigma, x_t, x0, reduction="none")
                    (grad,) = torch.autograd.grad(loss, leaf, torch.ones_like(loss))
                    out[key + "/loss"], out[key + "/grad"] = loss.detach(), grad
                    buffer = score.clone().requires_grad_() * 1
                    total = loss_fn(kind, buffer, sigma, x_t, x0, reduction="sum", inplace=True)
                    out[key + "/inplace_loss"], out[key + "/inplace_grad"] = total.detach(), buffer.detach()
                    acc = torch.zeros(4, 2, dtype=torch.float64)
                    dse = kind != "dce"
                    fb.integrate_step(score, x_t, x0, sigma[:, 0].double(), torch.ones(4, dtype=torch.float64),
                                      acc, loss="dse" if dse else "dce", graph=kind if dse else "absorb")
                    out[key + "/integrate"] = acc

    # The continuous loss and integration step (csrc/cpu/continuous_loss.cpp), d around the lane widths.
    import fastbound.continuous as fc
    for dname, dtype in DTYPES.items():
        for d in (1, 7, 15, 16, 17, 33, 3 * 32 * 32 + 5):
            g = torch.Generator().manual_seed(d)
            eps = torch.randn(5, d, generator=g).to(dtype)
            eps_hat = (torch.randn(5, d, generator=g) * 2).to(dtype)
            eps_hat[1, 0] = float("nan")
            key = f"continuous/{dname}/d{d}"
            leaf = eps_hat.clone().requires_grad_()
            loss = fc.denoising_loss(leaf, eps, reduction="none")
            (grad,) = torch.autograd.grad(loss, leaf, torch.ones_like(loss))
            out[key + "/loss"], out[key + "/grad"] = loss.detach(), grad
            acc = torch.zeros(5, 2, dtype=torch.float64)
            fc.integrate_step(eps_hat, eps, acc, weight=0.5)
            out[key + "/integrate"] = acc

    # The continuous noise (csrc/cpu/continuous_words.h: 16-counter AVX-512 groups against 8-counter
    # AVX2 ones; continuous_lanes.h: 64-lane transforms against 32-lane ones): perturb under every
    # law and the regenerating loss, d around the groups' and transforms' widths, offsets where the
    # counter's low word wraps inside a group and where the whole counter wraps.
    for dname, dtype in DTYPES.items():
        for d in (1, 15, 16, 17, 31, 33, 47, 64 + 33, 512 + 37, 3 * 32 * 32 + 5):
            g = torch.Generator().manual_seed(d)
            x = torch.randn(3, d, generator=g).to(dtype)
            lam = torch.tensor([-4.0, 0.5, 6.0], dtype=torch.float64)
            for offset in (0, 2**32 - 21, 2**64 - 2 * d - 9):
                for law in (None,) + fc.WARM_LAWS:
                    key = f"perturb/{dname}/d{d}/o{offset}/{law}"
                    p = fc.perturb(x, lam, warm=law, warm_std=0.3 if law else 0.0, seed=2**63 + d, offset=offset,
                                   return_warm=True, backend="cpu")
                    out[key + "/z"], out[key + "/eps"], out[key + "/x_warm"] = p.z, p.eps, p.x_warm
                key = f"regen/{dname}/d{d}/o{offset}"
                leaf = x.clone().requires_grad_()
                loss = fc.denoising_loss(leaf, seed=2**63 + d, offset=offset, reduction="none", backend="cpu")
                (grad,) = torch.autograd.grad(loss, leaf, torch.ones_like(loss))
                out[key + "/loss"], out[key + "/grad"] = loss.detach(), grad

    # The discrete noise (csrc/cpu/perturb.cpp, on the same Philox words under the plain seed): both
    # graphs, Bernoulli and exact-k, rows around the groups' widths, offsets as above.
    for length in (1, 15, 16, 17, 33, 512 + 37):
        x0 = torch.randint(0, 30, (3, length), generator=torch.Generator().manual_seed(length))
        for offset in (0, 2**32 - 21, 2**64 - 6 * length - 9):
            for graph in ("absorb", "uniform"):
                key = f"discrete/L{length}/o{offset}/{graph}"
                common = dict(graph=graph, vocab_size=30, seed=2**63 + length, offset=offset)
                noised = fb.perturb(x0, sigma=torch.tensor([0.3, 1.0, 3.0]), **common)
                out[key + "/x_t"], out[key + "/mask"] = noised.x_t, noised.mask.long()
                exact = fb.perturb(x0, num_masked=torch.tensor([0, length // 2, length]), **common)
                out[key + "/k/x_t"], out[key + "/k/mask"] = exact.x_t, exact.mask.long()
    torch.save(out, sys.argv[1])
    """
)


def run_worker(tmp_path, name, isa):
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if isa is not None:
        env[ENV] = isa
    path = tmp_path / f"{name}.pt"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, str(script), str(path), tests_dir], env=env, check=True, timeout=600)
    return torch.load(path)


def bits(t):
    """The bit patterns of a float tensor (so that NaN payloads and the sign of zero count)."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}
    return t.contiguous().view(ints[t.element_size()])


@pytest.fixture(scope="module")
def both_paths(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cpu_isa")
    return run_worker(tmp, "default", None), run_worker(tmp, "forced", "avx2")


def test_override_selects_the_8_lane_path(both_paths):
    default, forced = both_paths
    assert default["isa"] in ("avx512", "avx2", "baseline")
    assert forced["isa"] == ("avx2" if default["isa"] in ("avx512", "avx2") else "baseline")


def test_16_lane_and_8_lane_paths_agree_bit_for_bit(both_paths):
    default, forced = both_paths
    keys = [k for k in default if k != "isa"]
    assert keys == [k for k in forced if k != "isa"] and len(keys) > 400
    differing = [k for k in keys if not torch.equal(bits(default[k]), bits(forced[k]))]
    assert not differing, f"{len(differing)} of {len(keys)} outputs differ, first: {differing[:5]}"


def test_the_comparison_can_fail(both_paths):
    # The spiked cases do reach NaN and inf, and a one-ulp change is seen as a difference.
    default, _ = both_paths
    g = default["uniform/fp32/V257/spiked/grad"]
    assert g.isnan().any() and not g.isnan().all()
    nudged = torch.nextafter(g, torch.full_like(g, float("inf")))
    assert not torch.equal(bits(g), bits(nudged))


def test_unknown_values_change_nothing(tmp_path):
    script = "import fastbound as fb; print(fb.cpu_isa())"
    env = {k: v for k, v in os.environ.items() if k != ENV}
    plain = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    env[ENV] = "avx1024"
    odd = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert odd.stdout == plain.stdout
