"""One-command GPU check of red_kernels (issue 12): build, test and time everything on one CUDA device.

    make gpu-check                       # python3 from PATH; GPU_PYTHON=... to choose another
    GPU_CHECK_DRY_RUN=1 make gpu-check   # no GPU needed: check the environment, print the plan

Written for a machine that has a CUDA build of torch, triton, nvcc, transformers (peft optional),
pytest and ninja installed and no network: it creates no virtual environment and downloads nothing.
Stages, each run in its own try/except (or its own process) so that a failing stage is reported and
the rest still run:

1. build   ``python3 setup.py build_ext --inplace`` with FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST of the
           local device and MAX_JOBS = the cores; then checks that the ``cuda`` backend is available.
2. tests   pytest with TRITON_INTERPRET=0 (so the ``triton`` and ``cuda`` backends run on the GPU):
           every ``gpu``-marked test plus the op tests (OP_TEST_FILES), ``-q``, a per-test timeout,
           in parallel workers when pytest-xdist is installed.
3. bench   each op at the README's benchmark shapes (BENCH_CASES), fp32 and bf16, forward (autograd
           recording, as in training) and forward+backward, for the ``cuda`` and ``triton`` backends,
           eager PyTorch and torch.compile of the eager code (the gathered ops also the per-tenant
           loop PEFT uses). Medians of triton.testing.do_bench (CUDA events if triton's timer is
           missing), bytes moved (see ``_bytes_*``), GB/s and % of a device-to-device copy of the
           same bytes (torch.empty_like + copy_), measured in the same process.
4. models  a random LLaMA (hidden 1024, 8 layers, 16 heads, 4 KV heads, vocab 32000, bf16): greedy
           decoding of 32 tokens after a 256-token prompt, batch 8, and a training step (forward
           with labels + backward, batch 8, 256 tokens), for the base model, RED, PARA and tenant
           batches (RED, PARA and mixed RED/PARA/base rows under ``rk.tenants``), and PEFT LoRA with
           mixed ``adapter_names`` when peft imports.

Stages 3 and 4 run in child processes of this script (``--stage bench|models``) that write their
rows to OUT after every case, so a crash or a kill keeps what was measured. Results: OUT/results.json
and OUT/results.md (GPU, versions, date, one table per stage), OUT/build.log, OUT/tests.log; OUT is
the environment variable OUT, default gpu_out/.

Time budget: the whole run, build included, stays under GPU_CHECK_BUDGET_S (default 450 s, to fit in
8 minutes on an H200). Each stage has a nominal budget (STAGES: build 180 s, tests 180 s, bench 120 s,
models 75 s), capped by what is left after the minimum the later stages need; a stage that cannot get
its minimum is skipped, and the bench/model children skip their remaining cases near their deadline.

Exit status: 0 all passed; 1 the build or the tests failed, timed out or were skipped; 2 the
environment cannot run the check (no CUDA device, torch without CUDA, no nvcc, a missing package);
3 the build and tests passed but a benchmark or model case raised. The dry run exits 0 unless a
package the check needs (not the GPU, nvcc or a CUDA build of torch) is missing.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
T0 = time.time()
BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET_S", "450"))
OUT = Path(os.environ.get("OUT") or "gpu_out")
if not OUT.is_absolute():
    OUT = ROOT / OUT

# name, nominal budget (s), minimum worth starting (s)
STAGES = [("build", 180, 30), ("tests", 180, 30), ("bench", 120, 20), ("models", 75, 20)]
WRITE_RESERVE_S = 10  # writing the results at the end
TEST_TIMEOUT_S = 90  # per test (pytest-timeout)

OP_TEST_FILES = [
    "test_red_edit.py",
    "test_seq_scale.py",
    "test_gathered_red_edit.py",
    "test_para_vector_gen.py",
    "test_gathered_para_vector_gen.py",
    "test_cpp_autograd.py",
    "test_patch_tenants.py",
    "test_patch_para.py",
]

OPS = ["red_edit", "seq_scale", "gathered_red_edit", "para_vector_gen", "gathered_para_vector_gen"]
MODES = ["fwd", "fwd+bwd"]
RK_BACKENDS = ["cuda", "triton"]
DEVICE = "cuda"  # the timed stages' tensors and models
# op, shape parameters, dtype. The README's headline cases first, so a tight deadline drops the rest.
PARA = {"B": 8, "T": 512, "d": 4096, "r": 12, "n": 2 * 4096 + 11008}
BENCH_CASES = [
    ("red_edit", {"shape": (4096, 4096)}, "fp32"),
    ("red_edit", {"shape": (8, 512, 4096)}, "bf16"),
    ("seq_scale", {"shape": (8, 512, 4096)}, "fp32"),
    ("seq_scale", {"shape": (8, 512, 4096)}, "bf16"),
    ("gathered_red_edit", {"K": 16, "shape": (16, 512, 4096)}, "fp32"),
    ("gathered_red_edit", {"K": 16, "shape": (16, 512, 4096)}, "bf16"),
    ("para_vector_gen", PARA, "fp32"),
    ("para_vector_gen", PARA, "bf16"),
    ("gathered_para_vector_gen", {**PARA, "K": 16, "B": 16}, "fp32"),
    ("gathered_para_vector_gen", {**PARA, "K": 16, "B": 16}, "bf16"),
    ("red_edit", {"shape": (4096, 4096)}, "bf16"),
    ("red_edit", {"shape": (8, 512, 4096)}, "fp32"),
    ("seq_scale", {"shape": (8, 512, 11008)}, "fp32"),
    ("seq_scale", {"shape": (8, 512, 11008)}, "bf16"),
]
BENCH_WARMUP_MS, BENCH_REP_MS = 10, 40  # do_bench: ~50 ms of calls per timing
COMPILE_MIN_LEFT_S = 25  # torch.compile of a new case takes seconds: skip it when less is left

LLAMA = {
    "hidden_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "intermediate_size": 2816,
    "vocab_size": 32000,
}
DECODE_BATCH, PROMPT, NEW_TOKENS = 8, 256, 32
TRAIN_BATCH, TRAIN_SEQ = 8, 256
N_ADAPTERS = 8  # RED adapters r0..r7 and PARA adapters p0..p7 in one bank
MIXED_ROWS = ["r0", "p0", "r1", "p1", "r2", "p2", None, "r3"]
MODEL_CASES = [  # workload, variant; in priority order
    ("decode", "base"),
    ("decode", "red"),
    ("decode", "para"),
    ("decode", "mixed tenants"),
    ("train", "base"),
    ("train", "red"),
    ("train", "para"),
    ("train", "mixed tenants"),
    ("decode", "peft-lora mixed"),
    ("decode", "red tenants"),
    ("decode", "para tenants"),
]
DECODE_REPEATS, TRAIN_REPEATS = 3, 5


# --- small helpers -----------------------------------------------------------------------------


def log(msg: str) -> None:
    now = time.time()
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[gpu-check {stamp} +{now - T0:5.1f}s] {msg}", flush=True)


def left_s() -> float:
    return BUDGET_S - (time.time() - T0)


def stage_limit(name: str) -> tuple[float, float]:
    """(seconds this stage may take, its minimum): its nominal budget, capped by what is left after
    the minimum of every later stage and the final write."""
    names = [s[0] for s in STAGES]
    i = names.index(name)
    later = sum(s[2] for s in STAGES[i + 1 :])
    return min(STAGES[i][1], left_s() - later - WRITE_RESERVE_S), STAGES[i][2]


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def child_env(**extra: str) -> dict[str, str]:
    """The children's environment: the repository and scripts/ on the path (the extension is built in
    place, not installed), Triton compiling for the GPU, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "scripts"), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env["TRITON_INTERPRET"] = "0"  # "0", not unset: python_tests/conftest.py defaults it to "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_logged(cmd: list[str], env: dict, log_path: Path | None, timeout: float, echo: bool) -> dict:
    """Run ``cmd`` in the repository root, output to ``log_path`` (if given) and to stdout (if
    ``echo``), killed with its whole process group after ``timeout`` seconds."""
    start = time.time()
    tail: collections.deque[str] = collections.deque(maxlen=300)
    with open(log_path or os.devnull, "w") as logf:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # one process group: a timeout ends the pytest/ninja children too
        )

        def pump():
            for line in proc.stdout:
                logf.write(line)
                tail.append(line)
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                rc = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
        reader.join(timeout=5)
    return {"rc": rc, "timed_out": timed_out, "seconds": round(time.time() - start, 1), "tail": list(tail)}


