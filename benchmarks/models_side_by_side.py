"""Model-level timings with the variants interleaved round by round (base, RED, PARA, ... in turn),
so that a loaded or drifting CPU slows every variant alike; prints medians and ratios to the base
and writes JSON. The cases are red_kernels.bench.models' (``python -m red_kernels bench
--models-only`` runs them too); this script keeps the command lines of the README's model tables.

    python benchmarks/models_side_by_side.py train        # issue 10: training step, base / RED / RED+ / PARA / PEFT
    python benchmarks/models_side_by_side.py decode       # issue 10: greedy decoding, base / RED / PARA
    python benchmarks/models_side_by_side.py tenants      # issue 11: mixed tenants, batch 8 / 8 tenants
    python benchmarks/models_side_by_side.py tenants --batch 64 --tenants 1 8 64 --methods red --no-peft
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from red_kernels.bench import models
from red_kernels.bench.report import machine
from red_kernels.bench.timing import measure, model_bytes, peak_extra_memory


def main() -> None:
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
    if args.what == "train":
        runs = [("train", models.train_case(peft=peft, rounds=args.rounds))]
    elif args.what == "decode":
        runs = [("decode", models.decode_case(variants=("base", *args.methods), rounds=args.rounds))]
    else:
        variants = ("base", *(f"{m} tenants" for m in args.methods), *(models.PEFT_DECODE if peft else ()))
        runs = [
            (
                f"tenants b{args.batch} t{t}",
                models.decode_case(
                    models.TENANTS,
                    batch=args.batch,
                    variants=variants,
                    tenants=t,
                    memory=True,
                    label="tenants",
                    rounds=args.rounds,
                ),
            )
            for t in args.tenants
        ]
    results = []
    for group, case in runs:
        cases = case.build()
        times, errors = measure(cases, case.rounds, case.warmup)
        for name, error in errors.items():
            print(f"  {name}: {error}")
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"\n{group} (medians of {args.rounds} interleaved rounds)")
        for name, t in med.items():
            row = {"group": group, "variant": name, "median_s": t, "ratio_to_base_time": t / med["base"]}
            extra = ""
            if case.tokens:
                row["tokens_per_s"] = case.tokens / t
                extra += f"  {case.tokens / t:8.1f} tokens/s  x{med['base'] / t:.3f} of base tokens/s"
            if case.memory:  # sampled apart from the timed rounds
                row["weights_mb"] = model_bytes(cases[name].models) / 2**20
                row["peak_extra_rss_mb"] = peak_extra_memory(cases[name].fn) / 2**20
                extra += f"  weights {row['weights_mb']:7.1f} MB  peak +{row['peak_extra_rss_mb']:6.1f} MB"
            print(f"  {name:<18} {t * 1000:9.1f} ms{extra}")
            results.append(row)
        del cases
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


if __name__ == "__main__":
    main()
