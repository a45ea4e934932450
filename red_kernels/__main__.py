"""Command line: ``python -m red_kernels info | demo | bench``; ``--help`` after any command says
what it does. Unknown flags are errors."""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch


def info() -> None:
    import red_kernels
    from red_kernels._backend import ENV_VAR
    from red_kernels.demo import OPS, default_backends

    print(f"red_kernels {red_kernels.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}")
    print(f"torch threads: {torch.get_num_threads()}, CUDA build: {torch.version.cuda or 'no'}")
    print("backends:")
    for b in red_kernels.backends():
        print(f"  {b}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("default backend per op (automatic selection):")
    print(f"  {'op':<26}" + "".join(f"{d:<12}" for d in devices))
    picks = {d: default_backends(d) for d in devices}
    for op in OPS:
        print(f"  {op:<26}" + "".join(f"{picks[d][op]:<12}" for d in devices))
    if os.environ.get(ENV_VAR):
        print(f"  ({ENV_VAR}={os.environ[ENV_VAR]} is set: it overrides the automatic selection)")
    print(f"cpu outputs: {_huge_page_note()}")


def _huge_page_note() -> str:
    """What the cpu backend's huge-page advice for large outputs (csrc/common/alloc.h) meets here."""
    off = os.environ.get("RED_KERNELS_NO_HUGE_PAGES", "")
    if off and not off.startswith("0"):  # alloc.h's reading of the variable
        return "huge-page advice off (RED_KERNELS_NO_HUGE_PAGES)"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return "huge-page advice on; transparent huge pages not available here (advice is a no-op)"
    note = f"huge-page advice on (transparent huge pages: {thp})"
    if thp != "never" and os.path.isdir("/sys/module/page_reporting"):
        # A memory balloon takes freed blocks back from the VM: re-faulting them as huge pages stalls.
        note += "; free page reporting is on (a VM memory balloon): see README 'Huge pages on VMs'"
    return note


BENCH_DESCRIPTION = """\
Time every op and the model-level cases on this machine (the GPU when one is visible, else the CPU),
from the installed package; no pytest needed.

ops      red_edit, seq_scale, gathered_red_edit, para_vector_gen, gathered_para_vector_gen at
         LLaMA-2-7B widths, fp32 and bf16, forward and forward+backward (and decode steps), each
         against: eager PyTorch (as the RED / PARA code and PEFT write it; multi-tenant ops: PEFT's
         per-tenant loop), torch.compile of that eager code, every backend that runs natively here
         (rk-<backend>), and a memory floor (a copy of the bytes the op must move).
models   a random-weight LLaMA (needs transformers): a training step of the frozen base, RED, RED+,
         PARA, PEFT IA3 and PEFT LoRA r=8 (PEFT rows need peft); greedy decoding of the base, RED,
         PARA and mixed tenants (rows of one batch on different adapters), and at full size the
         tenants comparison with PEFT, weights and peak extra memory.

Variants of a case run in interleaved rounds (so a drifting CPU slows all alike); reported: medians,
the speed-up over the baseline (eager, the loop, or the base model), over torch.compile, and the time
over the memory floor. Writes OUT/bench.json (machine, versions, date, every row), OUT/bench.md (the
tables) and OUT/bench.png (a chart; needs matplotlib). The full run takes roughly 10-20 minutes on
2 CPU cores; --quick under a minute. Exit status 1 if a variant failed (its error is in the table).

examples:
  python -m red_kernels bench --quick
  python -m red_kernels bench --ops-only --filter '^red_edit ' '^seq_scale '
  python -m red_kernels bench --models-only --rounds 7 --out results/
"""


def _parser() -> argparse.ArgumentParser:
    from red_kernels.demo import DEFAULT_STEPS

    parser = argparse.ArgumentParser(
        prog="python -m red_kernels",
        description="red_kernels: fused kernels for RED / PARA representation-editing fine-tuning.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{info,demo,bench}")
    commands.add_parser(
        "info",
        help="versions, every backend (available or not, and why), the default backend per op",
        description="Print versions, every backend with its availability and the reason, and which backend "
        "each op (red_edit, seq_scale, gathered_red_edit, para_vector_gen, gathered_para_vector_gen) "
        "picks by automatic selection on this machine.",
    )
    demo = commands.add_parser(
        "demo",
        help="pre-train a small LLaMA, fine-tune it with RED and PARA, time backends, serve mixed tenants",
        description="Pre-train a small LLaMA on a generated language (cached in OUT/base), fine-tune it with "
        "RED / PARA on a new task, report trainable parameters, eval loss and accuracy before and after, "
        "training steps/s of the default and the reference backends, and answer the same prompts as the "
        "base and every adapter in one mixed-tenant generate batch. Writes OUT/summary.json, "
        "OUT/loss_curves.png and OUT/adapters/<method>/. No download; about 3 minutes on 2 CPU cores.",
    )
    demo.add_argument(
        "--method",
        choices=["red", "red+", "para", "all"],
        default="all",
        help="adapter(s) to train; all = red and para (default: all)",
    )
    demo.add_argument(
        "--model",
        metavar="PATH",
        help="a local Hugging Face causal-LM checkpoint instead of the built-in pre-trained base (the "
        "language uses its token ids 0..25; no tokenizer)",
    )
    demo.add_argument("--out", metavar="DIR", default="demo_out", help="output folder (default: demo_out)")
    demo.add_argument(
        "--steps", type=_positive, default=DEFAULT_STEPS, help=f"training steps per method (default: {DEFAULT_STEPS})"
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the data, the model and the adapters (default: 0)")
    demo.add_argument(
        "--threads",
        type=_positive,
        help="torch threads (default: 1 for the built-in model, whose 128-wide matrices gain nothing from "
        "more; torch's default with --model)",
    )
    demo.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the test suite's size
    bench = commands.add_parser(
        "bench",
        help="time every op and model-level case on this machine: table of medians and ratios, JSON, PNG",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=BENCH_DESCRIPTION,
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="small shapes, a tiny LLaMA and few rounds: about a minute on 2 CPU cores (a smoke test of the "
        "machine and the install, not numbers to quote)",
    )
    bench.add_argument(
        "--filter",
        nargs="+",
        action="extend",
        default=[],
        metavar="PATTERN",
        help="run only the cases whose name contains one of the patterns or, read as a regular expression, "
        "matches it (re.search), e.g. '^red_edit ' (not gathered_red_edit), 'fwd+bwd', 'model train'; "
        "--list shows the names",
    )
    bench.add_argument(
        "--out",
        metavar="DIR",
        default="bench_out",
        help="output folder for bench.json, bench.md, bench.png (default: bench_out)",
    )
    bench.add_argument(
        "--rounds",
        type=_positive,
        metavar="N",
        help="timed rounds of every case (default: 15 per op case, 5 per training step, 3 per decode; "
        "--quick: 5 and 3)",
    )
    bench.add_argument(
        "--threads",
        type=_positive,
        metavar="N",
        help="torch CPU threads (default: torch's, one per core). On a small shared machine 1 can be faster: "
        "waking a second thread there cost a scheduler tick (~8 ms) per parallel op",
    )
    only = bench.add_mutually_exclusive_group()
    only.add_argument("--ops-only", action="store_true", help="only the op microbenchmarks")
    only.add_argument("--models-only", action="store_true", help="only the model-level cases (needs transformers)")
    bench.add_argument("--list", action="store_true", help="print the cases and variants that would run, and exit")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo" and args.model is not None and not os.path.isdir(args.model):
        parser.error(f"--model {args.model}: not a directory (a local Hugging Face checkpoint; no download)")
    if args.command == "info":
        info()
        return 0
    if args.command == "bench":
        from red_kernels.bench.runner import run as run_bench

        return run_bench(
            quick=args.quick,
            filters=args.filter,
            out=args.out,
            rounds=args.rounds,
            ops=not args.models_only,
            models=not args.ops_only,
            list_only=args.list,
            threads=args.threads,
            command=" ".join(["python -m red_kernels", *argv]),
        )
    from red_kernels.demo import run

    run(
        method=args.method,
        model_path=args.model,
        out=args.out,
        steps=args.steps,
        seed=args.seed,
        threads=args.threads,
        tiny=args.tiny,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