def shell(cmd: list[str], env: dict | None = None) -> str:
    """A command line as a user would type it (only the variables that matter)."""
    prefix = " ".join(f"{k}={v}" for k, v in (env or {}).items())
    return (prefix + " " if prefix else "") + " ".join(cmd)


# --- environment -------------------------------------------------------------------------------


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for candidate in [home and os.path.join(home, "bin", "nvcc"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]:
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def check_environment() -> tuple[dict, list[str], list[str]]:
    """(facts, fatal problems for any run, problems fatal only for a real run)."""
    facts: dict = {"python": sys.version.split()[0], "executable": sys.executable, "cores": cpu_count()}
    fatal, gpu_fatal = [], []
    if sys.version_info < (3, 10):  # noqa: UP036  (a python3 older than the package supports)
        fatal.append(f"python {facts['python']} < 3.10")
    for dist, module, required in [
        ("triton", "triton", True),
        ("transformers", "transformers", True),
        ("pytest", "pytest", True),
        ("setuptools", "setuptools", True),
        ("peft", "peft", False),
        ("pytest-timeout", "pytest_timeout", False),
        ("pytest-xdist", "xdist", False),
    ]:
        # find_spec, not import: importing peft alone takes seconds, and the children import for real.
        found = importlib.util.find_spec(module) is not None
        facts[dist] = (version(dist) or "?") if found else None
        if not found and required:
            fatal.append(f"{dist} is not importable")
    setuptools_v = facts.get("setuptools") or "0"
    if tuple(int(x) for x in re.findall(r"\d+", setuptools_v)[:1]) < (77,):
        fatal.append(f"setuptools {setuptools_v} < 77 cannot read pyproject.toml's SPDX license string")
    facts["ninja"] = shutil.which("ninja")
    facts["nvcc"] = find_nvcc()
    if facts["nvcc"]:
        try:
            out = subprocess.run([facts["nvcc"], "--version"], capture_output=True, text=True, timeout=30).stdout
            facts["nvcc_version"] = out.strip().splitlines()[-1] if out.strip() else "?"
        except (OSError, subprocess.SubprocessError) as exc:
            facts["nvcc_version"] = f"? ({exc})"
    else:
        gpu_fatal.append("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
    try:
        import torch

        facts["torch"] = torch.__version__
        facts["torch_cuda"] = torch.version.cuda
        if torch.version.cuda is None:
            gpu_fatal.append(f"torch {torch.__version__} is not a CUDA build")
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            major, minor = torch.cuda.get_device_capability(0)
            facts["gpu"] = torch.cuda.get_device_name(0)
            facts["capability"] = f"{major}.{minor}"
            facts["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            facts["sms"] = getattr(props, "multi_processor_count", None)
        else:
            facts["gpu"] = None
            gpu_fatal.append("no CUDA device visible to torch")
    except Exception as exc:  # a broken torch install is reported, not raised
        facts["torch"] = None
        fatal.append(f"torch is not importable: {exc}")
    missing = [f for f in OP_TEST_FILES if not (ROOT / "python_tests" / f).exists()]
    facts["missing_test_files"] = missing  # test_patch_para.py is optional ("if present")
    return facts, fatal, gpu_fatal


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --- stage 1: build ------------------------------------------------------------------------------


def build_plan(facts: dict) -> tuple[list[str], dict[str, str]]:
    arch = facts.get("capability") or "<device capability, e.g. 9.0>"
    env = {"FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(facts["cores"])}
    return [sys.executable, "setup.py", "build_ext", "--inplace"], env


BACKENDS_PROBE = "import red_kernels as rk; print(*rk.backends(), sep=chr(10))"


def stage_build(facts: dict, limit: float) -> dict:
    cmd, env = build_plan(facts)
    log(f"build: {shell(cmd, env)} (limit {limit:.0f} s, log {OUT / 'build.log'})")
    result = run_logged(cmd, child_env(**env), OUT / "build.log", limit, echo=False)
    tail = result.pop("tail")
    result["command"] = shell(cmd, env)
    if result["rc"] != 0 or result["timed_out"]:
        log("build FAILED" + (" (timed out)" if result["timed_out"] else "") + "; last lines:")
        print("".join(tail[-30:]), flush=True)
        result["status"] = "failed"
        result["error"] = "timed out" if result["timed_out"] else f"exit status {result['rc']} (see build.log)"
        result["log_tail"] = tail[-30:]
        return result
    probe = subprocess.run(
        [sys.executable, "-c", BACKENDS_PROBE], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60
    )
    result["backends"] = probe.stdout.strip().splitlines()
    print(probe.stdout + probe.stderr[-2000:], flush=True)
    cuda_ok = any(line.startswith("cuda") and " available" in line for line in result["backends"])
    result["status"] = "ok" if probe.returncode == 0 and cuda_ok else "failed"
    if result["status"] != "ok":
        result["error"] = "built, but the cuda backend is not available (see backends)"
    log(f"build {result['status']} in {result['seconds']} s")
    return result


# --- stage 2: tests ------------------------------------------------------------------------------


def test_plan(facts: dict) -> tuple[list[str], dict[str, str], list[str]]:
    """The pytest command, its environment, and the files it runs: the op test files plus every
    file with a ``gpu``-marked test (only those tests of it: see pytest_collection_modifyitems)."""
    tests = ROOT / "python_tests"
    op_files = [f for f in OP_TEST_FILES if (tests / f).exists()]
    gpu_files = sorted(
        p.name for p in tests.glob("test_*.py") if p.name not in op_files and "mark.gpu" in p.read_text()
    )
    files = [f"python_tests/{f}" for f in op_files + gpu_files]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_check"]
    cmd += ["--continue-on-collection-errors"]
    if facts.get("pytest-timeout"):
        cmd += [f"--timeout={TEST_TIMEOUT_S}"]
    workers = 1
    if facts.get("pytest-xdist") and facts["cores"] >= 4:
        workers = min(8, facts["cores"] // 2)
        cmd += ["-n", str(workers)]
    env = {
        "TRITON_INTERPRET": "0",
        "GPU_CHECK_OP_TEST_FILES": os.pathsep.join(op_files),
        "OMP_NUM_THREADS": str(max(1, facts["cores"] // workers)),
        "TORCHINDUCTOR_COMPILE_THREADS": "1",
    }
    return cmd + files, env, files


def pytest_collection_modifyitems(config, items):
    """pytest hook, active when pytest loads this file as a plugin (``-p gpu_check``, stage 2):
    keep every test of the op files and the ``gpu``-marked tests of the other files given."""
    op_files = set(filter(None, os.environ.get("GPU_CHECK_OP_TEST_FILES", "").split(os.pathsep)))
    if not op_files:
        return
    keep, drop = [], []
    for item in items:
        wanted = item.path.name in op_files or item.get_closest_marker("gpu") is not None
        (keep if wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def parse_pytest(tail: list[str]) -> dict:
    counts: dict[str, int] = {}
    for line in reversed(tail):
        if re.search(r"\b(passed|failed|error|errors|skipped|no tests ran)\b.* in [\d.]+s", line):
            for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)", line):
                counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
            break
    failures = [line.strip() for line in tail if line.startswith(("FAILED ", "ERROR "))]
    return {"counts": counts, "failures": failures[:50]}


def stage_tests(facts: dict, limit: float) -> dict:
    cmd, env, files = test_plan(facts)
    log(f"tests: {shell(cmd, env)} (limit {limit:.0f} s, per test {TEST_TIMEOUT_S} s, log {OUT / 'tests.log'})")
    result = run_logged(cmd, child_env(**env), OUT / "tests.log", limit, echo=True)
    result.update(parse_pytest(result.pop("tail")))
    result["command"] = shell(cmd, env)
    # rc 0: all passed; 5: nothing collected (counts as a failure here); timeout: failure.
    result["status"] = "ok" if result["rc"] == 0 and not result["timed_out"] else "failed"
    timed_out = " (timed out)" if result["timed_out"] else ""
    log(f"tests {result['status']} in {result['seconds']} s: {result['counts']}{timed_out}")
    return result


# --- stage 3: op benchmarks (child process) ---------------------------------------------------------


def case_name(op: str, params: dict, dt: str) -> str:
    k = f"K{params['K']} " if "K" in params else ""
    if "shape" in params:
        return f"{k}{'x'.join(map(str, params['shape']))} {dt}"
    p = params
    return f"{k}B{p['B']} T{p['T']} d{p['d']} r{p['r']} n{p['n']} {dt}"


def variants_for(op: str) -> list[str]:
    loop = ["loop"] if op.startswith("gathered") else []
    return ["eager", *loop, "torch.compile", *RK_BACKENDS]


def _bytes_elementwise(h, vec_bytes: int) -> dict[str, int]:
    """red_edit, seq_scale, gathered_red_edit: the forward reads h and writes y; the backward reads
    grad_y and h (for the vectors' gradients) and writes grad_h: 2 and 5 passes over h's bytes, plus
    the vectors (read; forward+backward: read twice and their gradients written)."""
    nb = h.numel() * h.element_size()
    return {"fwd": 2 * nb + vec_bytes, "fwd+bwd": 5 * nb + 3 * vec_bytes}


def _bytes_para(h, weights: list, batch: int, n_out: int) -> dict[str, int]:
    """para_vector_gen (and gathered): the forward reads B pooled rows of h and the weights and
    writes [B, n_out]; the backward reads grad_out, the pooled rows and the weights again, writes
    the weights' gradients and a dense grad_h (zeros but the pooled rows)."""
    es = h.element_size()
    rows, out, w = batch * h.shape[-1] * es, batch * n_out * es, sum(t.numel() * t.element_size() for t in weights)
    fwd = rows + w + out
    return {"fwd": fwd, "fwd+bwd": fwd + out + rows + 2 * w + h.numel() * es}


def build_case(op: str, params: dict, dtype):
    """(inputs, grad_out, {variant: fn(*inputs)}, bytes per mode) for one benchmark case, on the GPU.
    The eager baselines are red_kernels.bench.ops's, the ones ``python -m red_kernels bench``
    compares against."""
    import torch

    import red_kernels as rk
    from red_kernels.bench import ops as bench_ops

    dev = DEVICE
    g = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, dt=torch.float32, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*shape, device=dev, generator=g)).to(dt).requires_grad_()

    if op in ("red_edit", "seq_scale", "gathered_red_edit"):
        shape = params["shape"]
        h = randn(*shape, dt=dtype)
        grad = torch.randn(*shape, device=dev, generator=g).to(dtype)
        if op == "red_edit":
            d = shape[-1]
            inputs = (h, randn(d, scale=0.1, shift=1.0), randn(d, scale=0.1))
            eager = bench_ops.eager_red_edit
            rk_op = rk.red_edit
            vec_bytes = 2 * d * 4
            extra = {}
        elif op == "seq_scale":
            b, _, n = shape
            inputs = (h, randn(b, n, scale=0.1, shift=1.0))
            eager = bench_ops.eager_seq_scale
            rk_op = rk.seq_scale
            vec_bytes = b * n * 4
            extra = {}
        else:
            k, (b, _, d) = params["K"], shape
            ids = torch.randperm(b, device=dev, generator=g).remainder(k)
            inputs = (h, randn(k, d, scale=0.1, shift=1.0), randn(k, d, scale=0.1), ids)
            eager = bench_ops.eager_gathered_red_edit  # vectorised gather in eager PyTorch
            rk_op = rk.gathered_red_edit
            vec_bytes = 2 * b * d * 4  # each row's two vectors
            extra = {"loop": bench_ops.eager_gathered_red_edit_loop}
        nbytes = _bytes_elementwise(h, vec_bytes)
    else:
        p = params
        b, t, d, r, n = p["B"], p["T"], p["d"], p["r"], p["n"]
        k = p.get("K")
        lead = (k,) if k else ()
        h = randn(b, t, d, dt=dtype)
        pool = torch.randint(0, t, (b,), device=dev, generator=g)
        w_down, w_up = randn(*lead, d, r, dt=dtype, scale=0.02), randn(*lead, r, n, dt=dtype, scale=0.02)
        b_up = torch.ones(*lead, n, device=dev, dtype=dtype, requires_grad=True)
        grad = torch.randn(b, n, device=dev, generator=g).to(dtype)
        weights = [w_down, w_up, b_up]
        if not k:
            inputs = (h, pool, w_down, w_up, b_up)
            eager = bench_ops.eager_para_vector_gen
            rk_op = rk.para_vector_gen
            extra = {}
        else:
            ids = torch.randperm(k, device=dev, generator=g)[:b]
            inputs = (h, pool, w_down, w_up, b_up, ids)

            def eager(h, pool, w_down, w_up, b_up, ids):  # vectorised: each row's generator gathered
                # (bench.ops has no vectorised eager of this op: its baseline is the loop)
                pooled = h[torch.arange(h.shape[0], device=h.device), pool]
                mid = torch.nn.functional.gelu(torch.bmm(pooled[:, None], w_down[ids]))
                return torch.bmm(mid, w_up[ids])[:, 0] + b_up[ids]

            rk_op = rk.gathered_para_vector_gen
            extra = {"loop": bench_ops.eager_gathered_para_loop}
        nbytes = _bytes_para(h, weights, b, n)

    fns = {"eager": eager, **extra, "torch.compile": torch.compile(eager, dynamic=False)}
    for backend in RK_BACKENDS:
        fns[backend] = lambda *a, _b=backend: rk_op(*a, backend=_b)
    return inputs, grad, fns, nbytes


def time_ms(fn, grad_to_none) -> float:
    """Median milliseconds of ``fn`` on the GPU: triton.testing.do_bench (which flushes the L2
    between calls), or CUDA events around each call when triton's timer is not there."""
    import torch

    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        try:
            return float(
                do_bench(fn, warmup=BENCH_WARMUP_MS, rep=BENCH_REP_MS, grad_to_none=grad_to_none, return_mode="median")
            )
        except TypeError:  # a triton without return_mode
            return float(
                do_bench(fn, warmup=BENCH_WARMUP_MS, rep=BENCH_REP_MS, grad_to_none=grad_to_none, quantiles=[0.5])
            )
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(30):
        for t in grad_to_none:
            t.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


_COPY_MS: dict[int, float] = {}


def copy_ms(nbytes: int) -> float:
    """A device-to-device copy moving ``nbytes`` (half read, half written): torch.empty_like + copy_."""
    import torch

    if nbytes not in _COPY_MS:
        src = torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device=DEVICE).random_(0, 255)
        dst = torch.empty_like(src)
        _COPY_MS[nbytes] = time_ms(lambda: dst.copy_(src), [])
    return _COPY_MS[nbytes]


def bench_case(op: str, params: dict, dt: str, deadline: float, rows: list[dict], save) -> None:
    """Time every variant of one case in both modes, appending one row per (mode, variant)."""
    import torch

    import red_kernels as rk

    name = f"{op} {case_name(op, params, dt)}"
    log(f"bench {name}")
    try:
        inputs, grad, fns, nbytes = build_case(op, params, {"fp32": torch.float32, "bf16": torch.bfloat16}[dt])
    except Exception as exc:
        rows.append({"op": op, "case": name, "error": f"setup: {type(exc).__name__}: {exc}"})
        return
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    with torch.no_grad():
        ref = fns["eager"](*inputs).float()
    for mode in MODES:
        floor = copy_ms(nbytes[mode])
        eager_ms = None
        for variant, fn in fns.items():
            row = {"op": op, "case": name, "dtype": dt, "mode": mode, "variant": variant, "bytes": nbytes[mode]}
            rows.append(row)
            if variant in RK_BACKENDS and not rk.backend_info(variant).available:
                row["skipped"] = f"unavailable: {rk.backend_info(variant).reason}"
                continue
            left = deadline - time.time()
            if left < 3 or (variant == "torch.compile" and left < COMPILE_MIN_LEFT_S):
                row["skipped"] = "deadline"
                continue
            try:
                if mode == "fwd":  # the first call compiles; its output is checked against eager's
                    y = fn(*inputs)
                    row["max_rel_err_vs_eager"] = float(
                        (y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)
                    )
                    ms = time_ms(lambda fn=fn: fn(*inputs), leaves)
                else:
                    ms = time_ms(lambda fn=fn: fn(*inputs).backward(grad), leaves)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
                log(f"  {mode} {variant}: ERROR {row['error'][:200]}")
                continue
            if variant == "eager":
                eager_ms = ms
            row.update(
                ms=round(ms, 4),
                gb_s=round(nbytes[mode] / ms / 1e6, 1),
                copy_ms=round(floor, 4),
                pct_of_copy=round(100 * floor / ms, 1),
                vs_eager=round(eager_ms / ms, 2) if eager_ms else None,
            )
            log(f"  {mode:8s} {variant:14s} {ms:9.4f} ms {row['gb_s']:8.1f} GB/s {row['pct_of_copy']:5.1f}% of copy")
        save()


def bench_main(deadline: float, out_path: Path) -> int:
    import torch

    dynamo = getattr(torch, "_dynamo", None)
    for knob in ("cache_size_limit", "recompile_limit"):  # one entry per case and shape; the name changed
        if dynamo is not None and hasattr(dynamo.config, knob):
            setattr(dynamo.config, knob, 64)
    rows: list[dict] = []

    def save():
        out_path.write_text(json.dumps(rows, indent=1))

    for op, params, dt in BENCH_CASES:
        if time.time() > deadline - 3:
            rows.append({"op": op, "case": f"{op} {case_name(op, params, dt)}", "skipped": "deadline"})
            continue
        bench_case(op, params, dt, deadline, rows, save)
        save()
    return 0


# --- stage 4: model-level decode and training (child process) ---------------------------------------


def models_main(deadline: float, out_path: Path) -> int:
    import copy
    import tempfile
    import warnings

    import torch
    import transformers

    import red_kernels as rk

    rows: list[dict] = []

    def save():
        out_path.write_text(json.dumps(rows, indent=1))

    dev, dtype = DEVICE, torch.bfloat16
    cfg = transformers.LlamaConfig(**LLAMA, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        base = transformers.LlamaForCausalLM(cfg).to(dev, dtype).eval()
    for p in base.parameters():
        p.requires_grad_(False)

    tmp = tempfile.TemporaryDirectory()
    adapters = {}  # name -> saved directory

    def make_adapters(method: str, prefix: str):
        """N_ADAPTERS adapters of ``method``, each with its own random parameters, saved to tmp."""
        src = rk.patch_model(copy.deepcopy(base), method)
        init = {n: p.detach().clone() for n, p in rk.adapter_parameters(src).items()}
        for i in range(N_ADAPTERS):
            gen = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for n, p in rk.adapter_parameters(src).items():
                    p.copy_(init[n] + 0.02 * torch.randn(p.shape, generator=gen).to(p))
            adapters[f"{prefix}{i}"] = os.path.join(tmp.name, f"{prefix}{i}")
            rk.save_adapter(src, adapters[f"{prefix}{i}"])
        del src

    models: dict[str, torch.nn.Module] = {"base": base}

    def model_for(variant: str):
        if variant in models:
            return models[variant]
        if not adapters:
            make_adapters("red", "r")
            make_adapters("para", "p")
        if variant in ("red", "para"):
            models[variant] = rk.load_adapter(copy.deepcopy(base), adapters[variant[0] + "0"])
        elif variant == "bank":
            bank = copy.deepcopy(base)
            for name, path in adapters.items():
                rk.load_adapter(bank, path, adapter_name=name)
            models[variant] = bank
        elif variant == "peft":
            import peft

            def lora():
                return peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)

            model = peft.get_peft_model(copy.deepcopy(base), lora(), adapter_name="t0")
            for i in range(1, N_ADAPTERS):
                model.add_adapter(f"t{i}", lora())
            models[variant] = model.to(dev).eval()
        return models[variant]

    names_for = {
        "mixed tenants": MIXED_ROWS,
        "red tenants": [f"r{i}" for i in range(DECODE_BATCH)],
        "para tenants": [f"p{i}" for i in range(DECODE_BATCH)],
    }
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, LLAMA["vocab_size"], (DECODE_BATCH, PROMPT), generator=gen).to(dev)
    train_ids = torch.randint(3, LLAMA["vocab_size"], (TRAIN_BATCH, TRAIN_SEQ), generator=gen).to(dev)
    labels = train_ids.clone()
    labels[:, : TRAIN_SEQ // 2] = -100  # prompt + answer: PARA pools the prompt's last token

    def timed(fn, repeats: int) -> list[float]:
        fn()  # warm-up: Triton/CUDA kernels compile, tables are built
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return times

    base_ms: dict[str, float] = {}
    for workload, variant in MODEL_CASES:
        row = {"workload": workload, "variant": variant}
        rows.append(row)
        if time.time() > deadline - 8:
            row["skipped"] = "deadline"
            continue
        log(f"models {workload} {variant}")
        try:
            setup_start = time.time()
            if variant == "peft-lora mixed":
                if importlib.util.find_spec("peft") is None:
                    row["skipped"] = "peft is not installed"
                    continue
                model = model_for("peft")
                names = [f"t{i}" for i in range(DECODE_BATCH)]
            else:
                model = model_for("bank" if variant.endswith("tenants") else variant)
                names = names_for.get(variant)
            row["setup_s"] = round(time.time() - setup_start, 1)
            if workload == "decode":
                model.eval()
                kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
                mask = torch.ones_like(prompt)

                def step(model=model, names=names, kwargs=kwargs, mask=mask, variant=variant):
                    with torch.inference_mode():
                        if variant == "peft-lora mixed":
                            return model.generate(input_ids=prompt, attention_mask=mask, adapter_names=names, **kwargs)
                        if names is not None:
                            with rk.tenants(model, names):
                                return model.generate(prompt, attention_mask=mask, **kwargs)
                        return model.generate(prompt, attention_mask=mask, **kwargs)

                times, tokens = timed(step, DECODE_REPEATS), DECODE_BATCH * NEW_TOKENS
            else:
                model.train()
                trainable = [p for p in model.parameters() if p.requires_grad]
                if names is not None:  # every adapter of the bank trains on its own rows
                    trainable = [p for n in rk.adapter_names(model) for p in rk.adapter_parameters(model, n).values()]
                    for p in trainable:
                        p.requires_grad_(True)

                def step(model=model, names=names, variant=variant, trainable=trainable):
                    for p in trainable:
                        p.grad = None
                    embeds = model.get_input_embeddings()(train_ids)
                    if variant == "base":
                        embeds.requires_grad_(True)  # a graph through every layer, like the patched models'
                    if names is not None:
                        with rk.tenants(model, names):
                            model(inputs_embeds=embeds, labels=labels).loss.backward()
                    else:
                        model(inputs_embeds=embeds, labels=labels).loss.backward()

                torch.cuda.reset_peak_memory_stats()
                try:
                    times, tokens = timed(step, TRAIN_REPEATS), TRAIN_BATCH * TRAIN_SEQ
                finally:
                    model.eval()
                    if names is not None:
                        for p in trainable:
                            p.requires_grad_(False)
                            p.grad = None
                row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            ms = 1000 * statistics.median(times)
            if variant == "base":
                base_ms[workload] = ms
            row.update(ms=round(ms, 2), tokens_s=round(tokens / ms * 1000), repeats=len(times))
            if workload in base_ms:
                row["vs_base"] = round(base_ms[workload] / ms, 2)
            log(f"  {workload} {variant}: {ms:.1f} ms, {row['tokens_s']} tokens/s")
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            log(f"  ERROR {row['error'][:300]}")
        save()
    save()
    tmp.cleanup()
    return 0


def stage_child(stage: str, limit: float) -> dict:
    """Run stage ``bench`` or ``models`` in a child process that stops starting cases 5 s before
    the limit; the parent kills it at the limit. Its rows come back through OUT/<stage>.json."""
    out_path = OUT / f"{stage}.json"
    out_path.unlink(missing_ok=True)
    deadline = time.time() + limit - 5
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--deadline", f"{deadline:.1f}"]
    cmd += ["--t0", f"{T0:.3f}", "--out", str(out_path)]
    log(f"{stage}: child process (limit {limit:.0f} s)")
    result = run_logged(cmd, child_env(), None, limit, echo=True)
    result.pop("tail")
    result["rows"] = json.loads(out_path.read_text()) if out_path.exists() else []
    errors = [r for r in result["rows"] if "error" in r]
    crashed = result["rc"] != 0 and not result["timed_out"]
    result["status"] = "error" if errors or crashed else ("partial" if result["timed_out"] else "ok")
    if crashed:
        result["error"] = f"child exited with {result['rc']} (its output is above)"
    elif errors:
        result["error"] = f"{len(errors)} case(s) raised (see the table)"
    elif result["timed_out"]:
        result["error"] = "killed at the stage's limit; the cases it finished are kept"
    log(f"{stage} {result['status']} in {result['seconds']} s ({len(errors)} case errors)")
    return result


# --- report ----------------------------------------------------------------------------------------


def write_report(facts: dict, stages: dict, exit_code: int) -> None:
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - T0, 1),
        "budget_s": BUDGET_S,
        "exit_code": exit_code,
        **{k: v for k, v in facts.items() if k != "missing_test_files"},
    }
    (OUT / "results.json").write_text(json.dumps({"meta": meta, "stages": stages}, indent=1, default=str))

    md = [
        "# red_kernels GPU check",
        "",
        f"{meta['date']}, {facts.get('gpu')} (sm {facts.get('capability')}, {facts.get('gpu_memory_gib')} GiB), "
        f"torch {facts.get('torch')} (CUDA {facts.get('torch_cuda')}), triton {facts.get('triton')}, "
        f"transformers {facts.get('transformers')}, peft {facts.get('peft')}, nvcc {facts.get('nvcc_version')}, "
        f"python {facts.get('python')}, {facts.get('cores')} cores. Total {meta['seconds']} s of a "
        f"{BUDGET_S:.0f} s budget; exit code {exit_code}.",
        "",
        "| stage | status | seconds | notes |",
        "|---|---|---:|---|",
    ]
    for name, st in stages.items():
        note = st.get("error") or st.get("skipped") or ""
        if name == "tests" and "counts" in st:
            note = ", ".join(f"{v} {k}" for k, v in st["counts"].items()) + (
                " (timed out)" if st.get("timed_out") else ""
            )
        md.append(f"| {name} | {st.get('status')} | {st.get('seconds', '')} | {note} |")
    failures = stages.get("tests", {}).get("failures") or []
    if failures:
        md += ["", "Failed tests:", "", *[f"- `{f[:300]}`" for f in failures]]

    bench = stages.get("bench", {}).get("rows") or []
    if bench:
        md += [
            "",
            "## Ops (medians; bytes = minimum traffic; % of copy = a device-to-device copy of the same bytes)",
            "",
            "| op, case | mode | variant | ms | GB/s | % of copy | vs eager | max rel err vs eager |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in bench:
            if "ms" in r:
                err, vs = r.get("max_rel_err_vs_eager"), r.get("vs_eager")
                err, vs = "-" if err is None else f"{err:.1e}", "-" if vs is None else f"{vs}x"
                md.append(
                    f"| {r['case']} | {r['mode']} | {r['variant']} | {r['ms']:.4f} | {r['gb_s']:.0f} | "
                    f"{r['pct_of_copy']:.0f}% | {vs} | {err} |"
                )
            else:
                why = r.get("error") or r.get("skipped", "")
                md.append(
                    f"| {r['case']} | {r.get('mode', '-')} | {r.get('variant', '-')} | - | - | - | - | {why[:120]} |"
                )
    models = stages.get("models", {}).get("rows") or []
    if models:
        md += [
            "",
            f"## Models (random LLaMA {LLAMA['hidden_size']}x{LLAMA['num_hidden_layers']}, bf16; decode: batch "
            f"{DECODE_BATCH}, prompt {PROMPT}, {NEW_TOKENS} greedy tokens; train: forward+backward, batch "
            f"{TRAIN_BATCH} x {TRAIN_SEQ} tokens; medians)",
            "",
            "| workload | variant | ms | tokens/s | vs base | peak GiB | notes |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for r in models:
            if "ms" in r:
                md.append(
                    f"| {r['workload']} | {r['variant']} | {r['ms']:.1f} | {r['tokens_s']} | {r.get('vs_base', '-')} | "
                    f"{r.get('peak_gib', '-')} | setup {r.get('setup_s')} s |"
                )
            else:
                why = (r.get("error") or r.get("skipped", ""))[:200]
                md.append(f"| {r['workload']} | {r['variant']} | - | - | - | - | {why} |")
    (OUT / "results.md").write_text("\n".join(md) + "\n")


# --- main ------------------------------------------------------------------------------------------


def dry_run(facts: dict, fatal: list[str], gpu_fatal: list[str]) -> int:
    print("gpu-check dry run: nothing is built, run or timed.\n")
    print("environment:")
    for key in ["python", "executable", "cores", "torch", "torch_cuda", "triton", "transformers", "setuptools"]:
        print(f"  {key:<16} {facts.get(key)}")
    for key in ["peft", "pytest", "pytest-timeout", "pytest-xdist", "ninja"]:
        print(f"  {key:<16} {facts.get(key) or 'missing (optional: see the stage that uses it)'}")
    print(f"  {'nvcc':<16} {facts.get('nvcc') or 'missing'} {facts.get('nvcc_version', '')}")
    gpu = facts.get("gpu")
    print(f"  {'CUDA device':<16} {gpu + ' (sm ' + facts['capability'] + ')' if gpu else 'missing'}")
    for problem in gpu_fatal:
        print(f"  missing for a real run (not fatal in a dry run): {problem}")
    for problem in fatal:
        print(f"  MISSING (the real run would stop): {problem}")
    for f in facts["missing_test_files"]:
        print(f"  note: python_tests/{f} is not there; the tests stage runs without it")

    print(f"\nbudget: {BUDGET_S:.0f} s in all (GPU_CHECK_BUDGET_S); results in {OUT}/ (OUT)")
    for name, nominal, minimum in STAGES:
        print(f"  stage {name:<7} up to {nominal} s (skipped if fewer than {minimum} s are left for it)")

    cmd, env = build_plan(facts)
    print(f"\nstage build: {shell(cmd, env)}")
    print(f"  then: {sys.executable} -c '{BACKENDS_PROBE}'  (the cuda backend must be available)")

    cmd, env, files = test_plan(facts)
    print(f"\nstage tests: {shell(cmd, env)}")
    op_files = [f for f in files if Path(f).name in OP_TEST_FILES]
    print(f"  every test of {', '.join(Path(f).name for f in op_files)}")
    print(f"  gpu-marked tests only of {', '.join(Path(f).name for f in files if f not in op_files) or '-'}")

    print(f"\nstage bench: {len(BENCH_CASES)} cases x {MODES}; timed with triton.testing.do_bench (median),")
    print("  bytes moved, GB/s and % of a device-to-device copy (torch.empty_like + copy_) of the same bytes")
    for op, params, dt in BENCH_CASES:
        print(f"  {op} {case_name(op, params, dt)}: {', '.join(variants_for(op))}")
    print(f"  ops: {', '.join(OPS)}")
    baselines_ok = bench_import_ok()

    print(
        f"\nstage models: random LLaMA {LLAMA}, bf16; decode batch {DECODE_BATCH}, prompt {PROMPT}, "
        f"{NEW_TOKENS} greedy tokens; train step batch {TRAIN_BATCH} x {TRAIN_SEQ}"
    )
    for workload, variant in MODEL_CASES:
        print(f"  {workload} {variant}")
    if not facts.get("peft"):
        print("  (peft is not installed: the PEFT LoRA case would be skipped)")
    return 1 if fatal or not baselines_ok else 0


BENCH_IMPORT_PROBE = "import red_kernels.bench.ops"


def bench_import_ok() -> bool:
    """Whether the bench child can import its eager baselines (red_kernels.bench.ops) with what
    this Python has; printed by the dry run, which fails without them."""
    cmd = [sys.executable, "-c", BENCH_IMPORT_PROBE]
    try:
        proc = subprocess.run(cmd, env=child_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
        problem = (proc.stderr.strip().splitlines() or ["?"])[-1] if proc.returncode else None
    except (OSError, subprocess.SubprocessError) as exc:
        problem = str(exc)
    status = f"MISSING (the bench stage would fail): {problem}" if problem else "ok"
    print(f"  eager baselines ({BENCH_IMPORT_PROBE}): {status}")
    return problem is None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["bench", "models"], help="internal: run one timed stage")
    parser.add_argument("--deadline", type=float, help="internal: epoch seconds to stop starting cases")
    parser.add_argument("--t0", type=float, help="internal: the parent's start, for the log's timestamps")
    parser.add_argument("--out", type=Path, help="internal: the JSON file the stage writes its rows to")
    args = parser.parse_args()
    if args.stage:
        global T0
        T0 = args.t0 or T0
        sys.path.insert(0, str(ROOT))
        main_fn = bench_main if args.stage == "bench" else models_main
        return main_fn(args.deadline or time.time() + 60, args.out or OUT / f"{args.stage}.json")

    facts, fatal, gpu_fatal = check_environment()
    if os.environ.get("GPU_CHECK_DRY_RUN", "0") not in ("", "0"):
        return dry_run(facts, fatal, gpu_fatal)

    OUT.mkdir(parents=True, exist_ok=True)
    log(f"gpu-check: {facts.get('gpu')}, torch {facts.get('torch')}, budget {BUDGET_S:.0f} s, results in {OUT}")
    stages: dict[str, dict] = {}
    if fatal or gpu_fatal:
        for problem in fatal + gpu_fatal:
            log(f"cannot run: {problem}")
        stages["environment"] = {"status": "failed", "error": "; ".join(fatal + gpu_fatal)}
        write_report(facts, stages, 2)
        return 2

    runners = {
        "build": lambda limit: stage_build(facts, limit),
        "tests": lambda limit: stage_tests(facts, limit),
        "bench": lambda limit: stage_child("bench", limit),
        "models": lambda limit: stage_child("models", limit),
    }
    for name, _, _ in STAGES:
        limit, minimum = stage_limit(name)
        if limit < minimum:
            log(f"{name}: skipped, {left_s():.0f} s left")
            stages[name] = {"status": "skipped", "skipped": f"deadline ({left_s():.0f} s left)"}
            continue
        try:
            stages[name] = runners[name](limit)
        except Exception as exc:
            log(f"{name}: ERROR {type(exc).__name__}: {exc}")
            stages[name] = {"status": "failed" if name in ("build", "tests") else "error", "error": repr(exc)}

    gate_failed = any(stages[s].get("status") != "ok" for s in ("build", "tests"))
    other_failed = any(stages[s].get("status") == "error" for s in ("bench", "models"))
    exit_code = 1 if gate_failed else 3 if other_failed else 0
    write_report(facts, stages, exit_code)
    print((OUT / "results.md").read_text(), flush=True)
    log(f"done: exit {exit_code}; {OUT / 'results.md'}, {OUT / 'results.json'}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
