"""``python -m red_kernels bench``: select cases, time them with a progress bar, write the results.

Each case is built (its inputs or models allocated), its variants timed in interleaved rounds
(:func:`red_kernels.bench.timing.measure`), its memory sampled when it asks for it, and then freed
before the next case. ``OUT/bench.json`` is rewritten after every case, so an interrupted run keeps
what it measured; ``OUT/bench.md`` (the tables) and ``OUT/bench.png`` (the chart, with matplotlib)
are written at the end.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import red_kernels as rk
from red_kernels.bench import models as model_cases
from red_kernels.bench import ops as op_cases
from red_kernels.bench import report
from red_kernels.bench.timing import Case, fix_malloc_mmap_threshold, measure, model_bytes, peak_extra_memory


def matcher(pattern: str) -> Callable[[str], bool]:
    """A test of a case name: ``pattern`` occurs in it, or ``pattern`` as a regular expression
    matches somewhere in it (``re.search``). Both, because names hold regex characters ("fwd+bwd")
    and users want anchors ("^red_edit ")."""
    try:
        regex = re.compile(pattern)
    except re.error:
        regex = None
    return lambda name: pattern in name or (regex is not None and regex.search(name) is not None)


def select(cases: Sequence[Case], filters: Sequence[str]) -> list[Case]:
    """The cases whose group matches any of ``filters`` (all cases without filters)."""
    if not filters:
        return list(cases)
    matchers = [matcher(p) for p in filters]
    return [c for c in cases if any(m(c.group) for m in matchers)]


def collect(device: torch.device, quick: bool, ops: bool, models: bool) -> tuple[list[Case], list[str]]:
    """Every case to run on ``device`` and notes on what is left out and why."""
    cases: list[Case] = []
    notes: list[str] = []
    if ops:
        cases += op_cases.cases(device, quick)
        native = set(op_cases.native_backends(device))
        for b in rk.backends():
            if b.name in native:
                continue
            if not b.available:
                reason = b.reason
            elif device.type not in b.devices:
                reason = f"runs on {', '.join(b.devices)} tensors, this run uses {device.type}"
            else:
                reason = "Triton interpreter (TRITON_INTERPRET=1): it times Python, not a kernel"
            notes.append(f"backend {b.name} skipped: {reason}")
    if models:
        if importlib.util.find_spec("transformers") is None:
            notes.append("model-level cases skipped: transformers not installed")
        else:
            cases += model_cases.cases(device, quick)
            if not model_cases.have_peft():
                notes.append("PEFT variants skipped: peft not installed")
    return cases, notes


def _progress(total: int):
    from red_kernels.demo import progress  # tqdm, or a line every 10% without it

    return progress(total=total, desc="bench")


def _say(bar, text: str) -> None:
    # tqdm.write keeps the bar below the text; the fallback bar prints plain lines.
    getattr(bar, "write", print)(text)


def _brief(row: dict) -> str:
    if "error" in row:
        return f"{row['variant']} failed"
    if row["speedup"]:
        return f"{row['variant']} {row['speedup']:.2f}x"
    return f"{row['variant']} {row['median_ms']:.3g} ms"


def _units(case: Case) -> int:
    return (case.warmup + case.rounds) * len(case.variants) + (len(case.variants) if case.memory else 0)


def run_case(case: Case, device: torch.device, tick: Callable[[], None]) -> list[dict]:
    """Build ``case``, time its variants, sample its memory if asked; one result row per variant
    (an ``error`` row for a variant, or a whole case, that raised)."""
    try:
        built = case.build()
        variants = {name: built[name] for name in case.variants}
    except Exception as exc:
        for _ in range(_units(case)):
            tick()
        return [{"group": case.group, "kind": case.kind, "variant": "(build)", "error": f"{type(exc).__name__}: {exc}"}]
    times, errors = measure(variants, case.rounds, case.warmup, case.iterations, device, tick)
    rows = report.summarize(case, {name: statistics.median(t) for name, t in times.items()})
    for row in rows:
        t = times[row["variant"]]
        row.update(min_ms=min(t) * 1e3, rounds=len(t), iterations=case.iterations)
        if case.memory:
            variant = variants[row["variant"]]
            row["weights_mb"] = model_bytes(variant.models) / 2**20
            row["peak_extra_mb"] = peak_extra_memory(variant.fn, device) / 2**20
            row["memory"] = "CUDA allocator" if device.type == "cuda" else "RSS"
            tick()
    rows += [{"group": case.group, "kind": case.kind, "variant": name, "error": e} for name, e in errors.items()]
    for _ in range(len(errors) if case.memory else 0):
        tick()
    return rows


def run(
    *,
    quick: bool = False,
    filters: Sequence[str] = (),
    out: str = "bench_out",
    rounds: int | None = None,
    ops: bool = True,
    models: bool = True,
    list_only: bool = False,
    threads: int | None = None,
    command: str = "",
) -> int:
    """Run the benchmarks; returns the exit status (0: all ran; 1: a variant or case failed, see
    the table and JSON; 2: nothing matched the filters). ``threads``: torch's CPU threads (None:
    torch's default)."""
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases, notes = collect(device, quick, ops, models)
    selected = select(cases, filters)
    if not selected:
        print(
            f"bench: no case matches --filter {' '.join(filters)}; `python -m red_kernels bench --list` "
            "shows the case names",
            file=sys.stderr,
        )
        return 2
    if rounds is not None:
        selected = [dataclasses.replace(c, rounds=rounds) for c in selected]
    if list_only:
        for case in selected:
            print(f"{case.group}: {', '.join(case.variants)} ({case.rounds} rounds)")
        for note in notes:
            print(f"note: {note}")
        return 0

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "command": command,
        "date": report.now(),
        "machine": report.machine(),
        "versions": report.versions(),
        "environment": report.environment(),
        "device": str(device),
        "package": str(Path(rk.__file__).parent),
        "settings": {
            "quick": quick,
            "filters": list(filters),
            "rounds": rounds,
            "threads": torch.get_num_threads(),
            "malloc_mmap_threshold_fixed": fix_malloc_mmap_threshold(),
        },
        "notes": notes,
        "results": [],
    }
    json_path, md_path, png_path = out_dir / "bench.json", out_dir / "bench.md", out_dir / "bench.png"
    bar = _progress(sum(_units(c) for c in selected))
    try:
        for case in selected:
            bar.set_postfix_str(case.group)
            rows = run_case(case, device, bar.update)
            record["results"] += rows
            json_path.write_text(json.dumps(record, indent=1) + "\n")
            _say(bar, f"{case.group} (vs {case.baseline}): {', '.join(_brief(r) for r in rows)}")
            gc.collect()
    finally:
        bar.close()

    results = record["results"]
    text = f"{report.header(record)}\n\n{report.table(results)}\n"
    text += "".join(f"\nNote: {note}" for note in notes)
    md_path.write_text(text + "\n")
    print()
    print(text)
    if importlib.util.find_spec("matplotlib") is None:
        print("\nchart: not drawn (matplotlib is not installed: pip install matplotlib)")
    elif report.plot(results, png_path):
        print(f"\nchart: {png_path}")
    else:
        print("\nchart: not drawn (no variant was timed)")
    print(f"table: {md_path}\nJSON:  {json_path}")
    failed = [r for r in results if "error" in r]
    if failed:
        print(f"{len(failed)} variant(s) failed: see the table", file=sys.stderr)
        return 1
    return 0
