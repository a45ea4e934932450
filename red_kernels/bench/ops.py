"""The op microbenchmarks: each op against eager PyTorch, ``torch.compile`` of that eager code, every
backend that runs natively on the device, and a memory-bandwidth floor.

Every case here is the one definition: ``python -m red_kernels bench`` runs them, and the
pytest-benchmark files of a source checkout (``benchmarks/bench_<op>.py``) are thin wrappers over
:func:`op_cases`.

Variants (names as they appear in tables and JSON):

  eager          the op written in eager PyTorch the way the official RED / PARA code and PEFT
                 write it (the baseline of the "vs eager" ratio)
  torch.compile  ``torch.compile(eager, dynamic=False)``; compiled in the first warm-up round
  floor          a copy of the bytes the op must move (``h.clone()`` for a forward; two clones,
                 the output and the input gradient, for forward+backward)
  rk-<backend>   the red_kernels op on that backend (``reference`` = the package's eager code)

Modes: ``fwd`` is the forward with autograd recording (as in training), ``fwd+bwd`` adds the
backward of a fixed output gradient (gradients cleared, untimed, before each timing); ``decode`` cases
are one KV-cached step of 8 sequences, microseconds of work, so they time many calls per round and
measure per-call overhead (``inference`` under ``torch.inference_mode`` as in serving).

Multi-tenant cases have their own baseline: ``eager`` of gathered_red_edit is the per-tenant loop
PEFT uses for mixed batches (``eager-gather`` is the vectorised eager alternative, compiled as
``torch.compile``; ``red_edit-<b>`` is single-tenant red_edit on the same tensor, the cost to
match); gathered_para_vector_gen compares against that ``loop``, ``loop-compile`` and
``single-tenant`` (one generator on the same batch).

Shapes: LLaMA-2-7B widths (d 4096, d_ffn 11008, 8 x 512 tokens); ``quick=True`` shrinks every
case to a fraction of a millisecond.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import red_kernels as rk
from red_kernels._backend import triton_interpreting
from red_kernels.bench.timing import Case, Variant

OPS = ("red_edit", "seq_scale", "gathered_red_edit", "para_vector_gen", "gathered_para_vector_gen")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd+bwd")
ROUNDS, QUICK_ROUNDS = 15, 5
DECODE_ITERATIONS, QUICK_DECODE_ITERATIONS = 200, 50


def native_backends(device: torch.device) -> list[str]:
    """Backends that run natively on ``device``. The Triton interpreter (``TRITON_INTERPRET=1``) is
    left out: it times Python, not a kernel."""
    return [
        b.name
        for b in rk.backends()
        if b.available and device.type in b.devices and not (b.name == "triton" and triton_interpreting())
    ]


def compiled(fn: Callable) -> Callable:
    """``torch.compile`` of the eager code; it compiles on its first call (a warm-up round)."""
    import torch._dynamo

    # One eager function meets every shape, dtype and mode of its op, each a recompilation with
    # dynamic=False; past the default limit (8) dynamo silently runs eager and the "torch.compile"
    # row would time eager code.
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
    return torch.compile(fn, dynamic=False)


# --- eager baselines -----------------------------------------------------------------------------------


def eager_red_edit(h: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    # The official RED code; the vectors cast to h's dtype so the output dtype matches.
    return h * scale.to(h.dtype) + bias.to(h.dtype)


def eager_seq_scale(x: Tensor, vec: Tensor) -> Tensor:
    # The PARA code; the vectors cast to x's dtype so the output dtype matches.
    return x * vec.to(x.dtype)[:, None, :]


def eager_gathered_red_edit_loop(h: Tensor, scales: Tensor, biases: Tensor, ids: Tensor) -> Tensor:
    # PEFT's mixed-batch pattern: one sub-batch per tenant, unedited rows (-1) left as they are.
    out = h.clone()
    for t in torch.unique(ids[ids >= 0]).tolist():
        rows = (ids == t).nonzero().squeeze(1)
        out[rows] = h[rows] * scales[t].to(h.dtype) + biases[t].to(h.dtype)
    return out


def eager_gathered_red_edit(h: Tensor, scales: Tensor, biases: Tensor, ids: Tensor) -> Tensor:
    # The vectorised eager alternative (every row edited here, so no masking).
    return h * scales[ids][:, None].to(h.dtype) + biases[ids][:, None].to(h.dtype)


def eager_para_vector_gen(h: Tensor, pool_index: Tensor, w_down: Tensor, w_up: Tensor, b_up: Tensor) -> Tensor:
    # The PARA code: pool the last prompt token, Linear -> GELU -> Linear.
    pooled = h[torch.arange(h.shape[0], device=h.device), pool_index]
    return F.gelu(pooled @ w_down) @ w_up + b_up


def eager_gathered_para_loop(
    h: Tensor, pool_index: Tensor, w_down: Tensor, w_up: Tensor, b_up: Tensor, tenant_ids: Tensor
) -> Tensor:
    # PEFT-style: split the batch by adapter, run each adapter on its sub-batch, scatter back.
    out = torch.ones(h.shape[0], w_up.shape[-1], dtype=w_up.dtype, device=h.device)
    for k in tenant_ids.unique().tolist():
        if k < 0:
            continue
        rows = (tenant_ids == k).nonzero().squeeze(1)
        pooled = h[rows, pool_index[rows]]
        out = out.index_put((rows,), F.gelu(pooled @ w_down[k]) @ w_up[k] + b_up[k])
    return out


# --- helpers -------------------------------------------------------------------------------------------


def _randn(gen: torch.Generator, shape, device, dtype=torch.float32, scale=1.0, shift=0.0, grad=False) -> Tensor:
    t = (shift + scale * torch.randn(shape, generator=gen)).to(device, dtype)
    return t.requires_grad_(grad)


def _dims(shape) -> str:
    return "x".join(map(str, shape))


def _backend_fns(op: Callable, backends: list[str], prefix: str = "rk-") -> dict[str, Callable]:
    return {f"{prefix}{b}": functools.partial(op, backend=b) for b in backends}


def _timed(fns: dict[str, Callable], inputs: tuple, mode: str, grad: Tensor | None = None) -> dict[str, Variant]:
    """Each fn on ``inputs``: the forward alone, or forward + backward of ``grad`` with every leaf's
    gradient cleared (untimed) before each timing."""
    if mode == "fwd":
        return {name: Variant(functools.partial(fn, *inputs)) for name, fn in fns.items()}
    leaves = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]

    def clear() -> None:
        for t in leaves:
            t.grad = None

    return {name: Variant(lambda fn=fn: fn(*inputs).backward(grad), setup=clear) for name, fn in fns.items()}


def _copy_floor(mode: str, x: Tensor, grad: Tensor) -> Variant:
    # The op writes y (and for the backward also grad_x): copies of those bytes.
    if mode == "fwd":
        return Variant(lambda: x.detach().clone())
    return Variant(lambda: (x.detach().clone(), grad.clone()))


def _inference(fn: Callable[[], object]) -> Callable[[], object]:
    def call():
        with torch.inference_mode():
            return fn()

    return call


def _op_case(group: str, variants: list[str], build: Callable[[], dict[str, Variant]], quick: bool, **options) -> Case:
    """An op case: against ``eager``, ``torch.compile`` and the ``floor`` unless ``options`` say
    otherwise; fewer rounds and one warm-up round when ``quick``."""
    budget = {"rounds": QUICK_ROUNDS, "warmup": 1} if quick else {"rounds": ROUNDS, "warmup": 2}
    defaults = {"baseline": "eager", "compiled": "torch.compile", "floor": "floor", **budget}
    return Case(group=group, kind="op", variants=tuple(variants), build=build, **{**defaults, **options})


def _decode_case(group: str, variants: list[str], build: Callable[[], dict[str, Variant]], quick: bool) -> Case:
    """A decode-step case: microseconds per call, so each timing is many calls."""
    iterations = QUICK_DECODE_ITERATIONS if quick else DECODE_ITERATIONS
    return _op_case(group, variants, build, quick, iterations=iterations)


def _decode_variants(fns: dict[str, Callable], inputs: tuple, x: Tensor, mode: str) -> dict[str, Variant]:
    """One KV-cached decode step: each fn's forward on ``inputs`` and the floor (a copy of the
    activations ``x``); under ``torch.inference_mode`` when ``mode`` is ``"inference"`` (serving),
    with autograd recording when it is ``"autograd"``."""
    x = x.detach()  # once, here: the floor times the copy alone
    variants = {**_timed(fns, inputs, "fwd"), "floor": Variant(lambda: x.clone())}
    if mode == "inference":
        variants = {name: Variant(_inference(v.fn)) for name, v in variants.items()}
    return variants


# --- red_edit ------------------------------------------------------------------------------------------


def red_edit_cases(device: torch.device, quick: bool = False) -> list[Case]:
    """h [..., d] * scale [d] + bias [d]: (4096, 4096) fp32 and (8, 512, 4096) bf16 with fp32 vectors,
    fwd and fwd+bwd; a decode step h [8, 1, 4096] bf16, with autograd and under inference_mode."""
    backends = native_backends(device)
    names = ["eager", "torch.compile", "floor", *(f"rk-{b}" for b in backends)]
    shapes = [((256, 1024), "fp32")] if quick else [((4096, 4096), "fp32"), ((8, 512, 4096), "bf16")]
    decode_d, decode_modes = (1024, ["inference"]) if quick else (4096, ["inference", "autograd"])

    def inputs(shape, dt, grad=True):
        g = torch.Generator().manual_seed(0)
        d = shape[-1]
        h = _randn(g, shape, device, DTYPES[dt], grad=grad)
        scale, bias = _randn(g, d, device, grad=grad), _randn(g, d, device, grad=grad)
        return h, scale, bias, _randn(g, shape, device, DTYPES[dt])

    def fns():
        return {
            "eager": eager_red_edit,
            "torch.compile": compiled(eager_red_edit),
            **_backend_fns(rk.red_edit, backends),
        }

    def build(shape, dt, mode):
        h, scale, bias, grad = inputs(shape, dt)
        return {**_timed(fns(), (h, scale, bias), mode, grad), "floor": _copy_floor(mode, h, grad)}

    def build_decode(mode):
        h, scale, bias, _ = inputs((8, 1, decode_d), "bf16", grad=mode == "autograd")
        return _decode_variants(fns(), (h, scale, bias), h, mode)

    cases = [
        _op_case(
            f"red_edit {_dims(shape)}-{dt} {mode}",
            names,
            functools.partial(build, shape, dt, mode),
            quick,
        )
        for shape, dt in shapes
        for mode in MODES
    ]
    cases += [
        _decode_case(f"red_edit decode 8x1x{decode_d} bf16 {mode}", names, functools.partial(build_decode, mode), quick)
        for mode in decode_modes
    ]
    return cases


# --- seq_scale -----------------------------------------------------------------------------------------


def seq_scale_cases(device: torch.device, quick: bool = False) -> list[Case]:
    """x [B, T, n] * vec [B, None, n]: B 8, T 512, n 4096 and 11008 (query/value width and d_ffn of a
    7B model), fp32 and bf16 with fp32 vectors, fwd and fwd+bwd; a decode step x [8, 1, n] bf16
    under inference_mode."""
    backends = native_backends(device)
    names = ["eager", "torch.compile", "floor", *(f"rk-{b}" for b in backends)]
    if quick:
        shapes, decode_widths = [((2, 64, 1024), "bf16")], []
    else:
        shapes = [((8, 512, n), dt) for n in (4096, 11008) for dt in DTYPES]
        decode_widths = [4096, 11008]

    def fns():
        return {
            "eager": eager_seq_scale,
            "torch.compile": compiled(eager_seq_scale),
            **_backend_fns(rk.seq_scale, backends),
        }

    def build(shape, dt, mode):
        g = torch.Generator().manual_seed(0)
        x = _randn(g, shape, device, DTYPES[dt], grad=True)
        vec = _randn(g, (shape[0], shape[2]), device, grad=True)
        grad = _randn(g, shape, device, DTYPES[dt])
        return {**_timed(fns(), (x, vec), mode, grad), "floor": _copy_floor(mode, x, grad)}

    def build_decode(n):
        g = torch.Generator().manual_seed(0)
        x, vec = _randn(g, (8, 1, n), device, torch.bfloat16), _randn(g, (8, n), device)
        return _decode_variants(fns(), (x, vec), x, "inference")

    cases = [
        _op_case(f"seq_scale {_dims(shape)}-{dt} {mode}", names, functools.partial(build, shape, dt, mode), quick)
        for shape, dt in shapes
        for mode in MODES
    ]
    cases += [
        _decode_case(f"seq_scale decode 8x1x{n} bf16", names, functools.partial(build_decode, n), quick)
        for n in decode_widths
    ]
    return cases


# --- gathered_red_edit ---------------------------------------------------------------------------------


def gathered_red_edit_cases(device: torch.device, quick: bool = False) -> list[Case]:
    """Multi-tenant RED: 16 tenants, h [16, 512, 4096], one tenant per sequence (shuffled), fp32 and
    bf16 activations with fp32 [16, 4096] tables, fwd and fwd+bwd. Baseline ``eager`` is PEFT's
    per-tenant loop; ``red_edit-<b>`` is single-tenant red_edit on the same tensor."""
    backends = native_backends(device)
    names = [
        "eager",
        "eager-gather",
        "torch.compile",
        "floor",
        *(f"red_edit-{b}" for b in backends),
        *(f"rk-{b}" for b in backends),
    ]
    tenants, shape = (4, (4, 64, 1024)) if quick else (16, (16, 512, 4096))
    dtypes = ["fp32"] if quick else list(DTYPES)

    def single_tenant(h, scales, biases, ids, backend):
        # The single-tenant cost on the same tensor: every row edited with tenant 0's vectors.
        return rk.red_edit(h, scales[0], biases[0], backend=backend)

    def build(dt, mode):
        g = torch.Generator().manual_seed(0)
        h = _randn(g, shape, device, DTYPES[dt], grad=True)
        scales = _randn(g, (tenants, shape[-1]), device, scale=0.1, shift=1.0, grad=True)
        biases = _randn(g, (tenants, shape[-1]), device, scale=0.1, grad=True)
        ids = torch.randperm(shape[0], generator=g).remainder(tenants).to(device)
        grad = _randn(g, shape, device, DTYPES[dt])
        fns = {
            "eager": eager_gathered_red_edit_loop,
            "eager-gather": eager_gathered_red_edit,
            "torch.compile": compiled(eager_gathered_red_edit),
            **{f"red_edit-{b}": functools.partial(single_tenant, backend=b) for b in backends},
            **_backend_fns(rk.gathered_red_edit, backends),
        }
        return {**_timed(fns, (h, scales, biases, ids), mode, grad), "floor": _copy_floor(mode, h, grad)}

    return [
        _op_case(
            f"gathered_red_edit K{tenants} {_dims(shape)}-{dt} {mode}",
            names,
            functools.partial(build, dt, mode),
            quick,
        )
        for dt in dtypes
        for mode in MODES
    ]


# --- para_vector_gen -----------------------------------------------------------------------------------


def _para_sizes(quick: bool) -> tuple[int, int, int, int, int]:
    """B, T, d, r, n_out: LLaMA-2-7B (n_out = l_q + l_v + l_u = 2 * 4096 + 11008), or a small one."""
    return (2, 64, 256, 12, 2 * 256 + 688) if quick else (8, 512, 4096, 12, 2 * 4096 + 11008)


def para_vector_gen_cases(device: torch.device, quick: bool = False) -> list[Case]:
    """PARA's vector generator: pool the last prompt token of h [B, T, d], GELU(x @ W_down [d, r]) @
    W_up [r, n_out] + b_up. fp32 and bf16 (h and weights in one dtype, a model cast wholesale),
    fwd and fwd+bwd with h requiring grad (the residual stream). Floors: the forward reads B rows of
    h and W_up; forward+backward must write a dense grad_h, so its floor is ``zeros_like(h)``."""
    backends = native_backends(device)
    names = ["eager", "torch.compile", "floor", *(f"rk-{b}" for b in backends)]
    b, t, d, r, n = _para_sizes(quick)
    dtypes = ["fp32"] if quick else list(DTYPES)

    def build(dt, mode):
        g = torch.Generator().manual_seed(0)
        dtype = DTYPES[dt]
        h = _randn(g, (b, t, d), device, dtype, grad=True)
        pool = torch.randint(0, t, (b,), generator=g).to(device)
        w_down = _randn(g, (d, r), device, dtype, scale=0.02, grad=True)
        w_up = _randn(g, (r, n), device, dtype, scale=0.02, grad=True)
        b_up = torch.ones(n, device=device, dtype=dtype, requires_grad=True)
        grad = _randn(g, (b, n), device, dtype)
        fns = {
            "eager": eager_para_vector_gen,
            "torch.compile": compiled(eager_para_vector_gen),
            **_backend_fns(rk.para_vector_gen, backends),
        }
        rows = torch.arange(b, device=device)
        if mode == "fwd":  # the bytes the op must read: B pooled rows and the weights
            floor = Variant(lambda: (h.detach()[rows, pool].clone(), w_up.detach().clone()))
        else:
            floor = Variant(lambda: torch.zeros_like(h))
        return {**_timed(fns, (h, pool, w_down, w_up, b_up), mode, grad), "floor": floor}

    return [
        _op_case(
            f"para_vector_gen B{b} T{t} d{d} r{r} n{n} {dt} {mode}",
            names,
            functools.partial(build, dt, mode),
            quick,
        )
        for dt in dtypes
        for mode in MODES
    ]


def gathered_para_vector_gen_cases(device: torch.device, quick: bool = False) -> list[Case]:
    """Multi-tenant PARA: 16 tenants' generators, B 16 (one sequence per tenant, shuffled), T 512,
    d 4096, r 12, n_out 19200; fp32 and bf16; fwd (serving: vectors made once at prefill) and
    fwd+bwd (mixed-tenant training). Baseline: the per-tenant ``loop``; no floor."""
    backends = native_backends(device)
    names = ["loop", "loop-compile", "single-tenant", *(f"rk-{b}" for b in backends)]
    _, t, d, r, n = _para_sizes(quick)
    k = 4 if quick else 16
    b = k  # one sequence per tenant
    dtypes = ["fp32"] if quick else list(DTYPES)

    def single_tenant(h, pool, w_down, w_up, b_up, ids):
        # What one generator costs on the same batch.
        return rk.para_vector_gen(h, pool, w_down[0], w_up[0], b_up[0])

    def build(dt, mode):
        g = torch.Generator().manual_seed(0)
        dtype = DTYPES[dt]
        h = _randn(g, (b, t, d), device, dtype, grad=True)
        pool = torch.randint(0, t, (b,), generator=g).to(device)
        w_down = _randn(g, (k, d, r), device, dtype, scale=0.02, grad=True)
        w_up = _randn(g, (k, r, n), device, dtype, scale=0.02, grad=True)
        b_up = torch.ones(k, n, device=device, dtype=dtype, requires_grad=True)
        ids = torch.randperm(k, generator=g).to(device)
        grad = _randn(g, (b, n), device, dtype)
        fns = {
            "loop": eager_gathered_para_loop,
            "loop-compile": compiled(eager_gathered_para_loop),
            "single-tenant": single_tenant,
            **_backend_fns(rk.gathered_para_vector_gen, backends),
        }
        return _timed(fns, (h, pool, w_down, w_up, b_up, ids), mode, grad)

    return [
        _op_case(
            f"gathered_para_vector_gen K{k} B{b} T{t} d{d} r{r} {dt} {mode}",
            names,
            functools.partial(build, dt, mode),
            quick,
            baseline="loop",
            compiled="loop-compile",
            floor=None,
        )
        for dt in dtypes
        for mode in MODES
    ]


_CASES = {
    "red_edit": red_edit_cases,
    "seq_scale": seq_scale_cases,
    "gathered_red_edit": gathered_red_edit_cases,
    "para_vector_gen": para_vector_gen_cases,
    "gathered_para_vector_gen": gathered_para_vector_gen_cases,
}


def op_cases(op: str, device: torch.device, quick: bool = False) -> list[Case]:
    """The benchmark cases of one op (nothing is allocated until a case's ``build()``)."""
    return _CASES[op](device, quick)


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    """The benchmark cases of every op."""
    return [case for op in OPS for case in op_cases(op, device, quick)]
