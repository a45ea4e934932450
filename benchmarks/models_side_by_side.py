"""Model-level timings with the variants interleaved round by round (base, RED, PARA, ... in turn),
so that a loaded or drifting CPU slows every variant alike; prints medians and ratios to the base
and writes JSON. The cases are red_kernels.bench.models' and each runs through
``red_kernels.bench.runner.run_case``, as in ``python -m red_kernels bench --models-only`` (JSON rows
are that command's); this script keeps the command lines of the README's model tables.

    python benchmarks/models_side_by_side.py train        # issue 10: training step, base / RED / RED+ / PARA / PEFT
    python benchmarks/models_side_by_side.py decode       # issue 10: greedy decoding, base / RED / PARA
    python benchmarks/models_side_by_side.py tenants      # issue 11: mixed tenants, batch 8 / 8 tenants
    python benchmarks/models_side_by_side.py tenants --batch 64 --tenants 1 8 64 --methods red --no-peft
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from red_kernels.bench import models
from red_kernels.bench.report import machine
from red_kernels.bench.runner import run_case


def _line(row: dict) -> str:
    """One variant's printed line: median ms, and tokens/s with the ratio to the base's for decoding,
    weights and peak extra memory when the case samples memory."""
    extra = ""
    if "tokens_per_s" in row:
        ratio = f"x{row['speedup']:.3f} of base tokens/s" if row["speedup"] else "(no base to compare)"
        extra += f"  {row['tokens_per_s']:8.1f} tokens/s  {ratio}"
    if "weights_mb" in row:
        extra += f"  weights {row['weights_mb']:7.1f} MB  peak +{row['peak_extra_mb']:6.1f} MB"
    return f"  {row['variant']:<18} {row['median_ms']:9.1f} ms{extra}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["train", "decode", "tenants"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="tenants: rows of the batch")
    parser.add_argument("--tenants", type=int, nargs="+", default=[8], help="tenants: distinct adapters per batch")
    parser.add_argument("--no-peft", action="store_true", help="leave out the PEFT variants")
    parser.add_argument(
        "--methods", nargs="+", default=["red", "para"], choices=list(models.METHODS), help="decode, tenants"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    peft = models.have_peft() and not args.no_peft
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.what == "train":
        cases = [models.train_case(peft=peft, device=device, rounds=args.rounds)]
    elif args.what == "decode":
        cases = [models.decode_case(variants=("base", *args.methods), device=device, rounds=args.rounds)]
    else:
        cases = [
            models.tenants_case(args.batch, t, args.methods, peft=peft, device=device, rounds=args.rounds)
            for t in args.tenants
        ]
    results = []
    for case in cases:
        rows = run_case(case, device, tick=lambda: None)
        print(f"\n{case.group} (medians of {args.rounds} interleaved rounds)")
        for row in rows:
            print(f"  {row['variant']}: {row['error']}" if "error" in row else _line(row))
        if not any(r["variant"] == case.baseline and "error" not in r for r in rows):
            print(f"  no ratios to {case.baseline}: the {case.baseline} variant failed (its error is above)")
        results += rows
    m = machine()
    meta = {
        "machine": f"{m['cpu']}, {m['cores']} cores",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "results": results,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(meta, f, indent=2)
    print(f"\n{meta['machine']}, torch {meta['torch']}, {meta['date']}")
    failed = [r for r in results if "error" in r]
    if failed:
        print(f"{len(failed)} variant(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
