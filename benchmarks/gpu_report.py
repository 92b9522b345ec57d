"""The GPU benchmark table: fastbound's times on the card and the fraction of its HBM bandwidth reached.

    python -m pytest benchmarks --bench-device cuda --benchmark-json=gpu.json
    python -m benchmarks.gpu_report gpu.json benchmarks/results/gpu.md

`.ci/gpu-check.sh` runs both. Per case (op, mode, dtype, shape) the table gives the times of
fastbound (the auto backend: the CUDA kernels), the eager oracle and the floor, and the
bandwidth that fastbound and the floor reach: the floor's traffic (`clone()`: a read and a
write of the largest input; `sum()`: one read) over the time, as a share of the card's peak
HBM bandwidth from its datasheet (`PEAK_HBM`). A memory-bound fused kernel near the floor
reaches a similar share; a much lower one says where the time is lost.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .harness import MODE_LABELS
from .report import collect, header, load

PEAK_HBM = {  # bytes/s, vendor datasheets (SXM parts unless named)
    "GH200": 4.0e12,
    "H200": 4.8e12,
    "H100 NVL": 3.9e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100 80GB PCIe": 1.935e12,
    "A100": 1.555e12,
    "L40S": 0.864e12,
    "A10G": 0.6e12,
    "L4": 0.3e12,
    "RTX 4090": 1.008e12,
}
"""Datasheet peak HBM bandwidth by device-name fragment; the first fragment found in the name wins."""

TRAFFIC = {"clone": 2, "sum": 1}
"""Passes over the largest input that each floor op makes (a read and a write, or one read)."""


def peak_bandwidth(device_name: str) -> float | None:
    """The datasheet peak of ``device_name`` (e.g. "NVIDIA H200"), None if the card is not listed."""
    return next((peak for fragment, peak in PEAK_HBM.items() if fragment in device_name), None)


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def table(rows: dict[tuple, dict[str, dict]], peak: float | None) -> list[str]:
    columns = ["case", "mode", "dtype", "tokens", "V", "fastbound ms", "eager ms", "floor ms", "vs eager",
               "/ floor", "fastbound GB/s", "fastbound % HBM", "floor % HBM"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for (case, mode, dtype, batch, length, vocab), providers in rows.items():
        time = {p: providers.get(p, {}).get("time") for p in ("fastbound", "eager", "floor")}
        some = next(iter(providers.values()))
        traffic = some["floor"] * TRAFFIC.get(some["floor_op"], 2)
        rate = {p: None if not t else traffic / t for p, t in time.items()}
        share = {p: None if r is None or peak is None else 100 * r / peak for p, r in rate.items()}
        fast, eager, floor = time["fastbound"], time["eager"], time["floor"]
        lines.append("| " + " | ".join([
            case, MODE_LABELS[mode], dtype, f"{batch}×{length}", str(vocab),
            _cell(fast and fast * 1e3, ".3g"), _cell(eager and eager * 1e3, ".3g"), _cell(floor and floor * 1e3, ".3g"),
            _cell(eager / fast if eager and fast else None, ".2f") + "×", _cell(fast / floor if fast and floor else None, ".2f") + "×",
            _cell(rate["fastbound"] and rate["fastbound"] / 1e9, ".4g"), _cell(share["fastbound"], ".0f"),
            _cell(share["floor"], ".0f"),
        ]) + " |")  # fmt: skip
    return lines


def report(run: dict, stat: str = "min") -> str:
    rows = collect(run, stat)
    if not rows:
        raise SystemExit("no fastbound benchmarks in this run")
    name = next(b["extra_info"]["device_name"] for b in run["benchmarks"] if "provider" in b["extra_info"])
    peak = peak_bandwidth(name)
    notes = [
        f"Peak HBM bandwidth of the {name}: " + (f"{peak / 1e12:.2f} TB/s (datasheet)." if peak else
                                                  "not listed in `benchmarks/gpu_report.PEAK_HBM`; no shares."),
        "`GB/s` and `% HBM`: the floor's traffic (`clone()`: a read and a write of the largest input; `sum()`: "
        "one read) over the time. `/ floor`: fastbound's time over the floor's.",
        "",
    ]
    return "\n".join(header(run, stat) + notes + table(rows, peak)) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark JSON of a --bench-device cuda run")
    parser.add_argument("out", type=Path, help="the markdown table to write, e.g. benchmarks/results/gpu.md")
    parser.add_argument("--stat", default="min", choices=("min", "median", "mean"), help="time statistic")
    args = parser.parse_args(argv)
    markdown = report(load(args.json), args.stat)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown)
    sys.stdout.write(markdown)


if __name__ == "__main__":
    main()
