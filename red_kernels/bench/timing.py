"""The timing runner: a benchmark case, its variants, and how they are timed.

A :class:`Case` is one comparison (one op, shape, dtype and mode, or one model-level task) with
several variants (eager PyTorch, ``torch.compile``, each backend, a memory floor; or the base model
and each adapter method). Its inputs are allocated by ``Case.build()`` only when it runs, so a run
holds one case's tensors at a time.

:func:`measure` times the variants in interleaved rounds: round 1 runs every variant once, then
round 2, and so on, each round starting one variant further along. A CPU whose speed drifts (turbo,
a neighbour on a shared machine, page-fault storms) then slows every variant alike, and the median
of each variant's rounds is compared with the others' medians from the same rounds. On a GPU each
timing is bracketed by CUDA events after a synchronisation, so it measures the device's work, not
the launch.

:func:`peak_extra_memory` samples the memory a call adds at its peak, apart from the timed rounds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch


@dataclass
class Variant:
    """One timed callable of a case: ``fn`` is timed, ``setup`` runs untimed before each timing
    (e.g. clearing ``.grad`` so that a backward does not accumulate), ``models`` are the models it
    runs (their parameter bytes are reported for cases that measure memory)."""

    fn: Callable[[], object]
    setup: Callable[[], None] | None = None
    models: tuple = ()


@dataclass(frozen=True)
class Case:
    """One benchmark comparison.

    ``group`` names it (``--filter`` matches it); ``variants`` lists the variant names in the order
    they run (known without allocating anything); ``build()`` allocates the inputs and returns
    ``{name: Variant}`` for exactly those names. Ratios are taken to ``baseline`` (eager PyTorch, the
    per-tenant loop, or the base model), to ``compiled`` (``torch.compile`` of the eager code) and
    to ``floor`` (a copy of the bytes the op must move) when the case has them.

    ``iterations`` calls make one timing (decode-sized calls take microseconds, where one call's
    timing is mostly timer noise); ``warmup`` untimed rounds come first (compilation, allocator,
    caches). ``tokens`` is the number of tokens one call generates (decode: tokens/s). ``memory``
    asks for each variant's weights and peak extra memory.
    """

    group: str
    kind: str  # "op" or "model"
    variants: tuple[str, ...]
    build: Callable[[], dict[str, Variant]] = field(repr=False, compare=False)
    baseline: str
    compiled: str | None = None
    floor: str | None = None
    rounds: int = 15
    warmup: int = 2
    iterations: int = 1
    tokens: int | None = None
    memory: bool = False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(variant: Variant, iterations: int, device: torch.device) -> float:
    """Seconds per call of ``variant.fn``, averaged over ``iterations`` back-to-back calls."""
    if variant.setup is not None:
        variant.setup()
    sync(device)  # nothing queued before (setup, the previous variant) is counted
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iterations):
            variant.fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iterations
    t0 = time.perf_counter()
    for _ in range(iterations):
        variant.fn()
    return (time.perf_counter() - t0) / iterations


def measure(
    variants: dict[str, Variant],
    rounds: int,
    warmup: int = 1,
    iterations: int = 1,
    device: torch.device | None = None,
    tick: Callable[[], None] | None = None,
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Time every variant in ``warmup + rounds`` interleaved rounds (each round runs each variant
    once); return ``({name: seconds per call of each timed round}, {name: error})``.

    The order rotates: round r (warm-up rounds counted) runs the variants in ``variants``' order
    starting at the (r mod n)-th of n, wrapping around. A variant then follows a different one from
    round to round, so what one variant leaves behind is not always paid by the same next one:
    after a variant that frees gigabytes of 4 KiB pages (the eager or reference loops), the next
    one faulting in huge pages was measured to stall for ~200 ms at times, which in a fixed order
    inflated one variant's median every round.

    A variant that raises is dropped from the remaining rounds and its error returned (a
    ``torch.compile`` that cannot build on this machine must not stop the others). ``tick`` is
    called after every timing (a progress bar)."""
    device = device or torch.device("cpu")
    times: dict[str, list[float]] = {name: [] for name in variants}
    errors: dict[str, str] = {}
    names = list(variants)
    for r in range(warmup + rounds):
        start = r % len(names) if names else 0
        for name in names[start:] + names[:start]:
            variant = variants[name]
            if name not in errors:
                try:
                    seconds = time_call(variant, iterations, device)
                    if r >= warmup:
                        times[name].append(seconds)
                except Exception as exc:
                    first_line = (str(exc).strip().splitlines() or [""])[0]
                    errors[name] = f"{type(exc).__name__}: {first_line}"
            if tick is not None:
                tick()
    return {k: v for k, v in times.items() if k not in errors}, errors


# --- memory ----------------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_memory(fn: Callable[[], object], device: torch.device | None = None) -> int:
    """Bytes of memory a call adds at its peak.

    CPU: the resident set size sampled every millisecond by a thread, minus the RSS before the
    call; freed heap memory is first returned to the system (``malloc_trim``) so that memory cached
    by earlier calls does not hide this call's peak. Run apart from the timed rounds (the sampling
    thread takes the GIL). CUDA: the caching allocator's peak of allocated bytes, minus what was
    allocated before."""
    device = device or torch.device("cpu")
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    _malloc_trim()
    before = peak = _rss()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak, _rss()) - before


def model_bytes(models: Iterable[torch.nn.Module]) -> int:
    """Bytes of the parameters and buffers of ``models`` (tensors shared between them counted once)."""
    seen, total = set(), 0
    for m in models:
        for t in (*m.parameters(), *m.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def fix_malloc_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Make every allocation of >= ``nbytes`` a fresh mmap, in every variant and every round.

    glibc raises its mmap threshold dynamically (up to 32 MiB) after large frees, so whether a
    16-32 MiB tensor gets recycled heap memory (no page faults) or fresh pages depends on what ran
    before: measured here, the same benchmark swung 3-5x between runs. A fixed threshold makes the
    allocator state the same for eager, torch.compile, the floor and the backends. Process-wide;
    returns whether it took effect (glibc only)."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        return bool(ctypes.CDLL(libc_name).mallopt(-3, nbytes))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
