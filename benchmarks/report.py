"""Render a pytest-benchmark JSON file (``make bench``) as markdown tables, with the package's
report (red_kernels.bench.report: the same tables and chart as ``python -m red_kernels bench``).

    python benchmarks/report.py benchmarks/results/latest.json [--plot out.png] [--compact]

For each group (one op, shape, dtype and mode, or one model task) it prints every variant's median
and its ratios: speed-up over the group's baseline (eager; for multi-tenant PARA the per-tenant
"loop"; for models the base), over torch.compile, and time relative to the memory floor. All numbers
come from one run of one process.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from red_kernels.bench.report import plot, summarize, table
from red_kernels.bench.timing import Case


def load(path: str) -> tuple[dict, list[dict]]:
    """The JSON and its rows. Files written before the cases moved into the package carry no
    baseline names: eager / loop / base are then taken by name."""
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    info: dict[str, dict] = {}
    for b in data["benchmarks"]:
        groups[b["group"]][b["extra_info"]["variant"]] = b["stats"]["median"]
        info.setdefault(b["group"], b["extra_info"])
    rows = []
    for group, medians in groups.items():
        extra = info[group]
        names = set(medians)
        case = Case(
            group=group,
            kind=extra.get("kind") or ("model" if group.startswith("model") else "op"),
            variants=tuple(medians),
            build=dict,
            baseline=extra.get("baseline") or next((n for n in ("eager", "loop", "base") if n in names), ""),
            compiled=extra.get("compiled") or next((n for n in ("torch.compile", "loop-compile") if n in names), None),
            floor=extra.get("floor") or ("floor" if "floor" in names else None),
            tokens=extra.get("tokens"),
        )
        rows += summarize(case, medians)
    return data, rows


def header(data: dict) -> str:
    m = data.get("machine_info", {})
    cpu = m.get("cpu", {}).get("brand_raw", m.get("processor", "?"))
    gpus = {b["extra_info"].get("gpu") for b in data["benchmarks"]} - {None}
    where = ", ".join(sorted(gpus)) if gpus else f"CPU: {cpu}, {m.get('cpu', {}).get('count', '?')} logical cores"
    return f"Measured {data.get('datetime', '?')[:19]} on {where}; python {m.get('python_version', '?')}."


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("json")
    parser.add_argument("--plot", help="write a bar chart PNG here (needs matplotlib)")
    parser.add_argument("--compact", action="store_true", help="leave out the reference backend's rows")
    args = parser.parse_args()
    data, rows = load(args.json)
    if args.compact:
        rows = [r for r in rows if not r["variant"].endswith("reference")]
    print(header(data))
    print()
    print(table(sorted(rows, key=lambda r: r["group"])))
    if args.plot:
        if plot(rows, args.plot):
            print(f"\nplot: {args.plot}")
        else:
            print("\n(matplotlib not installed: no plot)")


if __name__ == "__main__":
    main()
