"""Render a pytest-benchmark JSON file as the README's benchmark table (and a plot if matplotlib is
installed).

    python benchmarks/report.py benchmarks/results/latest.json [--plot out.png]

For each group (one op, shape, dtype and mode) it prints every variant's median and its ratios:
speed-up over eager (eager / variant; for multi-tenant PARA the eager baseline is the per-tenant
"loop"), over torch.compile, and time relative to the memory floor (variant / floor). All numbers
come from one run of one process.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def load(path: str) -> tuple[dict, dict[str, dict[str, float]]]:
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for b in data["benchmarks"]:
        groups[b["group"]][b["extra_info"]["variant"]] = b["stats"]["median"] * 1e3
    return data, groups


def _ms(ms: float) -> str:
    # Decode-step and generator rows take microseconds: keep three significant digits there.
    return f"{ms:.2f}" if ms >= 1 else f"{ms:.3g}"


def _ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.2f}x" if num and den else "-"


def table(groups: dict[str, dict[str, float]], compact: bool = False) -> str:
    lines = [
        "| benchmark | variant | median ms | vs eager | vs torch.compile | / floor |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for group in sorted(groups):
        times = groups[group]
        # Multi-tenant PARA calls its eager baseline "loop" (the per-tenant sub-batch loop).
        eager = times.get("eager") or times.get("loop")
        comp = times.get("torch.compile") or times.get("loop-compile")
        floor = times.get("floor")
        for variant, ms in sorted(times.items(), key=lambda kv: kv[1]):
            if compact and variant.endswith("reference"):
                continue
            ratios = f"{_ratio(eager, ms)} | {_ratio(comp, ms)} | {_ratio(ms, floor)}"
            lines.append(f"| {group} | {variant} | {_ms(ms)} | {ratios} |")
    return "\n".join(lines)


def header(data: dict) -> str:
    m = data.get("machine_info", {})
    cpu = m.get("cpu", {}).get("brand_raw", m.get("processor", "?"))
    gpus = {b["extra_info"].get("gpu") for b in data["benchmarks"]} - {None}
    where = ", ".join(sorted(gpus)) if gpus else f"CPU: {cpu}, {m.get('cpu', {}).get('count', '?')} logical cores"
    return f"Measured {data.get('datetime', '?')[:19]} on {where}; python {m.get('python_version', '?')}."


def plot(groups: dict[str, dict[str, float]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(groups)
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 1.6 * len(names) + 1), squeeze=False)
    for ax, group in zip(axes[:, 0], names):
        items = sorted(groups[group].items(), key=lambda kv: kv[1])
        ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("median ms")
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("json")
    parser.add_argument("--plot", help="write a bar chart PNG here (needs matplotlib)")
    parser.add_argument("--compact", action="store_true", help="leave out the reference backend's rows")
    args = parser.parse_args()
    data, groups = load(args.json)
    print(header(data))
    print()
    print(table(groups, args.compact))
    if args.plot:
        try:
            plot(groups, args.plot)
            print(f"\nplot: {args.plot}")
        except ImportError:
            print("\n(matplotlib not installed: no plot)")


if __name__ == "__main__":
    main()
