"""Model-level timings with the variants interleaved round by round (base, RED, PARA, ... in turn),
so that a loaded or drifting CPU slows every variant alike; prints medians and ratios to the base
and writes JSON. The pytest-benchmark file bench_models.py times the same cases one after another.

    python benchmarks/models_side_by_side.py train        # issue 10: training step, base / RED / PARA
    python benchmarks/models_side_by_side.py decode       # issue 10: greedy decoding, base / PARA
    python benchmarks/models_side_by_side.py tenants      # issue 11: mixed tenants, batch 8 / 8 tenants
    python benchmarks/models_side_by_side.py tenants --batch 64 --tenants 1 8 64 --methods red --no-peft
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_models as bm  # noqa: E402

import red_kernels as rk  # noqa: E402


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def interleave(cases: dict, rounds: int) -> dict:
    times = {k: [] for k in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_memory(fn) -> int:
    """Bytes of resident memory a call adds at its peak: the RSS sampled every millisecond by a
    thread, minus the RSS before the call. Freed heap memory is returned to the system first
    (``malloc_trim``) so that memory cached by earlier calls does not hide this call's peak. Run
    apart from the timed rounds (the sampling thread takes the GIL)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    before = peak = _rss()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak, _rss()) - before


def model_bytes(*models) -> int:
    """Parameters and buffers of the models a case runs (shared tensors counted once)."""
    seen, total = set(), 0
    for m in models:
        for t in list(m.parameters()) + list(m.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def train_cases() -> dict:
    models = bm._train_models()
    ids = torch.randint(3, 32000, (4, 256), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :128] = -100

    def step(variant):
        model = models[variant]
        model.train()
        embeds = model.get_input_embeddings()(ids)
        if variant == "base":
            embeds.requires_grad_(True)
        model(inputs_embeds=embeds, labels=labels).loss.backward()

    return {v: (lambda v=v: step(v)) for v in ("base", "red", "para")}


def decode_cases() -> dict:
    base = bm._decode_model("small", 512, 4, 8, 8, 1376)
    para = rk.patch_model(copy.deepcopy(base), "para")
    bm._perturb(para)
    ids = torch.randint(3, 32000, (8, 256), generator=torch.Generator().manual_seed(0))
    return {"base": lambda: bm._generate(base, ids), "para": lambda: bm._generate(para, ids)}


MODELS: dict = {}  # case name -> the model it runs, for the memory columns


def tenant_cases(batch: int, tenants: int, peft: bool, methods: tuple[str, ...] = ("red", "para")) -> dict:
    base = bm._decode_model("tenants", 1024, 8, 16, 4, 2816)
    ids = torch.randint(3, 32000, (batch, 256), generator=torch.Generator().manual_seed(0))
    names = [f"t{i % tenants}" for i in range(batch)]
    cases = {"base": lambda: bm._generate(base, ids)}
    MODELS["base"] = base
    for method in methods:
        bank = bm._tenant_bank(method, tenants)

        def go(bank=bank):
            with rk.tenants(bank, names):
                bm._generate(bank, ids)

        cases[f"{method} tenants"] = go
        MODELS[f"{method} tenants"] = bank
    if peft:
        lora = bm._peft_bank("lora", tenants)

        def go_lora():
            with torch.inference_mode():
                lora.generate(input_ids=ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, adapter_names=names)

        cases["peft lora mixed"] = go_lora
        MODELS["peft lora mixed"] = lora
        ia3 = bm._peft_bank("ia3", tenants)

        def go_ia3():
            for t in sorted(set(names)):
                rows = [i for i, n in enumerate(names) if n == t]
                ia3.set_adapter(t)
                bm._generate(ia3, ids[rows])

        cases["peft ia3 loop"] = go_ia3
        MODELS["peft ia3 loop"] = ia3
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["train", "decode", "tenants"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tenants", type=int, nargs="+", default=[8])
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--methods", nargs="+", default=["red", "para"], choices=["red", "para"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = []
    groups = (
        [(args.what, None)] if args.what != "tenants" else [(f"tenants b{args.batch} t{t}", t) for t in args.tenants]
    )
    for group, tenants in groups:
        if args.what == "train":
            cases, tokens = train_cases(), None
        elif args.what == "decode":
            cases, tokens = decode_cases(), 8 * 32
        else:
            cases = tenant_cases(args.batch, tenants, not args.no_peft, tuple(args.methods))
            tokens = args.batch * 32
        med = interleave(cases, args.rounds)
        peak = {name: peak_extra_memory(fn) for name, fn in cases.items()} if args.what == "tenants" else {}
        print(f"\n{group} (medians of {args.rounds} interleaved rounds)")
        for name, t in med.items():
            row = {"group": group, "variant": name, "median_s": t, "ratio_to_base_time": t / med["base"]}
            extra = ""
            if tokens:
                row["tokens_per_s"] = tokens / t
                extra += f"  {tokens / t:8.1f} tokens/s  x{med['base'] / t:.3f} of base tokens/s"
            if name in peak:
                row["weights_mb"] = model_bytes(MODELS[name]) / 2**20
                row["peak_extra_rss_mb"] = peak[name] / 2**20
                extra += f"  weights {row['weights_mb']:7.1f} MB  peak +{row['peak_extra_rss_mb']:6.1f} MB"
            print(f"  {name:<18} {t * 1000:9.1f} ms{extra}")
            results.append(row)
        MODELS.clear()
    meta = {
        "machine": f"{_cpu()}, {os.cpu_count()} cores",
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
