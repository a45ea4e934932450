"""Command line: ``python -m red_kernels info | demo | bench``; ``--help`` after any command says
what it does. Unknown flags are errors; ``bench`` passes what follows ``--`` to pytest."""

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


def bench(extra: list[str]) -> int:
    """Run the pytest-benchmark files of a source checkout (benchmarks/ is not installed)."""
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    if not bench_dir.is_dir():
        print("benchmarks/ not found: run this from a source checkout (make bench)", file=sys.stderr)
        return 2
    import pytest

    return pytest.main([str(bench_dir), "-q", "--benchmark-only", *extra])


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
    commands.add_parser(
        "bench",
        help="run the pytest-benchmark files of a source checkout; pytest arguments after --",
        description="Run benchmarks/ (a source checkout) with pytest-benchmark. Arguments after -- go to "
        "pytest, e.g. python -m red_kernels bench -- -k red_edit --benchmark-json=out.json",
    )
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Only bench takes pass-through arguments, and only after "--"; everything else is parsed strictly.
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    parser = _parser()
    args = parser.parse_args(argv)
    if passthrough and args.command != "bench":
        parser.error(f"{args.command} takes no arguments after --: {' '.join(passthrough)}")
    if args.command == "demo" and args.model is not None and not os.path.isdir(args.model):
        parser.error(f"--model {args.model}: not a directory (a local Hugging Face checkpoint; no download)")
    if args.command == "info":
        info()
        return 0
    if args.command == "bench":
        return bench(passthrough)
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
