"""Summarises a benchmark run: a markdown table of ratios and a PNG chart, one small panel per op.

    pytest benchmarks --benchmark-json=bench.json
    python -m benchmarks.report bench.json            # writes bench.md and bench.png

Without a path it reads the newest JSON that ``--benchmark-autosave`` stored under
``.benchmarks/``. Per case (op, mode, dtype, shape) the table gives each provider's time
(the minimum over rounds by default, the statistic least disturbed by other processes;
``--stat median`` for the typical run), fastbound's speed-up over the eager oracle and over
``torch.compile`` of it, fastbound's time over the floor (1.0 = as fast as copying the
scores once with ``clone()``, or, for ops that only read them, as reading them once with
``sum()``), peak memory per provider, and the share of the eager oracle's peak that
fastbound saves.

The fused output-layer rows (``extra_info["mask_rate"]``, `benchmarks/test_fused_linear.py`)
get their own table and chart (time and peak memory against the masking rate; the chart is
``<prefix>.png`` when the run holds no other op, else ``<prefix>-fused.png``).

Estimator cases (``extra_info["draws"]``, `benchmarks/test_estimate_nll.py`) get their own
table: with a denoiser that does no work, an estimate's time is the estimator's overhead,
shown over the floor of one read of the denoiser output per denoiser call.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from . import test_fused_linear as fused
from .harness import MODE_LABELS, PROVIDERS

MIB = 2**20


def load(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def newest_autosave(root: Path = Path(".benchmarks")) -> Path:
    runs = sorted(root.glob("**/*.json"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit(f"no benchmark JSON given and none under {root}/ (run pytest with --benchmark-json=FILE)")
    return runs[-1]


def collect(run: dict, stat: str) -> dict[tuple, dict[str, dict]]:
    """Rows keyed by (case, mode, dtype, batch, length, vocab), each {provider: {time, peak, floor}}."""
    rows: dict[tuple, dict[str, dict]] = defaultdict(dict)
    # Key order: case, mode, dtype, batch, length, vocab; sorted below by case, V, tokens, dtype, mode.
    for bench in run["benchmarks"]:
        info = bench["extra_info"]
        if "provider" not in info or "mask_rate" in info:
            continue  # not one of ours, or a fused output-layer row (`fused`)
        key = (info["case"], info["mode"], info["dtype"], info["batch"], info["length"], info["vocab"])
        rows[key][info["provider"]] = {
            "time": bench["stats"][stat],
            "peak": info["peak_bytes"],
            "floor": info["floor_bytes"],
            "floor_op": info.get("floor_op", "clone"),
            "draws": info.get("draws"),
            "method": info.get("method"),
            "denoiser": info.get("denoiser_seconds", 0.0),
            # The alternating calls' minimums and median ratio (runs before it have no ratio):
            # other statistics use the two benchmarks'.
            "paired": (info["paired_seconds"], info["paired_floor_seconds"],
                       info.get("paired_ratio", info["paired_seconds"] / info["paired_floor_seconds"]))
            if "paired_seconds" in info and stat == "min" else None,
            "paired_vs": {k[len("paired_vs_"):]: v for k, v in info.items() if k.startswith("paired_vs_")},
        }
    order = {"fp32": 0, "bf16": 1}
    return dict(sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][5], kv[0][3] * kv[0][4], order.get(kv[0][2], 2), kv[0][1])))


def over_floor(providers: dict[str, dict]) -> float | None:
    """fastbound's time over the floor: the median ratio of their alternating calls where the
    run has them (`benchmarks.harness._paired_floor`), else the two benchmarks' minimums'."""
    paired = providers.get("fastbound", {}).get("paired")
    if paired is not None:
        return paired[2]
    fast, floor = providers.get("fastbound", {}).get("time"), providers.get("floor", {}).get("time")
    return None if fast is None or not floor else fast / floor


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator == 0:
        return "–"
    return f"{numerator / denominator:.2f}×"


def _times(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio:.2f}×"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 1000 else f"{ms:.0f}"


def _mib(nbytes: int | None) -> str:
    return "–" if nbytes is None else f"{nbytes / MIB:.1f}"


def _saved(fast: int | None, eager: int | None) -> str:
    if fast is None or not eager:
        return "–"
    return f"{100 * (1 - fast / eager):.0f}%"


def is_estimator(providers: dict[str, dict]) -> bool:
    return any(p.get("draws") for p in providers.values())


def floors(rows: dict[tuple, dict[str, dict]]) -> str:
    """'case, case: op; ...': the floor each case is timed against ('case (mode)' where the
    case's modes have different floors)."""
    ops: dict[tuple[str, str], str] = {}
    for (case, mode, *_), providers in rows.items():
        ops[case, mode] = next((p["floor_op"] for p in providers.values()), "clone")
    by_op: dict[str, list[str]] = defaultdict(list)
    for (case, mode), op in ops.items():
        split = len({o for (c, _), o in ops.items() if c == case}) > 1
        name = f"{case} ({MODE_LABELS.get(mode, mode)})" if split else case
        if name not in by_op[op]:
            by_op[op].append(name)
    return "; ".join(f"{', '.join(cases)}: `{op}()`" for op, cases in by_op.items())


def header(run: dict, stat: str) -> list[str]:
    infos = [b["extra_info"] for b in run["benchmarks"] if "provider" in b["extra_info"]]
    first = infos[0] if infos else {}
    commit = run.get("commit_info", {})
    return [
        f"Device: {first.get('device_name', '?')} ({first.get('device', '?')}, {first.get('threads', '?')} threads, "
        f"fastbound CPU ISA {first.get('cpu_isa', '?')}), torch {first.get('torch', '?')}, "
        f"run {run.get('datetime', '?')}, commit {str(commit.get('id', '?'))[:10]}"
        f"{' (dirty)' if commit.get('dirty') else ''}.",
        "",
        f"Times in ms ({stat} over the rounds). Peak memory in MiB beyond the inputs "
        f"({first.get('memory_method', '?')}).",
        "",
    ]


def extra_providers(rows: dict[tuple, dict[str, dict]]) -> list[str]:
    """Providers beyond `PROVIDERS` that some case added (``F.cross_entropy``, the bare op)."""
    return sorted({p for providers in rows.values() for p in providers} - set(PROVIDERS))


def table(rows: dict[tuple, dict[str, dict]]) -> list[str]:
    """The ops' table, with its notes."""
    extras = extra_providers(rows)
    notes = [
        "`vs eager` / `vs compile`: fastbound's speed-up over the eager oracle / `torch.compile` of it; "
        "`/ floor`: fastbound's time over the memory-traffic floor on the largest input, `clone()` (a read "
        "and a write) or, for ops that only read it, `sum()` (one read), timed in alternating calls so that "
        "each pair sees the same machine: the median of the pairs' ratios (`floor ms` is the floor's "
        "fastest call). Floors: " + floors(rows) + ". "
        "`saved`: share of the eager oracle's peak that fastbound does not need."
        + (" `vs <provider>`: that provider's time over fastbound's, the median ratio of alternating calls "
           "where the run has them (" + ", ".join(f"`{p}`" for p in extras)
           + "; `bare_op` is the raw `torch.ops` kernel call, so `vs bare_op` below 1 is the Python layer's cost)."
           if extras else ""),
        "",
    ]
    columns = (
        ["case", "mode", "dtype", "tokens", "V"]
        + [f"{p} ms" for p in PROVIDERS]
        + ["vs eager", "vs compile", "/ floor"]
        + [c for p in extras for c in (f"{p} ms", f"vs {p}")]
        + [f"peak {p}" for p in PROVIDERS]
        + ["saved"]
    )
    lines = notes + ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for (case, mode, dtype, batch, length, vocab), providers in rows.items():
        time = {p: providers.get(p, {}).get("time") for p in PROVIDERS + tuple(extras)}
        paired = providers.get("fastbound", {}).get("paired")
        if paired is not None:
            time["floor"] = paired[1]
        peak = {p: providers.get(p, {}).get("peak") for p in PROVIDERS}
        cells = [case, MODE_LABELS[mode], dtype, f"{batch}×{length}", str(vocab)]
        cells += [_ms(time[p]) for p in PROVIDERS]
        cells += [
            _ratio(time["eager"], time["fastbound"]),
            _ratio(time["compile"], time["fastbound"]),
            _times(over_floor(providers)),
        ]
        paired_vs = providers.get("fastbound", {}).get("paired_vs", {})
        for p in extras:
            cells += [_ms(time[p]), _times(paired_vs[p]) if p in paired_vs else _ratio(time[p], time["fastbound"])]
        cells += [_mib(peak[p]) for p in PROVIDERS]
        cells += [_saved(peak["fastbound"], peak["eager"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def estimator_table(rows: dict[tuple, dict[str, dict]]) -> list[str]:
    """The estimators' table (issue 4's speed targets), with its notes."""
    notes = [
        "## Estimator overhead",
        "",
        "`fastbound.estimate_nll` with a denoiser that returns a stored (B, L, V) output (no work), so an "
        "estimate's time is almost all the estimator's own: noise, loss, accumulation and bookkeeping. "
        "`draws`: denoiser calls per estimate. `floor`: one read (`sum()`) of the denoiser output per call. "
        "`overhead` = (estimate time − denoiser time) / floor time, the denoiser time (`draws` calls, "
        "`den. µs`) measured apart (target: at most 1.3×); `eager overhead`: the same for the estimator "
        "with the eager oracle's step "
        "(`benchmarks.eager_estimator.estimate_nll`, same draws). `vs eager` / `vs compile`: fastbound's speed-up over "
        "that oracle estimator, eager (target: at least 3×) / under `torch.compile` (graph breaks; "
        "see `benchmarks/test_estimate_nll.py`). `saved`: share of the eager estimator's peak memory that "
        "fastbound does not need.",
        "",
    ]
    providers_shown = ("fastbound", "eager", "compile")
    columns = (
        ["case", "method", "dtype", "tokens", "V", "draws", "den. µs"]
        + [f"{p} ms" for p in PROVIDERS]
        + ["overhead", "eager overhead", "vs eager", "vs compile"]
        + [f"peak {p}" for p in providers_shown]
        + ["saved"]
    )
    lines = notes + ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for (case, mode, dtype, batch, length, vocab), providers in rows.items():
        time = {p: providers.get(p, {}).get("time") for p in PROVIDERS}
        peak = {p: providers.get(p, {}).get("peak") for p in PROVIDERS}
        info = next(iter(providers.values()))
        denoiser = info["denoiser"]
        own = {p: None if time[p] is None else time[p] - denoiser for p in ("fastbound", "eager")}
        cells = [case, str(info.get("method") or "–"), dtype, f"{batch}×{length}", str(vocab),
                 str(info.get("draws")), f"{denoiser * 1e6:.2g}"]
        cells += [_ms(time[p]) for p in PROVIDERS]
        cells += [
            _ratio(own["fastbound"], time["floor"]),
            _ratio(own["eager"], time["floor"]),
            _ratio(time["eager"], time["fastbound"]),
            _ratio(time["compile"], time["fastbound"]),
        ]
        cells += [_mib(peak[p]) for p in providers_shown]
        cells += [_saved(peak["fastbound"], peak["eager"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


PANEL_BARS = (("eager", "speed-up over eager"), ("compile", "speed-up over compile"), ("floor", "floor / time"))
"""Bars per x position: fastbound's speed-up over a provider (floor: the floor's time over
fastbound's, so 1 means at the floor and every bar reads "higher is better")."""


def chart(rows: dict[tuple, dict[str, dict]], path: Path, title: str) -> None:
    """One small panel per case: at each size and dtype (forward+backward where timed, else
    forward), fastbound's speed-up over the eager oracle and over ``torch.compile``, and the
    floor's time over fastbound's; log scale, a line at 1x (parity, and the floor)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, list[tuple[str, dict[str, dict]]]] = defaultdict(list)
    for (case, mode, dtype, batch, length, vocab), providers in rows.items():
        if is_estimator(providers) or "fastbound" not in providers:
            continue
        panels[case].append((mode, f"{batch * length}×{vocab}\n{dtype}", providers))
    panels = {case: [(label, p) for mode, label, p in entries if mode == "fwd_bwd"]
              or [(label, p) for mode, label, p in entries] for case, entries in panels.items()}
    n_cols = 2
    n_rows = max(1, -(-len(panels) // n_cols))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(8.0, 2.3 * n_rows), squeeze=False)
    width = 0.8 / len(PANEL_BARS)
    for ax, (case, entries) in zip(axes.flat, panels.items()):
        for i, (other, label) in enumerate(PANEL_BARS):
            xs, heights = [], []
            for x, (_, providers) in enumerate(entries):
                if other in providers:
                    xs.append(x + (i - (len(PANEL_BARS) - 1) / 2) * width)
                    heights.append(1 / over_floor(providers) if other == "floor"
                                   else providers[other]["time"] / providers["fastbound"]["time"])
            ax.bar(xs, heights, width, label=label)
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(entries)), [label for label, _ in entries], fontsize=7)
        ax.tick_params(axis="y", which="both", labelsize=7)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.set_title(case, fontsize=9)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle(title + "\ntokens×V, dtype; fwd+bwd where timed; higher is better; 1 = parity, or at the floor",
                 fontsize=9, y=0.995)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.5 / fig.get_figheight()),
               ncols=len(PANEL_BARS), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / fig.get_figheight()))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="?", type=Path, help="pytest-benchmark JSON (default: newest autosave)")
    parser.add_argument("--stat", default="min", choices=("min", "median", "mean"), help="time statistic")
    parser.add_argument("--out", type=Path, help="output prefix for .md and .png (default: next to the JSON)")
    args = parser.parse_args(argv)

    path = args.json or newest_autosave()
    run = load(path)
    rows = collect(run, args.stat)
    fused_rows = fused.collect(run, args.stat)
    if not rows and not fused_rows:
        raise SystemExit(f"{path}: no fastbound benchmarks in this file")
    prefix = str(args.out or path.with_suffix(""))
    ops = {key: providers for key, providers in rows.items() if not is_estimator(providers)}
    estimators = {key: providers for key, providers in rows.items() if is_estimator(providers)}
    lines = header(run, args.stat)
    if ops:
        lines += table(ops)
    if estimators:
        lines += ([""] if ops else []) + estimator_table(estimators)
    if fused_rows:
        lines += ([""] if rows else []) + fused.summary(fused_rows, args.stat)
    markdown = "\n".join(lines) + "\n"
    Path(prefix + ".md").write_text(markdown)
    charts = []
    if ops:
        device = next(b["extra_info"] for b in run["benchmarks"] if "provider" in b["extra_info"])
        charts.append(prefix + ".png")
        chart(rows, Path(charts[-1]), f"fastbound on {device['device_name']} ({device['device']})")
    if fused_rows:  # time and memory against the masking rate
        charts.append(prefix + ("-fused.png" if ops else ".png"))
        fused.chart(fused_rows, Path(charts[-1]))
    sys.stdout.write(markdown)
    print(f"\nwrote {prefix}.md and {', '.join(charts)}", file=sys.stderr)


if __name__ == "__main__":
    main()
