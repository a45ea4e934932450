"""Benchmark results: ratios from medians, the markdown tables, the JSON record and the PNG chart.

Ratios (all from medians measured side by side in one process):

- ``speedup``: the case's baseline median / the variant's median (eager PyTorch, the per-tenant
  loop, or the base model; above 1 the variant is faster). For decode cases it is also the ratio of
  tokens/s to the base's.
- ``vs_compile``: the ``torch.compile`` variant's median / the variant's median.
- ``per_floor``: the variant's median / the memory floor's (a copy of the bytes the op must move;
  near 1 the op runs at memory speed).
"""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Sequence

import torch

from red_kernels.bench.timing import Case


def machine() -> dict:
    """CPU model (``/proc/cpuinfo``), its widest vector ISA, logical cores, torch threads, GPU name."""
    from red_kernels.demo import machine as demo_machine  # the demo records the same fields

    info = demo_machine()
    info["gpu"] = info.pop("cuda")
    return info


# Environment variables that change what a CPU benchmark measures (huge pages, the kernels' build).
_TIMING_ENV = ("THP_MEM_ALLOC_ENABLE", "OMP_NUM_THREADS", "TRITON_INTERPRET", "LD_PRELOAD")


def environment() -> dict:
    """The set variables among those that change timings: torch's huge pages for every allocation,
    threads, the Triton interpreter, a preloaded allocator, and every ``RED_KERNELS_*`` switch."""
    return {k: v for k, v in sorted(os.environ.items()) if k in _TIMING_ENV or k.startswith("RED_KERNELS_")}


def versions() -> dict:
    """python, torch, transformers, peft, triton and red_kernels versions (None: not installed)."""
    import importlib.metadata

    import red_kernels

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "peft", "triton"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    out["red_kernels"] = red_kernels.__version__
    return out


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def summarize(case: Case, medians: dict[str, float]) -> list[dict]:
    """One row per timed variant of ``case`` (``medians``: seconds per call) with its ratios."""

    def ratio(num: float | None, den: float | None) -> float | None:
        return num / den if num and den else None

    base, comp, floor = (medians.get(name) if name else None for name in (case.baseline, case.compiled, case.floor))
    rows = []
    for variant in case.variants:
        if variant not in medians:
            continue
        t = medians[variant]
        row = {
            "group": case.group,
            "kind": case.kind,
            "variant": variant,
            "median_ms": t * 1e3,
            "baseline": case.baseline,
            "speedup": ratio(base, t),
            "vs_compile": ratio(comp, t),
            "per_floor": ratio(t, floor),
        }
        if case.tokens:
            row["tokens_per_s"] = case.tokens / t
        rows.append(row)
    return rows


# --- text ------------------------------------------------------------------------------------------------


def _ms(ms: float) -> str:
    # Decode-step rows take microseconds: keep three significant digits there.
    return f"{ms:.2f}" if ms >= 1 else f"{ms:.3g}"


def _x(value: float | None) -> str:
    return f"{value:.2f}x" if value else "-"


def _num(value: float | None, fmt: str = ".1f") -> str:
    return format(value, fmt) if value is not None else "-"


# The columns after "benchmark | variant | median ms" of each kind's table: (header, cell of a row).
_COLUMNS = {
    "op": [
        ("vs eager", lambda r: _x(r["speedup"])),
        ("vs torch.compile", lambda r: _x(r["vs_compile"])),
        ("/ floor", lambda r: _x(r["per_floor"])),
    ],
    "model": [
        ("vs base", lambda r: _x(r["speedup"])),
        ("tokens/s", lambda r: _num(r.get("tokens_per_s"))),
        ("weights MB", lambda r: _num(r.get("weights_mb"))),
        ("peak extra MB", lambda r: _num(r.get("peak_extra_mb"))),
    ],
}


def table(rows: Sequence[dict]) -> str:
    """Markdown tables of ``rows``: ops (vs eager, vs torch.compile, / floor) and models (vs base,
    tokens/s, memory); fastest variant first in each group; failed variants with their error."""
    parts = []
    for kind, columns in _COLUMNS.items():
        of_kind = [r for r in rows if r["kind"] == kind]
        if not of_kind:
            continue
        lines = [
            "| benchmark | variant | median ms | " + " | ".join(name for name, _ in columns) + " |",
            "|---|---|" + "---:|" * (1 + len(columns)),
        ]
        for r in _ordered(of_kind):
            if "error" in r:
                cells = f"error: {_cell(r['error'])} |" + " |" * len(columns)
            else:
                cells = " | ".join([_ms(r["median_ms"]), *(cell(r) for _, cell in columns)]) + " |"
            lines.append(f"| {r['group']} | {r['variant']} | {cells}")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _ordered(rows: Sequence[dict]) -> list[dict]:
    """Groups in their run order; within a group the fastest first, failures last."""
    first = {}
    for i, r in enumerate(rows):
        first.setdefault(r["group"], i)
    return sorted(rows, key=lambda r: (first[r["group"]], "error" in r, r.get("median_ms") or 0.0))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")[:120]


def header(record: dict) -> str:
    """Where and when the numbers were measured."""
    m, v = record["machine"], record["versions"]
    where = f"{m['cpu']}, {m['cores']} logical cores, {m['torch_threads']} torch threads"
    if m.get("gpu"):
        where = f"GPU {m['gpu']} (host: {where})"
    installed = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    env = record.get("environment") or {}
    setting = "; environment: " + ", ".join(f"{k}={val}" for k, val in env.items()) if env else ""
    return f"Measured {record['date']} on {where}; {installed}{setting}."


# --- chart -----------------------------------------------------------------------------------------------


def plot(rows: Sequence[dict], path: str | os.PathLike) -> bool:
    """A bar chart of each group's speed-ups over its baseline: bars grow right of the 1x line when
    faster, left when slower (log scale). Returns False, writing nothing, when matplotlib is not
    installed or no row has a speed-up."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("speedup"):
            groups.setdefault(r["group"], []).append(r)
    if not groups:
        return False
    heights = [0.6 + 0.22 * len(g) for g in groups.values()]
    fig, axes = plt.subplots(
        len(groups), 1, figsize=(8, sum(heights) + 0.4), squeeze=False, gridspec_kw={"height_ratios": heights}
    )
    for ax, (group, items) in zip(axes[:, 0], groups.items()):
        items = sorted(items, key=lambda r: r["speedup"])
        speed = [r["speedup"] for r in items]
        colors = ["tab:green" if x > 1 else "tab:gray" if x == 1 else "tab:red" for x in speed]
        ax.barh([r["variant"] for r in items], [x - 1 for x in speed], left=1, color=colors)
        for i, x in enumerate(speed):
            ax.text(x, i, f" {x:.2f}x ", va="center", ha="left" if x >= 1 else "right", fontsize=6)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlim(min(speed + [1]) / 1.6, max(speed + [1]) * 1.6)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{group}: speed-up over {items[0]['baseline']}", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
